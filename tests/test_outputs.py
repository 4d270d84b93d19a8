"""Outputs are all-or-nothing, checked before any work, strict JSON; resume files and images are
validated; SIGTERM and kill -9 lose nothing."""

import builtins
import errno
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import gaborprune._io as gio
from gaborprune.errors import GaborPruneError
from gaborprune.train import Checkpoints
from gaborprune.train.checkpoint import NOT_RESUMABLE
from helpers import one_line_error, run

TESTS = Path(__file__).parent
TINY = ["tiny_models:gabor_net", "--input-shape", "3,16,16"]
EXPORT = ["export", "tiny_models:gabor_net", "--input-shape", "1,3,16,16"]
FINETUNE = ["finetune", *TINY, "--data", "fake:64:4", "--epochs", "2", "--batch-size", "16", "--device", "cpu"]
NO_SPACE = os.strerror(errno.ENOSPC)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"bare {constant} in JSON")

    return json.loads(text, parse_constant=refuse)


# -- the disk fails ----------------------------------------------------------------------------------
class _FullDiskFile(io.FileIO):
    def write(self, b):
        super().write(bytes(b)[: len(b) // 2])  # part of it lands, as on a real disk
        raise OSError(errno.ENOSPC, NO_SPACE)


def _full_disk_open(file, mode="r", *args, **kwargs):
    return _FullDiskFile(file, "wb") if "w" in mode else builtins.open(file, mode, *args, **kwargs)


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")


def _unmount(where: Path) -> None:
    subprocess.run(["umount", "--lazy", str(where)], check=True)


@pytest.fixture(params=["tmpfs", "patched"])
def full_disk(request, tmp_path, monkeypatch):
    """A directory whose writes fail with ENOSPC: a real, filled 64 KiB tmpfs, or a patched write.

    Returns a function that fills the disk (call it after placing the files that should survive)."""
    disk = tmp_path / "disk"
    if request.param == "patched":
        disk.mkdir()
        monkeypatch.setattr(gio, "open", _full_disk_open, raising=False)
        yield disk, lambda: None
        return
    _mount_tmpfs(disk, "size=64k")

    def fill():
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)

    try:
        yield disk, fill
    finally:
        _unmount(disk)


@pytest.mark.parametrize("command, written", [
    (["convert", "resnet20", "--layers", "1", "--init", "random"], ["out.pt"]),
    (["prune", *TINY], ["out.pt"]),
    ([*FINETUNE], ["out.pt", "out.last.pt", "out.metrics.jsonl"]),
])
def test_full_disk_is_one_line_and_leaves_every_file_as_it_was(full_disk, command, written):
    disk, fill = full_disk
    for name in written:
        (disk / name).write_bytes(f"the previous {name}".encode())
    fill()
    before = files(disk)
    result = run(*command, "-o", disk / "out.pt", "--force")
    one_line_error(result, f"cannot write '{disk}/", NO_SPACE)
    assert files(disk) == before  # no partial file, no temporary file, the old files byte-identical


def test_a_full_disk_under_torch_save_keeps_the_cause(tmp_path, monkeypatch):
    def stream_writer_fails(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(torch, "save", stream_writer_fails)
    with pytest.raises(GaborPruneError, match=r"^cannot write '.*r\.pt': torch\.save failed \(\[enforce fail .*PytorchStreamWriter failed"):
        gio.save_torch(tmp_path / "r.pt", {"w": torch.zeros(3)})
    assert list(tmp_path.iterdir()) == []


def _raise(error):
    def fail(*args, **kwargs):
        raise error
    return fail


@pytest.mark.parametrize("case, cause", [
    ("no space", NO_SPACE),
    ("no permission", os.strerror(errno.EACCES)),
    ("read-only", os.strerror(errno.EROFS)),
    ("rename fails", os.strerror(errno.EIO)),
    ("a directory", "is a directory; give a file path"),
    ("under a file", "out.json' is a file, not a directory"),
])
def test_write_errors_are_one_line_and_leave_the_original(tmp_path, monkeypatch, case, cause):
    target = tmp_path / "out.json"
    target.write_text("original")
    if case == "no space":
        monkeypatch.setattr(gio, "open", _full_disk_open, raising=False)
    elif case in ("no permission", "read-only"):
        code = errno.EACCES if case == "no permission" else errno.EROFS
        monkeypatch.setattr(tempfile, "mkstemp", _raise(OSError(code, os.strerror(code))))
    elif case == "rename fails":
        monkeypatch.setattr(os, "replace", _raise(OSError(errno.EIO, os.strerror(errno.EIO))))
    elif case == "a directory":
        target = tmp_path / "adir"
        target.mkdir()
    else:
        target = tmp_path / "out.json" / "x.json"
    with pytest.raises(GaborPruneError) as info:
        gio.write_json(target, {"a": 1}, force=True)
    message = str(info.value)
    assert str(target) in message and cause in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == (["adir", "out.json"] if case == "a directory" else ["out.json"])
    assert (tmp_path / "out.json").read_text() == "original"


def test_a_missing_output_directory_is_created(tmp_path):
    gio.write_text(tmp_path / "a" / "b" / "report.md", "# hi\n")
    assert (tmp_path / "a" / "b" / "report.md").read_text() == "# hi\n"


def test_read_only_mount_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro,size=64k")
    try:
        one_line_error(run(*FINETUNE, "-o", ro / "out.pt"), f"cannot write '{ro}/out.last.pt'", os.strerror(errno.EROFS))
        one_line_error(run("convert", "resnet20", "--layers", "1", "--init", "random", "-o", ro / "out.pt"), os.strerror(errno.EROFS))
        assert list(ro.iterdir()) == []
    finally:
        _unmount(ro)


@pytest.mark.parametrize("command", [["convert", "resnet20", "--layers", "1"], FINETUNE, EXPORT])
def test_empty_output_path_is_one_line(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    one_line_error(run(*command, "-o", ""), "is a directory; give a file path")
    assert list(tmp_path.iterdir()) == []


# -- one path, two outputs ---------------------------------------------------------------------------
@pytest.mark.parametrize("command, options", [
    (["convert", "resnet20", "--layers", "1"], ["-o", "X", "--json", "X"]),
    (["inspect", "resnet20"], ["--png", "X", "--json", "X"]),
    (FINETUNE, ["-o", "X", "--json", "X"]),
    (FINETUNE, ["-o", "X.pt", "--json", "X.last.pt"]),
    (FINETUNE, ["-o", "X.pt", "--json", "sub/../X.metrics.jsonl"]),
    (["prune", *TINY], ["-o", "X", "--json", "X"]),
    (["prune", *TINY, "--data", "fake:64:4", "--sweep", "0.1"], ["--png", "X", "--json", "X"]),
    (EXPORT, ["-o", "X", "--json", "X"]),
    (["bench", "m.onnx"], ["--json", "X", "--markdown", "X"]),
    (["bench", "m.onnx"], ["--markdown", "X", "--png", "X"]),
])
@pytest.mark.parametrize("existing", [False, True])
def test_the_same_path_twice_is_refused_before_anything_is_written(tmp_path, command, options, existing):
    (tmp_path / "sub").mkdir()
    options = [str(tmp_path / o) if o[0] in "Xs" else o for o in options]
    if existing:
        for o in options[1::2]:
            Path(o).resolve().write_text("keep me")
    before = files(tmp_path)
    one_line_error(run(*command, *options, *(["--force"] if existing else [])), "is given twice", "give each output its own path")
    assert files(tmp_path) == before


# -- strict JSON ---------------------------------------------------------------------------------------
def test_json_is_strict(tmp_path):
    data = {"loss": float("nan"), "top": [float("inf"), 1.5, (float("-inf"), 2)], "n": 3, "ok": True, "none": None}
    gio.write_json(tmp_path / "r.json", data)
    assert strict_json((tmp_path / "r.json").read_text()) == {"loss": None, "top": [None, 1.5, [None, 2]], "n": 3, "ok": True, "none": None}
    with pytest.raises(TypeError):  # anything the converter misses fails loudly instead of writing bare NaN
        gio.to_json({"x": object()})


def test_metrics_log_is_strict_json_and_rewritten_whole(tmp_path):
    ckpt = Checkpoints(tmp_path / "run.pt")
    ckpt.start([])
    assert not ckpt.metrics.exists()  # a new run's log appears with its first epoch
    ckpt.log({"epoch": 1, "test_loss": float("nan")})
    ckpt.log({"epoch": 2, "test_loss": 0.5})
    assert [strict_json(line) for line in ckpt.metrics.read_text().splitlines()] == [
        {"epoch": 1, "test_loss": None}, {"epoch": 2, "test_loss": 0.5}]
    resumed = Checkpoints(tmp_path / "run.pt")
    resumed.start([{"epoch": 1}])  # a resumed run's log is the checkpoint's epochs, whatever was there
    assert ckpt.metrics.read_text() == '{"epoch": 1}\n'


# -- resume files ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def last_pt(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    result = run(*FINETUNE, "-o", d / "run.pt")
    assert result.exit_code == 0, result.output
    return d / "run.last.pt"


def _drop(key):
    return lambda s: s.pop(key)


def _set(key, value):
    return lambda s: s.__setitem__(key, value)


@pytest.mark.parametrize("field, corrupt", [
    ("config", _drop("config")),
    ("config", _set("config", {"epochs": 2, "bogus": 1})),
    ("optimizer", _drop("optimizer")),
    ("optimizer.param_groups", _set("optimizer", {})),
    ("optimizer.param_groups[0].lr", lambda s: s["optimizer"]["param_groups"][0].__setitem__("lr", "fast")),
    ("optimizer state 'momentum_buffer'", lambda s: next(iter(s["optimizer"]["state"].values())).__setitem__("momentum_buffer", torch.zeros(3))),
    ("scheduler.last_epoch", lambda s: s["scheduler"].__setitem__("last_epoch", "x")),
    ("scaler", _set("scaler", [1])),
    ("rng.torch", lambda s: s["rng"].__setitem__("torch", torch.zeros(3, dtype=torch.uint8))),
    ("rng.data", lambda s: s["rng"].pop("data")),
    ("epoch", _set("epoch", "one")),
    ("epoch", _set("epoch", 7)),
    ("best_accuracy", _set("best_accuracy", float("nan"))),
    ("history", _set("history", "none")),
    ("history", lambda s: s["history"].pop()),
    ("data", _drop("data")),
])
def test_malformed_resume_file_is_one_line_and_writes_nothing(last_pt, tmp_path, field, corrupt):
    payload = torch.load(last_pt, weights_only=True)
    corrupt(payload["train_state"])
    torch.save(payload, tmp_path / "run.last.pt")
    before = files(tmp_path)
    result = run(*FINETUNE, "-o", tmp_path / "run.pt", "--resume", tmp_path / "run.last.pt")
    one_line_error(result, f"its {field} ", NOT_RESUMABLE)
    assert files(tmp_path) == before  # no metrics file, no checkpoint touched


def test_an_intact_resume_file_resumes(last_pt, tmp_path):
    (tmp_path / "run.last.pt").write_bytes(last_pt.read_bytes())
    result = run(*FINETUNE, "-o", tmp_path / "run.pt", "--resume", tmp_path / "run.last.pt")
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "run.metrics.jsonl").read_text().splitlines()) == 2


# -- images -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_a_corrupt_image_is_one_line_naming_the_file(tmp_path, damage):
    from PIL import Image

    for split in ("train", "val"):
        for k, cls in enumerate(("a", "b")):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (80 * k, 10 * i, 0)).save(tmp_path / split / cls / f"{i}.jpg")
    bad = tmp_path / "val" / "b" / "1.jpg"
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"not a jpeg at all")
    result = run("eval", *TINY, "--num-classes", "2", "--data", f"imagefolder:{tmp_path}", "--device", "cpu")
    one_line_error(result, f"cannot read image '{bad}': ", "; remove or replace it")
    assert "DataLoader worker" not in result.output


