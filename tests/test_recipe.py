"""Recipes rebuild models by replay, load with weights_only=True, and refuse unsafe or broken files.
Model sources: built-ins, torchvision by name, factories, and local weight files."""

import os
import pickle
import sys

import pytest
import torch
from torch import nn

import gaborprune as gp
from gaborprune.errors import ModelSourceError, OutputExistsError, RecipeError


def converted(tmp_path, name="resnet20", **spec):
    torch.manual_seed(0)
    model, recipe = gp.load_model(name)
    recipe = recipe.with_step(gp.gaborize_(model, gp.ConversionSpec(**({"first": 2, "fit_steps": 5} | spec)), recipe.input_shape).step)
    with torch.no_grad():
        model.conv1.mask[0, 1] = 0
        model.bn1.running_mean.normal_()
    path = gp.save_recipe(tmp_path / "r.pt", model, recipe)
    return model.eval(), recipe, path


def test_round_trip_by_replay(tmp_path):
    model, recipe, path = converted(tmp_path)
    raw = torch.load(path, weights_only=True)  # plain data and tensors only
    assert raw["format"] == "gaborprune.recipe" and raw["version"] == 2 and raw["steps"][0]["layers"] == ["conv1", "layer1.0.conv1"]
    loaded, again = gp.load_model(str(path))
    loaded.eval()
    assert isinstance(loaded.conv1, gp.GaborConv2d) and loaded.conv1.kernels_alive == 47
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert again.source == recipe.source and again.steps == recipe.steps and again == recipe


def test_recipe_of_a_recipe_keeps_the_history(tmp_path):
    _, _, path = converted(tmp_path)
    model, recipe = gp.load_model(str(path))
    recipe = recipe.with_step(gp.gaborize_(model, gp.ConversionSpec(targets=("layer1.1.conv1",), init="random"), recipe.input_shape).step)
    second = gp.save_recipe(tmp_path / "r2.pt", model, recipe)
    again, r = gp.load_model(str(second))
    assert [c.layers for c in r.conversions] == [("conv1", "layer1.0.conv1"), ("layer1.1.conv1",)]
    assert isinstance(again.layer1[1].conv1, gp.GaborConv2d)


def test_existing_output_is_not_overwritten_without_force(tmp_path):
    model, recipe, path = converted(tmp_path)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="pass `force`"):
        gp.save_recipe(path, model, recipe)
    assert path.read_bytes() == before
    gp.save_recipe(path, model, recipe, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["r.pt"]  # no temporary left behind


class Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pt", "wb") as f:
        pickle.dump({"format": "gaborprune.recipe", "x": Boom()}, f, protocol=2)
    with pytest.raises(RecipeError, match="refusing to load 'evil.pt': it needs arbitrary unpickling"):
        gp.load_model("evil.pt")
    with open("evil4.pt", "wb") as f:  # protocol 4 framing is refused before any global is seen
        pickle.dump({"x": Boom()}, f, protocol=4)
    with pytest.raises(RecipeError, match="is not a readable recipe"):
        gp.load_model("evil4.pt")
    assert not (tmp_path / "PWNED").exists()
    torch.save(nn.Linear(2, 2), "module.pt")  # a pickled module is refused too
    with pytest.raises(RecipeError, match="arbitrary unpickling"):
        gp.read_recipe("module.pt")


def test_broken_files_give_clear_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file '.*missing.pt' not found"):
        gp.load_model(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(RecipeError, match="is not a readable recipe"):
        gp.load_model(str(tmp_path / "junk.pt"))
    _, _, path = converted(tmp_path)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:5000])
    with pytest.raises(RecipeError, match="is not a readable recipe"):
        gp.load_model(str(tmp_path / "cut.pt"))
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(RecipeError, match="plain state_dict, not a recipe; pass it as `weights`"):
        gp.load_model(str(tmp_path / "sd.pt"))
    payload = torch.load(path, weights_only=True)
    torch.save(payload | {"version": 99}, tmp_path / "future.pt")
    with pytest.raises(RecipeError, match="format version 99.*upgrade gaborprune"):
        gp.load_model(str(tmp_path / "future.pt"))


def test_unknown_models_list_the_known_ones():
    with pytest.raises(ModelSourceError, match=r"unknown model 'resnet2'; known: resnet20, resnet32, .*torchvision:NAME"):
        gp.load_model("resnet2")
    with pytest.raises(ModelSourceError, match="unknown torchvision classification, detection or segmentation model .resnet1.; e.g. resnet"):
        gp.load_model("torchvision:resnet1")
    with pytest.raises(ModelSourceError, match="cannot import module 'no_such_pkg.mod'"):
        gp.load_model("no_such_pkg.mod:build")
    with pytest.raises(ModelSourceError, match="does not take these arguments"):
        gp.load_model("resnet20", model_args={"width": 3})


def test_factory_source_and_weights_file(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def small(num_classes=3):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))\n"
        "def not_a_model():\n    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model, recipe = gp.load_model("my_models:small", input_shape=(3, 8, 8))
    assert recipe.input_shape == (3, 8, 8) and isinstance(model[0], nn.Conv2d)
    with pytest.raises(ModelSourceError, match="returned int, not a torch.nn.Module"):
        gp.load_model("my_models:not_a_model")
    with pytest.raises(ModelSourceError, match="has no callable 'nothing'"):
        gp.load_model("my_models:nothing")
    sys.modules.pop("my_models", None)


def test_weights_files(tmp_path):
    trained, _ = gp.load_model("resnet20")
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "ddp.pt")
    model, _ = gp.load_model("resnet20", weights=str(tmp_path / "ddp.pt"))
    torch.testing.assert_close(model.conv1.weight, trained.conv1.weight)
    with pytest.raises(ModelSourceError, match=r"does not fit model 'resnet32': .*missing .*check the model name"):
        gp.load_model("resnet32", weights=str(tmp_path / "ddp.pt"))
    with pytest.raises(ModelSourceError, match=r"of another shape \(e.g. fc.weight \(10, 64\) vs \(100, 64\)"):
        gp.load_model("resnet20", num_classes=100, weights=str(tmp_path / "ddp.pt"))
    with pytest.raises(ModelSourceError, match="weights file 'nowhere.pt' not found"):
        gp.load_model("resnet20", weights="nowhere.pt")


def test_pretrained_weights_are_never_downloaded():
    with pytest.raises(ModelSourceError, match=r"never downloaded here\. Fetch https://download\.pytorch\.org/models/resnet18-.* with `weights`"):
        gp.load_model("torchvision:resnet18", weights="IMAGENET1K_V1")


def test_torchvision_input_shape_from_weight_metadata():
    assert gp.ModelSource("torchvision:inception_v3").input_shape() == (3, 299, 299)
    assert gp.ModelSource("torchvision:resnet18").input_shape() == (3, 224, 224)
    assert gp.ModelSource("vgg16").input_shape() == (3, 32, 32)


def test_public_api_is_importable_lazily():
    import subprocess
    import sys

    code = "import sys, gaborprune as gp; assert 'torch' not in sys.modules; gp.GaborConv2d; assert 'torch' in sys.modules; print(sorted(gp.__all__))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in gp.__all__:
        assert getattr(gp, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gp.nope
