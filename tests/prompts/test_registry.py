"""The prompt registry: short names, a helpful unknown-name error, and jsonargparse ``class_path: coop``.

``check_registry`` and ``check_jsonargparse_resolves`` are the suites for one registered name; they
run over every learner the package's files register (no list here for a new learner to join).
"""

from __future__ import annotations

import pytest
from jsonargparse import ArgumentParser

import vlm.prompts
from tests.registries import registered_in_files
from vlm.prompts import PromptLearner
from vlm.prompts.coop import CoOp
from vlm.prompts.vpt import VPT
from vlm.registry import import_path


def check_registry(name: str) -> None:
    """``name`` is registered: lowercase, ``create`` builds a learner that knows its name, and the
    unknown-name error lists it among every registered name."""
    assert name in vlm.prompts.available() and name == name.lower()
    made = vlm.prompts.create(name)
    assert isinstance(made, PromptLearner) and made.name == name
    with pytest.raises(KeyError) as err:
        vlm.prompts.create(name + "_unknown")
    assert "Available: " + ", ".join(vlm.prompts.available()) in str(err.value)


def check_jsonargparse_resolves(name: str) -> None:
    """jsonargparse builds the registered class, with its defaults, from its full ``class_path``
    (a config's short name is tested through the CLI parser, tests/test_configs.py)."""
    cls = vlm.prompts.PROMPTS.get(name)
    parser = ArgumentParser()
    parser.add_argument("--prompt", type=PromptLearner)
    cfg = parser.parse_object({"prompt": {"class_path": import_path(cls)}})
    learner = parser.instantiate_classes(cfg).prompt
    assert type(learner) is cls and learner.name == name


def test_the_registry_holds_what_the_files_register():
    """A method file whose import the package dropped, or a stray registration, differs."""
    assert vlm.prompts.available() == registered_in_files(vlm.prompts)


@pytest.mark.parametrize("name", vlm.prompts.available())
def test_every_registered_learner_is_reachable_by_name(name):
    check_registry(name)
    check_jsonargparse_resolves(name)


def test_available_and_create():
    names = vlm.prompts.available()
    assert {"coop", "vpt"} <= set(names)
    assert isinstance(vlm.prompts.create("coop", n_ctx=2), CoOp)
    vpt = vlm.prompts.create("vpt", num_tokens=3, deep=True)
    assert isinstance(vpt, VPT) and vpt.deep and vpt.name == "vpt"


def test_unknown_name_lists_available():
    with pytest.raises(KeyError) as err:
        vlm.prompts.create("nope")
    assert "coop" in str(err.value) and "vpt" in str(err.value)


@pytest.mark.parametrize("class_path", ["coop", "vlm.prompts.coop.CoOp"])
def test_short_and_full_class_paths_build_the_same_class(class_path):
    """A config's short name is expanded to the registered class's import path before jsonargparse
    reads it (``vlm.registry.expand_short_names``, what the CLI does), so both build ``CoOp`` itself."""
    from vlm.registry import expand_short_names

    parser = ArgumentParser()
    parser.add_argument("--prompt", type=PromptLearner)
    cfg = parser.parse_object(expand_short_names({"prompt": {"class_path": class_path, "init_args": {"n_ctx": 4}}}))
    learner = parser.instantiate_classes(cfg).prompt
    assert type(learner) is CoOp and learner.n_ctx == 4 and learner.name == "coop"