"""Hostile and malformed dataset files (issue 24): CIFAR batches are data (an exact allow-list of numpy
names, labels checked against the classes and the images), image trees neither block on special files
nor follow symlink loops, errors stay one short line, and fake specs are bounded before allocation.

Everything that could block (a FIFO) runs under a deadline, so a regression fails instead of hanging
the suite."""

import os
import pickle
import re
import signal
import socket
import stat
import subprocess
import sys
import types
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from gaborprune.data import DataError, DataSpec, load_data
from helpers import one_line_error, run
from test_data import write_cifar, write_cifar_tree


# -- crafted CIFAR batches -----------------------------------------------------------------------------
def crafted_batch(module: str, name: str, args: bytes = b")") -> bytes:
    """A protocol-2 pickle of {'data': module.name(*args), 'labels': []} whose GLOBAL opcode names
    `module name`; `args` are the opcodes that push the argument tuple."""
    return (b"\x80\x02}(X\x04\x00\x00\x00data" + b"c" + f"{module}\n{name}\n".encode() + args + b"R"
            + b"X\x06\x00\x00\x00labels]u.")


def write_batch(path, data, labels, protocol=pickle.DEFAULT_PROTOCOL, key="labels"):
    with open(path, "wb") as f:
        pickle.dump({"data": data, key: labels}, f, protocol=protocol)


def test_a_batch_naming_a_numpy_module_outside_the_allow_list_runs_nothing(tmp_path, monkeypatch):
    calls = []
    sentinel = types.ModuleType("numpy.gaborprune_sentinel")
    sentinel._reconstruct = lambda *a: calls.append(a) or np.zeros((1, 3072), np.uint8)
    monkeypatch.setitem(sys.modules, "numpy.gaborprune_sentinel", sentinel)  # importable, so only the allow-list stops it
    folder = write_cifar(tmp_path)
    (folder / "test_batch").write_bytes(crafted_batch("numpy.gaborprune_sentinel", "_reconstruct"))
    one_line_error(run("eval", "resnet20", "--data", f"cifar10:{tmp_path}"),
                   str(folder / "test_batch"), "numpy.gaborprune_sentinel._reconstruct", "not a cifar10 batch")
    assert calls == []


@pytest.mark.parametrize("module, name", [("numpy", "_frombuffer"), ("numpy", "load"), ("numpy.lib.npyio", "load"),
                                          ("numpy.testing", "ndarray"), ("numpy.core.multiarray", "dtype"),
                                          ("builtins", "eval"), ("os", "system")])
def test_a_batch_naming_anything_else_is_one_line_naming_the_file_and_the_global(tmp_path, module, name):
    folder = write_cifar(tmp_path)
    (folder / "data_batch_2").write_bytes(crafted_batch(module, name))
    one_line_error(run("eval", "resnet20", "--data", f"cifar10:{tmp_path}"), str(folder / "data_batch_2"), f"{module}.{name}")


def test_a_global_with_control_characters_is_shown_escaped_on_one_line(tmp_path):
    def short(text: str) -> bytes:  # SHORT_BINUNICODE
        return bytes([0x8C, len(text)]) + text.encode()

    module, name = "numpy\nerror: forged\x1b[2J", "x" * 244  # STACK_GLOBAL takes any text, unlike GLOBAL's lines
    raw = b"\x80\x04}(" + short("data") + short(module) + short(name) + b"\x93)R" + short("labels") + b"]u."
    folder = write_cifar(tmp_path)
    (folder / "test_batch").write_bytes(raw)
    result = run("eval", "resnet20", "--data", f"cifar10:{tmp_path}")
    one_line_error(result, str(folder / "test_batch"), "numpy\\nerror: forged\\x1b[2J", "characters)")
    assert "\x1b" not in result.output and len(result.stderr) < 500


