"""Detectors and segmenters as model sources: convert, exact prune of the traceable part, export.

torchvision's detectors cannot be traced whole by torch.fx (their forward pass resizes a list of
images and selects boxes in Python), so the channel analysis reads their `backbone` (which holds the
feature pyramid or SSD's extra layers); segmenters trace whole. The oracles do not trust the prune:

- exactness on the whole model: before pruning, a share of the part's BatchNorm channels is made
  exactly zero (gain and shift 0, so the channel carries 0 whatever the input); the prune must
  remove channels (MACs drop) and the pruned model's outputs must equal those of the model before
  the prune: a segmenter's masks; a detector's every tensor before it selects boxes (features,
  scores and box regressions of every anchor) and its detections (the same sorted scores, 90% of
  the boxes found: which of two boxes with equal scores is kept, float rounding decides). Other
  channels keep BatchNorm gains the statistics of random images set, so only zero channels go;
- the recipe replays the prune on a fresh model with the same outputs;
- the exported ONNX file, run by onnxruntime here, gives PyTorch's outputs.

Weights are random but made to tell boxes apart (`distinct_weights_`): an untrained torchvision
detector scores every box alike and then keeps an arbitrary subset of them. Inputs are small where
the model allows (detectors that resize take `min_size`), so each model takes seconds.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import gaborprune as gp
from gaborprune.errors import PruneError
from gaborprune.prune.part import flat_outputs

#: name -> (input side, model arguments, the part analysed: "" is the whole model)
MODELS = {
    "ssdlite320_mobilenet_v3_large": (320, {}, "backbone"),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (160, {"min_size": 160, "max_size": 160}, "backbone"),
    "retinanet_resnet50_fpn": (96, {"min_size": 96, "max_size": 96, "score_thresh": 0.01}, "backbone"),
    "lraspp_mobilenet_v3_large": (96, {}, ""),
    "deeplabv3_mobilenet_v3_large": (96, {}, ""),
}
NUM_CLASSES = 5


def build(name: str):
    side, args, _ = MODELS[name]
    torch.manual_seed(0)
    model, recipe = gp.load_model(f"torchvision:{name}", num_classes=NUM_CLASSES, model_args=args, input_shape=(3, side, side))
    return model.eval(), recipe


@torch.no_grad()
def distinct_weights_(model: nn.Module, part: nn.Module, side: int, zero_share: float = 0.25) -> int:
    """Weights under which a random detector tells boxes apart, and some channels carry exactly 0.

    torchvision initialises a detector's heads so that their biases decide every score, and a
    random network's BatchNorm statistics do not fit its activations, which then collapse: many
    boxes tie, and which of them are kept is decided by float rounding. So the heads' convolutions
    get weights that matter, the BatchNorm statistics are estimated on random images (train-mode
    passes), and then `zero_share` of the part's BatchNorm channels get gain and shift 0.
    Returns how many channels were zeroed."""
    g = torch.Generator().manual_seed(3)
    inside = {id(m) for m in part.modules()}
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and id(m) not in inside:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the passes
    images = torch.rand(4, 3, side, side, generator=g)
    model.train()
    if part is model:  # a segmenter
        model(images)
    else:
        model(list(images), [{"boxes": torch.tensor([[4.0, 4.0, side / 2, side / 2]]), "labels": torch.tensor([1])}] * len(images))
    model.eval()
    zeroed = 0
    for m in part.modules():
        if isinstance(m, nn.BatchNorm2d) and m.num_features >= 8:
            dead = torch.rand(m.num_features, generator=g) < zero_share
            m.weight[dead], m.bias[dead] = 0.0, 0.0
            zeroed += int(dead.sum())
    return zeroed


@torch.no_grad()
def score_column(detector: nn.Module, x: torch.Tensor) -> int:
    """Where the score sits in a detection row [x1, y1, x2, y2, then scores and labels in the model's order]."""
    return 4 + [k for k in detector.eval()(x)[0] if k != "boxes"].index("scores")


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The model's outputs; for a detector, also every tensor it computes before selecting boxes
    (the backbone's features and the head's scores and box regressions, for every anchor), which
    the selection's ties do not blur."""
    seen: list[torch.Tensor] = []
    heads = [getattr(model, "backbone", None), getattr(model, "head", None), getattr(getattr(model, "rpn", None), "head", None)]
    hooks = [h.register_forward_hook(lambda m, a, out: seen.extend(flat_outputs(out))) for h in heads if h is not None]
    try:
        out = model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return seen + flat_outputs(out) if isinstance(out, list) else flat_outputs(out)


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = 1e-4, detections: int | None = None) -> None:
    """Equal up to `tol` x the largest magnitude. `detections`: the score's column in a row
    [boxes (4), scores and labels in the model's order]; the last three tensors (one image's
    detections) have the same sorted scores, and 90% of the boxes are found on the other side
    (which of two boxes with equal scores is kept, float rounding decides); the tensors before them
    (the network's, before any selection) are equal."""
    assert [t.shape for t in got] == [t.shape for t in want]
    assert all(t.numel() for t in want), "an empty output compares nothing"
    scale = max(1.0, max(float(t.abs().max()) for t in want if t.numel()))
    if detections is not None:  # the network's tensors, then one image's boxes, scores and labels
        rows = [torch.cat([t.double().reshape(len(t), -1) for t in ts[-3:]], dim=1) for ts in (got, want)]
        torch.testing.assert_close(rows[0][:, detections].sort().values, rows[1][:, detections].sort().values, rtol=0, atol=tol)
        dist = torch.cdist(rows[0], rows[1], p=float("inf")) / rows[1].abs().amax(dim=1).clamp_min(1.0)  # [got, want], relative
        assert float((dist.min(dim=0).values <= tol).double().mean()) >= 0.9
        got, want = got[:-3], want[:-3]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=tol * scale)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_prune_is_exact_on_the_whole_model_and_exports(name: str, tmp_path) -> None:
    side, _, part_name = MODELS[name]
    model, recipe = build(name)
    part = model.get_submodule(part_name) if part_name else model
    zeroed = distinct_weights_(model, part, side)
    assert zeroed > 0
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(5))
    before = outputs(model, x)
    rows = score_column(model, x) if part_name == "backbone" else None  # a detector
    original = copy.deepcopy(model)

    report = gp.prune_model_(model, recipe.input_shape, gp.PruneSpec(scope="all"))
    assert report.plan.channels, "no channel removed"
    assert all(n.startswith(part_name) for n in report.plan.channels)
    assert report.after.macs < report.before.macs
    assert report.max_abs_diff <= 1e-4
    assert_same(outputs(model, x), before, detections=rows)

    # the recipe replays the prune on a fresh model, and the weights load into it
    recipe = recipe.with_step(report.step)
    path = gp.save_recipe(tmp_path / "pruned.pt", model, recipe)
    rebuilt, _ = gp.load_model(str(path))
    assert_same(outputs(rebuilt, x), before, detections=rows)
    # the plan alone, on the original weights, gives the pruned model
    replayed = gp.apply_plan_(original, report.plan)
    assert_same(outputs(replayed, x), before, detections=rows)

    onnx_path = tmp_path / "pruned.onnx"
    export = gp.export_model(model, recipe.input_shape, onnx_path, gp.ExportConfig(lowering="dense", check_inputs=1), provenance=recipe.provenance())
    assert export.max_abs_diff <= 1e-4
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = [torch.from_numpy(np.asarray(y)) for y in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]
    assert_same(got, before[-3:] if rows is not None else before, tol=1e-4, detections=rows)


