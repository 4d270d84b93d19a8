"""`timm:NAME` model sources: one model per timm family, converted, pruned, exported and replayed.

Each family is checked against oracles that do not trust the code under test:

(a) conversion: the selected layers become GaborConv2d banks shaped like the convolutions they
    replace, and the converted model computes what a deep copy of the original computes once each
    bank's materialised kernels (and bias) are written into it;
(b) exact `scope` all pruning: the compacted model equals the uncompacted original with only the
    plan's folds added and the removed channels' reader columns zeroed (no surgery), a family's
    share of convolution channels and parameters actually went, and a sliced BatchNormAct2d keeps
    its class and activation (export folds it into its convolution, keeping the activation);
(c) export: the report's parity, and an independent onnxruntime run of the written file;
(d) a recipe written to disk rebuilds the same outputs.

timm models are built with random weights at 3x64x64 (their configured 224x224 is only checked as
the default input shape). Conv biases and BatchNorm statistics are randomised first: zero biases
and unit statistics would hide a lost bias or a misplaced fold.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import gaborprune as gp  # noqa: E402
from gaborprune import GaborConv2d  # noqa: E402
from gaborprune.errors import ModelSourceError  # noqa: E402
from gaborprune.models import ModelSource  # noqa: E402

SHAPE = (3, 64, 64)
NUM_CLASSES = 10

#: name -> the least share of the model's convolution output channels that `scope` all with ratio
#: 0.3 removes exactly (measured at 3x64x64: resnet10t 23%, mobilenetv3_small_100 20%, regnetx_002 5.7%, convnext_atto 19%, ghostnet_050 3.2%,
#: efficientnet_b0 25%, repvgg_a0 11%). Most timm CNNs put their activation inside the BatchNorm (BatchNormAct2d), which the
#: analysis treats as a BatchNorm followed by its activation; before it did, RegNet and RepVGG lost
#: nothing and EfficientNet-style models only squeeze-excitation channels. RegNet's grouped 3x3
#: convolutions (opaque to the analysis) bound most of its channels.
FAMILIES: dict[str, float] = {
    "resnet10t": 0.15,
    "mobilenetv3_small_100": 0.10,
    "regnetx_002": 0.03,
    "convnext_atto": 0.10,
    "ghostnet_050": 0.02,
    "efficientnet_b0": 0.15,
    "repvgg_a0": 0.07,
}


# -- helpers ---------------------------------------------------------------------------------------
@torch.no_grad()
def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random conv biases and BatchNorm statistics and affine parameters (timm initialises them trivially)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def build(name: str):
    model, recipe = gp.load_model(f"timm:{name}", num_classes=NUM_CLASSES, input_shape=SHAPE)
    return randomise_(model).eval(), recipe


def inputs(n: int = 2) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def scaled_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """Equal up to `tol` times the magnitude of `expected`."""
    scale = float(expected.abs().max().clamp_min(1e-6))
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * scale)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def unread_oracle(original: nn.Module, plan) -> nn.Module:
    """The plan without surgery: the plan's folds added and every removed input column of a reader
    (an ungrouped convolution or a linear layer) zeroed, so the removed channels are read by nothing."""
    ref = copy.deepcopy(original)
    for f in plan.folds:
        target = getattr(ref.get_submodule(f["module"]), f["attr"])
        target += torch.tensor(f["delta"], dtype=target.dtype)
    for name, sides in plan.channels.items():
        m = ref.get_submodule(name)
        columns = sides.get("in", [])
        if columns and (isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.groups == 1):
            m.weight[:, columns] = 0
    return ref


def roundtrip(tmp_path, model: nn.Module, recipe, x: torch.Tensor) -> None:
    """(d): the recipe on disk rebuilds the model: same state_dict, same outputs."""
    path = gp.save_recipe(tmp_path / "recipe.pt", model, recipe)
    rebuilt, again = gp.load_model(str(path))
    assert again.steps == recipe.steps and tuple(again.input_shape) == SHAPE
    theirs = rebuilt.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(theirs[key], value), key
    scaled_close(out(rebuilt, x), out(model, x), tol=1e-6)


# -- per family ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_convert(name: str, tmp_path) -> None:
    model, recipe = build(name)
    original = copy.deepcopy(model)
    report = gp.gaborize_(model, gp.ConversionSpec(first=2, fit_steps=5), SHAPE)
    recipe = recipe.with_step(report.step)

    # (a) the layers are banks shaped like their convolutions, with an honest fit error
    assert len(report.layers) == 2
    for entry in report.layers:
        layer, conv = model.get_submodule(entry.name), original.get_submodule(entry.name)
        assert isinstance(layer, GaborConv2d) and isinstance(conv, nn.Conv2d), entry.name
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            assert getattr(layer, attr) == getattr(conv, attr), f"{entry.name}.{attr}"
        with torch.no_grad():
            expected = float((conv.weight - layer.weight).norm() / conv.weight.norm())
        assert entry.fit_rel_error == pytest.approx(expected, rel=1e-3, abs=1e-6)
        assert entry.fit_rel_error < 1.0
    # the converted model is the original with the materialised kernels written in
    with torch.no_grad():
        for n in report.layer_names:
            original.get_submodule(n).weight.copy_(model.get_submodule(n).weight)
            if model.get_submodule(n).bias is not None:
                original.get_submodule(n).bias.copy_(model.get_submodule(n).bias)
    x = inputs()
    got = out(model, x)
    assert got.shape == (2, NUM_CLASSES)
    scaled_close(got, out(original, x))

    roundtrip(tmp_path, model, recipe, x)


def conv_channels(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prune_all_and_export(name: str, tmp_path) -> None:
    from timm.layers import BatchNormAct2d

    model, recipe = build(name)
    original = copy.deepcopy(model)
    x = inputs()
    # (b) channels went, exactly
    report = gp.prune_model_(model, SHAPE, gp.PruneSpec(scope="all", ratio=0.3))
    scale = max(1.0, float(out(model, x).abs().max()))  # RepVGG's outputs reach 1e4 with random BatchNorms
    assert report.max_abs_diff <= 1e-4 * scale
    assert 1 - conv_channels(model) / conv_channels(original) > FAMILIES[name]
    assert params(model) < params(original) and report.after.params < report.before.params
    assert all(k.reason for k in report.kept)  # any dead channel that stayed says why
    # a sliced BatchNormAct2d is still one, activation and all, sized like its channels
    sliced = [n for n, sides in report.plan.channels.items() if sides.get("out") and isinstance(original.get_submodule(n), BatchNormAct2d)]
    for n in sliced:
        m, was = model.get_submodule(n), original.get_submodule(n)
        if isinstance(m, BatchNormAct2d):
            assert m.num_features == m.running_mean.numel() == m.weight.numel() < was.num_features, n
            assert type(m.act) is type(was.act), n
    if any(isinstance(m, BatchNormAct2d) for m in original.modules()):
        assert sliced
    scaled_close(out(model, x), out(unread_oracle(original, report.plan), x))
    replayed = gp.apply_plan_(copy.deepcopy(original), report.plan)  # the plan alone rebuilds it
    scaled_close(out(replayed, x), out(model, x), tol=1e-6)
    recipe = recipe.with_step(report.step)
    roundtrip(tmp_path, model, recipe, x)

    # export folds each BatchNormAct2d into its convolution, keeping the activation
    from gaborprune.export.lower import fold_batchnorms_

    deploy = copy.deepcopy(model).eval()
    folded = fold_batchnorms_(deploy)
    for n in folded:
        was = model.get_submodule(n)
        if isinstance(was, BatchNormAct2d) and not isinstance(was.act, nn.Identity):
            assert type(deploy.get_submodule(n)) is type(was.act), n
    scaled_close(out(deploy, x), out(model, x))

    # (c) export: the report's parity, and onnxruntime run independently on the written file
    import onnxruntime as ort

    path = tmp_path / "m.onnx"
    export = gp.export_model(model, SHAPE, path, gp.ExportConfig(lowering="dense", check_inputs=1, atol=1e-4 * scale))
    assert export.max_abs_diff <= 1e-4 * scale
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x1 = x[:1]
    (onnx_out,) = sess.run(None, {sess.get_inputs()[0].name: x1.numpy()})
    scaled_close(torch.from_numpy(onnx_out), out(model, x1))


# -- the source itself -----------------------------------------------------------------------------
def test_default_input_shape_comes_from_the_timm_config() -> None:
    model, recipe = gp.load_model("timm:resnet10t", num_classes=NUM_CLASSES)
    assert tuple(recipe.input_shape) == tuple(model.pretrained_cfg["input_size"]) == (3, 176, 176)
    from gaborprune.models.timm_models import timm_input_shape

    assert timm_input_shape(nn.Conv2d(3, 3, 1)) == (3, 224, 224)  # no timm config: the usual crop


def test_a_local_state_dict_loads_and_pretrained_weights_are_refused(tmp_path) -> None:
    torch.manual_seed(3)
    donor = timm.create_model("resnet10t", pretrained=False, num_classes=NUM_CLASSES)
    torch.save(donor.state_dict(), tmp_path / "w.pt")
    model, _ = gp.load_model("timm:resnet10t", num_classes=NUM_CLASSES, weights=str(tmp_path / "w.pt"), input_shape=SHAPE)
    for key, value in donor.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    with pytest.raises(ModelSourceError, match="never downloaded.*`weights`"):
        ModelSource("timm:resnet10t", kwargs={"weights": "IMAGENET1K"}).build()


@pytest.mark.parametrize("key, value", [("pretrained", True), ("checkpoint_path", "/etc/passwd"), ("cache_dir", "/tmp"),
                                        ("pretrained_cfg_overlay", {"file": "/etc/passwd"})])
def test_a_recipe_cannot_make_timm_fetch_or_read_weights(key, value, tmp_path) -> None:
    """A recipe's source arguments are data whoever wrote it chose: none of them may make timm download
    or read a file (create_model's checkpoint_path would load any path)."""
    with pytest.raises(ModelSourceError, match=f"`{key}`: pretrained weights are never downloaded or read"):
        ModelSource("timm:resnet10t", kwargs={key: value}).build()
    model, recipe = gp.load_model("timm:resnet10t", num_classes=NUM_CLASSES, input_shape=SHAPE)
    path = gp.save_recipe(tmp_path / "r.pt", model, recipe)
    payload = torch.load(path, weights_only=True)
    payload["source"]["kwargs"] = {key: value}
    torch.save(payload, tmp_path / "hostile.pt")
    with pytest.raises(gp.GaborPruneError, match=f"`{key}`"):
        gp.load_model(str(tmp_path / "hostile.pt"))


def test_an_unknown_name_is_one_line_naming_close_ones() -> None:
    with pytest.raises(ModelSourceError) as info:
        gp.load_model("timm:nonexistent_model")
    message = str(info.value)
    assert "unknown timm model 'nonexistent_model'" in message and len(message.splitlines()) == 1
    with pytest.raises(ModelSourceError, match="resnet18"):
        gp.load_model("timm:resnet18x")


def test_missing_timm_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(ModelSourceError) as info:
        gp.load_model("timm:resnet18")
    message = str(info.value)
    assert 'pip install "gaborprune[timm]"' in message and len(message.splitlines()) == 1
