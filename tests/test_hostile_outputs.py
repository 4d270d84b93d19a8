"""Hostile outputs and terminal text: outputs only ever replace regular files, never an input, are all
checked before anything is written, may have any legal name; and what came from a file or an argument
reaches the terminal as plain text (control characters escaped, no Rich markup)."""

import os
import socket
import stat
from pathlib import Path

import pytest
from torch import nn

import gaborprune._io as gio
from gaborprune.cli import _plain
from gaborprune.errors import GaborPruneError
from helpers import one_line_error, run

TINY = ["tiny_models:gabor_net", "--input-shape", "3,16,16"]
CONVERT = ["convert", "resnet20", "--layers", "1", "--init", "random"]
EVIL = "\x1b[2J\x1b]0;pwned\x07[red]x\r\nerror: forged"  # clear screen, window title, markup, a forged error line


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def recipe(tmp_path_factory):
    """A small recipe (a pruned tiny Gabor net), copied fresh into each test that uses it."""
    made = tmp_path_factory.getbasetemp() / "recipe.pt"
    if not made.exists():
        result = run("prune", *TINY, "-o", made)
        assert result.exit_code == 0, result.output
    return made.read_bytes()


# -- outputs only ever replace regular files -------------------------------------------------------------
def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(path.parent)  # a relative name: the full path may pass the 108 bytes of sun_path
    try:
        s.bind(path.name)
    finally:
        os.chdir(cwd)
        s.close()  # the socket file stays


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("keep me")


def _link_to_fifo(path: Path) -> None:
    os.mkfifo(path.parent / "real-fifo")
    path.symlink_to("real-fifo")


SPECIAL = {"fifo": (_fifo, "is a FIFO (named pipe), not a regular file"), "socket": (_socket, "is a socket, not a regular file"),
           "directory": (_directory, "is a directory; give a file path"),
           "link to a fifo": (_link_to_fifo, "is a FIFO (named pipe), not a regular file")}
OPTIONS = [
    (CONVERT, "-o"), (CONVERT, "--json"), (["inspect", *TINY], "--png"), (["prune", *TINY], "-o"),
    (["export", "tiny_models:gabor_net", "--input-shape", "1,3,16,16"], "-o"), (["bench", "m.onnx"], "--markdown"), (["bench", "m.onnx"], "--png"),
]


@pytest.mark.parametrize("kind", SPECIAL)
@pytest.mark.parametrize("command, option", OPTIONS)
def test_a_special_file_or_directory_is_refused_even_with_force(tmp_path, monkeypatch, kind, command, option):
    monkeypatch.chdir(tmp_path)
    make, message = SPECIAL[kind]
    target = tmp_path / "target"
    make(target)
    before = (names(tmp_path), os.lstat(target).st_mode)
    other = [] if option == "-o" or command[0] in ("inspect", "bench") else ["-o", tmp_path / "out.pt"]
    one_line_error(run(*command, option, target, *other, "--force"), f"output '{target}' {message}")
    assert (names(tmp_path), os.lstat(target).st_mode) == before  # still the FIFO/socket/link/folder; no temporary file
    if kind == "directory":
        assert (target / "inside").read_text() == "keep me"


