"""Hostile and malformed ONNX files (issue 24, items 3, 5 and 10): external data only from inside the
model's folder and resolved against it, sizes checked before anything is allocated, gaborprune
metadata of the wrong shape, and ONNX Runtime's warnings kept off the terminal.

The models are built here with `onnx.helper`: input [batch, 3, 4, 4] -> Flatten -> MatMul W[48, 4]
-> Add B[4] -> logits [batch, 4]. MACs count W's non-zero entries (`onnx_counts`), so which bytes
were loaded as W shows in `inspect`'s MACs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import gaborprune as gp
from gaborprune.errors import OnnxFileError
from gaborprune.export.bench_models import load_onnx
from gaborprune.export.runtime import session
from helpers import one_line_error, run

DATA = "fake:40:4"
QUICK = ["--runs", "3", "--warmup", "0", "--max-seconds", "0.2"]  # bench: the checks are the point, not the timing


def weights(zero_rows: int = 0) -> np.ndarray:
    """W[48, 4] of ones with its first `zero_rows` rows zero: MACs per image = 4 * (48 - zero_rows)."""
    w = np.ones((48, 4), np.float32)
    w[:zero_rows] = 0
    return w


def model(w: TensorProto | None = None, b: TensorProto | None = None, meta: dict[str, str] | None = None,
          input_dims: tuple = ("batch", 3, 4, 4), extra: list | None = None) -> onnx.ModelProto:
    w = w if w is not None else numpy_helper.from_array(weights(), "W")
    b = b if b is not None else numpy_helper.from_array(np.arange(4, dtype=np.float32) / 10, "B")
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "B"], ["output"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_dims))],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])], [b, w, *(extra or [])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    for key, value in (meta or {}).items():
        entry = m.metadata_props.add()
        entry.key, entry.value = key, value
    return m


def external(name: str, location: str, array: np.ndarray | None = None, dims: list[int] | None = None, **entries: object) -> TensorProto:
    """A tensor `name` of `array`'s type and shape (or `dims`) whose data is declared at `location` (plus `offset`, `length`)."""
    array = array if array is not None else weights()
    t = numpy_helper.from_array(array, name)
    t.ClearField("raw_data")
    if dims is not None:
        del t.dims[:]
        t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, **entries}.items():
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)
    return t


def save(m: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(m.SerializeToString())  # as it is: onnx.save would touch external data
    return path


@pytest.fixture
def opened():
    """The absolute paths Python opens while the test runs (the audit hook sees builtins.open and os.open;
    every external-data read goes through the loader's os.open); the test clears it after its set-up."""
    _OPENED.clear()
    _RECORDING[0] = True
    yield _OPENED
    _RECORDING[0] = False


_OPENED: list[str] = []
_RECORDING = [False]


def _audit(event, args):
    if _RECORDING[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


# -- external data stays inside the model's folder, resolved against it -----------------------------------
def _inspect_macs(path) -> int:
    out = Path(str(path) + ".json")
    result = run("inspect", path, "--json", out, "--force")
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())["macs"]


def _eval(path) -> dict:
    out = Path(str(path) + ".eval.json")
    result = run("eval", path, "--data", DATA, "--threads", 1, "--json", out, "--force")
    assert result.exit_code == 0, result.output
    return {k: v for k, v in json.loads(out.read_text()).items() if k in ("top1", "top5", "loss", "samples")}


@pytest.mark.parametrize("folder", [".", "sub/deeper"])  # the data beside the model, or in a folder under it
def test_external_data_beside_the_model_is_read_from_any_working_directory(tmp_path, monkeypatch, folder):
    home = tmp_path / "models"
    (home / folder).mkdir(parents=True, exist_ok=True)
    weights(zero_rows=12).tofile(home / folder / "w.bin")  # 36 live rows: 144 MACs
    location = f"{folder}/w.bin" if folder != "." else "w.bin"
    path = save(model(external("W", location)), home / "ext.onnx")
    embedded = save(model(numpy_helper.from_array(weights(zero_rows=12), "W")), tmp_path / "embedded.onnx")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / folder).mkdir(parents=True)
    weights().tofile(elsewhere / folder / "w.bin")  # a decoy named like the location in the working directory: 192 MACs
    monkeypatch.chdir(elsewhere)
    for given in (path, Path("..") / "models" / "ext.onnx"):  # absolute, and relative to the working directory
        assert _inspect_macs(given) == 144  # the model folder's bytes, not the decoy's
        assert gp.describe_onnx(given).params == 48 * 4 + 4
    assert _eval(path) == _eval(embedded)  # ONNX Runtime ran on the same weights as the embedded copy
    result = run("bench", path, "--baseline", embedded, *QUICK)
    assert result.exit_code == 0, result.output
    assert load_onnx(path).macs == 144 and session(path) is not None


def _outside(tmp_path: Path) -> Path:
    """A folder beside the model's, holding a file the size of W named 'passwd'."""
    out = tmp_path / "outside"
    out.mkdir()
    weights().tofile(out / "passwd")
    return out


