"""The channel importances of `scope` all: the Taylor estimate against the loss change of removing
the channel (exact where the loss is linear in it; a float64 finite difference on resnet20 with
cross-entropy otherwise), the ranking it drives, and its refusals."""

import copy

import pytest
import torch
from torch import nn

import gaborprune as gp
from gaborprune.data import TensorData, calibration_batches
from gaborprune.errors import PruneError
from gaborprune.prune import PruneSpec, prune_model_
from gaborprune.prune.importance import taylor_estimates
from helpers import randomize_norms

SHAPE = (3, 8, 8)


class Linear(nn.Module):
    """conv -> BN -> 1x1 conv -> BN -> mean -> linear, no activation: the output is affine in every
    BatchNorm's output, so a loss linear in the output makes the first-order estimate exact."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 5, 1, bias=False), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.bn2(self.conv2(self.bn1(self.conv1(x)))).mean((2, 3)))


def batches(n=2, size=6, shape=SHAPE, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, classes, (size,), generator=g)) for _ in range(n)]


def linear_loss(out, y):
    return (out * torch.tensor([0.3, -1.2, 0.7])).sum(1).mean()


def remove(model, norm, c):
    """The oracle's removal of an out channel: its rows and gain zeroed, the shift kept (what
    `zero_units_` does before the constant is folded)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.get_submodule(norm).weight[c] = 0
    return model


def test_the_estimate_is_the_loss_change_where_the_loss_is_linear():
    model = randomize_norms(Linear()).eval()
    data = batches()
    estimates = taylor_estimates(model, SHAPE, data, loss=linear_loss)
    assert set(estimates) == {f"conv1 out {c}" for c in range(6)} | {f"conv2 out {c}" for c in range(5)}
    with torch.no_grad():
        for norm, layer, channels in (("bn1", "conv1", 6), ("bn2", "conv2", 5)):
            for c in range(channels):
                exact = [float(linear_loss(remove(model, norm, c)(x), y) - linear_loss(model(x), y)) for x, y in data]
                assert estimates[f"{layer} out {c}"] == pytest.approx(exact, rel=1e-4, abs=1e-6)


def test_the_estimate_is_the_first_order_change_on_resnet20_with_cross_entropy():
    """Moving a channel a fraction eps of the way to its removed value is scaling its BatchNorm gains
    by 1 - eps; (L(eps) - L(0)) / eps tends to the estimate. A channel of layer1's residual stream is
    written by the stem's BatchNorm and by every block's second one: all move together."""
    torch.manual_seed(0)
    model = randomize_norms(gp.load_model("resnet20")[0]).double().eval()
    shape = (3, 16, 16)
    x, y = batches(1, 4, shape, 10)[0]
    x = x.double()
    estimates = taylor_estimates(model, shape, [(x, y)])
    loss = nn.functional.cross_entropy
    eps = 1e-6
    cases = {"conv1 out 5": ["bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"],  # the stream
             "layer2.1.conv1 out 7": ["layer2.1.bn1"]}  # inside a block
    with torch.no_grad():
        base = float(loss(model(x), y))
        for key, norms in cases.items():
            moved = copy.deepcopy(model)
            c = int(key.split()[-1])
            for norm in norms:
                moved.get_submodule(norm).weight[c] *= 1 - eps
            assert (float(loss(moved(x), y)) - base) / eps == pytest.approx(estimates[key][0], rel=1e-3, abs=1e-9)


def test_estimating_changes_nothing_in_the_model():
    model = randomize_norms(Linear()).train()
    before = copy.deepcopy(model.state_dict())
    gp.taylor_scores(model, SHAPE, batches())
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_scores_are_the_root_mean_square_of_the_estimates():
    model = randomize_norms(Linear())
    data = batches(3)
    estimates, scores = taylor_estimates(model, SHAPE, data), gp.taylor_scores(model, SHAPE, data)
    assert scores == pytest.approx({k: (sum(e * e for e in v) / 3) ** 0.5 for k, v in estimates.items()})


def test_a_taylor_ratio_removes_the_channels_of_least_score():
    model = randomize_norms(Linear())
    scores = dict.fromkeys([f"conv1 out {c}" for c in range(6)] + [f"conv2 out {c}" for c in range(5)], 1.0)
    scores["conv1 out 4"] = scores["conv2 out 1"] = 0.1  # weak by Taylor, whatever their gains say
    with torch.no_grad():
        model.bn1.weight[4] = model.bn2.weight[1] = 5.0  # the strongest gains
    report = prune_model_(model, SHAPE, PruneSpec(scope="all", ratio=2 / 11, importance="taylor"), scores=scores)
    assert report.plan.channels == {"conv1": {"out": [4]}, "bn1": {"out": [4]}, "conv2": {"in": [4], "out": [1]},
                                  "bn2": {"out": [1]}, "fc": {"in": [1]}}
    assert report.plan.spec["importance"] == "taylor"


