"""Fuzz: every command, driven with random and malformed options and files, ends cleanly.

For each example, hypothesis picks a command and a random subset of its options, each with a value
from a pool of good, bad and absurd values (and real files: a good recipe, an ONNX file, corrupt,
empty, foreign, hostile and plain-state_dict files, a directory, a missing path). Whatever it picks:

- no uncaught exception and no traceback (a refusal is exit code 1 or 2 with a message);
- a failed command leaves no output file behind, and an existing file it was pointed at intact;
- no input file changes, and the hostile recipe's payload never runs.

The examples are derandomised, so CI runs the same ones every time; FUZZ_EXAMPLES=N runs more.
"""

import hashlib
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from gaborprune.cli import app

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
runner = CliRunner()
SHAPE = "3,16,16"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Input files, made once: every kind a user or a stranger could hand the program."""
    d = tmp_path_factory.mktemp("fuzz-inputs")
    ok = runner.invoke(app, ["convert", "resnet20", "--layers", "1", "--input-shape", SHAPE, "--num-classes", "4", "-o", str(d / "good.pt")])
    assert ok.exit_code == 0, ok.output
    ok = runner.invoke(app, ["export", str(d / "good.pt"), "-o", str(d / "good.onnx"), "--lowering", "dense"])
    assert ok.exit_code == 0, ok.output
    (d / "corrupt.pt").write_bytes(os.urandom(300))
    (d / "empty.pt").write_bytes(b"")
    (d / "text.onnx").write_text("not a model\n")
    torch.save({"weight": torch.zeros(2)}, d / "plain.pt")
    hostile = torch.load(d / "good.pt", weights_only=True)
    hostile["source"] = {"spec": "os:system", "num_classes": None, "kwargs": {"command": f"touch {d / 'PWNED'}"}}
    torch.save(hostile, d / "hostile.pt")
    (d / "folder").mkdir()
    return d


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


# -- value pools: half good values, half bad or absurd ones -----------------------------------------
ABSURD = ["", " ", "-1", "0", "nan", "inf", "-inf", "1e309", "99999999999999999999999", "abc", ",", "=", "1,,2", "é"]  # no NUL: argv cannot carry one


def pool(good: list[str], bad: list[str] = ()) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(good), st.sampled_from([*bad, *ABSURD]))


COUNTS = pool(["1", "2"])  # epochs, runs, layers...: small when valid, so a run stays short
FLOATS = pool(["0.01", "0.5", "1"], ["1.5", "-0.1", "1e-30"])
SHAPES = pool([SHAPE, "3,8,8"], ["1,16,16", "3,1,1", "3,16", "0,16,16", "3,16,16,16", "1," + SHAPE, "100000," + SHAPE])
DATA = pool(["fake:32:4", "fake:64:4"], ["fake:0", "fake:10:0", "fake:10:1", "cifar10:/nonexistent", "imagefolder:/nonexistent", "mnist"])
GOOD_SOURCES = ["good.pt", "good.onnx", "resnet20", "hostile.pt"]
BAD_SOURCES = ["corrupt.pt", "empty.pt", "plain.pt", "folder", "missing.pt", "text.onnx", "resnet2", "torchvision:nope", "os:system", "gaborprune:nothing"]
SOURCES = pool(GOOD_SOURCES, BAD_SOURCES)
MODEL_ARGS = pool(["k1=3", "num_classes=4"], ["channels=0", "blocks=-1", "gabor=maybe", "k1=0", "widths=[0]", "x", "=1", "num_classes=-3"])
OUTPUTS = pool(["out.pt", "out.onnx", "out.json", "existing.pt"], ["sub/dir/out.pt", "", ".", "folder"])
BATCHES = pool(["8", "1"], ["100000"])

COMMON = {"--num-classes": COUNTS, "--input-shape": SHAPES, "--model-arg": MODEL_ARGS, "--threads": COUNTS, "--weights": SOURCES}
COMMANDS = {
    "convert": {"--layers": COUNTS, "--kernel-size": pool(["3", "5"], ["4", "1001"]), "--init": pool(["fit", "random"]),
                "--seed": COUNTS, "--to": pool(["gabor", "cada"]), "--target": pool(["conv1"], ["re:(", "nope"]),
                "--freeze": pool(["theta"]), "--bases": COUNTS, "--context": COUNTS, **COMMON},
    "inspect": {**COMMON},
    "finetune": {"--epochs": COUNTS, "--batch-size": BATCHES, "--lr": FLOATS, "--momentum": FLOATS, "--warmup-epochs": FLOATS,
                 "--sparsity": FLOATS, "--seed": COUNTS, "--label-smoothing": FLOATS, "--optimizer": pool(["sgd", "adamw"]),
                 "--resize": COUNTS, "--resume": SOURCES, **COMMON},
    "eval": {"--batch-size": BATCHES, "--resize": COUNTS, **COMMON},
    "prune": {"--threshold": FLOATS, "--ratio": pool(["0.5", "conv1=0.5"], ["conv1=1.5", "x=0.1"]), "--keep": pool(["3", "conv1=2"]),
              "--data": DATA, "--finetune-epochs": COUNTS, "--seed": COUNTS, "--sweep": pool(["0.01,0.1"], ["2"]), "--input-shape": SHAPES,
              "--threads": COUNTS, "--batch-size": BATCHES},
    "export": {"--input-shape": pool(["1," + SHAPE, "2," + SHAPE], ["100000," + SHAPE, SHAPE]), "--opset": pool(["17", "20"], ["99"]),
               "--lowering": pool(["dense"]), "--atol": FLOATS, "--pad-channels": pool(["0", "8"], ["3"]), "--quantize": pool(["int8"], ["int4"]),
               "--data": DATA, "--threads": COUNTS},
    "bench": {"--batch-size": pool(["1", "1,2"], ["100000"]), "--threads": pool(["1"], ["100000"]), "--warmup": COUNTS, "--runs": COUNTS,
              "--provider": pool(["cpu"], ["cuda"]), "--baseline": SOURCES, "--precision": FLOATS, "--data": DATA},
}
# bench times until its medians are tight (60 s by default): one second is plenty for the fuzz's tiny models
REQUIRED = {"convert": {"-o": OUTPUTS}, "finetune": {"--data": DATA, "-o": OUTPUTS}, "eval": {"--data": DATA}, "export": {"-o": OUTPUTS},
            "bench": {"--max-seconds": st.just("1")}}
FLAGS = {"convert": ["--force"], "inspect": ["--force"], "finetune": ["--force"], "eval": ["--force"],
         "prune": ["--force", "--dry-run"], "export": ["--force", "--dynamic-batch"], "bench": ["--force", "--profile", "--int8"]}
OUTPUT_OPTIONS = {"convert": ["--json"], "inspect": ["--png", "--json"], "finetune": ["--json"], "eval": ["--json"],
                  "prune": ["-o", "--json", "--png"], "export": ["--json"], "bench": ["--json", "--markdown", "--png"]}
FILE_OPTIONS = {"--weights", "--resume", "--baseline"}


@st.composite
def invocations(draw):
    command = draw(st.sampled_from(sorted(COMMANDS)))
    args = [command, draw(SOURCES)]
    for option in draw(st.lists(st.sampled_from(sorted(COMMANDS[command])), max_size=4, unique=True)):
        args += [option, draw(COMMANDS[command][option])]
    for option, values in REQUIRED.get(command, {}).items():
        args += [option, "@out/" + draw(values) if option == "-o" else draw(values)]
    for option in draw(st.lists(st.sampled_from(OUTPUT_OPTIONS[command]), max_size=2, unique=True)):
        args += [option, "@out/" + draw(OUTPUTS)]
    args += draw(st.lists(st.sampled_from(FLAGS[command]), max_size=2, unique=True))
    return args


def _resolve(arg: str, inputs: Path, out: Path, is_file_value: bool) -> str:
    """Pool names become real paths: outputs in a fresh folder, input files among the made ones."""
    if arg.startswith("@out/"):
        return str(out / arg.removeprefix("@out/"))
    if is_file_value and arg.strip() and (arg == "missing.pt" or (inputs / arg).exists()):
        return str(inputs / arg)
    return arg


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(invocation=invocations())
def test_no_command_crashes_or_leaves_partial_files(files, tmp_path_factory, invocation):
    raw = invocation
    out = tmp_path_factory.mktemp("fuzz-out")
    (out / "existing.pt").write_bytes(b"the user's file")
    (out / "folder").mkdir()
    args = [raw[0], _resolve(raw[1], files, out, True)]
    for i, arg in enumerate(raw[2:], start=2):
        args.append(_resolve(arg, files, out, raw[i - 1] in FILE_OPTIONS))
    (files / "PWNED").unlink(missing_ok=True)  # each example is judged on its own
    inputs_before, outputs_before = _digest(files), _digest(out)

    threads = torch.get_num_threads()
    try:
        result = runner.invoke(app, args)
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide; the rest of the suite runs on one

    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert "Traceback" not in result.output, (args, result.output[-2000:])
    assert not (files / "PWNED").exists(), args
    assert _digest(files) == inputs_before, args
    if result.exit_code != 0:
        assert result.exit_code in (1, 2), (args, result.exit_code)
        left = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
        assert left == {Path("existing.pt")}, (args, left, result.output[-1000:])
        assert _digest(out) == outputs_before, args
        assert "error" in result.output.lower() or "usage" in result.output.lower(), (args, result.output[-1000:])


# -- the files themselves: mutated recipes, recipe metadata, ONNX files and CIFAR batches -----------
FILE_EXAMPLES = max(1, EXAMPLES // 10)  # each file fuzz runs commands end to end: a tenth of the option fuzz
JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8)),
                       lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                       max_leaves=12)


def _clean(result, args) -> None:
    """The command ended as a command should: done, or refused in one line; never a traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert "Traceback" not in result.output, (args, result.output[-2000:])
    assert result.exit_code in (0, 1), (args, result.exit_code, result.output[-1000:])
    if result.exit_code == 1:
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr[-2000:])