def _hostile(case: str, home: Path, outside: Path) -> str:
    """Set up `case` in the model's folder `home`; return the location the model declares."""
    if case == "symlinked folder":  # the issue's `etc -> /etc`, location etc/passwd
        (home / "etc").symlink_to(outside, target_is_directory=True)
        return "etc/passwd"
    if case == "symlinked file":
        (home / "w.bin").symlink_to(outside / "passwd")
        return "w.bin"
    if case == "symlinked folder inside":  # a link at any component is refused, even one that stays inside
        (home / "real").mkdir()
        weights().tofile(home / "real" / "w.bin")
        (home / "alias").symlink_to(home / "real", target_is_directory=True)
        return "alias/w.bin"
    if case == "dot-dot":
        return "../outside/passwd"
    if case == "dot-dot inside a path":
        (home / "sub").mkdir()
        return "sub/../../outside/passwd"
    if case == "absolute":
        return str(outside / "passwd")
    raise AssertionError(case)


CASES = ["symlinked folder", "symlinked file", "symlinked folder inside", "dot-dot", "dot-dot inside a path", "absolute"]


@pytest.mark.parametrize("case", CASES)
def test_external_data_leaving_the_models_folder_is_refused_before_any_file_is_opened(tmp_path, monkeypatch, opened, case):
    home = tmp_path / "models"
    home.mkdir()
    outside = _outside(tmp_path)
    location = _hostile(case, home, outside)
    np.zeros(4, np.float32).tofile(home / "b.bin")  # a legitimate external tensor, listed first: not opened either
    path = save(model(external("W", location), b=external("B", "b.bin", np.zeros(4, np.float32))), home / "m.onnx")
    save(model(), tmp_path / "plain.onnx")
    monkeypatch.chdir(home)  # where the location also resolves against the working directory (how /etc/passwd was read)
    opened.clear()  # the set-up wrote these files
    for args in (["inspect", "m.onnx"], ["bench", "m.onnx", *QUICK], ["eval", "m.onnx", "--data", DATA],
                 ["bench", tmp_path / "plain.onnx", "--baseline", "m.onnx", *QUICK]):
        one_line_error(run(*args), "tensor 'W'", repr(location))
    with pytest.raises(OnnxFileError, match="tensor 'W'"):
        session(path)  # a path given to ONNX Runtime goes through the same loader
    assert not [p for p in opened if p.startswith(str(outside)) or p.endswith(("b.bin", "w.bin", "passwd"))], opened


def test_a_missing_or_special_external_file_gives_one_line(tmp_path):
    os.mkfifo(tmp_path / "fifo.bin")  # opening it for reading would block
    (tmp_path / "folder.bin").mkdir()
    weights()[:10].tofile(tmp_path / "short.bin")
    for location, fragment in (("missing.bin", "does not exist"), ("fifo.bin", "not a regular file"), ("folder.bin", "not a regular file"),
                               ("short.bin", "past the end of the 160-byte file"), ("", "names no file")):
        path = save(model(external("W", location)), tmp_path / "m.onnx")
        one_line_error(run("inspect", path), "tensor 'W'", fragment)
    weights().tofile(tmp_path / "w.bin")
    for entries, fragment in (({"length": 2**31}, "length 2147483648, but its shape [48, 4] needs 768 bytes"),
                              ({"offset": 8}, "(bytes 8 to 776), past the end of the 768-byte file"),
                              ({"offset": "-8"}, "offset '-8', not a whole number")):
        path = save(model(external("W", "w.bin", **entries)), tmp_path / "m.onnx")
        one_line_error(run("bench", path, *QUICK), "tensor 'W'", fragment)


def test_external_data_at_an_offset_is_read_from_there(tmp_path):
    blob = np.full(10, 7, np.float32).tobytes() + weights(zero_rows=40).tobytes()
    (tmp_path / "pack.bin").write_bytes(blob)
    path = save(model(external("W", "pack.bin", offset=40, length=768)), tmp_path / "m.onnx")
    assert _inspect_macs(path) == 4 * 8


# -- sizes, dimensions and metadata that would give a traceback ------------------------------------------
def _claims_2gb() -> TensorProto:
    t = numpy_helper.from_array(np.ones(4, np.float32), "W")
    del t.dims[:]
    t.dims.extend([2**27, 4])  # 2 GiB of float32 declared, 16 bytes held
    return t


def _negative() -> TensorProto:
    t = numpy_helper.from_array(weights(), "W")
    t.dims[0] = -48
    return t


def _short() -> TensorProto:
    t = numpy_helper.from_array(weights(), "W")
    t.raw_data = t.raw_data[:100]
    return t