@pytest.mark.parametrize("name", ["ssdlite320_mobilenet_v3_large", "lraspp_mobilenet_v3_large"])
def test_convert_then_replay(name: str, tmp_path) -> None:
    """The first two convolutions become Gabor banks computing what a plain copy with their
    materialised kernels computes, on the whole model; the recipe rebuilds it."""
    side = MODELS[name][0]
    model, recipe = build(name)
    original = copy.deepcopy(model)
    report = gp.gaborize_(model, gp.ConversionSpec(first=2, fit_steps=5), recipe.input_shape)
    names = report.layer_names
    assert len(names) == 2 and all(isinstance(model.get_submodule(n), gp.GaborConv2d) for n in names)
    with torch.no_grad():
        for n in names:
            original.get_submodule(n).weight.copy_(model.get_submodule(n).weight)
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(5))
    want = outputs(original, x)
    assert_same(outputs(model, x), want)
    recipe = recipe.with_step(report.step)
    rebuilt, _ = gp.load_model(str(gp.save_recipe(tmp_path / "g.pt", model, recipe)))
    assert_same(outputs(rebuilt, x), want, tol=1e-6)


def test_untraceable_whole_model_is_refused_naming_the_module_and_op() -> None:
    model, recipe = build("ssdlite320_mobilenet_v3_large")
    with pytest.raises(PruneError, match=r"torch.fx cannot trace SSD at ssd.py:\d+ `.*`.*name a part that traces with `module`"):
        gp.prune_model_(model, recipe.input_shape, gp.PruneSpec(scope="all", module=""))
    with pytest.raises(PruneError, match="the model has no module 'neck'; its top-level modules: backbone, anchor_generator, head, transform"):
        gp.prune_model_(model, recipe.input_shape, gp.PruneSpec(scope="all", module="neck"))
    with pytest.raises(PruneError, match="module 'head': torch.fx cannot trace"):
        gp.prune_model_(model, recipe.input_shape, gp.PruneSpec(scope="all", module="head"))


