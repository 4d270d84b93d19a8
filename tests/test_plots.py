"""The pictures: what they say matches the reports, removed kernels stand apart, latency is drawn honestly."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import torch
from torch import nn

import gaborprune as gp
import tiny_models
from gaborprune.convert import GaborConv2d
from gaborprune.export.results import BenchResult
from gaborprune.export.runtime import Latency
from gaborprune.plot import (
    REMOVED,
    REMOVED_FILL,
    SEPARATOR,
    WEAK,
    WEAK_RING,
    bank_image,
    bank_views,
    banks_figure,
    latency_figure,
    plot_banks,
    plot_latency,
    plot_summary,
    plot_sweep,
    stage_of,
    summary_figure,
    sweep_figure,
)
from gaborprune.prune import PruneSpec, SweepPoint, prune_model_
from gaborprune.recipe import Recipe
from gaborprune.sparsity import GaborSparsity
from gaborprune.summary import summarize

SHAPE = (3, 16, 16)
PNG = b"\x89PNG\r\n\x1a\n"


def texts(fig) -> str:
    """Every string drawn in the figure, one per line."""
    return "\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))


def chain_with_dead_channels():
    """tiny_models.Chain with g1's channels 0-2 dead (removable) and a weak kernel in channel 5."""
    torch.manual_seed(0)
    model = tiny_models.Chain().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
        model.bn1.weight[[0, 1, 2]] = 0
        model.bn1.bias[[0, 1, 2]] = -1.0  # relu(-1) = 0: the channels go
        model.g1.log_sigma[5, 1] -= 3  # a narrow envelope: a weak kernel (not removed by this prune)
    return model, Recipe(gp.ModelSource("tiny_models:Chain"), SHAPE)


def test_bank_counts_are_the_reports_counts_before_and_after_pruning(tmp_path):
    model, recipe = chain_with_dead_channels()
    before = bank_views(model, SHAPE)
    assert before[0].alive == GaborSparsity(model, SHAPE).alive()["g1"] == summarize(model, SHAPE).layers[0].kernels_alive
    assert before[0].kept == before[0].total == 24 and before[0].kept - before[0].alive >= 3  # the dead channels are weak, not removed
    report = prune_model_(model, SHAPE, PruneSpec(threshold=0.01))
    recipe = recipe.with_step(report.step)
    change = report.gabor_layers[0]
    assert model.g1.out_channels < 8  # channels were cut out: the compacted layer is smaller than the grid drawn
    after = bank_views(model, SHAPE, [s.plan for s in recipe.prunes])
    assert (after[0].kept, after[0].total) == (change.kernels_after, change.kernels_before)
    assert (after[0].state[[0, 1, 2]] == REMOVED).all()  # the cut channels, in their places
    fig = banks_figure([("fine-tuned", before), ("pruned", after)])
    drawn = texts(fig)
    assert f"pruned: g1 (3x3)\n{change.kernels_after}/24 kernels kept, {24 - change.kernels_after} removed" in drawn
    assert f"fine-tuned: g1 (3x3)\n24 kernels, none removed\n{before[0].alive} alive" in drawn
    assert len(fig.axes) == 3  # before | after, and the colour bar
    assert plot_banks([("pruned", after)], tmp_path / "b.png") == ["g1"] and (tmp_path / "b.png").read_bytes()[:8] == PNG


def test_stage_of_a_recipe():
    model, recipe = chain_with_dead_channels()
    assert stage_of(recipe) == ""
    from gaborprune.train.config import FinetuneStep, TrainConfig

    recipe = recipe.with_step(FinetuneStep(TrainConfig(sparsity=0.1), "digits", 1, 50.0))
    assert stage_of(recipe) == "fine-tuned"
    recipe = recipe.with_step(prune_model_(model, SHAPE, PruneSpec(threshold=0.01)).step)
    assert stage_of(recipe) == "pruned"


def test_removed_kernels_are_drawn_unlike_weak_ones():
    model, _ = chain_with_dead_channels()
    with torch.no_grad():
        model.g1.mask[6, 0] = 0
    view = bank_views(model, SHAPE, threshold=0.05)[0]
    assert view.state[6, 0] == REMOVED and view.state[0, 0] == WEAK
    img = bank_image(view)
    cell = img.shape[0] // 8
    assert cell == 3 * 8 + 2  # a 3x3 kernel upsampled 8x (nearest), framed by one pixel
    removed = img[6 * cell + 1:7 * cell - 1, 1:cell - 1]
    weak_ring, alive_ring = img[0, 0:cell], img[7 * cell, 0:cell]
    assert np.isclose(removed, REMOVED_FILL).all(-1).mean() > 0.5 and not np.isclose(img[1:cell - 1, 1:cell - 1], REMOVED_FILL).all(-1).any()
    assert np.isclose(weak_ring, WEAK_RING).all() and np.isclose(alive_ring, SEPARATOR).all()


def test_a_large_bank_is_capped_and_says_so():
    model = nn.Sequential(GaborConv2d(40, 36, 3, padding=1), nn.BatchNorm2d(36))
    view = bank_views(model, (40, 8, 8))[0]
    assert bank_image(view).shape[:2] == (32 * 26, 32 * 26)
    assert "first 32 of 36 output channels; first 32 of 40 input channels shown" in texts(banks_figure([("converted", [view])]))


