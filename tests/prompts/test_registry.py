"""The prompt registry: short names, a helpful unknown-name error, and jsonargparse ``class_path: coop``."""

from __future__ import annotations

import pytest
from jsonargparse import ArgumentParser

import vlm.prompts
from vlm.prompts import PromptLearner
from vlm.prompts.coop import CoOp
from vlm.prompts.vpt import VPT


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
def test_jsonargparse_resolves_short_name(class_path):
    parser = ArgumentParser()
    parser.add_argument("--prompt", type=PromptLearner)
    cfg = parser.parse_object({"prompt": {"class_path": class_path, "init_args": {"n_ctx": 4}}})
    learner = parser.instantiate_classes(cfg).prompt
    assert isinstance(learner, CoOp) and learner.n_ctx == 4 and learner.name == "coop"
