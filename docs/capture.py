"""Regenerate every sample output in README.md and docs/guide.md by running the documented commands.

    .venv/bin/python docs/capture.py                    # everything (several minutes: it trains and times)
    .venv/bin/python docs/capture.py --only demo        # one block (and the commands it needs first)
    .venv/bin/python docs/capture.py --list             # the registry
    .venv/bin/python docs/capture.py --keep             # keep the work directory and its capture-log.json
    .venv/bin/python docs/capture.py --reuse DIR        # go on in a kept directory, reusing the commands already run

A sample block sits between markers in the Markdown; everything between them is rewritten:

    <!-- capture: NAME -->
    ```
    $ gaborprune ...              (each command exactly as run, in the work directory)
    ...                           (its stdout and stderr, in order; long parts cut at "...")
    ```
    *Captured by `docs/capture.py` on DATE: CPU, N cores, 1 thread, 1-minute load L, S s.*
    <!-- /capture -->

The commands run in one fresh temporary directory (so `out/...` paths read as the user's), in the
order they need each other, with `--threads 1` wherever the command takes it (the registry is
refused otherwise), OMP/MKL threads pinned to 1, Rich at 200 columns (what `gaborprune` uses when
piped), and no network: in a network namespace of their own (`unshare -rn`) where the system allows
it, else behind an unreachable proxy. A command line used by several blocks runs once, and they show
the same output. Figures a capture names are copied into docs/figures/ (each under 200 KiB).
Nothing is written unless every command ran as expected (exit code 0, or the one the registry gives).

Adding a sample: define a `Run` for each new command line (with `needs`: the runs whose files it
reads), append a `Capture(name, doc, runs, ...)` to `CAPTURES`, and put the two markers where the
block goes (`tests/test_docs.py` checks that markers and entries match). Then
`docs/capture.py --only NAME`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README, GUIDE = "README.md", "docs/guide.md"
FIGURES = ROOT / "docs" / "figures"
MAX_FIGURE_BYTES = 200 * 1024
LOG = "capture-log.json"  # in the work directory: every command's output, exit code, time and machine
MARKER = re.compile(r"<!-- capture: (?P<name>[\w.-]+) -->(?P<body>\n.*?)<!-- /capture -->", re.S)


@dataclass(frozen=True)
class Run:
    """One command line, run in the work directory after the runs it reads files from."""

    line: str
    needs: tuple[Run, ...] = ()
    exit_code: int = 0


Trim = Callable[[list[str]], list[str]]


@dataclass(frozen=True)
class Capture:
    """A sample block: the runs it shows, the file its marker is in, how its output is cut."""

    name: str
    doc: str
    runs: tuple[Run, ...]
    trims: tuple[Trim, ...] = ()
    figures: dict[str, str] = field(default_factory=dict)  # file in the work directory -> docs/figures/NAME


# -- trims: deterministic cuts, each marked with a "..." line ------------------------------------
def elide(pattern: str, head: int, tail: int) -> Trim:
    """In every run of consecutive lines matching `pattern`, keep the first `head` and last `tail`."""
    rx = re.compile(pattern)

    def trim(lines: list[str]) -> list[str]:
        kept, i = [], 0
        while i < len(lines):
            j = i
            while j < len(lines) and rx.search(lines[j]):
                j += 1
            if j == i:
                kept.append(lines[i])
                i += 1
                continue
            block = lines[i:j]
            kept += block if len(block) <= head + tail + 1 else block[:head] + ["..."] + block[len(block) - tail:]
            i = j
        return kept

    return trim


def only(pattern: str) -> Trim:
    """Keep just the lines matching `pattern`; each stretch cut becomes one "..." line."""
    rx = re.compile(pattern)

    def trim(lines: list[str]) -> list[str]:
        kept: list[str] = []
        for line in lines:
            if rx.search(line):
                kept.append(line)
            elif not kept or kept[-1] != "...":
                kept.append("...")
        return kept

    return trim


# -- the registry --------------------------------------------------------------------------------
# The by-hand pipeline of the README's quickstart, which the guide walks step by step: one run.
FINETUNE = Run("gaborprune finetune resnet20_altered --data digits --epochs 8 --batch-size 64 --sparsity 0.1 -o out/r20a.pt --threads 1")
INSPECT = Run("gaborprune inspect out/r20a.pt --png out/r20a-banks.png --threads 1", (FINETUNE,))
SWEEP = Run("gaborprune prune out/r20a.pt --sweep 0.02,0.05,0.1,0.2 --data digits --png out/sweep.png --threads 1", (FINETUNE,))
DRY_RUN = Run("gaborprune prune out/r20a.pt --ratio conv1=0.83 --ratio conv2=0.94 --dry-run --threads 1", (FINETUNE,))
PRUNE = Run("gaborprune prune out/r20a.pt --data digits --finetune-epochs 2 --batch-size 64 -o out/r20a-pruned.pt --threads 1", (FINETUNE,))
INSPECT_PRUNED = Run("gaborprune inspect out/r20a-pruned.pt --png out/r20a-pruned-banks.png --threads 1", (PRUNE,))
EXPORT = Run("gaborprune export out/r20a-pruned.pt -o out/r20a-pruned.onnx --dynamic-batch --data digits --threads 1", (PRUNE,))
EXPORT_UNPRUNED = Run("gaborprune export out/r20a.pt -o out/r20a.onnx --dynamic-batch --threads 1", (FINETUNE,))
EXPORT_INT8 = Run("gaborprune export out/r20a-pruned.pt -o out/r20a-int8.onnx --quantize int8 --data digits --threads 1", (PRUNE,))
EVAL = Run("gaborprune eval out/r20a-pruned.pt --data digits --threads 1", (PRUNE,))
EVAL_ONNX = Run("gaborprune eval out/r20a-pruned.onnx --data digits --threads 1", (EXPORT,))
INSPECT_ONNX = Run("gaborprune inspect out/r20a-pruned.onnx --threads 1", (EXPORT,))
BENCH = Run("gaborprune bench out/r20a-pruned.onnx --baseline out/r20a.onnx --batch-size 1,32 --threads 1 --int8 --data digits "
            "--profile --png out/bench.png --max-seconds 30", (EXPORT, EXPORT_UNPRUNED))
SPEEDUP = Run("gaborprune prune out/r20a.pt --speedup 1.1 --dry-run --threads 1", (FINETUNE,))
UNREACHABLE = Run("gaborprune prune out/r20a.pt --speedup 3 --dry-run --threads 1", (FINETUNE,), exit_code=1)
LATENCY_AWARE = Run("gaborprune finetune resnet20_altered --data digits --epochs 1 --batch-size 64 --sparsity 0.1 --latency-aware "
                    "-o out/r20a-la.pt --threads 1")
# No shell runs the lines: shlex splits them as a shell would, so the quoted regex stays one argument.
CONVERT = Run(r"gaborprune convert resnet20 --target conv1 --target 're:layer1\.0\.conv.' -o out/r20.pt --threads 1")
DEMO = Run("gaborprune demo --out out/demo --threads 1")
# --scope all: a plain ResNet-20, its channels and residual branches pressed, pruned, exported, timed
R20 = Run("gaborprune finetune resnet20 --data digits --epochs 6 --batch-size 64 -o out/r20-plain.pt --threads 1")
CONVERT_DATA = Run(r"gaborprune convert out/r20-plain.pt --target conv1 --target 're:layer1\.\d\.conv\d' --data digits -o out/r20-gabor.pt "
                   "--threads 1", (R20,))
R20_ALL = Run("gaborprune finetune out/r20-plain.pt --data digits --epochs 12 --batch-size 64 --sparsity 0.3 --scope all "
              "-o out/r20-all.pt --threads 1", (R20,))
R20_PRUNE = Run("gaborprune prune out/r20-all.pt --scope all --threshold 0.6 --data digits --finetune-epochs 2 --batch-size 64 "
                "-o out/r20-all-pruned.pt --threads 1", (R20_ALL,))
R20_EXPORT = Run("gaborprune export out/r20-all-pruned.pt -o out/r20-all-pruned.onnx --dynamic-batch --threads 1", (R20_PRUNE,))
R20_EXPORT_UNPRUNED = Run("gaborprune export out/r20-plain.pt -o out/r20-plain.onnx --dynamic-batch --threads 1", (R20,))
R20_BENCH = Run("gaborprune bench out/r20-all-pruned.onnx --baseline out/r20-plain.onnx --batch-size 1,32 --threads 1 --max-seconds 30",
                (R20_EXPORT, R20_EXPORT_UNPRUNED))
# targets past what a short, weak pressure separated (Step 14's digits case): --speedup and --max-drop with --scope all
R20_SHORT = Run("gaborprune finetune out/r20-plain.pt --data digits --epochs 4 --batch-size 64 --sparsity 0.1 --structure channel --scope all "
                "-o out/r20-short.pt --threads 1", (R20,))
R20_SPEEDUP = Run("gaborprune prune out/r20-short.pt --scope all --speedup 1.4 --data digits --finetune-epochs 2 --batch-size 64 "
                  "-o out/r20-fast.pt --threads 1", (R20_SHORT,))
R20_FAST_EXPORT = Run("gaborprune export out/r20-fast.pt -o out/r20-fast.onnx --dynamic-batch --threads 1", (R20_SPEEDUP,))
R20_FAST_BENCH = Run("gaborprune bench out/r20-fast.onnx --baseline out/r20-plain.onnx --batch-size 1,32 --threads 1 --max-seconds 30",
                     (R20_FAST_EXPORT, R20_EXPORT_UNPRUNED))
R20_BUDGET = Run("gaborprune prune out/r20-short.pt --scope all --max-drop 1 --data digits --batch-size 64 -o out/r20-1pt.pt --threads 1",
                 (R20_SHORT,))

EPOCHS = elide(r"^epoch ", 1, 2)
DEEP_LAYERS = elide(r"^│ layer[23]\.", 1, 1)
PROFILE_ROWS = elide(r"^│ \S+ +│ +[\d.]+ │ +\d+% │$", 4, 0)

CAPTURES: list[Capture] = [
    # README.md
    Capture("convert", README, (CONVERT,)),
    Capture("convert-data", README, (CONVERT_DATA,)),
    Capture("inspect-onnx", README, (INSPECT_ONNX,)),
    Capture("finetune", README, (FINETUNE,), (EPOCHS,)),
    Capture("latency-cost-table", README, (LATENCY_AWARE,), (only(r"^latency cost table"),)),
    Capture("eval", README, (EVAL, EVAL_ONNX)),
    Capture("prune", README, (PRUNE,)),
    Capture("prune-ratio", README, (DRY_RUN,)),
    Capture("prune-scope-all", README, (R20_ALL, R20_PRUNE), (EPOCHS,)),
    Capture("bench-scope-all", README, (R20_BENCH,)),
    Capture("prune-speedup", README, (SPEEDUP,)),
    Capture("prune-unreachable", README, (UNREACHABLE,)),
    Capture("prune-speedup-all", README, (R20_SHORT, R20_SPEEDUP, R20_FAST_BENCH), (EPOCHS,)),
    Capture("prune-budget", README, (R20_BUDGET,)),
    Capture("export", README, (EXPORT,)),
    Capture("export-int8", README, (EXPORT_INT8,)),
    Capture("bench", README, (BENCH,), (PROFILE_ROWS,)),
    Capture("demo", README, (DEMO,), figures={
        "out/demo/summary.png": "demo-summary.png", "out/demo/banks-converted.png": "demo-banks-converted.png",
        "out/demo/banks-after-pruning.png": "demo-banks-after-pruning.png", "out/demo/latency.png": "demo-latency.png"}),
    # docs/guide.md: the same run, step by step
    Capture("guide-finetune", GUIDE, (FINETUNE,)),
    Capture("guide-inspect", GUIDE, (INSPECT,), (DEEP_LAYERS,), figures={"out/r20a-banks.png": "r20a-banks.png"}),
    Capture("guide-sweep", GUIDE, (SWEEP,), figures={"out/sweep.png": "sweep.png"}),
    Capture("guide-dry-run", GUIDE, (DRY_RUN,)),
    Capture("guide-prune", GUIDE, (PRUNE,)),
    Capture("guide-inspect-pruned", GUIDE, (INSPECT_PRUNED,), (DEEP_LAYERS,), figures={"out/r20a-pruned-banks.png": "r20a-pruned-banks.png"}),
    Capture("guide-export", GUIDE, (EXPORT,)),
    Capture("guide-export-unpruned", GUIDE, (EXPORT_UNPRUNED,)),
    Capture("guide-int8", GUIDE, (EXPORT_INT8,)),
    Capture("guide-eval", GUIDE, (EVAL, EVAL_ONNX)),
    Capture("guide-bench", GUIDE, (BENCH,), (PROFILE_ROWS,), figures={"out/bench.png": "bench.png"}),
]


# -- checks ----------------------------------------------------------------------------------------
def markers(doc: str) -> list[str]:
    """The capture names marked in `doc`, in order."""
    return [m["name"] for m in MARKER.finditer((ROOT / doc).read_text())]


def registry_problems() -> list[str]:
    """Markers without an entry, entries without their marker, names used twice, `--threads` missing."""
    problems, names = [], [c.name for c in CAPTURES]
    problems += [f"capture name '{n}' is registered twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for doc in (README, GUIDE):
        found = markers(doc)
        problems += [f"{doc}: marker '{n}' appears {found.count(n)} times" for n in sorted(set(found)) if found.count(n) > 1]
        problems += [f"{doc}: marker '{n}' has no entry in docs/capture.py" for n in found if n not in names]
        problems += [f"{doc}: entry '{c.name}' has no marker here" for c in CAPTURES if c.doc == doc and c.name not in found]
    problems += [f"'{c.name}': {c.doc} is not a documented file" for c in CAPTURES if c.doc not in (README, GUIDE)]
    problems += [f"'{run.line}' takes --threads: give --threads 1" for run in all_runs() if _takes_threads(run.line) and not _one_thread(run.line)]
    return problems


def all_runs() -> list[Run]:
    seen: dict[str, Run] = {}

    def visit(run: Run) -> None:
        for n in run.needs:
            visit(n)
        seen.setdefault(run.line, run)

    for c in CAPTURES:
        for run in c.runs:
            visit(run)
    return list(seen.values())


def _one_thread(line: str) -> bool:
    words = shlex.split(line)
    return any(a == "--threads" and b == "1" for a, b in zip(words, words[1:]))


def _takes_threads(line: str) -> bool:
    import typer.main

    from gaborprune.cli import app

    words = shlex.split(line)
    command = typer.main.get_command(app).commands.get(words[1]) if words[0] == "gaborprune" and len(words) > 1 else None
    return command is not None and any("--threads" in p.opts for p in command.params)


# -- running ---------------------------------------------------------------------------------------
@dataclass
class Result:
    output: str
    exit_code: int
    seconds: float
    environment: dict


def _sandbox() -> tuple[list[str], str]:
    try:
        if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
            return ["unshare", "-rn"], "no network (own network namespace)"
    except OSError:
        pass
    return [], "no network namespace available: HTTP(S) through an unreachable proxy"


def _environment(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", COLUMNS="200", PYTHONUNBUFFERED="1",
               NO_COLOR="1", TERM="dumb", TORCH_HOME=str(work / ".torch"), HOME=str(work / ".home"),
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `gaborprune` is this environment's
    env.pop("GABORPRUNE_TRUSTED_MODULES", None)
    return env


class Session:
    """Runs each command line once, in one work directory, after the runs it needs."""

    def __init__(self, work: Path, saved: dict[str, dict] | None = None):
        from gaborprune.export.environment import environment

        self.work, self.saved, self.results = work, saved or {}, {}
        self._environment = lambda: environment([1], "cpu")
        self.prefix, self.isolation = _sandbox()
        self.env = _environment(work)

    def run(self, run: Run) -> Result:
        if run.line in self.results:
            return self.results[run.line]
        for need in run.needs:
            self.run(need)
        if run.line in self.saved:
            result = Result(**self.saved[run.line])
        else:
            print(f"  running: {run.line}", flush=True)
            env_now, t0 = self._environment(), time.perf_counter()
            proc = subprocess.run(self.prefix + shlex.split(run.line), cwd=self.work, env=self.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
            result = Result(_relative(proc.stdout, self.work), proc.returncode, time.perf_counter() - t0, env_now)
        if result.exit_code != run.exit_code:
            tail = "\n".join(result.output.splitlines()[-20:])
            raise SystemExit(f"'{run.line}' exited {result.exit_code}, expected {run.exit_code}; no doc written\n{tail}")
        self.results[run.line] = result
        self.saved[run.line] = vars(result)
        (self.work / LOG).write_text(json.dumps(self.saved, indent=1))  # after every run: --reuse continues from here
        return result


def _relative(text: str, work: Path) -> str:
    for root in {str(work.resolve()), str(work)}:
        text = text.replace(root + "/", "").replace(root, ".")
    return text


# -- rendering -------------------------------------------------------------------------------------
def render(capture: Capture, results: list[Result]) -> str:
    lines: list[str] = []
    for run, result in zip(capture.runs, results):
        out = [line.rstrip() for line in result.output.rstrip("\n").splitlines()]
        for trim in capture.trims:
            out = trim(out)
        lines += [f"$ {run.line}", *out]
    env = results[0].environment
    load = env.get("load_average")
    seconds = sum(r.seconds for r in results)
    note = (f"*Captured by `docs/capture.py` on {env['date'][:10]}: {env['cpu']}, {env['cores']} cores, 1 thread, "
            f"1-minute load {'n/a' if load is None else f'{load:.2f}'} at the start, {seconds:.0f} s.*")
    return "\n```\n" + "\n".join(lines) + "\n```\n" + note + "\n"


def rewrite(doc: str, blocks: dict[str, str]) -> tuple[str, str]:
    old = (ROOT / doc).read_text()

    def body(m: re.Match) -> str:
        name = m["name"]
        return f"<!-- capture: {name} -->{blocks[name] if name in blocks else m['body']}<!-- /capture -->"

    return old, MARKER.sub(body, old)


def _figure(src: Path, name: str) -> str:
    """Copy one PNG into docs/figures/, re-encoded as a palette PNG when it is too large to commit."""
    dest = FIGURES / name
    before = dest.read_bytes() if dest.exists() else None
    data = src.read_bytes()
    if len(data) > MAX_FIGURE_BYTES:
        from io import BytesIO

        from PIL import Image

        buf = BytesIO()
        Image.open(src).convert("RGB").quantize(256).save(buf, "PNG", optimize=True)
        data = buf.getvalue()
        if len(data) > MAX_FIGURE_BYTES:
            raise SystemExit(f"{src.name} is {len(data) // 1024} KiB even as a palette PNG; the limit is {MAX_FIGURE_BYTES // 1024} KiB")
    FIGURES.mkdir(exist_ok=True)
    dest.write_bytes(data)
    state = "new" if before is None else "unchanged" if before == data else "changed"
    return f"docs/figures/{name}: {len(data) / 1024:.0f} KiB ({state})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="rewrite only these blocks (the runs they need run too)")
    parser.add_argument("--list", action="store_true", help="print the registry and exit")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (with its capture-log.json)")
    parser.add_argument("--reuse", metavar="DIR", type=Path,
                        help="continue in a kept work directory: the commands its capture-log.json holds are not run again "
                             "(to change trims or prose without rerunning, or to go on after a failed command)")
    args = parser.parse_args(argv)

    if args.list:
        for c in CAPTURES:
            print(f"{c.name:24s} {c.doc:14s} " + " && ".join(r.line for r in c.runs))
        return 0
    problems = registry_problems()
    if problems:
        raise SystemExit("docs/capture.py: the registry and the markers disagree:\n  " + "\n  ".join(problems))
    by_name = {c.name: c for c in CAPTURES}
    unknown = [n for n in args.only or () if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown capture {', '.join(unknown)}; known: {', '.join(by_name)}")
    chosen = [by_name[n] for n in args.only] if args.only else CAPTURES

    if args.reuse:
        work = args.reuse.resolve()
        saved = json.loads((work / LOG).read_text()) if (work / LOG).exists() else {}
    else:
        work, saved = Path(tempfile.mkdtemp(prefix="gaborprune-capture-")).resolve(), {}
    session = Session(work, saved)
    print(f"work directory {work}; {session.isolation}")
    try:
        blocks: dict[str, dict[str, str]] = {README: {}, GUIDE: {}}
        figures: list[str] = []
        for c in chosen:
            print(f"{c.name} ({c.doc})", flush=True)
            blocks[c.doc][c.name] = render(c, [session.run(r) for r in c.runs])
        for c in chosen:
            figures += [_figure(work / src, name) for src, name in c.figures.items()]
        for doc, new_blocks in blocks.items():
            old, new = rewrite(doc, new_blocks)
            if new != old:
                (ROOT / doc).write_text(new)
            for name in new_blocks:
                before = MARKER.search(old[old.index(f"<!-- capture: {name} -->"):])["body"]
                diff = list(difflib.unified_diff(before.splitlines(), new_blocks[name].splitlines(), lineterm="", n=0))[2:]
                changed = [d for d in diff if not d.startswith("@@")]
                print(f"{doc} {name}: " + (f"{len(changed)} lines changed" if changed else "unchanged"))
                for d in changed:
                    print(f"    {d[:160]}")
        for line in figures:
            print(line)
    finally:
        if args.keep or args.reuse:
            print(f"kept {work} (docs/capture.py --reuse {work} continues there)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