def bench_report(p50_1=1.0, p50_32=32.0, with_torch=True) -> dict:
    """A bench report's JSON: baseline and pruned at batch 1 and 32 (ONNX Runtime), a PyTorch row."""
    def row(model, batch, p50, runtime="onnxruntime"):
        return {"model": model, "runtime": runtime, "precision": "float", "batch_size": batch, "threads": 1, "p50_ms": p50,
                "p50_low_ms": p50 * 0.99, "p50_high_ms": p50 * 1.01, "p25_ms": p50 * 0.9, "p75_ms": p50 * 1.2, "p90_ms": p50 * 10}

    results = [row("baseline", 1, p50_1 * 1.25), row("pruned", 1, p50_1), row("baseline", 32, p50_32 * 1.25), row("pruned", 32, p50_32)]
    if with_torch:
        results.append(row("pruned", 1, p50_1 * 3, "pytorch"))
    comparisons = [{"model": "pruned", "baseline": "baseline", "batch_size": b, "threads": 1, "speedup": 1.25, "verdict": "faster",
                    "precision": "float"} for b in (1, 32)]
    return {"environment": {"cpu": "Test CPU", "cores": 2, "load_average": 0.5}, "results": results, "comparisons": comparisons}


def test_latency_bars_show_iqr_numbers_speedups_and_runtimes():
    report = bench_report()
    fig = latency_figure(report)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"  # batch 32 takes 32x batch 1
    assert ax.get_title() and "ONNX Runtime" in ax.get_title()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "pruned (ONNX Runtime, float)" in labels and "pruned (PyTorch, float)" in labels and "baseline (ONNX Runtime, float)" in labels
    drawn = texts(fig)
    assert drawn.count("1.25x faster") == 2 and "1.25 ms" in drawn and "32 ms" in drawn
    whiskers = sorted(tuple(np.round(sorted(seg[:, 1]), 6)) for c in ax.containers if hasattr(c, "has_yerr") for seg in c.lines[2][0].get_segments())
    expected = sorted((round(r["p25_ms"], 6), round(r["p75_ms"], 6)) for r in report["results"])
    assert whiskers == expected  # p25-p75, not p90 (10x the median here)
    assert inside(fig)
    assert latency_figure(bench_report(p50_32=2.0, with_torch=False)).axes[0].get_yscale() == "linear"


def test_bench_results_carry_their_quartiles(tmp_path):
    samples = list(range(1, 101))
    d = BenchResult("m", 1, 1, Latency.of_ms(samples)).to_dict()
    assert (d["p25_ms"], d["p50_ms"], d["p75_ms"]) == (np.percentile(samples, 25), np.percentile(samples, 50), np.percentile(samples, 75))
    plot_latency(bench_report(), tmp_path / "l.png")
    assert (tmp_path / "l.png").read_bytes()[:8] == PNG


def inside(fig) -> bool:
    """Everything drawn lies inside the figure (nothing clipped at an edge)."""
    fig.canvas.draw()
    drawn, (w, h) = fig.get_tightbbox(fig.canvas.get_renderer()), fig.get_size_inches()
    return drawn.x0 >= -0.01 and drawn.y0 >= -0.01 and drawn.x1 <= w + 0.01 and drawn.y1 <= h + 0.01


def test_sweep_draws_the_unpruned_accuracy_and_macs_unclipped(tmp_path):
    points = [SweepPoint(t, k, 304, 1000, m, a) for t, k, m, a in
              ((0.01, 47, 32_550_000, 98.6), (0.05, 21, 31_640_000, 84.1), (0.1, 20, 31_620_000, 81.6), (0.4, 9, 31_260_000, 31.9))]
    fig = sweep_figure(points, unpruned_accuracy=99.18, unpruned_macs=39_900_000, title="finetuned.pt")
    drawn = texts(fig)
    assert "top-1 unpruned (99.18%)" in drawn and "MACs unpruned (39.90M)" in drawn and "T=0.05: 21/304" in drawn
    left, right = fig.axes
    assert any(np.allclose(line.get_ydata(), 99.18) for line in left.get_lines())
    assert right.get_ylabel() == "MACs per image (millions)"
    assert inside(fig)
    plot_sweep(points, tmp_path / "s.png", unpruned_accuracy=99.18, unpruned_macs=39_900_000)
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG


def demo_report() -> dict:
    """The parts of `DemoReport.to_dict()` the summary reads."""
    latency = bench_report(p50_1=0.33, p50_32=10.1, with_torch=False)
    return {
        "config": {"model": "resnet20_altered", "data": "digits"},
        "stages": [{"name": "resnet20_altered (unconverted)", "accuracy": 98.63, "params": 271482, "macs": 39_895_680},
                   {"name": "recovered", "accuracy": 98.35, "params": 263394, "macs": 31_643_264}],
        "kernels": {"conv1": [7, 48], "conv2": [14, 256]},
        "onnx": {"baseline": {"file_bytes": 1126 * 1024}, "pruned": {"file_bytes": 1105 * 1024}},
        "latency": latency,
    }


def test_demo_summary_pairs_baseline_and_pruned_with_their_numbers(tmp_path):
    fig = summary_figure(demo_report())
    drawn = texts(fig)
    for fragment in ("98.63%", "98.35%", "-0.28 points", "21/304 kept", "304", "39.90M", "31.64M", "1126", "1105",
                     "batch 1", "batch 32", "float 1.25x faster", "0.33", "10.1"):
        assert fragment in drawn, fragment
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 6  # accuracy, kernels, MACs, size, latency at 2 batches
    assert inside(fig)
    plot_summary(demo_report(), tmp_path / "summary.png")
    assert (tmp_path / "summary.png").read_bytes()[:8] == PNG


def test_a_plain_model_draws_its_first_convolution():
    views = bank_views(nn.Sequential(nn.Conv2d(3, 4, 3)), SHAPE)
    assert [v.name for v in views] == ["0"] and views[0].threshold is None and views[0].alive == views[0].kept == 12
    assert "first convolution (no Gabor banks)" in texts(banks_figure([("", views)]))