BAD = {
    "2 GB initializer": (lambda: model(_claims_2gb()), ["tensor 'W'", "[134217728, 4]", "more than the 2.1 GB"]),
    "1 GB external": (lambda: model(external("W", "w.bin", np.ones((1, 4), np.float32), dims=[2**26, 4], length=2**30)),
                      ["tensor 'W'", "'w.bin' (bytes 0 to 1073741824), past the end of the 768-byte file"]),
    "short initializer": (lambda: model(_short()), ["tensor 'W'", "(768 bytes) but holds 100 bytes"]),
    "negative initializer dimension": (lambda: model(_negative()), ["tensor 'W'", "negative dimension [-48, 4]"]),
    "negative input dimension": (lambda: model(input_dims=("batch", 3, -4, 4)), ["dimension -4 for 'input'"]),
    "non-numeric macs": (lambda: model(meta={"gaborprune.macs": "lots"}), ["gaborprune.macs 'lots', not a count of MACs"]),
    "negative macs": (lambda: model(meta={"gaborprune.macs": "-5"}), ["gaborprune.macs '-5', not a count of MACs"]),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("role", ["model", "baseline"])
def test_bench_of_a_malformed_file_gives_one_line(tmp_path, case, role):
    build, fragments = BAD[case]
    weights().tofile(tmp_path / "w.bin")
    bad, good = save(build(), tmp_path / "bad.onnx"), save(model(), tmp_path / "good.onnx")
    args = [bad] if role == "model" else [good, "--baseline", bad]
    one_line_error(run("bench", *args, *QUICK, "--json", tmp_path / "b.json"), *fragments)
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("case", [c for c in BAD if "macs" not in c])
def test_inspect_and_eval_of_a_malformed_file_give_one_line(tmp_path, case):
    build, fragments = BAD[case]
    weights().tofile(tmp_path / "w.bin")
    bad = save(build(), tmp_path / "bad.onnx")
    one_line_error(run("inspect", bad), *fragments)
    one_line_error(run("eval", bad, "--data", DATA), *fragments)


@pytest.mark.parametrize("key, value, note", [
    ("gaborprune.kernels_kept", '{"g1": 3, "g2": 5}', "(ignored: a mapping, not {layer: [kept, kernels]})"),
    ("gaborprune.kernels_kept", "[1, 2]", "(ignored: a list, not {layer: [kept, kernels]})"),
    ("gaborprune.kernels_kept", '{"g1": ["a", {}]}', "(ignored: a mapping, not {layer: [kept, kernels]})"),
    ("gaborprune.lowering", '["dense"]', "(ignored: a list, not {layer: form})"),
    ("gaborprune.lowering", '{"g1": ["dense"]}', "(ignored: a mapping, not {layer: form})"),
    ("gaborprune.macs", "lots", "(ignored: a string, not a count)"),
    ("gaborprune.input_shape", '{"c": 3}', "(ignored: a mapping, not a list of dimensions)"),
])
def test_inspect_notes_gaborprune_metadata_of_the_wrong_shape_and_goes_on(tmp_path, key, value, note):
    path = save(model(meta={key: value, "gaborprune.version": "1.0", "other": '{"kept": 1}'}), tmp_path / "m.onnx")
    result = run("inspect", path, "--json", tmp_path / "i.json")
    assert result.exit_code == 0, result.output
    assert f"metadata {key}: {note}" in result.stdout
    meta = json.loads((tmp_path / "i.json").read_text())["metadata"]
    # the wrong shape is a note; a version stays the string it was (not the number 1.0); other keys decode as JSON
    assert meta == {key: note, "gaborprune.version": "1.0", "other": {"kept": 1}}
    if key != "gaborprune.macs":  # (bench refuses that one: test_bench_of_a_malformed_file_gives_one_line)
        assert load_onnx(path).converted == []  # bench reads the converted layers through the same rule
        result = run("bench", path, *QUICK, "--profile")
        assert result.exit_code == 0, result.output


def test_metadata_of_the_right_shape_is_kept(tmp_path):
    meta = {"gaborprune.kernels_kept": '{"g1": [3, 24]}', "gaborprune.lowering": '{"g1": "dense"}', "gaborprune.macs": "144"}
    path = save(model(meta=meta), tmp_path / "m.onnx")
    s = gp.describe_onnx(path)
    assert s.metadata == {"gaborprune.kernels_kept": {"g1": [3, 24]}, "gaborprune.lowering": {"g1": "dense"}, "gaborprune.macs": 144}
    assert load_onnx(path).converted == ["g1"] and load_onnx(path).macs == 144


# -- ONNX Runtime's warnings ------------------------------------------------------------------------------
def test_onnx_runtime_warnings_stay_off_the_terminal(tmp_path):
    """A model with an unused initializer makes ONNX Runtime warn "Removing initializer" on its own
    stderr (C++, below Python): the quantiser's sessions and bench's must log errors only."""
    unused = numpy_helper.from_array(np.ones(5, np.float32), "unused")
    path = save(model(extra=[unused]), tmp_path / "m.onnx")
    done = subprocess.run([sys.executable, "-m", "gaborprune", "bench", str(path), "--int8", *QUICK], capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "(int8)" in done.stdout
    for stream in (done.stdout, done.stderr):
        assert "Removing initializer" not in stream and "onnxruntime:" not in stream, stream