def cli_within(seconds: int, *args, cwd):
    """`python -m gaborprune ARGS` in its own process group, killed with its workers after `seconds`:
    a hang fails the test instead of blocking the suite. Returns (exit code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "gaborprune", *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"gaborprune {' '.join(map(str, args))} still ran after {seconds} s")
    return proc.returncode, out, err


def errors(stderr: str) -> list[str]:
    """The lines of a subprocess's stderr, less the CLI's warnings (a busy machine adds one)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("warning: ")]


def test_a_batch_naming_f2py_main_does_not_run_f2py(tmp_path):
    """The reproduced attack: importing numpy.f2py.__main__ runs f2py's command line (in a fresh process,
    so that a regression cannot run it inside the test session)."""
    folder = write_cifar(tmp_path / "c")
    (folder / "test_batch").write_bytes(crafted_batch("numpy.f2py.__main__", "_reconstruct"))
    code, out, err = cli_within(240, "eval", "resnet20", "--data", f"cifar10:{tmp_path / 'c'}", cwd=tmp_path)
    lines = errors(err)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    assert str(folder / "test_batch") in lines[0] and "numpy.f2py.__main__._reconstruct" in lines[0]
    assert "f2py" not in out.lower() and "Traceback" not in err


SHAPE_100K_IMAGES = b"J\xa0\x86\x01\x00M\x00\x0c\x86"  # the tuple (100000, 3072): 307 MB of images
U1 = b"X\x02\x00\x00\x00u1"


@pytest.mark.parametrize("module, name, args, fragment", [
    ("numpy", "ndarray", SHAPE_100K_IMAGES + U1 + b"\x86", "calls numpy.ndarray itself"),
    ("numpy._core.multiarray", "_reconstruct", b"cnumpy\nndarray\n" + SHAPE_100K_IMAGES + U1 + b"\x87", "array of a declared shape"),
    ("numpy.core.multiarray", "scalar", b"cnumpy\ndtype\nX\x0a\x00\x00\x00V100000000\x85R\x85", "numpy scalar"),
])
def test_a_few_bytes_cannot_declare_a_large_array(tmp_path, module, name, args, fragment):
    """numpy's allowed callables would allocate whatever shape a batch declares; only numpy's own
    reductions (data in the file) pass."""
    folder = write_cifar(tmp_path)
    (folder / "test_batch").write_bytes(crafted_batch(module, name, args))
    assert (folder / "test_batch").stat().st_size < 100
    one_line_error(run("eval", "resnet20", "--data", f"cifar10:{tmp_path}"), str(folder / "test_batch"), fragment)