def test_taylor_refusals():
    model = Linear()
    with pytest.raises(PruneError, match="pass `scores`"):
        prune_model_(model, SHAPE, PruneSpec(scope="all", ratio=0.2, importance="taylor"))
    with pytest.raises(PruneError, match="no entry for channel 'conv1 out 0'"):
        prune_model_(model, SHAPE, PruneSpec(scope="all", ratio=0.2, importance="taylor"), scores={})
    with pytest.raises(PruneError, match="add `scope` all"):
        PruneSpec(ratio=0.2, importance="taylor")
    with pytest.raises(PruneError, match="give `ratio`"):
        prune_model_(model, SHAPE, PruneSpec(scope="all", importance="taylor"), scores={})
    with pytest.raises(PruneError, match="unknown `importance` 'hessian'"):
        PruneSpec(scope="all", ratio=0.2, importance="hessian")
    with pytest.raises(PruneError, match="scores"):
        gp.prune_to_target_(model, SHAPE, macs=0.5, scores={})


def test_labelled_calibration_batches_pair_the_same_images_with_their_labels():
    data = TensorData(torch.randint(0, 255, (30, 3, 8, 8), dtype=torch.uint8), torch.arange(30) % 7, torch.zeros(3), torch.ones(3), 7,
                      crop_padding=2, flip=True)
    plain, labelled = calibration_batches(data, 20, 8, seed=3), calibration_batches(data, 20, 8, seed=3, labels=True)
    assert [len(x) for x in plain] == [len(x) for x, _ in labelled] == [8, 8, 4]
    assert all(torch.equal(a, b) and len(y) == len(b) for a, (b, y) in zip(plain, labelled))


# -- the command line ------------------------------------------------------------------------------
def test_cli_prunes_by_taylor_importance_and_records_it(tmp_path, monkeypatch):
    """`prune --scope all --ratio R --importance taylor --data` ranks by the scores of the training
    images (the workflow's own estimate, checked against a direct one) and records the criterion."""
    import json

    from gaborprune import workflows
    from helpers import run

    model, recipe = gp.load_model("resnet20", input_shape=(3, 16, 16), num_classes=4)
    randomize_norms(model)
    gp.save_recipe(tmp_path / "r.pt", model, recipe)
    used = []
    real = workflows._Measures.taylor_scores
    monkeypatch.setattr(workflows._Measures, "taylor_scores", lambda self, m, shape: used.append(real(self, m, shape)) or used[-1])
    result = run("prune", tmp_path / "r.pt", "--scope", "all", "--ratio", "0.25", "--round-to", "1", "--importance", "taylor",
                 "--data", "fake:64:4", "--batch-size", "16", "-o", tmp_path / "p.pt", "--json", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    [scores] = used
    pruned = copy.deepcopy(model)
    prune_model_(pruned, (3, 16, 16), PruneSpec(scope="all", ratio=0.25, round_to=1, importance="taylor"), scores=scores)
    out, _ = gp.load_model(str(tmp_path / "p.pt"))
    assert {n: m.out_channels for n, m in out.named_modules() if isinstance(m, nn.Conv2d)} == \
           {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    assert json.loads((tmp_path / "p.json").read_text())["criterion"]["importance"] == "taylor"


def test_cli_refuses_taylor_without_data_or_scope_all(tmp_path):
    from helpers import one_line_error, run

    one_line_error(run("prune", "resnet20", "--scope", "all", "--ratio", "0.2", "--importance", "taylor", "-o", tmp_path / "p.pt"),
                   "--importance taylor", "give --data")
    one_line_error(run("prune", "resnet20", "--macs", "0.5", "--importance", "taylor", "--data", "fake:8:10", "-o", tmp_path / "p.pt"),
                   "--importance taylor", "add --scope all")
    one_line_error(run("prune", "resnet20", "--scope", "all", "--ratio", "0.2", "--importance", "fisher", "-o", tmp_path / "p.pt"),
                   "unknown --importance 'fisher'")
    assert not (tmp_path / "p.pt").exists()
