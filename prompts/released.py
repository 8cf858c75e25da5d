"""How a prompt learner's released checkpoints name its tensors: a learner declares its layout, the
converter (``vlm.runtime.released``: ``vlm import``, ``vlm export --format dassl``) reads it.

Prompt-learning repositories built on Dassl save prompts as ``model.pth.tar-N`` (the state dict of
the registered model, either the prompt learner itself or the whole CLIP wrapper with its frozen
weights). A learner whose official code publishes such checkpoints sets ``released_layout`` to a
:class:`DasslLayout` in its own file: the Dassl model name, one :class:`Rule` per released tensor,
the prefixes of the frozen weights saved beside them, and how to read the learner's settings from a
checkpoint (for error messages that give the config to use). Adding a method's released format is
then an edit of that method's file only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

_FIELD = re.compile(r"\{(\d+|row)\}")


def _pattern(template: str) -> re.Pattern[str]:
    """``template`` with ``{0}``, ``{1}``, ... as name parts (letters, digits, ``_``) and ``{row}`` as
    a block index (digits), anchored."""
    out, last = [], 0
    for m in _FIELD.finditer(template):
        out.append(re.escape(template[last : m.start()]))
        out.append(r"(\d+)" if m.group(1) == "row" else r"(\w+)")
        last = m.end()
    out.append(re.escape(template[last:]))
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class Rule:
    """One released tensor (``official``) and ours (``ours``), as name templates.

    A plain rule renames: ``{0}``, ``{1}``, ... stand for the same name parts on both sides
    (``proj.{0}`` for ``proj.weight`` and ``proj.bias``). A row rule (``row_offset`` set) maps
    the released per-block tensors ``official`` (with a ``{row}`` field, the block index) to the
    rows of our stacked tensor ``ours``: released block ``row + row_offset`` is our row ``row``.
    """

    official: str
    ours: str
    row_offset: Optional[int] = None

    def match(self, key: str) -> Optional[tuple[str, Optional[int]]]:
        """(our name, row or None) for a released ``key`` this rule covers, else None."""
        m = _pattern(self.official).match(key)
        if m is None:
            return None
        if self.row_offset is None:
            return self.ours.format(*m.groups()), None
        return self.ours, int(m.group(1)) - self.row_offset

    def released(self, ours: str, value: Any) -> Optional[dict[str, Any]]:
        """The released tensors of our tensor ``ours`` (``value``) if this rule covers it, else None."""
        if self.row_offset is not None:
            if ours != self.ours:
                return None
            return {self.official.format(row=i + self.row_offset): value[i].clone() for i in range(value.shape[0])}
        m = _pattern(self.ours).match(ours)
        return None if m is None else {self.official.format(*m.groups()): value}


@dataclass(frozen=True)
class DasslLayout:
    """A learner's released Dassl checkpoint.

    ``model_name``: the name Dassl registers the model under (the sub-folder of ``--model-dir``
    that the official ``load_model`` reads); ``rules``: every released prompt tensor;
    ``frozen``: prefixes of the frozen weights the official code saves with them (skipped when
    reading, not written back); ``settings``: the learner's ``init_args`` read from a released state
    dict (for errors: which config fits the file); ``also``: other repositories that publish this
    layout (said in messages).
    """

    model_name: str
    rules: tuple[Rule, ...]
    settings: Callable[[dict[str, Any]], dict[str, Any]]
    frozen: tuple[str, ...] = ()
    also: tuple[str, ...] = field(default_factory=tuple)

    def match(self, key: str) -> Optional[tuple[str, Optional[int]]]:
        """(our name, row or None) of a released ``key``, or None if no rule covers it."""
        for rule in self.rules:
            found = rule.match(key)
            if found is not None:
                return found
        return None

    def is_frozen(self, key: str) -> bool:
        return key.startswith(self.frozen)

    def released(self, ours: str, value: Any) -> Optional[dict[str, Any]]:
        """Our tensor ``ours`` as released tensors, or None if no rule covers it."""
        for rule in self.rules:
            out = rule.released(ours, value)
            if out is not None:
                return out
        return None