def test_a_batch_file_larger_than_any_cifar_batch_is_refused_unread(tmp_path, monkeypatch):
    from gaborprune.data import specs

    folder = write_cifar(tmp_path)
    with open(folder / "data_batch_4", "r+b") as f:
        f.truncate(specs.MAX_BATCH_BYTES + 1)  # sparse: no disk, and nothing read if the bound holds
    one_line_error(run("eval", "resnet20", "--data", f"cifar10:{tmp_path}"), str(folder / "data_batch_4"), "1.1 GB, more than a cifar10 batch")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_every_pickle_protocol_and_numpy_1_names_still_load(tmp_path, protocol):
    folder = write_cifar(tmp_path)
    rng = np.random.default_rng(1)
    data, labels = rng.integers(0, 255, (10, 3072), dtype=np.uint8), np.arange(10, dtype=np.int64)[::-1].copy()
    write_batch(folder / "test_batch", data, labels, protocol)  # labels as an array: numpy scalars' names too
    if protocol == 2:  # a batch pickled by numpy 1.x names numpy.core, not numpy._core
        with open(folder / "data_batch_1", "rb") as f:
            raw = pickle.dumps(pickle.load(f), protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"numpy.core.multiarray" in raw and b"_codecs" in raw
        (folder / "data_batch_1").write_bytes(raw)
    _, test = load_data(f"cifar10:{tmp_path}", (3, 32, 32))
    assert torch.equal(test.images, torch.from_numpy(data.reshape(10, 3, 32, 32))) and test.labels.tolist() == labels.tolist()


@pytest.mark.parametrize("labels, fragment", [
    ([255] + [0] * 9, "label 255"),
    ([-1] + [0] * 9, "label -1"),
    ([1, 2, 3], "10 images but 3 labels"),
    ([0] * 12, "10 images but 12 labels"),
    (["cat"] * 10, "labels are not integers"),
    ([0.5] * 10, "labels are not integers"),
    ([True] * 10, "labels are not integers"),
    (np.zeros((10, 1), np.int64), "labels are not integers"),
    ("0123456789", "labels are not integers"),
])
def test_labels_are_checked_against_the_classes_and_the_images(tmp_path, labels, fragment):
    folder = write_cifar(tmp_path)
    write_batch(folder / "data_batch_3", np.zeros((10, 3072), np.uint8), labels)
    one_line_error(run("eval", "resnet20", "--data", f"cifar10:{tmp_path}"), str(folder / "data_batch_3"), fragment)


def test_cifar100_labels_are_checked_against_its_100_classes(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_batch(folder / "train", np.zeros((4, 3072), np.uint8), [0, 99, 5, 50], key="fine_labels")
    write_batch(folder / "test", np.zeros((2, 3072), np.uint8), [99, 100], key="fine_labels")
    with pytest.raises(DataError, match=r"test' is not a cifar100 batch: label 100 is outside 0\.\.99"):
        load_data(f"cifar100:{tmp_path}", (3, 32, 32))
    write_batch(folder / "test", np.zeros((2, 3072), np.uint8), [99, 0], key="fine_labels")
    train, test = load_data(f"cifar100:{tmp_path}", (3, 32, 32))
    assert train.labels.tolist() == [0, 99, 5, 50] and test.num_classes == 100


@pytest.mark.parametrize("data, fragment", [
    (np.zeros((10, 3072), np.float32), "uint8"),
    (np.zeros((10, 3000), np.uint8), "3072"),
    ([[0] * 3072] * 10, "uint8"),
])
def test_image_data_must_be_uint8_rows_of_3072(tmp_path, data, fragment):
    folder = write_cifar(tmp_path)
    write_batch(folder / "test_batch", data, [0] * 10)
    one_line_error(run("eval", "resnet20", "--data", f"cifar10:{tmp_path}"), str(folder / "test_batch"), fragment)


@pytest.mark.parametrize("raw", [b"", b"\x80\x02", b"garbage", b"\x80\x02]q\x00.", b"\x80\x02K\x05.", b"\x80\x02h\x09."])
def test_truncated_or_odd_pickles_are_one_line(tmp_path, raw):
    folder = write_cifar(tmp_path)
    (folder / "test_batch").write_bytes(raw)
    one_line_error(run("eval", "resnet20", "--data", f"cifar10:{tmp_path}"), str(folder / "test_batch"), "not a cifar10 batch")


# -- image trees: special files and symlinks -----------------------------------------------------------
def release(*fifos) -> None:
    """Open each FIFO for writing once, so that any reader still blocked on it (a DataLoader worker
    left by a regression) gets end-of-file and exits."""
    for fifo in fifos:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting: nothing to release
            pass


@contextmanager
def deadline(seconds: int, *fifos):
    """Raise TimeoutError in the main thread after `seconds`; on the way out, `release` the FIFOs."""
    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        release(*fifos)


def image_folder(root, classes=("cat", "dog"), n=2, size=20):
    from PIL import Image

    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def special(kind: str, path, tmp_path):
    """A non-regular file named like an image: a FIFO, a socket, a link to a device or to a FIFO."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "device link":
        os.symlink("/dev/zero", path)
    elif kind == "fifo link":
        os.mkfifo(tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", path)
    return [p for p in (path, tmp_path / "elsewhere") if os.path.exists(p) and stat.S_ISFIFO(os.stat(p).st_mode)]


@pytest.mark.parametrize("kind", ["fifo", "socket", "device link", "fifo link"])
def test_an_image_folder_refuses_special_files_before_opening_them(tmp_path, kind):
    root = image_folder(tmp_path / "tree")
    bad = root / "val" / "dog" / "9.jpg"
    fifos = special(kind, bad, tmp_path)
    with deadline(60, *fifos), pytest.raises(DataError, match=re.escape(f"'{bad}' is not a regular file; remove it from the image tree")):
        _, val = load_data(f"imagefolder:{root}", (3, 16, 16))
        list(val.batches(8, train=False))


def test_eval_on_an_image_folder_with_a_fifo_ends_in_one_line(tmp_path):
    """The reproduced hang, end to end: `eval` with DataLoader workers in a fresh process, under a deadline."""
    root = image_folder(tmp_path / "tree")
    fifo = root / "val" / "cat" / "x.jpg"
    os.mkfifo(fifo)
    try:
        code, out, err = cli_within(240, "eval", "resnet20", "--num-classes", "2", "--data", f"imagefolder:{root}", cwd=tmp_path)
    finally:
        release(fifo)
    lines = errors(err)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    assert f"'{fifo}' is not a regular file" in lines[0]


@pytest.mark.parametrize("kind", ["fifo", "socket", "device link", "fifo link"])
def test_a_cifar_tree_refuses_special_files_through_the_cli(tmp_path, kind):
    write_cifar_tree(tmp_path / "tree", write_cifar(tmp_path / "batches"))
    bad = tmp_path / "tree" / "train" / "class03" / "x.jpg"
    fifos = special(kind, bad, tmp_path)
    with deadline(60, *fifos):
        result = run("eval", "resnet20", "--data", f"cifar10:{tmp_path / 'tree'}")
    one_line_error(result, f"'{bad}' is not a regular file")


def test_an_image_folder_follows_no_symlink_loop_and_walks_each_folder_once(tmp_path):
    root = image_folder(tmp_path / "tree")
    os.symlink(root / "train" / "cat", root / "train" / "cat" / "loop")  # cat/loop/loop/... : today 41 times each image
    os.symlink(root / "train", root / "train" / "dog" / "up")  # a loop through the split folder
    deep = root / "train" / "dog" / "d0"
    deep.mkdir()
    for level in range(1, 9):  # two links to each next level: 2**8 paths to one folder
        (deep.parent / f"d{level}").mkdir()
        for name in ("a", "b"):
            os.symlink(deep.parent / f"d{level}", deep / name)
        deep = deep.parent / f"d{level}"
    from PIL import Image

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(deep / "deep.png")
    with deadline(120):
        train, val = load_data(f"imagefolder:{root}", (3, 16, 16))
    labels = [label for _, label in train.dataset.samples]
    assert labels.count(0) == 2 and labels.count(1) == 3 and len(val) == 4  # cat 2; dog 2 + deep.png once, not cat's via up/
    linked = tmp_path / "elsewhere"
    (root / "train" / "dog").rename(linked)
    os.symlink(linked, root / "train" / "dog")  # a symlinked class folder is still followed (ImageNet setups do this)
    assert len(load_data(f"imagefolder:{root}", (3, 16, 16))[0]) == 5


def test_image_folder_keeps_torchvisions_order(tmp_path):
    from torchvision.datasets import ImageFolder

    root = image_folder(tmp_path / "tree", classes=("b", "a", "c"), n=3)
    (root / "train" / "a" / "sub" / "deeper").mkdir(parents=True)
    for path in ("a/sub/z.png", "a/sub/deeper/0.png", "a/Z.JPG", "c/readme.txt"):
        (root / "train" / path).write_bytes((root / "train" / "b" / "0.png").read_bytes())
    train, _ = load_data(f"imagefolder:{root}", (3, 16, 16))
    assert train.dataset.samples == ImageFolder(str(root / "train")).samples and len(train) == 12


def test_a_cifar_tree_ignores_a_folder_loop_and_refuses_one_named_like_an_image(tmp_path):
    write_cifar_tree(tmp_path / "tree", write_cifar(tmp_path / "batches"))
    cls = tmp_path / "tree" / "train" / "class00"
    os.symlink(cls, cls / "loop")
    train, _ = load_data(f"cifar10:{tmp_path / 'tree'}", (3, 32, 32))
    assert len(train) == 100
    os.symlink(cls, cls / "loop.png")
    one_line_error(run("eval", "resnet20", "--data", f"cifar10:{tmp_path / 'tree'}"), f"'{cls / 'loop.png'}' is not a regular file")


# -- errors stay one short line ------------------------------------------------------------------------
def test_thousands_of_empty_class_folders_are_one_short_line(tmp_path):
    root = image_folder(tmp_path / "tree")
    for i in range(3000):
        (root / "train" / f"empty{i:05d}").mkdir()
    result = run("eval", "resnet20", "--num-classes", "2", "--data", f"imagefolder:{root}")
    one_line_error(result, "3000 of its 3002 class folders", "'empty00000'", "and 2995 more")
    assert len(result.stderr) < 400


def test_a_cifar_tree_with_thousands_of_class_folders_is_one_short_line(tmp_path):
    write_cifar_tree(tmp_path / "tree", write_cifar(tmp_path / "batches"))
    for i in range(3000):
        (tmp_path / "tree" / "test" / f"empty{i:05d}").mkdir()
    result = run("eval", "resnet20", "--data", f"cifar10:{tmp_path / 'tree'}")
    one_line_error(result, "has 3010 class folders; this set has 10")
    assert len(result.stderr) < 400


# -- fake specs are bounded ------------------------------------------------------------------------------
def test_a_fake_spec_with_a_billion_classes_is_one_line():
    one_line_error(run("eval", "resnet20", "--data", "fake:40:1000000000"), "fake:40:1000000000", "1000000000 classes", "at most 100000")
    with pytest.raises(DataError, match="at most 100000"):
        DataSpec("fake", samples=40, classes=100001)
    with pytest.raises(DataError, match="samples"):
        DataSpec("fake", samples=1, classes=3)
    assert DataSpec.parse("fake:40:100000").classes == 100000


def test_fake_class_templates_are_counted_before_allocation(monkeypatch):
    import gaborprune._validate as validate

    monkeypatch.setattr(validate, "available_memory", lambda: 10**9)
    with pytest.raises(DataError, match=r"'fake:40:100000' needs about 60\.2 GB of memory for its 100000 class templates"):
        load_data("fake:40:100000", (3, 224, 224))
    train, test = load_data("fake:40:4", (3, 224, 224))  # small sets still fit
    assert len(train) + len(test) == 40


def test_a_huge_spec_is_shown_cut_short():
    with pytest.raises(DataError) as info:
        DataSpec.parse("fake:" + "9" * 5000)
    assert len(str(info.value)) < 300


def test_digits_at_a_huge_input_shape_is_refused_before_the_resize(monkeypatch):
    """Resizing digits' 1,797 images to 3x2048x2048 would ask for about 90 GB in float: refused from
    the estimate against the memory budget (set here, so the host's memory does not matter)."""
    monkeypatch.setenv("GABORPRUNE_MEMORY_LIMIT", str(16 * 2**30))
    with pytest.raises(DataError, match=r"1797 images resized to 3x2048x2048 need about 9\d\.\d GB .* give a smaller `input_shape`"):
        load_data("digits", (3, 2048, 2048))
    train, test = load_data("digits", (3, 64, 64))  # a modest size still loads under the same budget
    assert train.images.shape[1:] == (3, 64, 64)
