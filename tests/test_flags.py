"""Library messages name arguments as Python spells them (`batch_size`); the CLI shows each command's
flag for them (`gaborprune._flags`), and every flag it shows is an option of that command."""

import ast
import re
from pathlib import Path

import pytest
import typer.main

import gaborprune as gp
from gaborprune import workflows
from gaborprune._flags import COMMANDS, FLAGS, cli_message
from gaborprune.cli import app
from gaborprune.export.results import BenchReport
from helpers import one_line_error, run

PACKAGE = Path(gp.__file__).parent
OPTION = re.compile(r"(?<![\w-])--?[a-z][a-z0-9-]*")  # a flag inside a map's value ("N of --input-shape N,C,H,W")
CLI_FLAG = re.compile(r"--[a-z]")
#: Strings under gaborprune/ that must spell a flag although they are not messages: {(module, the string): why}.
NOT_MESSAGES: dict[tuple[str, str], str] = {}


def _options(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


# -- the maps ----------------------------------------------------------------------------------------
def test_every_flag_a_command_shows_is_one_of_its_options():
    commands = typer.main.get_command(app).commands
    assert set(COMMANDS) == set(commands)
    for name, command in commands.items():
        options = _options(command)
        for argument, shown in COMMANDS[name].items():
            flags = OPTION.findall(shown)
            assert flags and set(flags) <= options, (name, argument, shown)


def test_every_command_maps_an_argument_to_each_of_its_flags_that_the_library_names():
    """A command given an option whose flag `FLAGS` knows shows that flag for some argument of its map."""
    for name, command in typer.main.get_command(app).commands.items():
        shown = {flag for value in COMMANDS[name].values() for flag in OPTION.findall(value)}
        missing = sorted(flag for flag in set(FLAGS.values()) & _options(command) if flag not in shown)
        assert not missing, (name, missing)


def test_library_messages_name_arguments_and_each_command_shows_its_flags():
    with pytest.raises(gp.GaborPruneError) as e:
        gp.TrainConfig(batch_size=0)
    assert str(e.value) == "`batch_size` must be an integer of at least 1, not 0"
    assert cli_message(str(e.value), "finetune") == "--batch-size must be an integer of at least 1, not 0"
    assert cli_message(str(e.value), "export") == "N of --input-shape N,C,H,W must be an integer of at least 1, not 0"
    with pytest.raises(gp.GaborPruneError) as e:
        gp.PruneSpec(layer_keep={"conv1": 0})
    assert cli_message(str(e.value), "prune") == "--keep conv1=0 would remove every kernel; keep at least 1"
    assert cli_message("`first` N or `targets` NAME; `max_candidates` stays", "convert") == "--layers N or --target NAME; `max_candidates` stays"
    # one argument, each command's own flag; a name the command has no flag for stays as it is
    assert [cli_message("`epochs` 0", c) for c in ("finetune", "prune", "reproduce", "eval")] == ["--epochs 0", "--finetune-epochs 0", "--epochs 0",
                                                                                                  "`epochs` 0"]
    assert [cli_message("use `provider` cpu", c) for c in ("bench", "eval")] == ["use --provider cpu", "use --device cpu"]
    assert cli_message("fine-tune with `structure` channel", "export") == "fine-tune with `structure` channel"
    with pytest.raises(KeyError):
        cli_message("`force`", "no-such-command")


def test_round_to_without_scope_all_is_refused_by_the_spec():
    with pytest.raises(gp.GaborPruneError, match="`round_to` counts channels that `scope` all removes"):
        gp.PruneSpec(round_to=8)
    assert gp.PruneSpec(round_to=8, scope="all").round_to == 8


# -- at the command line -----------------------------------------------------------------------------
def test_an_error_shows_the_flag_of_the_command_that_runs(tmp_path):
    prune = ["prune", "missing.pt", "-o", tmp_path / "p.pt"]
    one_line_error(run(*prune, "--data", "digits", "--finetune-epochs", "0"), "error: --finetune-epochs must be an integer of at least 1, not 0")
    one_line_error(run(*prune, "--finetune-epochs", "1"), "error: --finetune-epochs needs --data to measure accuracy")
    one_line_error(run(*prune, "--round-to", "8"), "error: --round-to counts channels that --scope all removes; add --scope all or drop --round-to")
    one_line_error(run("bench", "missing.onnx", "--data", "digits"), "error: --data digits calibrates --int8; add --int8, or leave out --data")
    assert not (tmp_path / "p.pt").exists()


def test_warnings_and_notes_of_the_library_show_the_flags(monkeypatch):
    report = BenchReport({"cpu": "test CPU", "cores": 2, "onnxruntime": "1.0", "torch": "2", "provider": "cpu", "load_average": None,
                          "date": "today"}, settings={"runs_per_round": 5, "precision": 0.02, "max_seconds": 1.0},
                         warnings=["2 of 2 medians did not reach +-1.0% within `max_seconds` 1: give more time"])
    monkeypatch.setattr(workflows, "bench", lambda *args, **kwargs: report)
    result = run("bench", "a.onnx")
    assert result.exit_code == 0, result.output
    assert "warning: 2 of 2 medians did not reach +-1.0% within --max-seconds 1: give more time" in result.stderr


# -- no library string names a flag ------------------------------------------------------------------
def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module and of its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def test_no_library_string_names_a_cli_flag():
    """Every string constant of every module but the CLI's (f-string parts too; docstrings may describe the
    CLI, and comments are not strings) names library arguments, not flags: a notebook has no --threads."""
    found = []
    modules = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix() not in ("cli.py", "_flags.py"))
    assert len(modules) > 40
    for path in modules:
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        module = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs and CLI_FLAG.search(node.value)
                    and (module, node.value) not in NOT_MESSAGES):
                found.append(f"{module}:{node.lineno}: {node.value!r}")
    assert not found, "\n".join(found)