@pytest.fixture
def char_device(tmp_path):
    """A character device no broken check can harm: a null device made in tmp_path where this user may
    (root), else /dev/null where /dev is not writable (a user who could not replace it anyway)."""
    made = tmp_path / "devices" / "null"
    made.parent.mkdir()
    try:
        os.mknod(made, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return made
    except OSError:
        if os.access("/dev", os.W_OK):
            pytest.skip("cannot make a device node here, and /dev is writable: /dev/null is not safe to test on")
        return Path("/dev/null")


def test_a_character_device_is_refused_even_with_force(tmp_path, char_device):
    assert stat.S_ISCHR(os.stat(char_device).st_mode)
    one_line_error(run(*CONVERT, "-o", tmp_path / "x.pt", "--json", char_device, "--force"),
                   f"output '{char_device}' is a character device, not a regular file", "even with --force")
    assert not (tmp_path / "x.pt").exists() and stat.S_ISCHR(os.stat(char_device).st_mode)
    with pytest.raises(GaborPruneError, match="character device"):  # the library refuses it at the write too
        gio.write_text(char_device, "x", force=True)
    assert stat.S_ISCHR(os.stat(char_device).st_mode)
    if char_device.parent == tmp_path / "devices":
        assert names(char_device.parent) == ["null"]  # no temporary file left beside it


def test_a_fifo_appearing_during_the_write_is_not_replaced(tmp_path):
    target = tmp_path / "out.json"

    def fill(tmp: Path) -> None:
        tmp.write_text("{}")
        os.mkfifo(target)  # the race: the check before the work passed, now a FIFO is there

    with pytest.raises(GaborPruneError, match="FIFO"):
        gio.write_atomic(target, fill, force=True)
    assert stat.S_ISFIFO(os.lstat(target).st_mode) and names(tmp_path) == ["out.json"]


def test_a_symlinked_output_is_replaced_not_followed_and_only_with_force(tmp_path):
    (tmp_path / "elsewhere.json").write_text("keep me")
    link = tmp_path / "report.json"
    link.symlink_to("elsewhere.json")
    one_line_error(run(*CONVERT, "-o", tmp_path / "x.pt", "--json", link), f"output '{link}' exists", "--force")
    assert link.is_symlink() and not (tmp_path / "x.pt").exists()
    result = run(*CONVERT, "-o", tmp_path / "x.pt", "--json", link, "--force")
    assert result.exit_code == 0, result.output
    assert not link.is_symlink() and '"model": "resnet20"' in link.read_text()
    assert (tmp_path / "elsewhere.json").read_text() == "keep me"


# -- an output is never an input -------------------------------------------------------------------------
@pytest.mark.parametrize("command", [
    ["prune", "R.pt", "-o", "out.pt", "--json", "{}"],
    ["prune", "R.pt", "-o", "{}"],
    ["inspect", "R.pt", "--json", "{}"],
    ["inspect", "R.pt", "--png", "{}"],
    ["eval", "R.pt", "--data", "fake:16:4", "--json", "{}"],
    ["export", "R.pt", "-o", "{}"],
    ["convert", "R.pt", "--layers", "1", "-o", "{}"],
    ["finetune", "R.pt", "--data", "fake:16:4", "--epochs", "1", "-o", "{}"],
    ["bench", "m.onnx", "--baseline", "R.pt", "--markdown", "{}"],
])
@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hard link"])
def test_an_output_that_is_an_input_is_refused_even_with_force(tmp_path, monkeypatch, recipe, command, spelling):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "R.pt").write_bytes(recipe)
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        os.symlink("R.pt", "link.pt")
    elif spelling == "hard link":
        os.link("R.pt", "hard.pt")
    same = {"same": "R.pt", "dotdot": "sub/../R.pt", "symlink": "link.pt", "hard link": "hard.pt"}[spelling]
    before = files(tmp_path)
    one_line_error(run(*[same if a == "{}" else a for a in command], "--force"), f"output '{same}' is also an input of this command",
                   "even with --force: write to another path")
    assert files(tmp_path) == before and (tmp_path / "R.pt").read_bytes() == recipe
    assert not (tmp_path / "out.pt").exists()


def test_the_resume_file_is_an_input_too(tmp_path, recipe):
    (tmp_path / "run.last.pt").write_bytes(recipe)
    one_line_error(run("finetune", *TINY, "--data", "fake:16:4", "--epochs", "1", "-o", tmp_path / "run.pt", "--json", tmp_path / "run.last.pt",
                       "--resume", tmp_path / "run.last.pt", "--force"), "is also an input of this command")
    assert (tmp_path / "run.last.pt").read_bytes() == recipe


def test_an_output_beside_the_input_is_fine(tmp_path, recipe):
    (tmp_path / "R.pt").write_bytes(recipe)
    result = run("inspect", tmp_path / "R.pt", "--json", tmp_path / "R.json", "--trust-factory")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "R.json").exists() and (tmp_path / "R.pt").read_bytes() == recipe


# -- every output is checked before anything is written ----------------------------------------------------
def _loop(tmp_path: Path) -> Path:
    (tmp_path / "loopdir").symlink_to("loopdir")
    return tmp_path / "loopdir" / "j.json"


