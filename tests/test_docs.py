"""The docs against the program: options in the docs' commands exist, documented JSON keys are the
ones the commands write, every sample block comes from docs/capture.py, every linked image exists."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import typer.main

from gaborprune.cli import app
from helpers import run

ROOT = Path(__file__).resolve().parent.parent
DOCS = {"README.md": ROOT / "README.md", "docs/guide.md": ROOT / "docs" / "guide.md"}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
# a gaborprune command line: "$ gaborprune CMD", ".venv/bin/gaborprune CMD", "... && gaborprune CMD", "-m gaborprune CMD"
COMMAND = re.compile(r"(?:^(?:\$\s+)?|&&\s*|\s-m\s+)(?:[\w./-]*/)?gaborprune\s+([a-z][\w-]*)(?=\s|$)(.*)$")
OPTION = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
SECTION = re.compile(r"^### `gaborprune ([a-z]+)[^`]*`\n(.*?)(?=^##)", re.S | re.M)


def capture_module():
    spec = importlib.util.spec_from_file_location("capture", ROOT / "docs" / "capture.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["capture"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def command_options() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    return {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"} for name, cmd in group.commands.items()}


def documented_commands() -> list[tuple[str, str, str]]:
    """(doc, command, options text) for every gaborprune command line in a code block or an inline code span."""
    found = []
    for doc, path in DOCS.items():
        text = path.read_text()
        lines = [line for block in FENCE.findall(text) for line in block.splitlines()]
        lines += re.findall(r"`(gaborprune [^`]+)`", FENCE.sub("", text))
        for line in lines:
            m = COMMAND.search(line.strip())
            if m:
                found.append((doc, m[1], re.split(r"&&|\|\s|\s#", m[2])[0]))
    return found


# -- options ---------------------------------------------------------------------------------------
def test_every_documented_option_exists():
    options = command_options()
    commands = documented_commands()
    assert len(commands) > 50 and {c for _, c, _ in commands} >= {"convert", "inspect", "finetune", "eval", "prune", "export", "bench", "demo"}
    wrong = []
    for doc, command, rest in commands:
        if command not in options:
            wrong.append(f"{doc}: gaborprune {command} is no command")
            continue
        wrong += [f"{doc}: gaborprune {command} {o}" for o in OPTION.findall(rest) if o not in options[command]]
    assert not wrong, "options the docs use that the commands do not have:\n" + "\n".join(sorted(set(wrong)))


def test_every_option_in_a_command_sections_tables_exists():
    options = command_options()
    text = DOCS["README.md"].read_text()
    sections = SECTION.findall(text)
    assert {c for c, _ in sections} >= {"convert", "finetune", "prune", "export", "demo"}
    wrong = []
    for command, body in sections:
        for row in re.findall(r"^\| ([^|\n]*(?:\\\|[^|\n]*)*) \|", body, re.M):
            wrong += [f"{command} {o}" for o in OPTION.findall(row) if o not in options[command]]
    assert not wrong, "options in the README's option tables that the commands do not have: " + ", ".join(wrong)


def test_the_option_parser_sees_through_chains_and_comments():
    line = "python3 -m venv .venv && .venv/bin/gaborprune demo --out out/demo --force  # --not-this"
    m = COMMAND.search(line)
    assert m[1] == "demo" and OPTION.findall(re.split(r"&&|\|\s|\s#", m[2])[0]) == ["--out", "--force"]
    assert COMMAND.search("torchrun --nproc_per_node=4 -m gaborprune finetune x --data d")[1] == "finetune"
    assert COMMAND.search("gaborprune demo: resnet20_altered on digits (54 s on cpu)") is None  # a title, not a command
    assert COMMAND.search("warning: pass trained weights with --weights") is None


# -- JSON keys -------------------------------------------------------------------------------------
def documented_keys() -> dict[str, set[str]]:
    """`<!-- json: ID -->` followed by a table whose first column names the keys (several per row allowed)."""
    tables = {}
    text = DOCS["README.md"].read_text()
    for m in re.finditer(r"<!-- json: ([\w-]+) -->\n((?:\|.*\n)+)", text):
        assert m[1] not in tables, f"json table '{m[1]}' twice"
        rows = m[2].splitlines()[2:]  # after the header and the --- line
        tables[m[1]] = {k for row in rows for k in re.findall(r"`([^`]+)`", row.split(" | ")[0])}
    return tables


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """One real JSON per documented table, from tiny runs (tiny models, fake:64:4, 1 epoch)."""
    import gaborprune.cpu as cpu
    import gaborprune.search as search
    from gaborprune.recipe import save_recipe
    from helpers import FakeTimer, ranked_model

    d = tmp_path_factory.mktemp("docs")
    tiny = ["--trust-factory"]
    data = ["--data", "fake:64:4"]

    def ok(*args):
        result = run(*args)
        assert result.exit_code == 0, result.output
        return result

    ok("convert", "resnet20", "--layers", "1", "--input-shape", "3,16,16", "--num-classes", "4", *data, "--calibration-images", "16",
       "-o", d / "c.pt", "--json", d / "convert.json")
    ok("finetune", "tiny_models:gabor_net", "--input-shape", "3,16,16", *data, "--epochs", "1", "--batch-size", "16",
       "--sparsity", "0.01", "--latency-aware", "-o", d / "f.pt", "--json", d / "finetune.json")
    ok("inspect", d / "f.pt", *tiny, "--json", d / "inspect.json")
    ok("eval", d / "f.pt", *data, *tiny, "--json", d / "eval.json")
    ok("prune", d / "f.pt", "--sweep", "0.05,0.1", *data, "--png", d / "s.png", *tiny, "--json", d / "prune-sweep.json")
    ok("export", d / "f.pt", "-o", d / "m.onnx", "--quantize", "int8", *data, "--lowering", "dense", *tiny, "--json", d / "export.json")
    ok("export", d / "f.pt", "-o", d / "float.onnx", "--lowering", "dense", *tiny)
    ok("eval", d / "m.onnx", *data, "--json", d / "eval-onnx.json")
    ok("inspect", d / "m.onnx", "--json", d / "inspect-onnx.json")
    ok("bench", d / "m.onnx", "--baseline", d / "float.onnx", "--runs", "5", "--warmup", "1", "--max-seconds", "1", "--profile",
       "--json", d / "bench.json")
    # --speedup with injected timings (never real speed): the prune report with its `target` entry and accuracies
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(search, "OrtTimer", FakeTimer)
        mp.setattr(cpu, "cpu_block", lambda cpuinfo=None: 0)
        model, recipe = ranked_model(num_classes=4)
        save_recipe(d / "r.pt", model, recipe)
        ok("prune", d / "r.pt", "--speedup", "1.33", "-o", d / "p.pt", *data, "--finetune-epochs", "1", "--batch-size", "32",
           "--json", d / "prune.json")
    out = {name: json.loads((d / f"{name}.json").read_text()) for name in
           ("convert", "finetune", "inspect", "eval", "prune-sweep", "export", "eval-onnx", "inspect-onnx", "bench", "prune")}
    out["prune-target"] = out["prune"]["target"]
    return out


def test_documented_json_keys_are_the_written_ones(reports):
    tables = documented_keys()
    assert set(tables) == set(reports), "a json table without a run in this test, or a run without its table"
    problems = []
    for name, keys in tables.items():
        written = set(reports[name])
        problems += [f"{name}: documented but not written: {k}" for k in sorted(keys - written)]
        problems += [f"{name}: written but not documented: {k}" for k in sorted(written - keys)]
    assert not problems, "\n".join(problems)


def test_the_key_tables_parse():
    tables = documented_keys()
    assert {"model", "output", "params_before", "params_after", "layers", "calibration"} == tables["convert"]
    assert {"model", "padded", "pad", "opset"} <= tables["export"]


# -- capture markers and images --------------------------------------------------------------------
def test_every_capture_marker_has_an_entry_and_every_entry_a_marker():
    capture = capture_module()
    registered = {(c.doc, c.name) for c in capture.CAPTURES}
    assert len(registered) == len(capture.CAPTURES) == len({c.name for c in capture.CAPTURES})
    marked = set()
    for doc, path in DOCS.items():
        text = path.read_text()
        opened = re.findall(r"<!-- capture: (\S+) -->", text)
        assert len(opened) == len(set(opened)) == text.count("<!-- /capture -->"), f"{doc}: unbalanced or repeated capture markers"
        marked |= {(doc, n) for n in opened}
    assert marked == registered, f"markers without entries: {sorted(marked - registered)}; entries without markers: {sorted(registered - marked)}"
    assert capture.registry_problems() == []


def test_the_registry_refuses_a_command_without_one_thread(monkeypatch):
    capture = capture_module()
    extra = capture.Capture("demo-two-threads", capture.README, (capture.Run("gaborprune demo --out out/d --threads 2"),))
    monkeypatch.setattr(capture, "CAPTURES", [*capture.CAPTURES, extra])
    problems = capture.registry_problems()
    assert "README.md: entry 'demo-two-threads' has no marker here" in problems
    assert "'gaborprune demo --out out/d --threads 2' takes --threads: give --threads 1" in problems


def test_every_capture_block_shows_its_registered_commands():
    capture = capture_module()
    for c in capture.CAPTURES:
        body = capture.MARKER.search(DOCS[c.doc].read_text()[DOCS[c.doc].read_text().index(f"<!-- capture: {c.name} -->"):])["body"]
        shown = [line[2:] for line in body.splitlines() if line.startswith("$ ")]
        assert shown == [r.line for r in c.runs], f"{c.doc} '{c.name}': run docs/capture.py --only {c.name}"
        assert "Captured by `docs/capture.py` on" in body


def test_trims_are_deterministic_and_marked():
    capture = capture_module()
    lines = ["a", "epoch 1", "epoch 2", "epoch 3", "epoch 4", "epoch 5", "b"]
    assert capture.elide(r"^epoch ", 1, 2)(lines) == ["a", "epoch 1", "...", "epoch 4", "epoch 5", "b"]
    assert capture.elide(r"^epoch ", 2, 2)(lines) == lines  # cutting one line would save nothing
    assert capture.only(r"^epoch [35]")(lines) == ["...", "epoch 3", "...", "epoch 5", "..."]


def linked_images() -> list[tuple[str, Path]]:
    return [(doc, (path.parent / link).resolve()) for doc, path in DOCS.items()
            for link in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", path.read_text()) if "://" not in link]


def test_every_linked_image_exists_and_is_small():
    images = linked_images()
    assert sum(doc == "docs/guide.md" for doc, _ in images) >= 5
    for doc, image in images:
        assert image.is_file(), f"{doc} links {image}, which does not exist"
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
        assert image.stat().st_size < 200 * 1024, f"{image} is {image.stat().st_size // 1024} KiB; figures are committed"


def test_every_figure_is_linked_and_produced_by_a_capture():
    capture = capture_module()
    figures = set((ROOT / "docs" / "figures").glob("*.png"))
    produced = {ROOT / "docs" / "figures" / name for c in capture.CAPTURES for name in c.figures.values()}
    assert figures == produced, "docs/figures/ should hold exactly what docs/capture.py writes there"
    assert figures <= {image for _, image in linked_images()}, "a figure no doc links"
    benchmark_figures = set((ROOT / "docs" / "figures" / "benchmarks").glob("*.png"))  # written by benchmarks/ scripts, with their commands
    assert benchmark_figures <= {image for _, image in linked_images()}, "a benchmark figure no doc links"
