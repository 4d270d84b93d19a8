"""The shape of the code: the import graph has no circles and its arrows run down (prune/ imports
nothing from export/), and the model analysis traces a model once per architecture."""

import ast
import copy
from pathlib import Path

import pytest
import torch

import gaborprune as gp
from gaborprune.prune import PruneSpec, dataflow, prune_model_
from gaborprune.search import prune_to_target_
from helpers import SHAPE, FakeTimer, randomize_norms, ranked_model, run

PACKAGE = Path(gp.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("gaborprune", *path.relative_to(PACKAGE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}, lazy imports inside functions included (they are
    arrows too); a package's own __init__ and `from gaborprune import NAME` of the lazy API excluded."""
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t in modules and t != name and t != "gaborprune" and not name.startswith(t + "."):
                    edges[name].add(t)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_circles():
    edges = import_graph()
    assert len(edges) > 50 and "gaborprune.search" in edges["gaborprune.workflows"]  # the graph is read, lazy imports too
    assert circles(edges) == []


def test_prune_imports_nothing_from_export():
    edges = import_graph()
    up = {m: sorted(t for t in ts if t.startswith("gaborprune.export")) for m, ts in edges.items() if m.startswith("gaborprune.prune")}
    assert {m: ts for m, ts in up.items() if ts} == {}


def test_only_the_cli_imports_typer():
    users = [name for name, path in _modules().items()
             if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "typer" in ((n.module or "") if isinstance(n, ast.ImportFrom)
                                                                                 else " ".join(a.name for a in n.names))
                    for n in ast.walk(ast.parse(path.read_text())))]
    assert users == ["gaborprune.cli"]


# -- one trace per architecture --------------------------------------------------------------------
@pytest.fixture
def traces(monkeypatch):
    """Counts the torch.fx traces of the channel analysis."""
    count = []
    real = dataflow._Tracer.trace

    def counting(self, root, *args, **kwargs):
        count.append(type(root).__name__)
        return real(self, root, *args, **kwargs)

    monkeypatch.setattr(dataflow._Tracer, "trace", counting)
    return count


def _resnet20():
    torch.manual_seed(0)
    model, recipe = gp.load_model("resnet20", input_shape=SHAPE)
    return randomize_norms(model).eval(), recipe


def test_a_scope_all_prune_traces_once(traces):
    model, _ = _resnet20()
    reference = copy.deepcopy(model)
    report = prune_model_(model, SHAPE, PruneSpec(threshold=0.5, scope="all", round_to=4))
    assert len(traces) == 1  # was 3: the units, the interior analysis and the final one each traced
    assert report.after.macs < report.before.macs and model.layer1[0].conv1.out_channels < reference.layer1[0].conv1.out_channels


def test_a_banks_prune_and_a_target_search_trace_once(traces):
    model, _ = ranked_model()
    pruned = prune_model_(copy.deepcopy(model), SHAPE, PruneSpec(threshold=0.1))  # conv1's weakest rows die
    assert len(traces) == 1 and pruned.plan.channels["conv1"]["out"]
    traces.clear()
    report = prune_to_target_(model, SHAPE, speedup=1.33, timer=FakeTimer())  # ranking, layouts of 15 candidates, several prunes
    assert report.chosen is not None and len(traces) == 1


def test_the_prune_command_traces_once_per_model_state(traces, tmp_path):
    model, recipe = _resnet20()
    gp.save_recipe(tmp_path / "r.pt", model, recipe)
    result = run("prune", tmp_path / "r.pt", "--scope", "all", "--threshold", "0.5", "--round-to", "4", "-o", tmp_path / "p.pt")
    assert result.exit_code == 0, result.output
    assert len(traces) == 1
