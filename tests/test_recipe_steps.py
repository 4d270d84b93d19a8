"""The recipe is an immutable record of typed steps; format 1 files (written by the code before it)
load and upgrade; the verbs never see a recipe (library messages and CLI flags: tests/test_flags.py)."""

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gaborprune as gp
from gaborprune.data import load_data
from gaborprune.errors import RecipeError
from gaborprune.recipe import read_recipe
from gaborprune.train import finetune_
from helpers import kill, randomize_norms

DATA = Path(__file__).parent / "data"
V1 = DATA / "recipe_v1.pt"  # written by tests/data/make_recipe_v1.py with the format-1 code
SHAPE = (3, 16, 16)
PACKAGE = Path(gp.__file__).parent


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


# -- format 1 ----------------------------------------------------------------------------------------
def test_a_format_1_file_is_small_and_really_format_1():
    raw = torch.load(V1, weights_only=True)
    assert V1.stat().st_size < 100 * 1024
    assert raw["version"] == 1 and "steps" not in raw and [p["after_conversions"] for p in raw["prune_plans"]] == [1, 2]
    assert raw["prune_plans"][0]["folds"] and raw["prune_plans"][1]["constants"] == {"conv2": "bn2"} and "finetune" in raw["metadata"]


def test_a_format_1_recipe_loads_as_steps_in_the_order_they_were_made():
    model, recipe = gp.load_model(str(V1), trust_factory=True)
    io = torch.load(DATA / "recipe_v1_io.pt", weights_only=True)
    assert torch.equal(outputs(model, io["x"]), io["y"])  # the oracle: what the format-1 code's model computed
    assert [s.kind for s in recipe.steps] == ["convert", "prune", "convert", "finetune", "prune"]
    first, second = recipe.conversions
    assert first.layers == ("stem",) and first.spec == gp.ConversionSpec(first=1, fit_steps=5)
    assert second.layers == ("conv2",)
    assert {f["module"] for f in recipe.prunes[0].plan.folds} == {"p"} and recipe.prunes[1].plan.constants == {"conv2": "bn2"}
    [tuned] = recipe.finetunes  # moved out of the metadata, which keeps the rest
    assert tuned.config == gp.TrainConfig(epochs=1) and tuned.data == "fake:64:4" and tuned.best_accuracy == 25.0
    assert "finetune" not in recipe.metadata and len(recipe.metadata["prunes"]) == 2
    assert type(model.conv1).__name__ == "Dropped" and type(model.conv2).__name__ == "ChannelConstant"


def test_a_format_1_recipe_saved_again_is_format_2_and_the_same(tmp_path):
    model, recipe = gp.load_model(str(V1), trust_factory=True)
    path = gp.save_recipe(tmp_path / "v2.pt", model, recipe)
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == gp.recipe.VERSION == 2 and "conversions" not in raw and "prune_plans" not in raw
    assert [s["kind"] for s in raw["steps"]] == ["convert", "prune", "convert", "finetune", "prune"]
    again, state = read_recipe(path)
    assert again == recipe
    rebuilt = again.build(trust_factory=True)
    rebuilt.load_state_dict(state, strict=True)
    x = torch.randn(2, *SHAPE)
    assert torch.equal(outputs(rebuilt, x), outputs(model, x))


def _edited_v1(tmp_path, edit):
    payload = torch.load(V1, weights_only=True)
    edit(payload)
    torch.save(payload, tmp_path / "bad.pt")
    return tmp_path / "bad.pt"


@pytest.mark.parametrize("edit, fragment", [
    (lambda p: p["prune_plans"][1].update(after_conversions=5), "'prune_plans[1].after_conversions' must be an integer from 0 to 2"),
    (lambda p: p.update(conversions="stem"), "'conversions' must be a list"),
    (lambda p: p["conversions"][0]["spec"].update(init="magic"), "'conversions[0].spec' is invalid"),
    (lambda p: p["prune_plans"][0].update(folds="none"), "'prune_plans[0].folds' must be a list"),
    (lambda p: p.pop("conversions"), "missing conversions"),
])
def test_a_malformed_format_1_file_is_still_refused_in_one_line(tmp_path, edit, fragment):
    with pytest.raises(RecipeError, match=re.escape(fragment)):
        read_recipe(_edited_v1(tmp_path, edit))


def test_a_format_1_fine_tuning_record_that_is_no_run_stays_in_the_metadata(tmp_path):
    path = _edited_v1(tmp_path, lambda p: p["metadata"].update(finetune={"config": {"lr": -1.0}, "note": "hand-written"}))
    recipe, _ = read_recipe(path)
    assert not recipe.finetunes and recipe.metadata["finetune"]["note"] == "hand-written"
    assert [s.kind for s in recipe.steps] == ["convert", "prune", "convert", "prune"]


def test_a_format_1_fine_tuning_record_from_before_structure_existed_reads_as_the_kernel_pressure(tmp_path):
    def older(payload):
        for key in ("structure", "latency_aware", "latency_batch"):
            del payload["metadata"]["finetune"]["config"][key]

    recipe, _ = read_recipe(_edited_v1(tmp_path, older))
    assert recipe.finetunes[0].config.structure == "kernel"


