"""Folds live in the prune plan: the plan alone, replayed on the unpruned weights, gives the pruned model."""

import copy
import json

import pytest
import torch

import gaborprune as gp
import tiny_models
from gaborprune.prune import PruneError, PrunePlan, PruneStep, apply_plan_, prune_model_
from gaborprune.recipe import Recipe, read_recipe, save_recipe
from helpers import FAMILIES, ONLY_DEAD, SHAPE, one_line_error, randomize_norms, run


def pruned(family):
    """(unpruned model, pruned copy, its recipe) for one of the tiny topology families."""
    build, setup = FAMILIES[family]
    torch.manual_seed(0)
    model = randomize_norms(build()).eval()
    setup(model)
    out = copy.deepcopy(model)
    report = prune_model_(out, SHAPE, ONLY_DEAD)
    return model, out, Recipe(gp.ModelSource(f"tiny_models:{build.__name__}"), SHAPE, (report.step,))


@torch.no_grad()
def diff(a, b):
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(5)) * 2
    return float((a.eval()(x) - b.eval()(x)).abs().max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_plan_alone_replayed_on_the_unpruned_model_gives_the_pruned_model(family):
    model, out, recipe = pruned(family)
    replay = apply_plan_(copy.deepcopy(model), recipe.prunes[0].plan)
    assert diff(out, replay) <= 1e-5
    expected, got = out.state_dict(), replay.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_without_its_folds_the_plan_would_not_preserve_the_function():
    model, out, recipe = pruned("folds")
    plan = recipe.prunes[0].plan.to_dict()
    assert {(f["module"], f["attr"]) for f in plan["folds"]} >= {("g2", "bias"), ("bn3", "running_mean"), ("head", "bias")}
    bare = apply_plan_(copy.deepcopy(model), PrunePlan.from_dict({k: v for k, v in plan.items() if k != "folds"}))
    assert diff(out, bare) > 1e-3


def test_a_plan_with_folds_round_trips_through_dict_json_and_recipe(tmp_path):
    _, out, recipe = pruned("folds")
    d = recipe.prunes[0].plan.to_dict()
    plan = PrunePlan.from_dict(d)
    assert plan.folds and all(isinstance(v, float) for f in plan.folds for v in f["delta"])
    assert PrunePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert plan.to_dict()["folds"] == d["folds"] and PrunePlan.from_dict(plan.to_dict()) == plan
    save_recipe(tmp_path / "r.pt", out, recipe)
    again, state = read_recipe(tmp_path / "r.pt")
    assert again.prunes == recipe.prunes
    # replay applies the folds to fresh weights, then the saved state_dict loads strictly over them
    rebuilt = again.build(trust_factory=True)
    rebuilt.load_state_dict(state, strict=True)
    assert diff(out, rebuilt) <= 1e-5


def test_an_old_plan_without_folds_still_loads_and_replays(tmp_path):
    model, out, recipe = pruned("vgg-chain")
    plan = recipe.prunes[0].plan.to_dict()
    plan.pop("folds")
    assert PrunePlan.from_dict(plan).folds == ()
    save_recipe(tmp_path / "old.pt", out, Recipe(recipe.source, SHAPE, (PruneStep(PrunePlan.from_dict(plan)),)))
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    del payload["steps"][0]["plan"]["folds"]
    torch.save(payload, tmp_path / "old.pt")
    again, state = read_recipe(tmp_path / "old.pt")
    rebuilt = again.build(trust_factory=True)
    rebuilt.load_state_dict(state, strict=True)
    assert diff(out, rebuilt) <= 1e-5
    assert diff(out, apply_plan_(copy.deepcopy(model), again.prunes[0].plan)) <= 1e-5


def test_a_fold_that_does_not_fit_the_model_is_refused():
    bias = {"module": "g1", "attr": "bias", "delta": [1.0] * 8}  # Folds.g1 has no bias
    with pytest.raises(PruneError, match="'g1.bias', which has none"):
        apply_plan_(tiny_models.Folds(), PrunePlan(folds=(bias,)))
    with pytest.raises(PruneError, match="adds 3 values to 'bn1.running_mean', which has 8"):
        apply_plan_(tiny_models.Folds(), PrunePlan(folds=({"module": "bn1", "attr": "running_mean", "delta": [1.0] * 3},)))
    with pytest.raises(PruneError, match="names 'nope'"):
        apply_plan_(tiny_models.Folds(), PrunePlan(folds=({"module": "nope", "attr": "bias", "delta": []},)))
    with pytest.raises(PruneError, match="malformed prune plan"):
        PrunePlan(folds=({"module": "g2", "attr": "bias_map", "delta": [0.0]},))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    model, recipe = gp.load_model("resnet20", input_shape=SHAPE)
    recipe = recipe.with_step(PruneStep(PrunePlan()))
    return gp.save_recipe(tmp_path_factory.mktemp("folds") / "base.pt", model, recipe)


BAD_FOLDS = {
    "string": ("folds", "'steps[0].plan.folds' must be a list"),
    "not a dict": ([[0.0]], "fold 0 that is not a dict"),
    "int module": ([{"module": 3, "attr": "bias", "delta": [0.0]}], "whose module is not a name"),
    "weight attr": ([{"module": "fc", "attr": "weight", "delta": [0.0]}], "attr 'weight', not bias or running_mean"),
    "NaN delta": ([{"module": "fc", "attr": "bias", "delta": [float("nan")]}], "delta is not a list of finite numbers"),
    "string delta": ([{"module": "fc", "attr": "bias", "delta": ["0"]}], "delta is not a list of finite numbers"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDS))
def test_a_malformed_folds_field_gets_one_line_naming_it(base, tmp_path, case):
    value, fragment = BAD_FOLDS[case]
    payload = torch.load(base, weights_only=True)
    payload["steps"][0]["plan"]["folds"] = value
    torch.save(payload, tmp_path / "bad.pt")
    one_line_error(run("inspect", tmp_path / "bad.pt"), "'steps[0].plan.folds'", fragment)
    with pytest.raises(gp.GaborPruneError):
        gp.load_model(str(tmp_path / "bad.pt"))


def test_the_base_recipe_of_the_folds_cases_is_valid_and_a_fold_that_does_not_fit_fails_in_one_line(base, tmp_path):
    assert run("inspect", base).exit_code == 0
    payload = torch.load(base, weights_only=True)
    payload["steps"][0]["plan"]["folds"] = [{"module": "fc", "attr": "bias", "delta": [0.0] * 3}]
    torch.save(payload, tmp_path / "misfit.pt")
    one_line_error(run("inspect", tmp_path / "misfit.pt"), "steps[0] (prune)", "'fc.bias'")
