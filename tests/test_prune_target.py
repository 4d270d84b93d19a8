"""`prune_to_target_` and `prune --speedup/--latency-ms`, with injected timings (never real speed).

The model: resnet20_altered at 3x16x16 whose conv1 output channel o has BatchNorm gain (o + 1) / 16,
so its channel groups rank conv1's rows 0, 1, 2, ... first, and removing k of them leaves conv1
16 - k output channels (and conv2 16 - k inputs). The fake timer's time is 0.1 + 0.01 x conv1's
output channels (ms), jittered +-2% run by run, plus a penalty off a multiple of 4 when asked.
"""

import copy
import json

import pytest
import torch
from torch import nn

import gaborprune as gp
import gaborprune.cpu as cpu
import gaborprune.search as search
from gaborprune.convert import GaborConv2d
from gaborprune.prune import PruneError
from gaborprune.prune.candidates import mask_groups_, rank_groups
from gaborprune.recipe import save_recipe
from gaborprune.search import TargetSpec, prune_to_target_
from helpers import BASE_MS, SHAPE, FakeTimer, one_line_error, ranked_model, run


@pytest.fixture(autouse=True)
def no_block(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_block", lambda cpuinfo=None: 0)


def test_groups_rank_weakest_first():
    model, recipe = ranked_model()
    groups, strengths = rank_groups(model, SHAPE)
    assert [g.label for g in groups[:16]] == ["conv1 out"] * 16
    assert [g.channel for g in groups[:16]] == list(range(16))
    assert strengths == sorted(strengths)


def test_the_smallest_k_meeting_the_target_is_chosen():
    model, recipe = ranked_model()
    timer = FakeTimer()
    report = prune_to_target_(model, SHAPE, speedup=1.33, timer=timer)
    # 0.26 / (0.1 + 0.01 c) with a 2% jitter: c = 9 (k = 7) is the first whose whole interval reaches 1.33
    assert report.chosen == 7 and report.removed == {"groups": {"conv1 out": 7}}
    measured = {c.k: c for c in report.candidates}
    assert measured[7].meets and measured[6].meets is False  # the bisection closed on the answer
    assert all(c.meets == (c.speedup.low >= 1.33) for c in report.candidates)
    assert len(report.candidates) <= search.MAX_CANDIDATES and report.size == 15
    assert model.conv1.out_channels == 9 and model.conv2.in_channels == 9
    assert report.step == report.prune.step and report.prune.plan.channels["conv1"]["out"] == list(range(7))
    conv1 = next(c for c in report.prune.layers if c.name == "conv1")  # counted from the model as it came in
    assert (conv1.kernels_before, conv1.kernels_after, conv1.channels_before, conv1.channels_after) == (48, 27, 16, 9)
    assert report.prune.before.macs > report.prune.after.macs
    assert report.message is None and json.dumps(report.to_dict())


def test_latency_target():
    model, recipe = ranked_model()
    report = prune_to_target_(model, SHAPE, latency_ms=0.17, timer=FakeTimer())
    # the high end of the interval within 0.17 ms: 1.02 (0.1 + 0.01 c) <= 0.17 -> c <= 6
    assert report.chosen == 10 and model.conv1.out_channels == 6


def test_a_latency_the_unpruned_model_already_meets_prunes_nothing():
    model, recipe = ranked_model()
    report = prune_to_target_(model, SHAPE, latency_ms=1.0, timer=FakeTimer())
    assert report.chosen is None and "already runs in 0.26 ms" in report.message and "nothing to prune" in report.message
    assert report.step is None and model.conv1.out_channels == 16


def test_pruned_model_equals_the_masked_model_and_replays(tmp_path):
    model, recipe = ranked_model()
    masked = copy.deepcopy(model)
    recipe = recipe.with_step(prune_to_target_(model, SHAPE, speedup=1.33, timer=FakeTimer()).step)
    groups, _ = rank_groups(masked, SHAPE)
    mask_groups_(masked, groups[:7])
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        y = model.eval()(x)
        assert torch.allclose(y, masked.eval()(x), atol=1e-5)
    save_recipe(tmp_path / "t.pt", model, recipe)
    again, _ = gp.load_model(str(tmp_path / "t.pt"))
    with torch.no_grad():
        assert torch.equal(again.eval()(x), y)
    assert again.conv1.out_channels == 9


def test_an_unreachable_target_leaves_the_model_unpruned():
    model, recipe = ranked_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    timer = FakeTimer()
    report = prune_to_target_(model, SHAPE, speedup=3.0, timer=timer)
    assert report.chosen is None and report.prune is None
    assert report.message.startswith("target 3x not reachable: at most 2.36x [") and "15 of 32 groups (all that can go) removed" in report.message
    assert timer.timed == [1]  # only the most that can go was timed
    assert report.step is None and model.conv1.out_channels == 16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_predicted_times_come_from_the_injected_profile():
    model, recipe = ranked_model()
    profile = {"conv1": 0.2, "conv2": 0.3, "(Add)": 0.5}
    timer = FakeTimer(profile=profile)
    report = prune_to_target_(model, SHAPE, speedup=1.33, timer=timer)
    first = report.candidates[-1]  # k_max is timed first: its baseline median is the prediction's scale
    assert first.k == report.size
    for c in report.candidates:
        o1 = c.channels["conv1"][0]
        o2, i2 = c.channels["conv2"]
        ratio = 0.2 * o1 * 3 / 48 + 0.3 * o2 * i2 / 256 + 0.5
        assert c.predicted_ratio == pytest.approx(ratio) and c.predicted_ms == pytest.approx(BASE_MS * ratio)
    # the bisection starts at the first k predicted to meet the target: ratio = 0.5 + 0.5 c / 16 <= 1 / 1.33 from
    # c = 8 (k = 8), after k_max (c = 1) for reachability
    assert timer.timed[:2] == [1, 8] and report.chosen == 7


@pytest.mark.parametrize("block,chosen", [(4, 4), (0, 8)])
def test_a_block_multiple_that_meets_the_target_wins(monkeypatch, block, chosen):
    """Off a multiple of 4 the fake costs 0.05 ms more: conv1 at 12 channels (k = 4) meets 1.15x
    although 11, 10 and 9 do not; the bisection alone (no block) ends at 8, the next aligned count."""
    monkeypatch.setattr(cpu, "cpu_block", lambda cpuinfo=None: block)
    model, recipe = ranked_model()
    report = prune_to_target_(model, SHAPE, speedup=1.15, timer=FakeTimer(penalty=0.05))
    assert report.chosen == chosen and model.conv1.out_channels == 16 - chosen
    assert report.block == block and report.chosen_candidate.aligned == (block == 4)


@pytest.mark.parametrize("args,message", [
    (dict(speedup=1.0), "`speedup` must be above 1"),
    (dict(speedup=float("inf")), "`speedup` must be a finite number"),
    (dict(latency_ms=0.0), "`latency_ms` must be above 0"),
    (dict(latency_ms=float("nan")), "`latency_ms` must be a finite number"),
    (dict(), "give one target"),
    (dict(speedup=2.0, latency_ms=1.0), "give one target"),
    (dict(macs=0.5, speedup=2.0), "give one target"),
    (dict(macs=1.0), "`macs` must be in \\(0, 1\\)"),
    (dict(macs=float("nan")), "`macs` must be a finite number"),
])
def test_bad_targets(args, message):
    with pytest.raises(PruneError, match=message):
        TargetSpec(**args)


def test_a_mac_target_removes_the_fewest_groups_that_meet_it_without_timing():
    model, recipe = ranked_model()
    report = prune_to_target_(model, SHAPE, macs=0.97)  # no timer: a MAC target is counted
    chosen = report.chosen_candidate
    assert chosen.mac_ratio <= 0.97 and chosen.measured is None and report.baseline is None
    assert all(c.meets == (c.mac_ratio <= 0.97) for c in report.candidates)
    assert all(not c.meets for c in report.candidates if c.k < report.chosen) and report.chosen - 1 in {c.k for c in report.candidates}
    assert model.conv1.out_channels == 16 - report.chosen


def test_cli_prunes_to_a_mac_ratio(ranked_recipe, tmp_path):
    result = run("prune", ranked_recipe, "--macs", "0.97", "-o", tmp_path / "p.pt", "--json", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    shown = " ".join(result.stdout.split())
    assert "pruning to MAC ratio 0.97 (MACs counted;" in shown and "met, chosen" in shown and "measured ms" not in shown
    report = json.loads((tmp_path / "p.json").read_text())["target"]
    assert report["target"]["macs"] == 0.97 and report["candidates"][-1]["measured_ms"] is None


def test_a_model_without_groups_is_refused():
    model = nn.Sequential(GaborConv2d(3, 4, 3, padding=1))  # reads the input, writes the output: no channel can go
    with pytest.raises(PruneError, match="no channel groups to remove .*part of the model's input"):
        prune_to_target_(model, SHAPE, speedup=1.2, timer=FakeTimer())


# -- the command line ------------------------------------------------------------------------------
@pytest.fixture
def ranked_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(search, "OrtTimer", FakeTimer)
    model, recipe = ranked_model(num_classes=4)
    save_recipe(tmp_path / "r.pt", model, recipe)
    return tmp_path / "r.pt"


def test_cli_prunes_to_a_speedup_and_recovers(ranked_recipe, tmp_path):
    out = tmp_path / "p.pt"
    result = run("prune", ranked_recipe, "--speedup", "1.33", "-o", out, "--json", tmp_path / "p.json",
                 "--data", "fake:64:4", "--finetune-epochs", "1", "--batch-size", "32")
    assert result.exit_code == 0, result.output
    shown = " ".join(result.stdout.split())  # a table title wraps with the length of the temporary path
    assert "pruning to 1.33x" in shown and "met, chosen" in shown and "7 weakest channel groups for 1.33x" in shown
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["target"]["chosen"] == 7 and report["target"]["removed"] == {"groups": {"conv1 out": 7}}
    assert all(c["predicted_ms"] is not None and c["measured_ms"]["median"] > 0 for c in report["target"]["candidates"])
    assert "accuracy_after" in report
    model, recipe = gp.load_model(str(out))
    assert model.conv1.out_channels == 9 and [s.kind for s in recipe.steps] == ["prune", "finetune"]  # the recovery fine-tuning after the prune


def test_cli_unreachable_target_is_one_line_and_writes_nothing(ranked_recipe, tmp_path):
    result = run("prune", ranked_recipe, "--speedup", "3", "-o", tmp_path / "p.pt")
    one_line_error(result, "target 3x not reachable", "no recipe written")
    assert "not met" in result.stdout and not (tmp_path / "p.pt").exists()


@pytest.mark.parametrize("args,fragments", [
    (["--speedup", "1"], ["--speedup must be above 1", "not 1.0"]),
    (["--speedup", "0.5"], ["--speedup must be above 1"]),
    (["--speedup", "inf"], ["--speedup must be a finite number"]),
    (["--speedup", "nan"], ["--speedup must be a finite number"]),
    (["--latency-ms", "0"], ["--latency-ms must be above 0"]),
    (["--latency-ms", "-2"], ["--latency-ms must be above 0"]),
    (["--latency-ms", "inf"], ["--latency-ms must be a finite number"]),
    (["--speedup", "1.2", "--latency-ms", "1"], ["drop --latency-ms"]),
    (["--speedup", "1.2", "--threshold", "0"], ["drop --threshold"]),
    (["--latency-ms", "1", "--ratio", "0.5"], ["--latency-ms chooses the kernels itself; drop --ratio"]),
    (["--speedup", "1.2", "--keep", "10"], ["drop --keep"]),
    (["--macs", "1.5"], ["--macs must be in (0, 1)"]),
    (["--macs", "0.5", "--speedup", "1.2"], ["--speedup chooses the kernels itself; drop --macs"]),
])
def test_cli_refuses_bad_targets(tmp_path, args, fragments):
    result = run("prune", "resnet20_altered", "-o", tmp_path / "p.pt", *args)
    one_line_error(result, *fragments)
    assert not (tmp_path / "p.pt").exists()


# -- an accuracy budget ---------------------------------------------------------------------------
def _scored(copy_):
    """A fake validation top-1: 90% unpruned, 2 points lower per conv1 channel removed."""
    return 90.0 - 2.0 * (16 - copy_.conv1.out_channels)


@pytest.mark.parametrize("floor, chosen", [({}, 2), ({"speedup": 1.05}, 2), ({"macs": 0.999}, 2)])
def test_the_most_pruning_within_the_budget_is_chosen(floor, chosen):
    model, recipe = ranked_model()
    report = prune_to_target_(model, SHAPE, TargetSpec(max_drop=5.0, **floor), timer=FakeTimer(), accuracy=_scored)
    assert report.base_accuracy == 90.0 and report.chosen == chosen and model.conv1.out_channels == 16 - chosen
    scored = {c.k: c for c in report.candidates if c.accuracy is not None}
    assert scored[chosen].within and scored[chosen + 1].within is False  # the bisection closed on the boundary
    assert all(c.within == (c.accuracy >= 85.0) for c in scored.values())
    assert all(c.measured is not None for c in report.candidates)  # each scored candidate is timed too: what it buys


def test_a_floor_the_budget_cannot_afford_prunes_nothing():
    model, recipe = ranked_model()
    report = prune_to_target_(model, SHAPE, TargetSpec(speedup=1.2, max_drop=5.0), timer=FakeTimer(), accuracy=_scored)
    assert report.chosen is None and report.step is None and model.conv1.out_channels == 16
    assert report.message.startswith("no pruning stays within 5 points: the least pruning that meets the floor")


def test_an_accuracy_budget_is_judged_on_training_images_held_out():
    from gaborprune.data import load_data

    train, test = load_data("fake:200:4", SHAPE)
    rest, held = train.split(20, seed=3)
    assert (len(rest), len(held)) == (len(train) - 20, 20) and held.crop_padding == 0
    whole = {tuple(x.flatten().tolist()) for x in train.images}
    parts = [{tuple(x.flatten().tolist()) for x in d.images} for d in (rest, held)]
    assert not parts[0] & parts[1] and parts[0] | parts[1] == whole  # disjoint, and all of the training split
    again = train.split(20, seed=3)[1]
    assert torch.equal(again.images, held.images)  # seeded


def test_the_workflow_scores_candidates_on_the_validation_split_never_the_test_split(tmp_path, monkeypatch):
    from gaborprune import workflows

    seen = []
    real = workflows._Measures.accuracy

    def accuracy(self, model, split=None):
        seen.append("test" if split is None else len(split))
        return real(self, model, split)

    monkeypatch.setattr(workflows._Measures, "accuracy", accuracy)
    model, recipe = ranked_model(num_classes=4)
    save_recipe(tmp_path / "r.pt", model, recipe)
    monkeypatch.setattr(search, "OrtTimer", FakeTimer)
    run_ = workflows.prune(str(tmp_path / "r.pt"), tmp_path / "p.pt", target=TargetSpec(max_drop=99.0),
                           accuracy=workflows.Accuracy("fake:100:4", batch_size=16), options=workflows.Options(device="cpu"))
    assert run_.target.chosen == run_.target.size  # a budget of 99 points allows everything on 4 classes
    assert seen[0] == "test" and set(seen[1:-2]) == {8} and seen[-2:] == ["test", "test"]  # before; candidates on 8 held-out images (10% of 80); after
    assert run_.report.accuracy_before is not None and run_.target.base_accuracy is not None


def test_cli_refuses_a_budget_without_data(tmp_path):
    one_line_error(run("prune", "resnet20_altered", "--max-drop", "1", "-o", tmp_path / "p.pt"), "--max-drop", "give --data")
    assert not (tmp_path / "p.pt").exists()