def _through_a_file(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("a file")
    return tmp_path / "afile" / "deeper" / "j.json"


def _broken_folder_link(tmp_path: Path) -> Path:
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    return tmp_path / "gone" / "j.json"


@pytest.mark.parametrize("make, message", [
    (_loop, "'{d}/loopdir' is a symlink loop"),
    (_through_a_file, "'{d}/afile' is a file, not a directory"),
    (_broken_folder_link, "'{d}/gone' is a symlink to a missing folder"),
])
def test_a_later_output_that_cannot_be_written_fails_before_the_first_is_written(tmp_path, make, message):
    json_path = make(tmp_path)
    before = files(tmp_path)
    one_line_error(run(*CONVERT, "-o", tmp_path / "x.pt", "--json", json_path), f"cannot write '{json_path}': " + message.format(d=tmp_path))
    assert not (tmp_path / "x.pt").exists() and files(tmp_path) == before


# -- any legal name ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["n" * 245, "n" * 255, "é" * 127])  # 255 bytes is the most one name may hold
def test_any_legal_output_name_is_written(tmp_path, name):
    gio.write_text(tmp_path / name, "hello\n", force=False)
    assert names(tmp_path) == [name] and (tmp_path / name).read_text() == "hello\n"  # no temporary file left
    gio.write_text(tmp_path / name, "again\n", force=True)
    assert names(tmp_path) == [name] and (tmp_path / name).read_text() == "again\n"


def test_a_245_character_recipe_name_works_from_the_cli(tmp_path):
    out = tmp_path / ("r" * 242 + ".pt")
    result = run(*CONVERT, "-o", out)
    assert result.exit_code == 0, result.output
    assert names(tmp_path) == [out.name]


@pytest.mark.parametrize("option", ["-o", "--json"])
def test_a_name_too_long_is_one_line(tmp_path, option):
    long = tmp_path / ("x" * 300 + ".pt")
    other = ["-o", tmp_path / "ok.pt"] if option == "--json" else []
    one_line_error(run(*CONVERT, option, long, *other), f"cannot write '{long}': name too long (at most 255 bytes a name)")
    assert names(tmp_path) == []


# -- plain text on the terminal -------------------------------------------------------------------------------
def test_plain_escapes_every_control_character_and_nothing_else():
    assert _plain(EVIL) == "\\x1b[2J\\x1b]0;pwned\\x07[red]x\\r\\nerror: forged"
    assert _plain("a\tb\x00c\x7f\x9b\u202edef\u2028") == "a\\tb\\x00c\\x7f\\x9b\\u202edef\\u2028"
    ordinary = "résumé 日本 [bold] ~/a b/c.pt 100% ±1 \\"
    assert _plain(ordinary) == ordinary


def _no_control(text: str) -> None:
    assert not any(c in text for c in "\x1b\x07\r"), repr(text)


def test_a_hostile_model_spec_is_one_escaped_error_line(tmp_path):
    result = run("convert", "resnet" + EVIL, "--layers", "1", "-o", tmp_path / "x.pt")
    one_line_error(result, "resnet\\x1b[2J\\x1b]0;pwned\\x07[red]x\\r\\nerror: forged")  # one line: the newline did not start a second
    _no_control(result.output)


def test_a_hostile_path_is_escaped_and_not_markup(tmp_path):
    folder = tmp_path / ("d" + EVIL)
    folder.mkdir()
    (folder / "out.json").write_text("old")
    result = run(*CONVERT, "-o", folder / "x.pt", "--json", folder / "out.json")
    one_line_error(result, f"output '{_plain(str(folder))}/out.json' exists")
    assert "[red]x" in result.stderr  # shown as written, not taken as a colour
    _no_control(result.output)


def test_a_hostile_option_value_is_escaped_in_the_usage_error(tmp_path):
    result = run(*CONVERT, "-o", tmp_path / "x.pt", "--input-shape", EVIL)
    assert result.exit_code == 2
    assert "'\\x1b[2J\\x1b]0;pwned\\x07[red]x\\r\\nerror: forged' is not C,H,W" in result.stderr
    assert not any(line.startswith("error: forged") for line in result.stderr.splitlines())
    _no_control(result.output)


def test_hostile_onnx_metadata_producer_and_names_are_escaped(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("in" + EVIL, TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["in" + EVIL], ["out"], name="relu" + EVIL)], "g", [x], [y])
    model = helper.make_model(graph, producer_name="maker" + EVIL, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"gaborprune.note" + EVIL: "value" + EVIL})
    onnx.save(model, tmp_path / "m.onnx")
    result = run("inspect", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    escaped = _plain(EVIL)
    for line in (f"producer: maker{escaped}", f"input: in{escaped} [1, 3, 4, 4]", f"metadata gaborprune.note{escaped}: value{escaped}"):
        assert line in result.stdout, result.stdout
    assert not any(line.startswith("error: forged") for line in result.stdout.splitlines())
    _no_control(result.output)


def hostile_net() -> nn.Module:
    """A model whose first layer's name carries escape sequences and a newline (a factory source)."""
    model = nn.Sequential()
    model.add_module("conv" + EVIL, nn.Conv2d(3, 4, 3, padding=1))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(4, 2))
    return model


def test_a_hostile_layer_name_in_a_table_is_escaped():
    result = run("inspect", "test_hostile_outputs:hostile_net", "--input-shape", "3,8,8")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "conv\\x1b[2J" in line]
    assert len(rows) == 1 and "conv\\x1b[2J\\x1b]0;pwned\\x07[red]x\\r\\nerror: forged" in rows[0], result.stdout
    assert not any(line.lstrip("│┃ ").startswith("error: forged") for line in result.stdout.splitlines())
    _no_control(result.output)
