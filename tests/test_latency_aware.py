"""Group weights in the channel pressure: the MACs (default) or the ONNX Runtime time (--latency-aware)
that removing each group saves. Timings are injected (monkeypatched), never measured for a decision."""

import json
import math

import pytest
import torch

import gaborprune as gp
import tiny_models
from gaborprune.errors import GaborPruneError
from gaborprune.export import costs
from gaborprune.prune.groups import channel_groups
from gaborprune.sparsity import GROUP_WEIGHT, GaborSparsity, kernel_strength, l1_l2_ratio
from gaborprune.train import TrainConfig
from helpers import SHAPE, one_line_error, randomize_norms, run, scale_channels_with_their_norms_

FOLDS_MACS = {"g1 out": 3 * 9 * 16 * 16 + 8 * 1 * 8 * 8,  # g1's row (3x3 on 16x16) + g2's column (1x1 on 8x8 after pooling)
              "g2 in": 3 * 9 * 16 * 16 + 8 * 1 * 8 * 8,  # the same channel
              "g2 out": 8 * 1 * 8 * 8 + 8 * 1 * 8 * 8 + 4}  # g2's row + p's column + one input feature of the 4-class head


def kernel_term(model):
    return sum(l1_l2_ratio(kernel_strength(m, n)) for m, n in ((model.g1, model.bn1), (model.g2, model.bn2)))


def folds():
    torch.manual_seed(0)
    return randomize_norms(tiny_models.Folds())


def fake_timer(ms: dict[str, tuple[float, float]]):
    """A `costs.time_pair` that returns, for each side, paired samples around the given (full, half) medians."""
    calls = []

    def time_pair(what, layers, shapes, threads):
        calls.append((what, shapes, threads))
        full, half = ms[what]
        jitter = [1 + 0.01 * (k % 7) for k in range(40)]
        return [full * j for j in jitter], [half * j for j in jitter]

    time_pair.calls = calls
    return time_pair


def test_mac_weights_match_a_hand_count_on_resnet20_altered():
    """conv1 (3 -> 16, 7x7) feeds conv2 (16 -> 16, 5x5) at 16x16: conv1's row c and conv2's column c
    are one channel, whose removal saves 3*49*256 + 16*25*256 MACs; so both families weigh 1."""
    model = gp.load_model("resnet20_altered", input_shape=SHAPE)[0]
    assert model.conv1.kernel_size == (7, 7) and model.conv2.kernel_size == (5, 5)
    analysis = channel_groups(model, SHAPE)
    by_label = {}
    for g, macs in zip(analysis.groups, analysis.saved_macs()):
        by_label.setdefault(g.label, []).append(macs)
    assert by_label == {"conv1 out": [3 * 49 * 256 + 16 * 25 * 256] * 16, "conv2 in": [3 * 49 * 256 + 16 * 25 * 256] * 16}
    conv1_out_3 = next(g for g in analysis.groups if g.label == "conv1 out" and g.channel == 3)
    assert conv1_out_3.saves == (("conv1", "out", 3), ("conv2", "in", 3))
    sparsity = GaborSparsity(model, SHAPE, "channel")
    assert sparsity.weighed_by == "macs" and all(f.weights is None for f in sparsity.families.values())  # all 1: unweighted, exactly


def test_mac_weights_differ_across_families_and_enter_the_penalty_in_closed_form():
    model = folds()
    sparsity = GaborSparsity(model, SHAPE, "channel")
    assert sparsity.groups.counts() == {"g1 out": 8, "g2 out": 8, "g2 in": 8}
    mean = sum(FOLDS_MACS[label] * 8 for label in FOLDS_MACS) / 24
    weights = sparsity.group_weights()
    for label, w in weights.items():
        assert w == pytest.approx([FOLDS_MACS[label] / mean] * 8, rel=1e-6), label
    assert sum(sum(w) for w in weights.values()) / 24 == pytest.approx(1.0)
    s1, s2 = kernel_strength(model.g1, model.bn1), kernel_strength(model.g2, model.bn2)
    families = {"g1 out": s1.norm(dim=1), "g2 in": s2.norm(dim=0), "g2 out": s2.norm(dim=1)}
    expected = kernel_term(model) + GROUP_WEIGHT * sum(
        (FOLDS_MACS[label] / mean * g).sum() / g.norm() for label, g in families.items())
    torch.testing.assert_close(sparsity.penalty(), expected)
    unweighted = kernel_term(model) + GROUP_WEIGHT * sum(l1_l2_ratio(g) for g in families.values())
    assert sparsity.penalty().item() != pytest.approx(unweighted.item(), rel=1e-3)


