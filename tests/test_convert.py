"""Selecting layers and converting networks: built-in CIFAR nets and tiny models defined here."""

import copy

import pytest
import torch
from torch import nn

import gaborprune as gp
from gaborprune.convert import ConversionSpec, GaborConv2d, gaborize_, select_layers
from gaborprune.errors import ConversionError


class Tiny(nn.Module):
    """Defined out of execution order: `late` is declared first but runs last."""

    def __init__(self):
        super().__init__()
        self.late = nn.Conv2d(8, 8, 3, padding=1)
        self.early = nn.Conv2d(3, 8, 5, padding=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn(self.depthwise(self.early(x)))
        return self.fc(self.late(x).mean((2, 3)))


def swap_in_materialised(original: nn.Module, converted: nn.Module, names):
    """The oracle: the original network with each converted layer's Gabor kernels as plain weights."""
    reference = copy.deepcopy(original)
    for name in names:
        with torch.no_grad():
            reference.get_submodule(name).weight.copy_(converted.get_submodule(name).weight)
    return reference


def test_first_n_follows_execution_order():
    assert select_layers(Tiny(), ConversionSpec(first=2), (3, 16, 16)) == ["early", "depthwise"]


def test_targets_by_name_and_regex():
    model = Tiny()
    assert select_layers(model, ConversionSpec(targets=("late",))) == ["late"]
    assert select_layers(model, ConversionSpec(targets=("re:(early|dep.*)", "early"))) == ["early", "depthwise"]


@pytest.mark.parametrize("target, message", [
    ("nope", "matches no layer"),
    ("fc", "is a Linear, not a Conv2d"),
    ("re:b.", "matches only non-convolutions"),
    ("re:zzz", "matches nothing"),
])
def test_bad_targets_are_named(target, message):
    with pytest.raises(ConversionError, match=message) as info:
        select_layers(Tiny(), ConversionSpec(targets=(target,)))
    assert target in str(info.value)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "either `first` N or `targets` NAME"),
    ({"first": 1, "targets": ("a",)}, "either `first` N or `targets` NAME"),
    ({"first": 0}, "at least 1"),
    ({"first": 1, "init": "zeros"}, "unknown `init` 'zeros'"),
    ({"first": 1, "freeze": ("lambda",)}, "cannot freeze 'lambda'"),
    ({"targets": ("re:(",)}, "not a valid regex"),
])
def test_spec_validation(kwargs, message):
    with pytest.raises(ConversionError, match=message):
        ConversionSpec(**kwargs)


def test_spec_round_trips_as_data():
    spec = ConversionSpec(targets=("a", "re:b.*"), kernel_size=7, init="random", freeze=("psi",), seed=3)
    assert ConversionSpec.from_dict(spec.to_dict()) == spec


def test_gaborize_converts_in_place_and_matches_the_materialised_oracle():
    torch.manual_seed(0)
    model = Tiny().eval()
    original = copy.deepcopy(model)
    report = gaborize_(model, ConversionSpec(first=2, fit_steps=30), (3, 16, 16))
    assert report.layer_names == ["early", "depthwise"]
    assert isinstance(model.early, GaborConv2d) and isinstance(model.depthwise, GaborConv2d)
    assert model.depthwise.groups == 8 and report.layers[1].kernels == 8
    for layer in report.layers:
        assert 0 < layer.fit_rel_error < 1
    x = torch.randn(2, 3, 16, 16)
    reference = swap_in_materialised(original, model, report.layer_names)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    # the fit error is what the report says
    with torch.no_grad():
        w, g = original.early.weight, model.early.weight
        assert report.layers[0].fit_rel_error == pytest.approx(float((w - g).norm() / w.norm()), rel=1e-5)


def test_fit_init_beats_random_init_on_function():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(4, 3, 16, 16)
    want = model(x)
    errors = {}
    for init in ("fit", "random"):
        m = copy.deepcopy(model)
        gaborize_(m, ConversionSpec(targets=("early",), init=init), (3, 16, 16))
        errors[init] = float((m(x) - want).norm().detach() / want.norm().detach())
    assert errors["fit"] < 0.5 * errors["random"]


def test_kernel_size_enlarges_and_keeps_shapes():
    model = Tiny().eval()
    x = torch.randn(1, 3, 16, 16)
    shape = model(x).shape
    report = gaborize_(model, ConversionSpec(targets=("early", "late"), kernel_size=7, fit_steps=5))
    assert model.early.kernel_size == (7, 7) and model.early.padding == (3, 3)
    assert [layer.original_kernel_size for layer in report.layers] == [(5, 5), (3, 3)]
    assert model(x).shape == shape
    with pytest.raises(ConversionError, match="smaller than the original"):
        gaborize_(Tiny(), ConversionSpec(targets=("early",), kernel_size=3))


def test_already_gabor_layers_are_skipped_by_count_and_refused_by_name():
    model, recipe = gp.load_model("resnet20_altered")
    assert isinstance(model.conv1, GaborConv2d)
    assert select_layers(model, ConversionSpec(first=1), recipe.input_shape) == ["layer1.0.conv1"]
    with pytest.raises(ConversionError, match="already a Gabor bank"):
        select_layers(model, ConversionSpec(targets=("conv1",)))


@pytest.mark.parametrize("name, first, expect", [
    ("resnet20", 3, ["conv1", "layer1.0.conv1", "layer1.0.conv2"]),
    ("vgg16", 2, ["features.0", "features.3"]),
])
def test_builtin_nets_convert(name, first, expect):
    torch.manual_seed(0)
    model, recipe = gp.load_model(name)
    model.eval()
    original = copy.deepcopy(model)
    report = gp.gaborize_(model, ConversionSpec(first=first, fit_steps=20), recipe.input_shape)
    assert report.layer_names == expect
    assert report.step == gp.ConversionStep(ConversionSpec(first=first, fit_steps=20), tuple(expect))
    assert report.step.to_dict() == {"kind": "convert", "spec": report.spec.to_dict(), "layers": expect}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), swap_in_materialised(original, model, expect)(x), rtol=1e-4, atol=1e-4)


def test_builtin_architectures():
    vgg, _ = gp.load_model("vgg16")
    assert vgg.features[0].out_channels * vgg.features[0].in_channels == 192
    altered, _ = gp.load_model("resnet20_altered", model_args={"k1": 9, "k2": 5})
    assert altered.conv1.kernel_size == (9, 9) and altered.conv2.kernel_size == (5, 5)
    assert len(altered.layer1) == 1  # the stem and two blocks became two layers
    plain, _ = gp.load_model("resnet20_altered", model_args={"gabor": False})
    assert type(plain.conv1) is nn.Conv2d
    counts = {name: sum(isinstance(m, nn.Conv2d) for m in gp.load_model(name)[0].modules()) for name in ("resnet20", "resnet56", "vgg16")}
    assert counts == {"resnet20": 19 + 2, "resnet56": 55 + 2, "vgg16": 13}  # + 1x1 shortcut convs
    for name in ("resnet20", "resnet32", "vgg11", "vgg19", "resnet20_altered"):
        model, recipe = gp.load_model(name, num_classes=100)
        assert model(torch.randn(2, *recipe.input_shape)).shape == (2, 100)
