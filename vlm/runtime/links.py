"""What a model takes from its datamodule, linked once in the CLI so there is one source of truth.

``vlm fit|test`` link, at instantiation, ``data.<attr>`` to ``model.init_args.<attr>`` for every
attribute in :data:`DATA_LINKS` (jsonargparse ``link_arguments(apply_on="instantiate")``). A link
is skipped when the datamodule has no such attribute or the model class no such argument, so one
set of links serves CLIPClassifier (template, classnames, test_classnames), ViTClassifier
(num_classes), EpisodicClassifier (template), ContrastiveCLIP (classnames) and LlavaEval (none).

A config that also sets a linked model argument to another value than the data's would be silently
overridden by the link; :func:`check_linked_values` makes that an error that names both values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlm.datamodules.protocols import SizedImages
from vlm.protocols import ImageBackbone

#: datamodule attribute -> the model argument of the same name that it fills.
DATA_LINKS: tuple[str, ...] = ("template", "num_classes", "classnames", "test_classnames")

_WHERE = {
    "template": "Set the template in the data config (data.init_args.template) and remove model.init_args.template",
    "num_classes": "Remove model.init_args.num_classes: the head gets the data's class count",
    "classnames": "Remove model.init_args.classnames: the classes come from the data's split files",
    "test_classnames": "Remove model.init_args.test_classnames: the test classes come from the data's test_subsets",
}


class LinkedValueError(ValueError):
    """A config sets a model argument that the CLI links from the data to a different value."""


def add_data_links(parser: Any) -> None:
    """Link ``data.<attr>`` -> ``model.init_args.<attr>`` for each of :data:`DATA_LINKS`."""
    for attr in DATA_LINKS:
        parser.link_arguments(f"data.{attr}", f"model.init_args.{attr}", apply_on="instantiate")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_linked_values(model_init_args: Any, datamodule: Any) -> None:
    """Raise :class:`LinkedValueError` if the parsed config gives a linked model argument a value
    (not ``None``) that differs from the datamodule's, which the link would silently replace."""
    if model_init_args is None or datamodule is None:
        return
    args = model_init_args.as_dict() if hasattr(model_init_args, "as_dict") else dict(model_init_args)
    for attr in DATA_LINKS:
        given = args.get(attr)
        if given is None or not hasattr(datamodule, attr):
            continue
        data_value = getattr(datamodule, attr)
        if _plain(given) != _plain(data_value):
            shown = repr(data_value) if len(repr(data_value)) < 200 else repr(data_value)[:200] + " ..."
            raise LinkedValueError(
                f"model.init_args.{attr} is {given!r}, but the data ({type(datamodule).__name__}) gives {shown}. "
                f"The model takes {attr} from the data config (linked from data.{attr}). {_WHERE[attr]}."
            )


def image_size_of(backbone: Any) -> int | None:
    """The square input size an :class:`~vlm.protocols.ImageBackbone` requires, or ``None`` if it
    accepts any size (or is not an image backbone, e.g. a LLaVA model with its own processor)."""
    return backbone.image_size if isinstance(backbone, ImageBackbone) else None


def check_image_size(backbone: Any, datamodule: Any) -> None:
    """Raise a ``ValueError`` naming both sizes and the keys to set when the data's images are not
    the size the backbone takes (instead of a tensor-shape error deep in the image tower)."""
    data_size = datamodule.transforms.image_size if isinstance(datamodule, SizedImages) else None
    model_size = image_size_of(backbone)
    if data_size is None or model_size is None or not isinstance(data_size, int) or data_size == model_size:
        return
    name = backbone.identity().get("model_name") or type(backbone).__name__
    raise ValueError(
        f"The data gives {data_size} px images (data.init_args.transforms.image_size={data_size}), but the backbone "
        f"{name!r} takes {model_size} px (model.init_args.backbone). Set --data.init_args.transforms.image_size {model_size}, "
        f"or use a backbone built for {data_size} px."
    )
