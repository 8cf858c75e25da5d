"""Released prompts (vlm import / vlm export --format dassl) on a tiny CLIP.

The checkpoints are built here in the published Dassl layout, key by key, as the official savers
write them (``{"state_dict", "epoch", "optimizer", "scheduler", "val_result"}``; the learner's
token buffers; MaPLe/IVLP/PromptSRC register the whole CustomCLIP, so frozen CLIP weights are in
the state dict too), with tiny widths: text 64, vision 96. The reference logits come from a plain
re-implementation of each official forward (KaiyangZhou/CoOp ``trainers/coop.py``;
multimodal-prompt-learning ``clip/model.py`` ``ResidualAttentionBlock_IVLP`` / ``_MaPLe``,
``VisionTransformer(_MaPLe)``) on open_clip's own layers, not on vlm's runners. The official code
casts inserted prompts to fp16 (``.half()``); the learned prompts here are fp16 values already (as
in a released fp16 checkpoint), except MaPLe's projected vision prompts, which the reference keeps
at fp32 as vlm does; the frozen token buffers are fp32 (``PREC: fp32``/``amp``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.datamodules.toydata import make_dataset
from tests.helpers import tiny_clip_cfg
from vlm.runtime.cli import SUBCOMMANDS, main
from vlm.runtime.released import IMPORT_HELP, ReleasedCheckpointError, build_module, load_dassl

DT, DV, LAYERS = 64, 96, 3
CLASSES = ["cat", "dog", "golden_retriever"]
LEARNERS = {
    "coop": {"class_path": "coop", "init_args": {"n_ctx": 4}},
    "maple": {"class_path": "maple", "init_args": {"n_ctx": 2, "depth": 3, "ctx_init": "a photo of a"}},
    "ivlp": {"class_path": "ivlp", "init_args": {"n_ctx_text": 2, "n_ctx_vision": 3, "depth_text": 3, "depth_vision": 2,
                                                  "ctx_init": "a photo of a"}},
}
PREFIX = {"coop": "X X X X", "maple": "a photo of a", "ivlp": "a photo of a"}


def _cfg() -> dict:
    cfg = tiny_clip_cfg(width=DV, head_width=32, layers=LAYERS)
    cfg["text_cfg"]["layers"] = LAYERS
    return cfg


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("released") / "toy")


def _config(tmp: Path, toy: Path, method: str, **learner_args) -> Path:
    learner = json.loads(json.dumps(LEARNERS[method]))
    learner["init_args"].update(learner_args)
    cfg = {
        "seed_everything": 0,
        "model": {"class_path": "vlm.modules.CLIPClassifier", "init_args": {
            "backbone": {"class_path": "vlm.backbones.ClipBackbone", "init_args": {"model_name": "tiny", "model_cfg": _cfg()}},
            "prompt_learner": learner}},
        "data": {"class_path": "vlm.datamodules.FewShotDataModule", "init_args": {
            "root": str(toy), "dataset": "Toy", "num_shots": 2, "transforms": {"image_size": 32},
            "loader": {"batch_size": 4, "eval_batch_size": 8}}},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "default_root_dir": str(tmp / "run"),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp / "run"), "name": "", "version": "imported"}}},
    }
    path = tmp / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _h(*shape: int) -> torch.Tensor:
    """A released fp16 prompt tensor."""
    return (torch.randn(*shape) * 0.5).half()


def _buffers(clip, prefix: str, n_ctx: int, classnames: list[str], tokenize) -> dict[str, torch.Tensor]:
    """``token_prefix``/``token_suffix`` as the official learners compute them from the class names."""
    tokens = tokenize([f"{prefix} {c.replace('_', ' ')}." for c in classnames])
    with torch.no_grad():
        emb = clip.token_embedding(tokens)  # clip_model.dtype: fp32 (PREC fp32/amp)
    return {"token_prefix": emb[:, :1], "token_suffix": emb[:, 1 + n_ctx:]}


def released_state(method: str, clip, tokenize, *, vision_deep: int = 1) -> dict[str, torch.Tensor]:
    """The state dict the official saver writes, with tiny widths."""
    torch.manual_seed(1)
    if method == "coop":  # register_model("prompt_learner", model.prompt_learner): no prefix
        return {"ctx": _h(4, DT), **_buffers(clip, PREFIX[method], 4, CLASSES, tokenize)}
    p = "prompt_learner."
    state = {f"{p}{k}": v for k, v in _buffers(clip, PREFIX[method], 2, CLASSES, tokenize).items()}
    state[p + "ctx"] = _h(2, DT)
    if method == "maple":  # MultiModalPromptLearner: proj Linear(512 -> 768), compound prompts i < depth - 1
        state[p + "proj.weight"], state[p + "proj.bias"] = _h(DV, DT), _h(DV)
        for i in range(LAYERS - 1):
            state[f"{p}compound_prompts_text.{i}"] = _h(2, DT)
            state[f"{p}compound_prompt_projections.{i}.weight"] = _h(DV, DT)
            state[f"{p}compound_prompt_projections.{i}.bias"] = _h(DV)
    else:  # IVLP / PromptSRC: VPT_shallow in blocks 1..depth-1, image_encoder.VPT at the input
        for i in range(1, 3):
            state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = _h(2, DT)
        state["image_encoder.VPT"] = _h(3, DV)
        for i in range(1, 1 + vision_deep):
            state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = _h(3, DV)
    # the frozen CLIP of the registered CustomCLIP (skipped by the converter)
    state["image_encoder.conv1.weight"] = torch.zeros(DV, 3, 8, 8).half()
    state["text_encoder.ln_final.weight"] = torch.ones(DT).half()
    state["logit_scale"] = torch.tensor(4.6).half()
    return state


def write_dassl(path: Path, state: dict[str, torch.Tensor], scheduler_object: bool = False) -> Path:
    """Dassl's save_checkpoint record; with ``scheduler_object`` the scheduler pickles its successor
    scheduler object, as Dassl's warmup schedulers do (refused by a plain weights-only load)."""
    params = [torch.nn.Parameter(v.float().clone()) for v in state.values() if v.is_floating_point()][:1]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sched = {"last_epoch": 5, "base_lrs": [0.1]}
    if scheduler_object:
        sched["successor"] = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "epoch": 5, "optimizer": opt.state_dict(), "scheduler": sched, "val_result": None}, path)
    return path


