"""CADAConv2d against a float64 reference built tap by tap, gradients, and its knobs."""

import json

import pytest
import torch
import torch.nn.functional as F

from gaborprune.convert.cada import CADAConv2d
from gaborprune.errors import ConversionError


def reference(layer: CADAConv2d, x: torch.Tensor) -> torch.Tensor:
    """The formula with an explicit filter per (head, position), summed over the k x k taps."""
    v = F.conv2d(x, layer.value.weight)
    n, c, h, w = v.shape
    k, s, g = layer.kernel_size, layer.stride, layer.heads
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    vp = F.pad(v, (k // 2,) * 4)
    rel = layer.relative if layer.relative is not None else torch.zeros(g, k, k, dtype=x.dtype)
    if layer.invariance == "none":
        filt = F.conv2d(x, layer.generator.weight, layer.generator.bias, s, layer.context // 2).view(n, g, k, k, ho, wo)
        filt = filt + rel[None, :, :, :, None, None]
    else:
        bases = layer.base_kernels()  # [G, B, k, k]
        if layer.invariance == "strict":
            a = torch.ones(n, g, 1, ho, wo, dtype=x.dtype)
        elif layer.context:
            logits = F.conv2d(x, layer.coefficients.weight, layer.coefficients.bias, s, layer.context // 2)
            a = logits.view(n, g, layer.bases, ho, wo).softmax(dim=2)
        else:
            a = layer.logits.softmax(dim=1)[None, :, :, None, None].expand(n, g, layer.bases, ho, wo)
        filt = torch.einsum("ngbpq,gbij->ngijpq", a, bases) + rel[None, :, :, :, None, None]
    head = torch.arange(c) // (c // g)
    y = torch.zeros(n, c, ho, wo, dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            taps = vp[:, :, i: i + s * (ho - 1) + 1: s, j: j + s * (wo - 1) + 1: s]  # V at p * stride + delta
            y += filt[:, head, i, j] * taps
    return y + layer.bias[:, None, None] if layer.bias is not None else y


SETTINGS = [
    dict(invariance="strict", bases=1, context=0),
    dict(invariance="strict", bases=1, context=0, basis="gabor", stride=2),
    dict(invariance="relaxed", bases=3, context=3),
    dict(invariance="relaxed", bases=3, context=1, rel_pos=True, stride=2),
    dict(invariance="relaxed", bases=2, context=0, rel_pos=True),
    dict(invariance="relaxed", bases=4, context=3, basis="gabor", heads=2),
    dict(invariance="none", bases=1, context=3, rel_pos=True),
    dict(invariance="none", bases=1, context=1, stride=2, heads=2),
]


def _layer(setting, k=5):
    torch.manual_seed(0)
    layer = CADAConv2d(3, 4, k, **setting).double()
    with torch.no_grad():  # non-trivial values everywhere (zero-initialised tensors would hide mistakes)
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_forward_matches_the_formula(setting):
    layer = _layer(setting)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, 4, (9 - 1) // layer.stride + 1, (8 - 1) // layer.stride + 1)
    torch.testing.assert_close(y, reference(layer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_gradients_match_finite_differences(setting):
    layer = _layer(setting, k=3)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_without_context_relaxed_is_a_depthwise_convolution_of_the_mixture():
    layer = _layer(dict(invariance="relaxed", bases=3, context=0))
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    mixed = torch.einsum("gb,gbij->gij", layer.logits.softmax(dim=1), layer.base_kernels())  # [G, k, k]
    v = F.conv2d(x, layer.value.weight)
    want = F.conv2d(v, mixed.repeat(4, 1, 1)[:, None], layer.bias, padding=2, groups=4)
    torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("setting", [dict(invariance="relaxed", bases=2), dict(invariance="none", bases=1, rel_pos=True)])
def test_no_tensor_k2_times_larger_than_the_values(setting):
    """Relaxed: B depthwise convolutions; none: k^2 shifted products accumulated. Neither makes the
    [N, C * k^2, H * W] tensor an unfold would: every tensor made is smaller than that."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    layer = CADAConv2d(8, 8, 7, context=3, **setting)
    x = torch.randn(2, 8, 16, 16)
    with Largest():
        layer(x).sum().backward()
    assert 0 < Largest.numel < 49 * x.numel() // 4  # 4x below the unfold's size; relaxed stays near one V


@pytest.mark.parametrize("setting", [dict(invariance="strict", bases=1, context=0), dict(invariance="relaxed", bases=3, stride=2),
                                     dict(invariance="none", bases=1, rel_pos=True)])
def test_summary_counts_the_blocks_arithmetic(setting):
    """Oracle: PyTorch's FLOP counter for every convolution the block runs, plus, by hand, what it
    does not count (the per-position weighting, the per-position filters of no invariance)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = torch.nn.Sequential(CADAConv2d(6, 8, 5, **setting), torch.nn.Flatten())
    x = torch.randn(1, 6, 12, 12)
    with FlopCounterMode(display=False) as counter:
        out = model[0](x)
    hw = out.shape[-2] * out.shape[-1]
    by_hand = {"strict": 0, "relaxed": 3 * 8 * hw, "none": 8 * 25 * hw}[setting["invariance"]]
    summary = gp.summarize(model, (6, 12, 12))
    assert summary.macs == counter.get_total_flops() // 2 + by_hand
    assert [layer.type for layer in summary.layers][0] == "cada" and summary.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kwargs,message", [
    (dict(invariance="strict", bases=4, context=0), "strict invariance has one kernel per head: bases must be 1"),
    (dict(invariance="strict", bases=1, context=3), "strict invariance has no coefficients"),
    (dict(invariance="strict", bases=1, context=0, rel_pos=True), "rel_pos adds nothing"),
    (dict(invariance="none", bases=4, context=3), "no invariance generates a free kernel per position: bases must be 1"),
    (dict(invariance="none", bases=1, context=0), "context must be at least 1"),
    (dict(invariance="none", bases=1, context=3, basis="gabor"), "basis must be free"),
    (dict(invariance="loose"), "invariance must be one of strict, relaxed, none"),
    (dict(heads=3), "heads (3) must divide out_channels (4)"),
    (dict(context=2), "context must be 0 (none) or an odd size"),
])
def test_knob_combinations_that_make_no_sense_are_refused(kwargs, message):
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CADAConv2d(3, 4, 3, **kwargs)


# -- conversion, recipes, export -----------------------------------------------------------------
import gaborprune as gp  # noqa: E402
from gaborprune.export.api import ExportConfig, export_model  # noqa: E402
from helpers import one_line_error, run as cli  # noqa: E402


@pytest.mark.parametrize("knobs", [dict(invariance="relaxed", rel_pos=True), dict(invariance="strict"),
                                   dict(invariance="none", context=1, heads=2), dict(invariance="relaxed", basis="gabor", bases=2, context=0)],
                         ids=["relaxed", "strict", "none", "gabor-basis"])
def test_convert_to_cada_replays_from_the_recipe_and_exports(tmp_path, knobs):
    torch.manual_seed(0)
    model, recipe = gp.load_model("resnet20")
    spec = gp.ConversionSpec(targets=("layer1.0.conv1", "layer2.0.conv1"), to="cada", **knobs)
    recipe = recipe.with_step(gp.gaborize_(model, spec, recipe.input_shape).step)
    assert isinstance(model.layer2[0].conv1, CADAConv2d) and model.layer2[0].conv1.stride == 2
    gp.save_recipe(tmp_path / "c.pt", model, recipe)
    again, _ = gp.load_model(str(tmp_path / "c.pt"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))
    report = export_model(again, recipe.input_shape, tmp_path / "c.onnx", ExportConfig(lowering="dense", dynamic_batch=True), provenance=recipe.provenance())
    assert report.max_abs_diff <= 1e-4
    import onnx

    ops = {n.op_type for n in onnx.load(tmp_path / "c.onnx").graph.node}
    assert not ops & {"Sin", "Cos", "BatchNormalization"}  # plain ops; BN folded into the blocks' value projections


def test_bench_times_and_profiles_cada_blocks(tmp_path):
    """`bench` exports a CADA recipe on the fly, times it against the plain network in the same runs
    and attributes profiled time to the blocks."""
    cli("convert", "resnet20", "--to", "cada", "--target", "layer1.0.conv1", "-o", tmp_path / "c.pt")
    result = cli("bench", tmp_path / "c.pt", "--baseline", "resnet20", "--torch", "--runs", "5", "--warmup", "1",
                 "--profile", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert {(r["model"], r["runtime"]) for r in report["results"]} >= {(str(tmp_path / "c.pt"), "onnxruntime"), (str(tmp_path / "c.pt"), "pytorch")}
    assert all(r["p50_ms"] > 0 for r in report["results"])
    assert any(layer.startswith("layer1.0.conv1") for layer in report["profiles"][str(tmp_path / "c.pt")])


def test_cada_conversion_errors(tmp_path):
    valid = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3, padding=1, dilation=2))
    with pytest.raises(ConversionError, match="layer '0': .*padding 0, 0|layer '0': .*padding \\(0, 0\\)"):
        gp.gaborize_(valid, gp.ConversionSpec(targets=("0",), to="cada"))
    with pytest.raises(ConversionError, match="layer '1': CADA has no dilation"):
        gp.gaborize_(valid, gp.ConversionSpec(targets=("1",), to="cada"))
    with pytest.raises(ConversionError, match="strict invariance has one kernel per head"):
        gp.ConversionSpec(first=1, to="cada", invariance="strict", bases=3)
    with pytest.raises(ConversionError, match="`freeze` applies to Gabor banks"):
        gp.ConversionSpec(first=1, to="cada", freeze=("theta",))
    one_line_error(cli("convert", "resnet20", "--to", "cada", "--layers", "1", "--invariance", "none", "--context", "0", "-o", tmp_path / "x.pt"),
                   "context must be at least 1")
    assert not (tmp_path / "x.pt").exists()