@settings(max_examples=FILE_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(["good.pt", "good.onnx"]), edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.floats(0, 1)), command=st.sampled_from(["inspect", "eval"]))
def test_corrupted_bytes_of_a_recipe_or_onnx_file_end_in_one_line(files, tmp_path_factory, kind, edits, cut, command):
    """Bytes of a good file overwritten at random places, and maybe cut short."""
    data = bytearray((files / kind).read_bytes())
    for where, value in edits:
        data[min(int(where * len(data)), len(data) - 1)] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = tmp_path_factory.mktemp("fuzz-bytes") / kind
    path.write_bytes(bytes(data))
    args = [command, str(path)] + (["--data", "fake:16:4"] if command == "eval" else [])
    _clean(runner.invoke(app, args), args)


@settings(max_examples=FILE_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(key=st.sampled_from(["metadata", "source", "input_shape", "steps", "format", "version"]), value=JSONISH,
       command=st.sampled_from(["inspect", "prune", "export"]))
def test_a_recipe_with_any_value_in_a_field_ends_in_one_line(files, tmp_path_factory, key, value, command):
    """A good recipe with one of its fields replaced by arbitrary plain data (what a hand-edited or
    crafted file holds)."""
    payload = torch.load(files / "good.pt", weights_only=True)
    payload[key] = value
    d = tmp_path_factory.mktemp("fuzz-fields")
    torch.save(payload, d / "r.pt")
    args = [command, str(d / "r.pt")] + {"inspect": [], "prune": ["--dry-run"], "export": ["-o", str(d / "r.onnx")]}[command]
    _clean(runner.invoke(app, args), args)


@settings(max_examples=FILE_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(props=st.dictionaries(st.sampled_from(["gaborprune.macs", "gaborprune.kernels_kept", "gaborprune.lowering", "gaborprune.input_shape",
                                               "gaborprune.source", "x\x1b[2J"]), st.one_of(st.text(max_size=12), JSONISH.map(str)), max_size=4),
       command=st.sampled_from(["inspect", "bench"]))
def test_onnx_metadata_of_any_value_ends_in_one_line(files, tmp_path_factory, props, command):
    import onnx

    model = onnx.load(files / "good.onnx")
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    d = tmp_path_factory.mktemp("fuzz-onnx")
    onnx.save(model, d / "m.onnx")
    args = [command, str(d / "m.onnx")] + (["--runs", "1", "--warmup", "0", "--max-seconds", "1"] if command == "bench" else [])
    result = runner.invoke(app, args)
    _clean(result, args)
    assert "\x1b" not in result.output, args  # a control character in a key is printed escaped


@settings(max_examples=FILE_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(images=st.integers(0, 12), labels=st.lists(st.integers(-3, 300), max_size=14), shape=st.sampled_from([(3072,), (3, 32, 32), (10,), ()]),
       dtype=st.sampled_from(["uint8", "float32", "int64"]), label_key=st.sampled_from([b"labels", "labels", b"fine_labels"]))
def test_a_cifar_batch_of_any_contents_ends_in_one_line(tmp_path_factory, images, labels, shape, dtype, label_key):
    import pickle

    import numpy as np

    d = tmp_path_factory.mktemp("fuzz-cifar") / "cifar-10-batches-py"
    d.mkdir()
    batch = {b"data": np.zeros((images, *shape), dtype=dtype), label_key: labels}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    args = ["eval", "resnet20", "--data", f"cifar10:{d}"]
    _clean(runner.invoke(app, args), args)