# -- processes that are stopped ------------------------------------------------------------------------------
# Runs the CLI with SGD stalling (forever) at its Nth step after writing a marker file, so that a test
# can stop it at a known point mid-epoch without depending on timing.
STALLING = """
import os, runpy, sys, time
import torch
stall_at, marker, count = int(os.environ["STALL_AT_STEP"]), os.environ["STALL_MARKER"], [0]
step = torch.optim.SGD.step
def stalling(self, *args, **kwargs):
    count[0] += 1
    if count[0] == stall_at:
        open(marker, "w").close()
        while True:
            time.sleep(0.01)
    return step(self, *args, **kwargs)
torch.optim.SGD.step = stalling
sys.argv[0] = "gaborprune"
runpy.run_module("gaborprune", run_name="__main__")
"""
# fake:320:4 has 256 training images: 8 steps of 32 per epoch; step 12 is in the middle of epoch 2
KILL_ARGS = ["finetune", *TINY, "--data", "fake:320:4", "--epochs", "3", "--batch-size", "32", "--device", "cpu", "--sparsity", "0.05"]
ENV = os.environ | {"PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}


def _stalled(tmp_path: Path, output: Path) -> subprocess.Popen:
    marker = tmp_path / "stalled"
    child = subprocess.Popen([sys.executable, "-c", STALLING, *KILL_ARGS, "-o", str(output)], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV | {"STALL_AT_STEP": "12", "STALL_MARKER": str(marker)})
    deadline = time.monotonic() + 300  # a generous bound for a busy machine, not a timing assertion
    while not marker.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail("the fine-tune never reached its stall point: " + child.communicate()[1])
        time.sleep(0.05)
    return child


def _epoch(last: Path) -> int:
    return torch.load(last, weights_only=True)["train_state"]["epoch"]


def test_sigterm_ends_with_how_to_resume_and_keeps_the_checkpoint(tmp_path):
    child = _stalled(tmp_path, tmp_path / "run.pt")
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode != 0 and "Traceback" not in stderr, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line == f"error: stopped by SIGTERM; continue with the same command plus --resume {tmp_path / 'run.last.pt'}"
    assert _epoch(tmp_path / "run.last.pt") == 1
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "run.pt").exists()


def test_kill_9_mid_epoch_then_resume_is_bit_identical(tmp_path):
    straight = subprocess.run([sys.executable, "-m", "gaborprune", *KILL_ARGS, "-o", str(tmp_path / "straight.pt")],
                              cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=600)
    assert straight.returncode == 0, straight.stderr
    child = _stalled(tmp_path, tmp_path / "cut.pt")
    child.kill()  # SIGKILL: no handler runs, nothing is flushed
    child.communicate(timeout=60)
    assert _epoch(tmp_path / "cut.last.pt") == 1
    resumed = subprocess.run([sys.executable, "-m", "gaborprune", *KILL_ARGS, "-o", str(tmp_path / "cut.pt"), "--resume", str(tmp_path / "cut.last.pt")],
                             cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "cut.pt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert a["steps"][-1]["kind"] == b["steps"][-1]["kind"] == "finetune"
    assert a["steps"][-1]["history"][-1]["test_loss"] == b["steps"][-1]["history"][-1]["test_loss"]
    assert len((tmp_path / "cut.metrics.jsonl").read_text().splitlines()) == 3
    assert not list(tmp_path.glob(".*.tmp"))