def test_a_named_part_inside_the_backbone() -> None:
    """`module` narrows the analysis: only channels inside it go, and the prune stays exact."""
    model, recipe = build("ssdlite320_mobilenet_v3_large")
    distinct_weights_(model, model.backbone, 320)
    x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(5))
    before = outputs(model, x)
    report = gp.prune_model_(model, recipe.input_shape, gp.PruneSpec(scope="all", module="backbone.features.0"))
    assert report.plan.channels and all(n.startswith("backbone.features.0.") for n in report.plan.channels)
    assert_same(outputs(model, x), before, detections=score_column(model, x))


@pytest.mark.parametrize("command", ["finetune", "eval"])
def test_the_builtin_loop_refuses_a_detector_in_one_line(command: str, tmp_path) -> None:
    from typer.testing import CliRunner

    from gaborprune.cli import app

    args = [command, "torchvision:lraspp_mobilenet_v3_large", "--data", "fake:16", "--input-shape", "3,64,64", "--threads", "1"]
    result = CliRunner().invoke(app, args + (["--epochs", "1", "-o", str(tmp_path / "f.pt")] if command == "finetune" else []))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "output (OrderedDict) is not logits [N, classes]" in result.output and "gp.Pressure" in result.output
    assert not (tmp_path / "f.pt").exists()


@pytest.mark.parametrize("command", ["prune", "export"])
def test_a_bad_module_is_one_line_from_the_cli(command: str, tmp_path) -> None:
    from typer.testing import CliRunner

    from gaborprune.cli import app

    out = tmp_path / ("p.pt" if command == "prune" else "p.onnx")
    args = [command, "torchvision:ssdlite320_mobilenet_v3_large", "--module", "neck", "-o", str(out), "--threads", "1"]
    result = CliRunner().invoke(app, args + (["--scope", "all", "--ratio", "0.2"] if command == "prune" else []))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "the model has no module 'neck'; its top-level modules: backbone, anchor_generator, head, transform" in result.output
    assert len(result.output.strip().splitlines()) <= 2 and not out.exists()