# -- format 2: every kind of step, made by the verbs ---------------------------------------------------
@pytest.fixture(scope="module")
def made():
    """A model converted, fine-tuned and pruned by the verbs, and the recipe recording each step."""
    torch.manual_seed(0)
    model, recipe = gp.load_model("tiny_models:Steps", input_shape=SHAPE, trust_factory=True)
    randomize_norms(model)
    conversion = gp.gaborize_(model, gp.ConversionSpec(first=1, fit_steps=5), recipe.input_shape)
    recipe = recipe.with_step(conversion.step)
    train, test = load_data("fake:64:4", SHAPE)
    result = finetune_(model, recipe, train, test, gp.TrainConfig(epochs=1, batch_size=32), device=torch.device("cpu"), data_name="fake:64:4")
    recipe = recipe.with_step(result.step)
    kill(model.bn0, [0, 1], -1.0)
    kill(model.bn0, [2, 3], 0.5)  # folds into p's bias
    pruned = gp.prune_model_(model.cpu(), recipe.input_shape, gp.PruneSpec(threshold=1e-6))
    return model, recipe.with_step(pruned.step), (conversion, result, pruned)


def test_each_verb_returns_its_step_and_leaves_the_recipe_to_the_caller(made):
    model, recipe, (conversion, result, pruned) = made
    assert recipe.steps == (conversion.step, result.step, pruned.step)
    assert conversion.step == gp.ConversionStep(gp.ConversionSpec(first=1, fit_steps=5), ("stem",))
    assert result.step.epochs_done == 1 and list(result.step.history) == result.history and "step" not in result.to_dict()
    assert pruned.step == gp.PruneStep(pruned.plan) and pruned.plan.folds
    assert model.stem.out_channels == 4


def test_format_2_round_trips_by_replay(made, tmp_path):
    model, recipe, _ = made
    path = gp.save_recipe(tmp_path / "r.pt", model, recipe)
    raw = torch.load(path, weights_only=True)  # plain data and tensors only
    assert [s["kind"] for s in raw["steps"]] == ["convert", "finetune", "prune"] and raw["steps"][1]["config"]["epochs"] == 1
    loaded, again = gp.load_model(str(path), trust_factory=True)
    assert again == recipe and again.origin == str(path)
    x = torch.randn(3, *SHAPE)
    assert torch.equal(outputs(loaded, x), outputs(model, x))


def test_the_recipe_is_immutable(made):
    _, recipe, _ = made
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.steps = ()
    shorter = gp.Recipe(recipe.source, recipe.input_shape, recipe.steps[:1])
    longer = shorter.with_step(recipe.steps[1])
    assert len(shorter.steps) == 1 and longer.steps == recipe.steps[:2] and longer is not shorter
    assert shorter.with_metadata(note="x").metadata == {"note": "x"} and shorter.metadata == {}
    with pytest.raises(RecipeError, match="a recipe step must be a ConversionStep, PruneStep, FinetuneStep"):
        shorter.with_step({"kind": "prune"})


def test_a_step_that_does_not_replay_names_its_place(made, tmp_path):
    model, recipe, _ = made
    path = gp.save_recipe(tmp_path / "r.pt", model, recipe)
    payload = torch.load(path, weights_only=True)
    payload["steps"][2]["plan"]["kernels"] = {"conv1": [[0, 0]]}  # a plain convolution, not a Gabor bank
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(gp.PruneError, match=r"steps\[2\] \(prune\): the prune plan masks kernels of 'conv1'"):
        gp.load_model(str(tmp_path / "bad.pt"), trust_factory=True)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return names | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}


@pytest.mark.parametrize("package", ["convert", "prune", "export", "data"])
def test_the_verbs_never_import_the_recipe(package):
    for path in sorted((PACKAGE / package).glob("*.py")):
        assert "gaborprune.recipe" not in _imports(path), path.name  # not even inside a function
    code = f"import sys, gaborprune.{package}; assert 'gaborprune.recipe' not in sys.modules, 'imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_exception_classes_live_in_errors():
    """Every public exception class of every module is in errors.py (a private one that only carries
    control flow inside its module, like a hook stopping a forward pass, may stay there)."""
    errors = {name for name, value in vars(gp.errors).items() if isinstance(value, type) and issubclass(value, BaseException)}
    exceptions = errors | {"Exception", "BaseException", "ValueError", "RuntimeError", "KeyboardInterrupt", "OSError"}
    found = []
    for path in sorted(PACKAGE.glob("**/*.py")):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                names = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if names & exceptions:
                    found.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert not found
    assert gp.prune.PruneError is gp.errors.PruneError is gp.PruneError
    assert gp.train.TrainingError is gp.errors.TrainingError


def test_export_takes_an_input_shape_and_leaves_the_model_as_it_was(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(gp.load_model("tiny_models:Chain", input_shape=SHAPE, trust_factory=True)[0]).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = gp.export_model(model, SHAPE, tmp_path / "m.onnx", gp.ExportConfig(lowering="dense"))  # no recipe needed
    assert report.max_abs_diff <= 1e-4 and report.note == ""
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
