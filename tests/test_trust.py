"""Recipes are data, and only data: a recipe never imports or calls the factory it names unless the
user trusts it, a malformed recipe gets one line naming the bad field, and non-finite weights or
outputs are refused on load and by export."""

import importlib
import re
import sys

import pytest
import torch
from torch import nn

import gaborprune as gp
from gaborprune.errors import RecipeError
from gaborprune.models import TRUST_ENV, trusted_factory
from helpers import one_line_error, run

STEALTH = '''
import pathlib
from torch import nn


def small(num_classes=4):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def build(marker, num_classes=4):
    """Looks like a model factory, and is one; it also does something on the side."""
    pathlib.Path(marker).touch()
    return small(num_classes)


def nan_net(num_classes=4):
    model = small(num_classes)
    model[0].weight.data[0, 0, 0, 0] = float("nan")
    return model


def overflow_net(num_classes=4):
    """Finite weights whose outputs overflow float32 to infinity."""
    model = small(num_classes)
    model[0].weight.data.fill_(1e30)
    model[4].weight.data.fill_(1e30)
    return model
'''


@pytest.fixture
def stealth(tmp_path, monkeypatch):
    """A module `stealth_factory` on sys.path (not yet imported) and a legit-looking recipe naming
    its `build`, whose state_dict fits what `build` returns."""
    (tmp_path / "stealth_factory.py").write_text(STEALTH)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.delenv(TRUST_ENV, raising=False)
    namespace = {}
    exec(STEALTH, namespace)
    marker = tmp_path / "STEALTH_RAN"
    recipe = gp.Recipe(gp.ModelSource("stealth_factory:build", kwargs={"marker": str(marker)}), (3, 16, 16))
    path = gp.save_recipe(tmp_path / "stealth.pt", namespace["small"](), recipe)
    yield path, marker
    sys.modules.pop("stealth_factory", None)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small valid recipe: a conversion, a fine-tuning record and an (empty) prune plan after them."""
    torch.manual_seed(0)
    model, recipe = gp.load_model("resnet20", input_shape=(3, 16, 16))
    recipe = recipe.with_step(gp.gaborize_(model, gp.ConversionSpec(first=1, init="random"), recipe.input_shape).step)
    recipe = recipe.with_step(gp.FinetuneStep(gp.TrainConfig(epochs=1), "fake:64:10", 1, 10.0, ({"epoch": 1, "test_top1": 10.0},)))
    recipe = recipe.with_step(gp.PruneStep(gp.PrunePlan()))
    return gp.save_recipe(tmp_path_factory.mktemp("trust") / "base.pt", model, recipe)


def edited(base, path, edit):
    payload = torch.load(base, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return path


def hostile_sources(tmp_path):
    """Per source kind: (spec, kwargs, what must still be true afterwards)."""
    marker = tmp_path / "MARKER"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    script = tmp_path / "script.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    hub = tmp_path / "hub"
    hub.mkdir()  # a local hub repo: torch.hub.load(source="local") runs its hubconf.py
    (hub / "hubconf.py").write_text(f"def evil(**kw):\n    open({str(marker)!r}, 'w').close()\n")
    untouched = lambda: not marker.exists() and (victim / "keep.txt").read_text() == "precious"  # noqa: E731
    return {
        "os:system": ({"command": f"touch {marker}"}, untouched),
        "subprocess:run": ({"args": ["touch", str(marker)]}, untouched),
        "shutil:rmtree": ({"path": str(victim)}, untouched),
        "runpy:run_path": ({"path_name": str(script)}, untouched),
        "torch.hub:load": ({"repo_or_dir": str(hub), "model": "evil", "source": "local", "trust_repo": True}, untouched),
    }


HOSTILE = ["os:system", "subprocess:run", "shutil:rmtree", "runpy:run_path", "torch.hub:load"]


def hostile_recipe(base, tmp_path, spec):
    kwargs, untouched = hostile_sources(tmp_path)[spec]
    path = edited(base, tmp_path / "evil.pt", lambda p: p.update(source={"spec": spec, "num_classes": None, "kwargs": kwargs}))
    return path, untouched


@pytest.mark.parametrize("spec", HOSTILE)
def test_a_hostile_recipe_is_refused_before_anything_runs(base, tmp_path, spec):
    path, untouched = hostile_recipe(base, tmp_path, spec)
    for args in (["inspect", path], ["eval", path, "--data", "fake:64:10"]):
        one_line_error(run(*args), f"'{spec}'", "--trust-factory", "trust_factory=True", TRUST_ENV)
        assert untouched()
    with pytest.raises(RecipeError, match=re.escape("pass `trust_factory` (trust_factory=True in the API)")):
        gp.load_model(str(path))
    recipe, _ = gp.read_recipe(path)  # reading is harmless; building is what is refused
    with pytest.raises(RecipeError, match=f"names the model factory '{spec}'"):
        recipe.build()
    assert untouched()


@pytest.mark.parametrize("command", [
    ["inspect", "{p}", "--json", "{o}"],
    ["convert", "{p}", "--layers", "1", "-o", "{o}"],
    ["finetune", "{p}", "--data", "fake:64:10", "--epochs", "1", "--device", "cpu", "-o", "{o}"],
    ["eval", "{p}", "--data", "fake:64:10", "--json", "{o}"],
    ["prune", "{p}", "--threshold", "0.5", "-o", "{o}"],
    ["export", "{p}", "-o", "{o}"],
    ["bench", "{p}", "--runs", "1", "--json", "{o}"],
    ["bench", "{o}.onnx", "--baseline", "{p}", "--runs", "1"],
])
def test_every_command_refuses_a_hostile_recipe(base, tmp_path, command):
    path, untouched = hostile_recipe(base, tmp_path, "os:system")
    out = tmp_path / "out"
    if command[1] == "{o}.onnx":  # the baseline is the hostile one: give bench a real ONNX model first
        assert run("export", base, "-o", f"{out}.onnx", "--lowering", "dense").exit_code == 0
    before = set(tmp_path.iterdir())
    one_line_error(run(*[a.format(p=path, o=out) for a in command]), "'os:system'", "--trust-factory")
    assert untouched() and set(tmp_path.iterdir()) == before  # and no output file


def test_a_stealth_factory_runs_only_when_trusted(stealth, monkeypatch):
    path, marker = stealth
    for args in (["inspect", path], ["export", path, "-o", path.with_suffix(".onnx")]):
        one_line_error(run(*args), "'stealth_factory:build'", "--trust-factory", f"{TRUST_ENV}=stealth_factory")
    assert not marker.exists() and "stealth_factory" not in sys.modules  # not even imported
    result = run("inspect", path, "--trust-factory")
    assert result.exit_code == 0, result.output
    assert marker.exists()  # trusted: the factory is called, as the user asked
    marker.unlink()
    model, recipe = gp.load_model(str(path), trust_factory=True)
    assert isinstance(model[0], nn.Conv2d) and recipe.source.spec == "stealth_factory:build" and marker.exists()


def test_the_environment_trusts_listed_modules(stealth, monkeypatch):
    path, marker = stealth
    monkeypatch.setenv(TRUST_ENV, "some_other_module, stealth_factory")
    result = run("inspect", path)
    assert result.exit_code == 0, result.output
    assert marker.exists()


@pytest.mark.parametrize("listed,spec,trusted", [
    ("stealth_factory", "stealth_factory:build", True),
    ("pkg", "pkg.models.zoo:build", True),  # a listed package trusts its submodules
    ("pkg", "pkgx.models:build", False),  # a prefix of the name is not a parent package
    ("pkg.models", "pkg:build", False),  # a listed submodule does not trust its package
    (" a ,pkg.models ", "pkg.models:build", True),
    ("", "os:system", False),
    (",", "os:system", False),
])
def test_trusted_modules_match_exactly_or_by_parent_package(monkeypatch, listed, spec, trusted):
    monkeypatch.setenv(TRUST_ENV, listed)
    assert trusted_factory(spec) is trusted


def test_a_factory_given_on_the_command_line_is_the_users_choice(stealth, tmp_path):
    _, marker = stealth
    result = run("inspect", "stealth_factory:build", "--model-arg", f"marker={marker}", "--input-shape", "3,16,16")
    assert result.exit_code == 0, result.output
    assert marker.exists()


def test_builtin_and_torchvision_recipes_rebuild_without_trust(base, tmp_path):
    assert run("inspect", base).exit_code == 0
    model, recipe = gp.load_model("torchvision:squeezenet1_0", num_classes=3, input_shape=(3, 32, 32))
    path = gp.save_recipe(tmp_path / "tv.pt", model, recipe)
    result = run("inspect", path)
    assert result.exit_code == 0, result.output


# -- malformed recipes: one line naming the field ----------------------------------------------------
def _set(*keys, value):
    def edit(payload):
        target = payload
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return edit


def _nan(name, value):
    def edit(payload):
        payload["state_dict"][name].view(-1)[0] = value
    return edit


MALFORMED = {
    "string version": (_set("version", value="1"), "'version'"),
    "negative version": (_set("version", value=-1), "'version'"),
    "bool version": (_set("version", value=True), "'version'"),
    "no version": (lambda p: p.pop("version"), "missing version"),
    "int source": (_set("source", value=3), "'source'"),
    "int source spec": (_set("source", "spec", value=3), "'source.spec'"),
    "zero classes": (_set("source", "num_classes", value=0), "'source.num_classes'"),
    "tensor kwarg": (_set("source", "kwargs", value={"w": torch.zeros(2)}), "'source.kwargs'"),
    "short input shape": (_set("input_shape", value=[3, 16]), "'input_shape'"),
    "huge input shape": (_set("input_shape", value=[3, 10**6, 10**6]), "'input_shape'"),
    "string steps": (_set("steps", value="conv1"), "'steps'"),
    "no steps": (lambda p: p.pop("steps"), "missing steps"),
    "string step": (_set("steps", 0, value="conv1"), "'steps[0]'"),
    "unknown kind": (_set("steps", 0, "kind", value="quantize"), "'steps[0]' must be a dict whose 'kind' is one of convert, prune, finetune"),
    "conversion as a plan": (_set("steps", 0, "kind", value="prune"), "'steps[0]' must be a prune step with keys kind, plan"),
    "string conversion spec": (_set("steps", 0, "spec", value="first=1"), "'steps[0].spec'"),
    "unknown key in conversion spec": (_set("steps", 0, "spec", "bogus", value=1), "unknown key 'bogus'"),
    "string in conversion spec": (_set("steps", 0, "spec", "first", value="1"), "'steps[0].spec.first'"),
    "string freeze": (_set("steps", 0, "spec", "freeze", value="theta"), "'steps[0].spec.freeze'"),
    "invalid conversion spec": (_set("steps", 0, "spec", "init", value="magic"), "unknown `init` 'magic'"),  # a field of the file, not an option of inspect
    "string layers": (_set("steps", 0, "layers", value="conv1"), "'steps[0].layers'"),
    "unknown layer name": (_set("steps", 0, "layers", value=["no.such.layer"]), "steps[0] (convert) does not replay"),
    "string fine-tuning config": (_set("steps", 1, "config", value="epochs=1"), "'steps[1].config'"),
    "invalid fine-tuning config": (_set("steps", 1, "config", "lr", value=-1.0), "'steps[1].config' is not a valid fine-tuning config"),
    "unknown fine-tuning setting": (_set("steps", 1, "config", "bogus", value=1), "'steps[1].config'"),
    "int fine-tuning data": (_set("steps", 1, "data", value=3), "'steps[1].data'"),
    "negative epochs done": (_set("steps", 1, "epochs_done", value=-1), "'steps[1].epochs_done'"),
    "NaN best accuracy": (_set("steps", 1, "best_accuracy", value=float("nan")), "'steps[1].best_accuracy'"),
    "tensor in history": (_set("steps", 1, "history", 0, "w", value=torch.zeros(2)), "'steps[1].history'"),
    "string prune plan": (_set("steps", 2, "plan", value="plan"), "'steps[2].plan'"),
    "unknown key in plan": (_set("steps", 2, "plan", "after_conversions", value=1), "'steps[2].plan' has unknown key 'after_conversions'"),
    "bad kernel pair": (_set("steps", 2, "plan", "kernels", value={"conv1": [[0]]}), "'steps[2].plan.kernels'"),
    "plan names a missing layer": (_set("steps", 2, "plan", "kernels", value={"nope": []}), "'nope'"),
    "string metadata": (_set("metadata", value="notes"), "'metadata'"),
    "string state_dict": (_set("state_dict", value="weights"), "'state_dict'"),
    "string in state_dict": (_set("state_dict", "fc.bias", value="zero"), "'state_dict['fc.bias']'"),
    "NaN weight": (_nan("fc.weight", float("nan")), "'state_dict['fc.weight']' holds NaN or infinite values"),
    "Inf running variance": (_nan("bn1.running_var", float("inf")), "'state_dict['bn1.running_var']' holds NaN or infinite values"),
    "-Inf Gabor parameter": (_nan("conv1.theta", float("-inf")), "'state_dict['conv1.theta']'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_recipe_gets_one_line_naming_the_field(base, tmp_path, case):
    edit, fragment = MALFORMED[case]
    path = edited(base, tmp_path / "bad.pt", edit)
    one_line_error(run("inspect", path), str(path), fragment)
    with pytest.raises(gp.GaborPruneError):
        gp.load_model(str(path))


def test_the_base_recipe_of_the_malformed_cases_is_valid(base):
    result = run("inspect", base)
    assert result.exit_code == 0, result.output
    model, recipe = gp.load_model(str(base))
    assert isinstance(model.conv1, gp.GaborConv2d) and [s.kind for s in recipe.steps] == ["convert", "finetune", "prune"]


def test_a_newer_version_says_upgrade(base, tmp_path):
    path = edited(base, tmp_path / "new.pt", _set("version", value=gp.recipe.VERSION + 1))
    one_line_error(run("inspect", path), "newer than this gaborprune reads", "upgrade gaborprune")


# -- non-finite weights and outputs ----------------------------------------------------------------
@pytest.mark.parametrize("factory,fragment", [
    ("nan_net", "the model's '0.weight' holds NaN or infinite values"),
    ("overflow_net", "NaN or infinite on the check inputs"),
])
def test_export_refuses_non_finite_weights_and_outputs(stealth, tmp_path, factory, fragment):
    out = tmp_path / "x.onnx"
    one_line_error(run("export", f"stealth_factory:{factory}", "--input-shape", "1,3,16,16", "--lowering", "dense", "-o", out), fragment, "nothing was written")
    assert not out.exists()


def test_a_weights_file_with_nan_is_refused_on_load(tmp_path):
    state = nn.Linear(3, 2).state_dict()
    state["bias"][1] = float("nan")
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(gp.GaborPruneError, match=r"weights file '.*w.pt' has NaN or infinite values in 'bias'"):
        gp.load_model("resnet20", weights=str(tmp_path / "w.pt"))


@pytest.mark.parametrize("command", ["convert", "inspect", "finetune", "eval", "prune", "export", "bench"])
def test_every_command_that_loads_a_model_offers_trust_factory(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "--trust-factory" in result.output
