"""Option values out of range: refused in one line naming the value, before any heavy work, by the
library where it receives them (the CLI only passes them on)."""

import math
import os

import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import gaborprune as gp
from gaborprune import _validate
from gaborprune._threads import usable_cores
from gaborprune._validate import MAX_SEED, check_batch_memory, check_finite, check_int, check_seed, check_threads
from gaborprune.convert.spec import ConversionSpec, gaborize_
from gaborprune.data import load_data
from gaborprune.errors import ConversionError, GaborPruneError, ModelSourceError, TrainingError
from gaborprune.export.api import ExportConfig
from gaborprune.export.bench_models import BenchModel
from gaborprune.export.onnx import ExportError
from gaborprune.models import ModelSource
from gaborprune.models.cifar import CADANet, CifarResNet, CifarVGG, resnet20_altered
from gaborprune.probe import InputShapeError, activation_bytes, probe
from gaborprune.train import TrainConfig, evaluate, finetune_
from gaborprune.train.loop import make_optimizer
from helpers import one_line_error, run

HUGE_SEED = "99999999999999999999999"
CPU = torch.device("cpu")


def plain_net(num_classes: int = 4) -> nn.Module:
    """Plain convolutions only (input 3x16x16), as a `test_validation:plain_net` model source."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

TRAIN = ["--num-classes", "4", "--data", "fake:64:4", "--input-shape", "3,16,16", "--epochs", "1"]
EVAL = ["eval", "resnet20", "--num-classes", "4", "--data", "fake:64:4", "--input-shape", "3,16,16"]
SMALL = ["--input-shape", "3,16,16"]


def _convert(*args):
    return ["convert", "resnet20", *args, "-o", "{out}/c.pt"]


def _finetune(*args):
    return ["finetune", "resnet20", *TRAIN, *args, "-o", "{out}/f.pt"]


def _inspect(model, arg):
    return ["inspect", model, "--model-arg", arg, "--json", "{out}/i.json"]


CASES = [
    # seeds: 0 .. 2**63-1 (torch.manual_seed overflowed with a traceback)
    (_convert("--layers", "1", "--seed", HUGE_SEED), ["--seed must be an integer from 0 to 2**63-1", HUGE_SEED]),
    (_convert("--layers", "1", "--seed", "-1"), ["--seed must be an integer from 0 to 2**63-1, not -1"]),
    (_finetune("--seed", HUGE_SEED), ["--seed must be an integer from 0 to 2**63-1", HUGE_SEED]),
    (["prune", "resnet20", "--dry-run", "--seed", HUGE_SEED, "--json", "{out}/p.json"], ["--seed must be an integer", HUGE_SEED]),
    # floats: finite (NaN fails every comparison; inf passed the range checks)
    (_finetune("--warmup-epochs", "inf"), ["--warmup-epochs must be a finite number, not inf"]),
    (_finetune("--sparsity", "inf"), ["--sparsity must be a finite number, not inf"]),
    (_finetune("--lr", "inf"), ["--lr must be a finite number, not inf"]),
    (_finetune("--lr", "nan"), ["--lr must be a finite number, not nan"]),
    (_finetune("--momentum", "nan"), ["--momentum must be a finite number, not nan"]),
    (_finetune("--weight-decay", "inf"), ["--weight-decay must be a finite number, not inf"]),
    (_finetune("--label-smoothing", "nan"), ["--label-smoothing must be a finite number, not nan"]),
    (["prune", "resnet20", "--dry-run", "--lr", "inf", "--json", "{out}/p.json"], ["--lr must be a finite number, not inf"]),
    (["prune", "resnet20", "--dry-run", "--threshold", "nan"], ["--threshold must be in [0, 1)", "not nan"]),
    (["prune", "resnet20", "--dry-run", "--threshold", "inf"], ["--threshold must be in [0, 1)", "not inf"]),
    (["prune", "resnet20", "--dry-run", "--ratio", "inf"], ["--ratio inf is out of range"]),
    (["prune", "resnet20", "--dry-run", "--ratio", "conv1=nan"], ["--ratio conv1=nan is out of range"]),
    (["export", "resnet20", "--atol", "inf", "-o", "{out}/e.onnx"], ["--atol must be a finite number, not inf"]),
    (["export", "resnet20", "--atol", "nan", "-o", "{out}/e.onnx"], ["--atol must be a finite number, not nan"]),
    # sizes: positive, and a training batch no larger than the training split
    (EVAL + ["--batch-size", "0"], ["--batch-size must be an integer of at least 1, not 0"]),
    (EVAL + ["--batch-size", "-3"], ["--batch-size must be an integer of at least 1, not -3"]),
    (_finetune("--batch-size", "0"), ["--batch-size must be an integer of at least 1, not 0"]),
    (_finetune("--batch-size", "100000"), ["--batch-size 100000 is larger than the 52 training samples of 'fake:64:4'", "--batch-size 52 or less"]),
    (EVAL + ["--resize", "0"], ["--resize must be an integer of at least 1, not 0"]),
    (EVAL + ["--resize", "-4"], ["--resize must be an integer of at least 1, not -4"]),
    (EVAL + ["--resize", "1000"], ["--resize 1000 does not suit a 16-pixel crop; give 16 to 128"]),
    (_finetune("--batch-size", "16", "--resize", "0"), ["--resize must be"]),
    (["eval", "resnet20", "--data", "fake:0"], ["dataset 'fake:0' is not fake:N or fake:N:CLASSES"]),
    (["eval", "resnet20", "--data", "fake:-5"], ["dataset 'fake:-5' is not fake:N"]),
    (["eval", "resnet20", "--data", "fake:10:0"], ["dataset 'fake:10:0' is not fake:N", ">= 2 classes"]),
    (["eval", "resnet20", "--data", "fake:10:1"], ["dataset 'fake:10:1' is not fake:N", ">= 2 classes"]),
    (["eval", "resnet20", "--data", "fake:1000000000000:4", *SMALL], ["dataset 'fake:1000000000000:4' needs about", "of memory", "N of fake:N"]),
    # model arguments of the built-in networks (channels=0 was a ZeroDivisionError traceback)
    (["convert", "resnet20_altered", "--layers", "1", "--model-arg", "channels=0", "-o", "{out}/c.pt"],
     ["model argument channels must be an integer of at least 1, not 0"]),
    (_inspect("cada_net", "blocks=-1"), ["model argument blocks must be an integer of at least 1, not -1"]),
    (_inspect("resnet20_altered", "gabor=maybe"), ["model argument gabor must be true or false, not 'maybe'"]),
    (_inspect("resnet20_altered", "k1=0"), ["model argument k1 must be an integer of at least 1, not 0"]),
    (_inspect("resnet20_altered", "k2=4"), ["model argument k2 must be an odd kernel size from 1 to 31, not 4"]),
    (_inspect("resnet20_altered", "k1=1001"), ["model argument k1 must be an odd kernel size from 1 to 31, not 1001"]),
    (_inspect("cada_net", "widths=[0]"), ["model argument widths must be an integer of at least 1, not 0"]),
    (_inspect("cada_net", "widths=[]"), ["model argument widths must be a non-empty list"]),
    (_inspect("cada_net", "widths=8"), ["model argument widths must be a non-empty list"]),
    (_inspect("resnet20", "num_classes=0"), ["model argument num_classes must be an integer of at least 1, not 0"]),
    # input shapes a model cannot take (resnet20 "ran" on 1x1 pixels), or whose memory does not fit
    (["inspect", "resnet20", "--input-shape", "3,1,1"], ["the model cannot run on input 3x1x1", "layer 'layer2.0.conv1' (stride 2x2) gets a 1x1 input",
                                                         "give a larger --input-shape"]),
    (["inspect", "resnet20", "--input-shape", "3,2,2"], ["cannot run on input 3x2x2", "layer 'layer3.0.conv1'"]),
    (["convert", "resnet20", "--target", "conv1", "--input-shape", "3,1,1", "-o", "{out}/c.pt"], ["cannot run on input 3x1x1"]),
    (_finetune("--batch-size", "16", "--input-shape", "3,1,1"), ["cannot run on input 3x1x1"]),
    (EVAL + ["--input-shape", "3,1,1"], ["cannot run on input 3x1x1"]),
    (["export", "resnet20", "--input-shape", "1,3,1,1", "-o", "{out}/e.onnx"], ["cannot run on input 3x1x1"]),
    (["export", "resnet20", "--input-shape", "1000000,3,32,32", "-o", "{out}/e.onnx"],
     ["exporting at batch 1000000 needs about", "of memory", "available; give a smaller N of --input-shape N,C,H,W (at most about"]),
    (["export", "resnet20", "--pad-channels", "3", "-o", "{out}/e.onnx"], ["--pad-channels must be 0 (off) or a power of two from 2 to 64", "not 3"]),
    (["export", "resnet20", "--pad-channels", "128", "-o", "{out}/e.onnx"], ["--pad-channels must be 0 (off) or a power of two", "not 128"]),
    # kernel sizes, layer counts, CADA knobs: bounded, refused before anything is fitted
    (_convert("--layers", "1", "--kernel-size", "1001"), ["--kernel-size 1001 is too large; give at most 31"]),
    (_convert("--target", "conv1", "--kernel-size", "21", "--input-shape", "3,8,8"),
     ["--kernel-size 21 is too large for the 8x8 input of layer 'conv1' (its outer taps would only ever see padding); give at most 15"]),
    (_convert("--layers", "9", "--kernel-size", "17", *SMALL), ["--kernel-size 17 is too large for the 8x8 input of layer 'layer2.0.conv2'",
                                                                "give at most 15"]),
    (_convert("--layers", "10000", *SMALL), ["the model has only 21 convolutions to convert; give --layers 21 or fewer"]),
    (_convert("--layers", "1", "--to", "cada", "--kernel-size", "1001"), ["--kernel-size 1001 is too large"]),
    (_convert("--layers", "1", "--to", "cada", "--bases", "100000"), ["--bases 100000 is too many; give at most 64"]),
    (_convert("--layers", "1", "--to", "cada", "--context", "1001"), ["--context 1001 is too large; give at most 31"]),
    (_convert("--layers", "1", "--to", "cada", "--heads", "20000"), ["heads (20000) must divide out_channels (16)"]),
    (_convert("--layers", "1", "--to", "cada", "--heads", "0"), ["--heads must be an integer of at least 1, not 0"]),
    # thread counts: 1 .. the usable cores (bench --threads 100000 hung)
    (["bench", "resnet20", "--threads", "100000", "--json", "{out}/b.json"], ["must be from 1 to", "not 100000"]),
    (["bench", "resnet20", "--threads", "1,100000", "--json", "{out}/b.json"], ["must be from 1 to", "not 100000"]),
    (["export", "resnet20", "--threads", "100000", "-o", "{out}/e.onnx"], ["must be from 1 to", "not 100000"]),
    (["bench", "resnet20", "--runs", "0"], ["--runs must be at least 1"]),
    (["bench", "resnet20", "--warmup", "-1"], ["--warmup at least 0"]),
]


@pytest.mark.parametrize("args, fragments", CASES, ids=[" ".join(a).replace("{out}/", "") for a, _ in CASES])
def test_bad_value_is_one_line_and_writes_nothing(tmp_path, args, fragments):
    one_line_error(run(*[a.replace("{out}", str(tmp_path)) for a in args]), *fragments)
    assert list(tmp_path.iterdir()) == []


def test_bench_refuses_a_batch_that_cannot_fit(tmp_path):
    # exported at batch 1 to learn the model, then refused before timing batch 10**9
    one_line_error(run("bench", "resnet20", "--batch-size", "1,1000000000", "--runs", "1", "--warmup", "0", "--json", tmp_path / "b.json"),
                   "timing at batch 1000000000 needs about", "give a smaller --batch-size (at most about")
    assert list(tmp_path.iterdir()) == []


def test_an_eval_batch_larger_than_the_data_is_one_correct_batch():
    model, recipe = gp.load_model("test_validation:plain_net", input_shape=(3, 16, 16))
    _, test = load_data("fake:64:4", recipe.input_shape)
    small, whole = (evaluate(model, test, CPU, batch_size=b) for b in (5, 100000))
    assert whole.samples == small.samples == len(test) == 12
    assert whole.top1 == small.top1 and whole.top5 == small.top5
    assert whole.loss == pytest.approx(small.loss, rel=1e-5)


def test_finetune_refuses_a_batch_larger_than_the_split_before_training(tmp_path):
    model, recipe = gp.load_model("test_validation:plain_net", input_shape=(3, 16, 16))
    train, test = load_data("fake:64:4", recipe.input_shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoints = gp.train.Checkpoints(tmp_path / "f.pt")
    with pytest.raises(TrainingError, match="`batch_size` 53 is larger than the 52 training samples of 'fake:64:4'; give `batch_size` 52 or less"):
        finetune_(model, recipe, train, test, TrainConfig(epochs=1, batch_size=53), device=CPU, data_name="fake:64:4",
                  checkpoints=checkpoints)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and list(tmp_path.iterdir()) == []
    # the whole split as one batch is allowed
    finetune_(model, recipe, train, test, TrainConfig(epochs=1, batch_size=52), device=CPU, data_name="fake:64:4")


def test_a_huge_finite_warmup_is_the_whole_run():
    model = nn.Linear(2, 2)
    _, schedule = make_optimizer(model, TrainConfig(epochs=2, warmup_epochs=1e308), steps_per_epoch=3)  # round(1e308 * 3) overflowed
    assert schedule.get_last_lr()[0] == pytest.approx(0.05 / 6)


# -- the library: every config and builder checks what it receives ------------------------------
@pytest.mark.parametrize("field", ["lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing", "sparsity"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_train_config_floats_are_finite(field, value):
    with pytest.raises(GaborPruneError, match=f"`{field}` must be a finite number"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=MAX_SEED + 1), "`seed` must be an integer from 0 to 2\\*\\*63-1"),
    (dict(seed=-1), "`seed` must be an integer"),
    (dict(seed=1.5), "`seed` must be an integer"),
    (dict(seed=True), "`seed` must be an integer"),
    (dict(epochs=0), "`epochs` must be an integer of at least 1, not 0"),
    (dict(epochs=2.5), "`epochs` must be an integer"),
    (dict(batch_size=0), "`batch_size` must be an integer of at least 1, not 0"),
    (dict(lr="0.1"), "`lr` must be a finite number, not '0.1'"),
])
def test_train_config_refuses(kwargs, message):
    with pytest.raises(GaborPruneError, match=message):
        TrainConfig(**kwargs)
    assert TrainConfig(seed=MAX_SEED).seed == MAX_SEED and TrainConfig(seed=0).seed == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(first=1, seed=MAX_SEED + 1), "`seed` must be an integer from 0 to 2\\*\\*63-1"),
    (dict(first=1, seed=-3), "`seed` must be an integer"),
    (dict(first=0), "`first` must be an integer of at least 1, not 0"),
    (dict(first=1.0), "`first` must be an integer"),
    (dict(first=1, kernel_size=0), "`kernel_size` must be an integer of at least 1, not 0"),
    (dict(first=1, kernel_size=33), "`kernel_size` 33 is too large; give at most 31"),
    (dict(first=1, fit_steps=-1), "`fit_steps` must be an integer of at least 0"),
    (dict(first=1, to="cada", heads=0), "`heads` must be an integer of at least 1"),
    (dict(first=1, to="cada", bases=65), "`bases` 65 is too many"),
    (dict(first=1, to="cada", context=33), "`context` 33 is too large"),
])
def test_conversion_spec_refuses(kwargs, message):
    with pytest.raises(ConversionError, match=message):
        ConversionSpec(**kwargs)


def test_conversion_spec_knob_check_allocates_nothing():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: the peak so far
    spec = ConversionSpec(first=1, to="cada", heads=100000)  # a trial block of 10**5 heads was 40 GB; divisibility is the layer's check
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert spec.heads == 100000 and spec.cada_knobs()["bases"] == 4
    assert grown < 200 * 1024, f"the check raised the peak memory by {grown} KiB"


def test_kernels_larger_than_a_layer_input_are_refused_before_fitting():
    model = plain_net()
    with pytest.raises(ConversionError, match="`kernel_size` 17 is too large for the 8x8 input of layer '0' .*; give at most 15"):
        gaborize_(model, ConversionSpec(first=1, kernel_size=17), (3, 8, 8))
    with pytest.raises(ConversionError, match="`kernel_size` 9 is too large for the 4x6 input of layer '0' .*; give at most 7"):
        gaborize_(model, ConversionSpec(targets=("0",), kernel_size=9), (3, 4, 6))
    assert not any(isinstance(m, gp.GaborConv2d) for m in model.modules())
    with pytest.raises(ConversionError, match="the model has only"):
        gaborize_(model, ConversionSpec(first=1000), (3, 16, 16))
    report = gaborize_(model, ConversionSpec(first=1, kernel_size=15, init="random"), (3, 8, 8))  # 2 x 8 - 1: the bound itself
    assert report.layers[0].kernel_size == (15, 15)


@pytest.mark.parametrize("k, touches", [(15, True), (17, False)])
def test_the_bound_is_where_outer_taps_stop_touching_the_image(k, touches):
    """The oracle for 2H - 1: on an 8x8 input, a same-padded kernel whose only weights sit on its
    outer ring reads padding alone once k > 15."""
    conv = nn.Conv2d(1, 1, k, padding=k // 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.weight[..., 1:-1, 1:-1] = 0.0
    assert bool(conv(torch.ones(1, 1, 8, 8)).abs().sum() > 0) == touches


@pytest.mark.parametrize("kwargs, message", [
    (dict(atol=math.inf), "`atol` must be a finite number, not inf"),
    (dict(atol=math.nan), "`atol` must be a finite number, not nan"),
    (dict(atol=0.0), "`atol` must be positive"),
    (dict(pad_channels=3), "`pad_channels` must be 0 \\(off\\) or a power of two from 2 to 64"),
    (dict(pad_channels=1), "`pad_channels` must be 0"),
    (dict(pad_channels=-8), "`pad_channels` must be 0"),
    (dict(threads=0), "`threads` must be from 1 to"),
    (dict(threads=10**6), "`threads` must be from 1 to"),
    (dict(quantize="int4"), "unknown `quantize` 'int4'; known: int8"),
])
def test_export_config_refuses(kwargs, message):
    with pytest.raises(ExportError, match=message):
        ExportConfig(**kwargs)
    assert ExportConfig(pad_channels=0).pad_channels == 0 and ExportConfig(pad_channels=64).pad_channels == 64
    assert ExportConfig(quantize="int8").quantize is True and ExportConfig().quantize is False


@pytest.mark.parametrize("build, message", [
    (lambda: resnet20_altered(channels=0), "model argument channels must be an integer of at least 1, not 0"),
    (lambda: resnet20_altered(k1=9, k2=6), "model argument k2 must be an odd kernel size"),
    (lambda: resnet20_altered(gabor="maybe"), "model argument gabor must be true or false"),
    (lambda: resnet20_altered(num_classes=0), "model argument num_classes must be"),
    (lambda: CifarResNet(20, stem_kernels=(3, 3), stem_channels=-1), "model argument stem_channels must be"),
    (lambda: CifarVGG(16, num_classes=-2), "model argument num_classes must be"),
    (lambda: CADANet(widths=(16, 0)), "model argument widths must be an integer of at least 1, not 0"),
    (lambda: CADANet(widths=()), "model argument widths must be a non-empty list"),
    (lambda: CADANet(blocks=0), "model argument blocks must be an integer of at least 1, not 0"),
    (lambda: CADANet(blocks=1.5), "model argument blocks must be an integer"),
])
def test_builders_refuse_nonsense_arguments(build, message):
    with pytest.raises(ModelSourceError, match=message):
        build()


def divides_by_zero(num_classes: int = 10):
    return 1 // 0


def overflows(num_classes: int = 10):
    return math.exp(1000)


@pytest.mark.parametrize("factory, detail", [("divides_by_zero", "by zero"), ("overflows", "math range error")])
def test_arithmetic_errors_of_any_builder_are_one_line(factory, detail):
    with pytest.raises(ModelSourceError, match=f"model 'test_validation:{factory}' could not be built: .*{detail}"):
        ModelSource(f"test_validation:{factory}").build()


# -- the shared checks --------------------------------------------------------------------------
def test_shared_checks_return_the_value_and_name_it_when_refused():
    assert check_seed(MAX_SEED) == MAX_SEED and check_finite(0.5, "x") == 0.5 and check_int(0, "x", 0) == 0
    assert check_threads(1) == 1 and check_threads(usable_cores()) == usable_cores()
    with pytest.raises(GaborPruneError, match=f"`threads` must be from 1 to {usable_cores()} \\(the cores this process may use\\), not {usable_cores() + 1}"):
        check_threads(usable_cores() + 1)
    with pytest.raises(ConversionError, match="threads must be from 1"):
        check_threads(True, "threads", ConversionError)
    with pytest.raises(GaborPruneError, match="--x must be a finite number, not True"):
        check_finite(True, "--x")


def test_batch_memory_is_refused_against_what_is_available(monkeypatch):
    monkeypatch.setattr(_validate, "available_memory", lambda: 1000)
    check_batch_memory(100, 10, "timing at batch 10")  # exactly fits
    with pytest.raises(GaborPruneError, match="timing at batch 11 needs about .* for 11 samples .*more than the .* available; "
                                              "give a smaller `batch_size` \\(at most about 10\\)"):
        check_batch_memory(100, 11, "timing at batch 11")
    with pytest.raises(GaborPruneError, match="give a smaller input"):
        check_batch_memory(2000, 1, "one sample")
    monkeypatch.setattr(_validate, "available_memory", lambda: None)  # unknown: nothing refused
    check_batch_memory(10**15, 10**6, "anything")


def test_available_memory_is_read_from_the_system():
    available = _validate.available_memory()
    assert available > 0 if os.path.exists("/proc/meminfo") else available is None or available > 0


def test_activation_bytes_counts_the_input_and_each_output_once():
    x = 3 * 8 * 8 * 4  # float32 input, 3x8x8
    y = 4 * 8 * 8 * 4  # the convolution's output
    assert activation_bytes(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True)), (3, 8, 8)) == x + y  # in place: one tensor
    assert activation_bytes(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), (3, 8, 8)) == x + 2 * y


@pytest.mark.parametrize("batch", ["N", 2])
def test_onnx_sample_bytes_from_shape_inference(batch):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3, 8, 8])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = BenchModel("m", proto.SerializeToString(), proto, 0)
    assert model.sample_bytes == 3 * (3 * 8 * 8 * 4)  # x, h (inferred) and y, per sample
    assert not proto.graph.value_info  # the intermediate's shape came from inference


def test_probe_refuses_an_input_smaller_than_a_stride():
    strided = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    assert probe(strided, (3, 4, 4)).shape == (1, 4, 1, 1)
    with pytest.raises(InputShapeError, match="cannot run on input 3x2x2: layer '2' \\(stride 2x2\\) gets a 1x1 input"):
        probe(strided, (3, 2, 2))
    with pytest.raises(InputShapeError, match="cannot run on input 3x1x1: layer '1'"):
        probe(strided, (3, 1, 1))
    pooled = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1), nn.Flatten())  # runs on 1x3, meaninglessly
    with pytest.raises(InputShapeError, match="layer '0' \\(stride 2x2\\) gets a 1x3 input"):
        probe(pooled, (3, 1, 3))


def test_resize_is_checked_for_every_dataset_kind():
    with pytest.raises(GaborPruneError, match="`resize` must be an integer of at least 1, not 0"):
        load_data("fake:64:4", (3, 16, 16), resize=0)
    train, _ = load_data("fake:64:4", (3, 16, 16), resize=18)
    assert len(train) == 52


def test_onnx_sample_bytes_leave_out_tensors_without_the_batch_dimension():
    """An int8 graph's dequantised weights do not grow with the batch: counted per sample they made
    a VGG-16 bench refuse batch 32 for 22 GB it would not use."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [3, 8, 8], [0.5] * (3 * 8 * 8))
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["c"]), helper.make_node("Add", ["x", "c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert BenchModel("m", proto.SerializeToString(), proto, 0).sample_bytes == 2 * (3 * 8 * 8 * 4)  # x and y, not c