def test_injected_timings_give_weights_proportional_to_the_time_saved(monkeypatch):
    model = folds()
    sparsity = GaborSparsity(model, SHAPE, "channel")
    ms = {"g1 out": (0.30, 0.10), "g2 in": (0.20, 0.12), "g2 out": (0.20, 0.16), "p in": (0.10, 0.06), "head in": (0.01, 0.009)}
    timer = fake_timer(ms)
    monkeypatch.setattr(costs, "time_pair", timer)
    table = costs.measure(model, sparsity.groups, batch=2)
    assert {what for what, _, _ in timer.calls} == set(ms)
    assert all(threads == 1 for _, _, threads in timer.calls)
    shapes = {what: s for what, s, _ in timer.calls}
    assert shapes["g2 in"] == ((2, 8, 8, 8), (2, 4, 8, 8))  # g2's input at full and half columns, batch 2
    assert shapes["g1 out"] == ((2, 3, 16, 16), (2, 3, 16, 16))
    assert shapes["head in"] == ((2, 16), (2, 8))
    units = {"g1 out": 8, "g2 in": 8, "g2 out": 8, "p in": 8, "head in": 16}
    for key, (full, half) in ms.items():
        n = units[key]
        assert table.ms[key] == pytest.approx({n: full * 1.03, n // 2: half * 1.03}, rel=1e-6)
        assert table.ms_per_unit[key] == pytest.approx((full - half) * 1.03 / (n - n // 2), rel=1e-6)
    assert table.from_macs == []
    per_group = {"g1 out": table.ms_per_unit["g1 out"] + table.ms_per_unit["g2 in"]}
    per_group["g2 in"] = per_group["g1 out"]
    per_group["g2 out"] = table.ms_per_unit["g2 out"] + table.ms_per_unit["p in"] + table.ms_per_unit["head in"]
    sparsity.weigh(table.saved_ms(sparsity.groups), "latency")
    mean = sum(per_group.values()) / 3
    for label, w in sparsity.group_weights().items():
        assert w == pytest.approx([per_group[label] / mean] * 8, rel=1e-5), label
    assert json.loads(json.dumps(table.to_dict()))["ms"]["g2 in"] == {"8": pytest.approx(0.206), "4": pytest.approx(0.1236)}
    line = costs.describe(table.to_dict())
    assert line.startswith("latency cost table (batch 2, 1 thread): g1 out 8ch 0.309 / 4ch 0.103 ms") and "priced from MACs" not in line


def test_a_saving_within_the_noise_is_priced_from_macs(monkeypatch):
    """head's halving saves nothing measurable: its feature costs its MACs at the measured sides' ms per MAC."""
    model = folds()
    sparsity = GaborSparsity(model, SHAPE, "channel")
    ms = {"g1 out": (0.30, 0.10), "g2 in": (0.20, 0.12), "g2 out": (0.20, 0.16), "p in": (0.10, 0.06), "head in": (0.01, 0.01)}
    monkeypatch.setattr(costs, "time_pair", fake_timer(ms))
    table = costs.measure(model, sparsity.groups)
    assert table.from_macs == ["head in"]
    macs = {f"{layer} {side}": m for (layer, side), m in sparsity.groups.unit_macs.items()}
    measured = [k for k in ms if k != "head in"]
    rate = sum(table.ms_per_unit[k] for k in measured) / sum(macs[k] for k in measured)
    assert table.ms_per_unit["head in"] == pytest.approx(macs["head in"] * rate)
    assert "within the noise, priced from MACs: head in" in costs.describe(table.to_dict())
    # nothing measurable: every side from MACs, at the whole layers' average ms per MAC
    monkeypatch.setattr(costs, "time_pair", fake_timer({k: (f, f) for k, (f, _) in ms.items()}))
    table = costs.measure(model, sparsity.groups)
    assert sorted(table.from_macs) == sorted(ms)
    ratios = {k: table.ms_per_unit[k] / macs[k] for k in ms}
    assert max(ratios.values()) == pytest.approx(min(ratios.values()))


def test_weighted_penalty_is_invariant_to_the_scale_batchnorm_absorbs(monkeypatch):
    model = folds().eval()
    model.bn1.eps = model.bn2.eps = 0.0
    sparsity = GaborSparsity(model, SHAPE, "channel")
    monkeypatch.setattr(costs, "time_pair", fake_timer({"g1 out": (0.3, 0.1), "g2 in": (0.2, 0.12), "g2 out": (0.2, 0.16),
                                                        "p in": (0.1, 0.06), "head in": (0.01, 0.009)}))
    sparsity.weigh(costs.measure(model, sparsity.groups).saved_ms(sparsity.groups), "latency")
    assert any(f.weights is not None for f in sparsity.families.values())
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        before_y, before_p = model(x), sparsity.penalty().item()
        scale_channels_with_their_norms_(((model.g1, model.bn1, 5, 30.0), (model.g2, model.bn2, 2, 1e-2)))
        torch.testing.assert_close(model(x), before_y, rtol=1e-4, atol=1e-4)
    assert sparsity.penalty().item() == pytest.approx(before_p, rel=1e-5)
    with torch.no_grad():
        model.bn2.weight[2] *= 0.1
    assert sparsity.penalty().item() != pytest.approx(before_p, rel=1e-4)


def test_kernel_structure_is_unchanged_and_refuses_latency_aware():
    model = folds()
    model.g2.mask[3, :5] = 0
    for structure in ("kernel", None):
        sparsity = GaborSparsity(model, SHAPE, structure)
        assert sparsity.weighed_by == "equal" and torch.equal(sparsity.penalty(), kernel_term(model))
    with pytest.raises(GaborPruneError, match="`latency_aware` weighs channel groups, which `structure` kernel does not press"):
        TrainConfig(structure="kernel", latency_aware=True)
    with pytest.raises(GaborPruneError, match="`latency_batch` must be an integer of at least 1, not 0"):
        TrainConfig(latency_aware=True, latency_batch=0)
    assert TrainConfig().latency_aware is False and TrainConfig(latency_aware=True).structure == "channel"


def test_weigh_is_validated():
    sparsity = GaborSparsity(folds(), SHAPE, "channel")
    for bad in ([1.0] * 23, [1.0] * 23 + [math.nan], [0.0] * 24, [1.0] * 23 + [-1.0]):
        with pytest.raises(GaborPruneError, match="group savings must be 24 finite values >= 0"):
            sparsity.weigh(bad, "latency")


def test_gradients_with_weights_are_finite():
    model = folds()
    model.g2.mask[:, 4] = 0  # a dead in group
    model.g1.mask[6] = 0  # a dead out group
    with torch.no_grad():
        model.bn2.weight[3] = 0
    sparsity = GaborSparsity(model, SHAPE, "channel")
    assert any(f.weights is not None for f in sparsity.families.values())
    with sparsity.track_forward():
        loss = model(torch.randn(4, *SHAPE)).square().mean() + sparsity.penalty()
    loss.backward()
    for bank in (model.g1, model.g2):
        for name, p in bank.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


FOLDS_CLI = ["finetune", "tiny_models:Folds", "--trust-factory", "--input-shape", "3,16,16", "--data", "fake:64:4",
             "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--sparsity", "0.1"]


def test_cli_latency_aware_writes_the_cost_table(tmp_path, monkeypatch):
    timer = fake_timer({"g1 out": (0.3, 0.1), "g2 in": (0.2, 0.12), "g2 out": (0.2, 0.16), "p in": (0.1, 0.06), "head in": (0.01, 0.01)})
    monkeypatch.setattr(costs, "time_pair", timer)
    result = run(*FOLDS_CLI, "--latency-aware", "--latency-batch", "3", "-o", tmp_path / "f.pt", "--json", tmp_path / "f.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["group_weights"] == "latency"
    table = report["cost_table"]
    assert table["batch"] == 3 and table["threads"] == 1 and table["from_macs"] == ["head in"]
    assert set(table["ms"]) == {"g1 out", "g2 in", "g2 out", "p in", "head in"} and table["ms"]["p in"].keys() == {"8", "4"}
    assert all(shapes[0][0] == 3 for _, shapes, _ in timer.calls)
    lines = [line for line in result.stdout.splitlines() if line.startswith("latency cost table")]
    assert lines == [costs.describe(table)] and "(batch 3, 1 thread)" in lines[0]
    # without the option: weighed by MACs, nothing timed
    timer.calls.clear()
    result = run(*FOLDS_CLI, "-o", tmp_path / "m.pt", "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["group_weights"] == "macs" and report["cost_table"] == {} and timer.calls == []


def test_cli_refuses_latency_aware_with_kernel_structure(tmp_path):
    one_line_error(run(*FOLDS_CLI, "--latency-aware", "--structure", "kernel", "-o", tmp_path / "k.pt"),
                   "--latency-aware weighs channel groups, which --structure kernel does not press")
    assert not list(tmp_path.iterdir())


def test_the_real_timer_exports_each_side_alone(monkeypatch):
    """The real path, on Chain (g1's rows, conv2's columns), with a handful of runs: the table's shape only."""
    monkeypatch.setattr(costs, "WARMUP", 1)
    monkeypatch.setattr(costs, "RUNS", 4)
    model = tiny_models.Chain()
    sparsity = GaborSparsity(model, SHAPE, "channel")
    table = costs.measure(model, sparsity.groups)
    assert {k: sorted(v) for k, v in table.ms.items()} == {"g1 out": [4, 8], "conv2 in": [4, 8]}
    assert all(t > 0 for v in table.ms.values() for t in v.values())
    assert all(math.isfinite(v) and v > 0 for v in table.ms_per_unit.values())
    assert sorted(table.ms_per_unit) == ["conv2 in", "g1 out"]