# --- the official forwards, written plainly on open_clip's layers --------------------------------
def official_text(clip, prompts: torch.Tensor, tokens: torch.Tensor, deep: list[torch.Tensor]) -> torch.Tensor:
    x = prompts.float() + clip.positional_embedding
    n = len(deep) and deep[0].shape[0]
    for i, block in enumerate(clip.transformer.resblocks):
        if 1 <= i <= len(deep):  # replace the previous layer's prompt outputs (positions 1..n)
            x = torch.cat([x[:, :1], deep[i - 1].float().expand(x.shape[0], -1, -1), x[:, 1 + n:]], dim=1)
        x = block(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ clip.text_projection


def official_image(visual, images: torch.Tensor, shallow, deep: list[torch.Tensor]) -> torch.Tensor:
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    if shallow is not None:
        x = torch.cat([x, shallow.float().expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    for i, block in enumerate(visual.transformer.resblocks):
        if 1 <= i <= len(deep):  # replace the last n tokens
            x = torch.cat([x[:, : x.shape[1] - deep[i - 1].shape[0]], deep[i - 1].float().expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def official_logits(method: str, state: dict[str, torch.Tensor], clip, tokenize, images: torch.Tensor) -> torch.Tensor:
    tokens = tokenize([f"{PREFIX[method]} {c.replace('_', ' ')}." for c in CLASSES])
    p = "" if method == "coop" else "prompt_learner."
    ctx = state[p + "ctx"].float().unsqueeze(0).expand(len(CLASSES), -1, -1)
    prompts = torch.cat([state[p + "token_prefix"].float(), ctx, state[p + "token_suffix"].float()], dim=1)  # 'end'
    lin = lambda x, w, b: x.float() @ state[w].float().t() + state[b].float()  # noqa: E731
    if method == "coop":
        text_deep, shallow, vis_deep = [], None, []
    elif method == "maple":
        text_deep = [state[f"{p}compound_prompts_text.{i}"] for i in range(LAYERS - 1)]
        shallow = lin(state[p + "ctx"], p + "proj.weight", p + "proj.bias")
        vis_deep = [lin(text_deep[i], f"{p}compound_prompt_projections.{i}.weight", f"{p}compound_prompt_projections.{i}.bias")
                    for i in range(LAYERS - 1)]
    else:
        text_deep = [state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] for i in range(1, 3)]
        shallow = state["image_encoder.VPT"]
        vis_deep = [state["image_encoder.transformer.resblocks.1.VPT_shallow"]]
    with torch.no_grad():
        text = official_text(clip, prompts, tokens, text_deep)
        image = official_image(clip.visual, images, shallow, vis_deep)
        text, image = text / text.norm(dim=-1, keepdim=True), image / image.norm(dim=-1, keepdim=True)
        return clip.logit_scale.exp() * image @ text.t()


# --- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["coop", "maple", "ivlp"])
def test_released_checkpoint_gives_the_official_logits_and_round_trips(method: str, toy: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, toy, method)
    reference = build_module([str(config)])
    clip, tokenize = reference.backbone.model, reference.backbone.tokenize
    state = released_state(method, clip, tokenize)
    name = {"coop": "prompt_learner", "maple": "MultiModalPromptLearner", "ivlp": "VLPromptLearner"}[method]
    ckpt = write_dassl(tmp_path / "released" / name / "model.pth.tar-5", state, scheduler_object=method == "maple")

    main(["import", "--from", "dassl", "--method", method, "--ckpt", str(ckpt), "--config", str(config), "--out", str(tmp_path / "export")])
    exported = tmp_path / "export"
    assert (exported / ".vlm-export").is_file() and json.loads((exported / "metadata.json").read_text())["source_format"] == f"dassl/{method}"

    # (a) the export, loaded through its own config, gives the official forward's logits
    module = build_module([str(exported / "config.yaml")]).eval()
    assert module.backbone.checksum() == reference.backbone.checksum()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = module(images, classnames=CLASSES)["logits"]
    torch.testing.assert_close(ours, official_logits(method, state, clip, tokenize, images), atol=2e-5, rtol=1e-5)
    if method == "coop":  # and `vlm test --config DIR/config.yaml` evaluates it
        main(["test", "--config", str(exported / "config.yaml")])
        results = json.loads((tmp_path / "run" / "imported" / "results.json").read_text())
        assert results["method"] == "coop" and "test/hm" in results["metrics"]

    # (b) official -> export -> official: the same prompt tensors, in a file the official load_model reads
    main(["export", "--format", "dassl", "--ckpt", str(exported), "--out", str(tmp_path / "back")])
    back = torch.load(tmp_path / "back" / name / "model.pth.tar-5", weights_only=True)
    assert set(back) == {"state_dict", "epoch", "optimizer", "scheduler", "val_result"} and back["epoch"] == 5
    prompts = {k: v for k, v in state.items() if "VPT" in k or k.split(".")[-1] not in ("token_prefix", "token_suffix")
               and not k.startswith(("image_encoder.", "text_encoder.", "logit_scale"))}
    assert set(back["state_dict"]) == set(prompts)
    for k, v in prompts.items():
        assert torch.equal(back["state_dict"][k], v.float()), k


def test_export_refuses_a_mismatched_config_naming_key_and_fix(toy: Path, tmp_path: Path) -> None:
    """An IVLP checkpoint with 2 deep vision prompts, converted with a config whose vision depth is 2 (one)."""
    config = _config(tmp_path, toy, "ivlp")
    reference = build_module([str(config)])
    state = released_state("ivlp", reference.backbone.model, reference.backbone.tokenize, vision_deep=2)
    ckpt = write_dassl(tmp_path / "m.pth.tar-5", state)
    with pytest.raises(ReleasedCheckpointError, match=r"image_encoder\.transformer\.resblocks\.2\.VPT_shallow.*depth_vision: 3"):
        main(["import", "--method", "ivlp", "--ckpt", str(ckpt), "--config", str(config), "--out", str(tmp_path / "e1")])
    # shape: a text width of another backbone
    state = released_state("maple", reference.backbone.model, reference.backbone.tokenize)
    state["prompt_learner.ctx"] = _h(2, 512)
    config = _config(tmp_path, toy, "maple")
    with pytest.raises(ReleasedCheckpointError, match=r"'prompt_learner\.ctx' \(maple\) has shape \[2, 512\].*expects \[2, 64\]"):
        main(["import", "--method", "maple", "--ckpt", str(write_dassl(tmp_path / "m2", state)), "--config", str(config),
              "--out", str(tmp_path / "e2")])


def test_unknown_keys_wrong_method_and_cocoop_are_refused(toy: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, toy, "coop")
    reference = build_module([str(config)])
    state = released_state("coop", reference.backbone.model, reference.backbone.tokenize)
    with pytest.raises(ReleasedCheckpointError, match=r"\['extra_scale'\] are not part of the released coop layout"):
        main(["import", "--method", "coop", "--ckpt", str(write_dassl(tmp_path / "a", {**state, "extra_scale": torch.ones(1)})),
              "--config", str(config), "--out", str(tmp_path / "e1")])
    with pytest.raises(ReleasedCheckpointError, match=r"holds coop tensors.*Pass --method coop"):
        main(["import", "--method", "maple", "--ckpt", str(write_dassl(tmp_path / "b", state)), "--config", str(config),
              "--out", str(tmp_path / "e2")])
    cocoop = {"ctx": _h(4, DT), "meta_net.linear1.weight": _h(6, DV), "meta_net.linear1.bias": _h(6),
              "meta_net.linear2.weight": _h(DT, 6), "meta_net.linear2.bias": _h(DT)}
    with pytest.raises(ReleasedCheckpointError, match="CoCoOp is not implemented"):
        main(["import", "--method", "coop", "--ckpt", str(write_dassl(tmp_path / "c", cocoop)), "--config", str(config),
              "--out", str(tmp_path / "e3")])
    assert not (tmp_path / "e3").exists()


def test_dassl_scheduler_objects_load_weights_only(tmp_path: Path) -> None:
    """A warmup scheduler pickles its successor: torch's weights-only load refuses it, load_dassl
    replaces the object by an inert placeholder and keeps the tensors."""
    path = write_dassl(tmp_path / "m", {"ctx": _h(4, DT)}, scheduler_object=True)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(path, weights_only=True)
    data = load_dassl(path)
    assert torch.equal(data["state_dict"]["ctx"], torch.load(path, weights_only=False)["state_dict"]["ctx"])


def test_import_is_a_listed_plain_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert SUBCOMMANDS["import"] == IMPORT_HELP
    with pytest.raises(SystemExit):
        main(["import", "--help"])
    out = capsys.readouterr().out
    assert "--method" in out and "--ckpt" in out and "--trainer" not in out
