"""The pictures: filter banks, latency, a prune sweep, and the demo's summary.

Each figure has a function that builds it and returns the matplotlib Figure (`*_figure`, which tests
read) and one that writes it as a PNG (`plot_*`). The counts a figure prints come from the functions
the reports use, so a picture cannot disagree with its report: `GaborSparsity.alive` for "alive"
(what `finetune` logs and `inspect` shows), `alive_kernels` for "kept" (what `prune` reports), and
the unpruned layer's size (from the recipe's prune plans) for "of".
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gaborprune._io import save_figure
from gaborprune.convert.layer import GaborConv2d, alive_kernels
from gaborprune.convert.spec import conv_modules
from gaborprune.prune.plan import PrunePlan
from gaborprune.sparsity import GaborSparsity
from gaborprune.strength import DEFAULT_THRESHOLD

ALIVE, WEAK, REMOVED = 0, 1, 2  # the states of a kernel in a `BankView`
SEPARATOR = (0.25, 0.25, 0.25)  # dark grey lines between kernels
REMOVED_FILL, REMOVED_MARK = (0.85, 0.85, 0.85), (0.55, 0.55, 0.55)  # grey tile crossed out
WEAK_RING = (1.0, 0.65, 0.2)  # orange frame around a kernel below the threshold
TILE_PIXELS = 24  # each kernel is upsampled (nearest) to about this many pixels a side: 3x3 shows its orientation
MAX_SHOWN = 32  # rows / columns of a bank drawn at most (a note says what was left out)
RUNTIMES = {"onnxruntime": "ONNX Runtime", "pytorch": "PyTorch"}
BASELINE_COLOUR, PRUNED_COLOUR = "#9a9a9a", "#1f77b4"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike, force: bool) -> None:
    try:
        save_figure(path, fig, force)
    finally:
        _pyplot().close(fig)


# -- filter banks ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BankView:
    """A snapshot of one layer's kernels on the grid of the layer before any pruning, so that a bank
    before and after pruning draw alike (rows: output channels, columns: input channels)."""

    name: str
    weight: np.ndarray  # [O, I, kh, kw]; zeros where removed
    state: np.ndarray  # [O, I] of ALIVE, WEAK, REMOVED
    kept: int  # kernels present: `alive_kernels`, the count `prune` reports as kept
    alive: int  # a Gabor bank: `GaborSparsity.alive(threshold)`, the count `finetune` logs; a conv: `kept`
    threshold: float | None  # what "weak" means (None: a plain convolution, nothing is weak)

    @property
    def total(self) -> int:
        return int(self.state.size)

    @property
    def removed(self) -> int:
        return self.total - self.kept

    @property
    def weak(self) -> int:
        return int((self.state == WEAK).sum())


def _unpruned_index(name: str, size: int, side: str, plans: Sequence[PrunePlan]) -> tuple[np.ndarray, int]:
    """Where each of a layer's `size` current channels on `side` ("out" or "in") sat before `plans`
    cut any, and how many there were. A plan's indices refer to the model before it, so the plans
    are undone last first."""
    idx = np.arange(size)
    for plan in reversed(list(plans)):
        cut = set(plan.channels.get(name, {}).get(side, ()))
        before = size + len(cut)
        kept = np.array([i for i in range(before) if i not in cut], dtype=int)
        idx, size = kept[idx], before
    return idx, size


def bank_views(model: nn.Module, input_shape: tuple[int, int, int], plans: Sequence[PrunePlan] = (), *,
               threshold: float = DEFAULT_THRESHOLD, layers: list[str] | None = None) -> list[BankView]:
    """Snapshots of the Gabor banks of `model` (or its first convolution if it has none).

    Args:
        plans: the recipe's prune plans (`[s.plan for s in recipe.prunes]`), to place a compacted
            bank's kernels where they were.
        threshold: a kept Gabor kernel weaker than this x its layer's strongest is "weak" (the
            default is the "alive" of `finetune`'s log; pass the threshold a prune used to mark
            what it would remove).
    """
    convs = conv_modules(model)
    gabor = [n for n, m in convs.items() if isinstance(m, GaborConv2d)]
    names = layers or gabor or list(convs)[:1]
    sparsity = GaborSparsity(model, input_shape) if gabor else None
    strength = {n: s.cpu().numpy() for n, s in sparsity.relative_strengths().items()} if sparsity else {}
    alive = sparsity.alive(threshold) if sparsity else {}
    views = []
    for name in names:
        m = convs[name]
        with torch.no_grad():
            w = m.weight.detach().float().cpu().numpy()
        present = alive_kernels(m).cpu().numpy()
        rows, n_out = _unpruned_index(name, w.shape[0], "out", plans)
        # a grouped conv's kernel column is its position inside the group, which no cut moves
        cols, n_in = _unpruned_index(name, w.shape[1], "in", plans) if m.groups == 1 else (np.arange(w.shape[1]), w.shape[1])
        here = np.where(present, ALIVE, REMOVED)
        if name in strength:
            here = np.where(present & (strength[name] < threshold), WEAK, here)
        weight = np.zeros((n_out, n_in, *w.shape[2:]), dtype=np.float32)
        state = np.full((n_out, n_in), REMOVED, dtype=np.int8)
        weight[np.ix_(rows, cols)] = w
        state[np.ix_(rows, cols)] = here
        kept = int(present.sum())
        views.append(BankView(name, weight, state, kept, alive.get(name, kept), threshold if name in strength else None))
    return views


def stage_of(recipe) -> str:
    """The stage a recipe's banks are at, for a title: pruned, fine-tuned, converted (or "" for a
    model built with its banks and never trained). A plain network fine-tuned without pressure and
    converted afterwards reads as converted; one converted and fine-tuned without pressure too (the
    recipe keeps no order between the two)."""
    if recipe.prunes:
        return "pruned"
    tuned = recipe.finetunes[-1] if recipe.finetunes else None
    if tuned and (not recipe.conversions or tuned.config.sparsity > 0):
        return "fine-tuned"
    return "converted" if recipe.conversions else ""


def bank_image(view: BankView, max_rows: int = MAX_SHOWN, max_cols: int = MAX_SHOWN) -> np.ndarray:
    """An RGB grid of a bank's kernels, each upsampled (nearest) to about `TILE_PIXELS` a side and
    framed by a one-pixel ring: separator grey, or orange for a weak kernel. Live kernels use a
    diverging colour map scaled by the layer's largest |weight|; removed ones are a grey tile
    crossed out.

    Returns:
        float array [rows * (t + 2), cols * (t + 2), 3], t the upsampled kernel size.
    """
    import matplotlib

    w, state = view.weight[:max_rows, :max_cols], view.state[:max_rows, :max_cols]
    o, i, kh, kw = w.shape
    k = max(1, round(TILE_PIXELS / max(kh, kw)))
    th, tw = kh * k, kw * k
    scale = float(np.abs(view.weight).max()) or 1.0
    colours = matplotlib.colormaps["RdBu_r"]((w / scale + 1) / 2)[..., :3]  # [O, I, kh, kw, 3]
    tiles = colours.repeat(k, axis=2).repeat(k, axis=3)  # [O, I, th, tw, 3]
    y, x = np.mgrid[0:th, 0:tw]
    removed_tile = np.empty((th, tw, 3))
    removed_tile[:] = REMOVED_FILL
    cross = (np.abs(y * (tw - 1) - x * (th - 1)) < max(th, tw)) | (np.abs(y * (tw - 1) - (tw - 1 - x) * (th - 1)) < max(th, tw))
    removed_tile[cross] = REMOVED_MARK
    tiles[state == REMOVED] = removed_tile
    img = np.empty((o, th + 2, i, tw + 2, 3))
    img[:] = SEPARATOR
    weak = state == WEAK
    ring = img.transpose(0, 2, 1, 3, 4)  # a view: [O, I, th + 2, tw + 2, 3]
    ring[weak] = WEAK_RING
    ring[:, :, 1:-1, 1:-1] = tiles
    return img.reshape(o * (th + 2), i * (tw + 2), 3)


def _bank_title(stage: str, view: BankView) -> str:
    head = f"{stage}: {view.name}" if stage else view.name
    kh, kw = view.weight.shape[2:]
    lines = [f"{head} ({kh}x{kw})"]
    lines.append(f"{view.kept}/{view.total} kernels kept, {view.removed} removed" if view.removed else f"{view.total} kernels, none removed")
    if view.threshold is not None:
        lines.append(f"{view.alive} alive (>= {view.threshold:g} x strongest), {view.weak} weak")
    return "\n".join(lines)


def _bank_xlabel(view: BankView) -> str:
    o, i = view.state.shape
    shown = [f"first {MAX_SHOWN} of {n} {what}" for n, what in ((o, "output channels"), (i, "input channels")) if n > MAX_SHOWN]
    return "input channel" + (f"\n({'; '.join(shown)} shown)" if shown else "")


def banks_figure(stages: Sequence[tuple[str, list[BankView]]], *, title: str = ""):
    """One column per stage (e.g. fine-tuned, pruned), one row per layer, one colour bar.

    Returns:
        the matplotlib Figure.
    """
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch

    names = [v.name for v in stages[0][1]]
    images = [[bank_image(v) for v in views] for _, views in stages]
    inches = 1.15 / 120  # a pixel of the image a little over a pixel of the 120-dpi PNG: no line is lost
    titles = [[_bank_title(stage, v) for v in views] for stage, views in stages]
    labels = [[_bank_xlabel(v) for v in views] for _, views in stages]
    # a panel at least as wide as its texts (an 8-point character is about 6.5 pixels): none is clipped
    room = [[max(img.shape[1], 6.5 * max(map(len, (t + "\n" + x).splitlines()))) for img, t, x in zip(*rows)]
            for rows in zip(images, titles, labels)]
    if len(stages) == 1:  # one stage: the layers side by side
        widths = room[0]
        size = (sum(widths) * inches + 0.9 * len(names) + 1.4, max(img.shape[0] for img in images[0]) * inches + 2.4)
        grid, place = {"width_ratios": widths}, (lambda s, r: (0, r))
    else:  # stages side by side, a row per layer
        heights = [max(images[s][r].shape[0] for s in range(len(stages))) for r in range(len(names))]
        width = max(max(row) for row in room)
        size = (len(stages) * (width * inches + 0.6) + 1.4, sum(heights) * inches + 1.15 * len(names) + 1.3)
        grid, place = {"height_ratios": heights}, (lambda s, r: (r, s))
    shape = place(len(stages) - 1, len(names) - 1)
    fig_w, fig_h = min(22.0, max(5.5, size[0])), min(26.0, size[1])
    fig, axes = plt.subplots(shape[0] + 1, shape[1] + 1, figsize=(fig_w, fig_h), squeeze=False, layout="constrained", gridspec_kw=grid)
    for s, (stage, views) in enumerate(stages):
        for r, view in enumerate(views):
            row, col = place(s, r)
            ax, img = axes[row][col], images[s][r]
            ax.imshow(img, interpolation="nearest")
            ax.set_title(titles[s][r], fontsize=8)
            ax.set_xlabel(labels[s][r], fontsize=8)
            ax.set_ylabel("output channel", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    bar = fig.colorbar(ScalarMappable(Normalize(-1, 1), "RdBu_r"), ax=axes.ravel().tolist(), shrink=min(0.6, 3.0 / fig_h), pad=0.02, panchor=False)
    bar.set_label("weight / its layer's largest |weight|", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    handles = [Patch(facecolor=REMOVED_FILL, edgecolor=REMOVED_MARK, hatch="x", label="removed")]
    thresholds = sorted({v.threshold for _, views in stages for v in views if v.threshold is not None})
    if thresholds:
        t = "/".join(f"{x:g}" for x in thresholds)
        handles.append(Patch(facecolor="white", edgecolor=WEAK_RING, linewidth=2, label=f"weak: present, below {t} x the layer's strongest"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    kind = "Gabor banks" if any(v.threshold is not None for _, views in stages for v in views) else "first convolution (no Gabor banks)"
    named = " vs ".join(s for s, _ in stages if s)
    fig.suptitle(title or (f"{kind}: {named}" if named else kind), fontsize=10)
    return fig


def plot_banks(stages: Sequence[tuple[str, list[BankView]]], path: str | os.PathLike, *, title: str = "", force: bool = False) -> list[str]:
    """`banks_figure` as a PNG. Returns the names of the layers drawn."""
    _save(banks_figure(stages, title=title), path, force)
    return [v.name for v in stages[0][1]]


def plot_recipe_banks(model: nn.Module, recipe, path: str | os.PathLike, *, force: bool = False) -> list[str]:
    """The banks of a loaded recipe at its stage (`stage_of`), removed kernels where they were."""
    return plot_banks([(stage_of(recipe), bank_views(model, recipe.input_shape, [s.plan for s in recipe.prunes]))], path, force=force)


# -- latency ---------------------------------------------------------------------------------------
def _quartiles(r: dict) -> tuple[float, float]:
    """(p25, p75) of a bench result; a point at the median for reports written before they were kept."""
    return r.get("p25_ms", r["p50_ms"]), r.get("p75_ms", r["p50_ms"])


def _speedup_text(c: dict) -> str:
    if c.get("speedup") is None:
        return c.get("verdict", "")
    return f"{c['speedup']:.2f}x {c['verdict']}"


def _family(model: str) -> str:
    """A model's name without its int8 suffix: a model and its int8 copy share a colour."""
    return model.removesuffix(" (int8)").removesuffix("-int8")


def latency_figure(report):
    """A bench report (a `BenchReport` or its `to_dict()`) as bars: p50 per configuration with the
    runs' interquartile range, each bar's number over it, each compared model's speedup and verdict,
    on a log axis when the medians differ more than tenfold (batch 1 and 32 side by side).

    Returns:
        the matplotlib Figure.
    """
    plt = _pyplot()
    from gaborprune.export.environment import load_note

    d = report if isinstance(report, dict) else report.to_dict()
    results, comparisons = d["results"], d["comparisons"]
    baselines = {c["baseline"] for c in comparisons}
    precisions = list(dict.fromkeys(r["precision"] for r in results))
    seen = list(dict.fromkeys((r["model"], r["runtime"], r["precision"]) for r in results))
    # each baseline just before the models compared with it: pairs read side by side
    keys = sorted(seen, key=lambda k: (precisions.index(k[2]), k[1] != "onnxruntime", k[0] not in baselines, seen.index(k)))
    configs = sorted({(r["batch_size"], r["threads"]) for r in results})
    speedups = {(c["model"], c["batch_size"], c["threads"]): c for c in comparisons}
    fig, ax = plt.subplots(figsize=(max(7.5, 0.95 * len(configs) * len(keys) + 1.2), 5.4), layout="constrained")
    width = 0.8 / len(keys)
    compared = list(dict.fromkeys(_family(m) for m, _, _ in keys if m not in baselines))
    for k, (model, rt, precision) in enumerate(keys):
        rows = {(r["batch_size"], r["threads"]): r for r in results if (r["model"], r["runtime"], r["precision"]) == (model, rt, precision)}
        xs = [i + k * width for i, c in enumerate(configs) if c in rows]
        found = [rows[c] for c in configs if c in rows]
        mid = [r["p50_ms"] for r in found]
        q = [_quartiles(r) for r in found]
        err = [[m - lo for m, (lo, _) in zip(mid, q)], [hi - m for m, (_, hi) in zip(mid, q)]]
        name = os.path.basename(model)
        label = f"{name} ({RUNTIMES.get(rt, rt)}, {precision})" + (" - baseline" if model in baselines and "baseline" not in name else "")
        # colour: the model (baselines grey); hatching: int8; paler: PyTorch
        colour = BASELINE_COLOUR if model in baselines else f"C{compared.index(_family(model)) % 10}"
        ax.bar(xs, mid, width, yerr=err, capsize=3, color=colour, alpha=1.0 if rt == "onnxruntime" else 0.5, edgecolor="white",
               hatch="//" if precision == "int8" else None, label=label, error_kw={"elinewidth": 1})
        for x, r, (_, hi) in zip(xs, found, q):
            c = speedups.get((model, r["batch_size"], r["threads"])) if rt == "onnxruntime" else None
            text = f"{r['p50_ms']:.3g} ms" + (f"\n{_speedup_text(c)}" if c else "")
            ax.annotate(text, (x, hi), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7,
                        fontweight="bold" if c and c.get("verdict") in ("faster", "slower") else "normal")
    p50 = [r["p50_ms"] for r in results if r["p50_ms"] > 0]
    log = bool(p50) and max(p50) > 10 * min(p50)  # batch 1 and 32 on a linear axis: batch 1's bars vanish
    if log:
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.margins(y=0.35)
    else:
        ax.set_ylim(0, max(_quartiles(r)[1] for r in results) * 1.3)
    ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(configs))],
                  [f"batch {b}, {t} thread{'s' * (t > 1)}" for b, t in configs])
    ax.set_ylabel(f"ms per batch: median, bars p25-p75{' (log scale)' if log else ''}")
    env = d.get("environment", {})
    names = " and ".join(dict.fromkeys(RUNTIMES.get(rt, rt) for _, rt, _ in keys))
    ax.set_title(f"{names} latency per batch\nspeedup: baseline's time / the model's, same precision, run by run\n"
                 f"{env.get('cpu', 'unknown CPU')}, {env.get('cores', '?')} cores{load_note(env)}; timings depend on the machine", fontsize=9)
    fig.legend(fontsize=7, loc="outside lower center", ncols=min(len(keys), 2), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_latency(report, path: str | os.PathLike, *, force: bool = False) -> None:
    """`latency_figure` as a PNG."""
    _save(latency_figure(report), path, force)


# -- prune sweep -----------------------------------------------------------------------------------
def sweep_figure(points, *, unpruned_accuracy: float | None = None, unpruned_macs: int | None = None, title: str = ""):
    """Accuracy against the share of Gabor kernels kept, one labelled point per threshold, the
    unpruned model's accuracy as a line, and each point's MACs on a second axis.

    Returns:
        the matplotlib Figure.
    """
    plt = _pyplot()
    banks = all(p.kernels_total for p in points)  # else a model without banks, pruned with --scope all
    kept = [100 * p.kernels_kept / p.kernels_total if banks else p.params / 1e3 for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.6), layout="constrained")
    lines = ax.plot(kept, [p.accuracy for p in points], "o-", color="C0", label="top-1 after pruning")
    span = (max(kept) - min(kept)) or 1.0
    level, last = 0, None
    for x, p in sorted(zip(kept, points), key=lambda xp: xp[0]):
        # a label about 15% of the axis wide: those of close points stack upwards instead of overlapping
        level = level + 1 if last is not None and x - last < 0.15 * span else 0
        last = x
        ax.annotate(f"T={p.threshold:g}: {p.kernels_kept}/{p.kernels_total}" if banks else f"T={p.threshold:g}", (x, p.accuracy), textcoords="offset points",
                    xytext=(0, 6 + 10 * level), ha="left" if x - min(kept) < 0.1 * span else "right" if max(kept) - x < 0.1 * span else "center",
                    va="bottom", fontsize=7, zorder=5,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6} if level else None)
    if unpruned_accuracy is not None:
        lines.append(ax.axhline(unpruned_accuracy, color="C0", ls="--", lw=1, label=f"top-1 unpruned ({unpruned_accuracy:.2f}%)"))
    ax.set_xlabel("Gabor kernels kept (%)" if banks else "parameters after pruning (thousands)")
    ax.set_ylabel("top-1 accuracy (%)", color="C0")
    ax.margins(x=0.12, y=0.25)
    right = ax.twinx()
    lines += right.plot(kept, [p.macs / 1e6 for p in points], "s:", color="C1", label="MACs after pruning")
    if unpruned_macs is not None:
        lines.append(right.axhline(unpruned_macs / 1e6, color="C1", ls="--", lw=1, label=f"MACs unpruned ({unpruned_macs / 1e6:.2f}M)"))
    right.set_ylabel("MACs per image (millions)", color="C1")
    ax.set_zorder(right.get_zorder() + 1)  # the accuracy line and its labels over the MACs
    ax.patch.set_visible(False)
    right.set_ylim(0, max([p.macs for p in points] + [unpruned_macs or 0]) / 1e6 * 1.15)
    what = "kernels kept" if banks else "parameters"
    ax.set_title(f"{title}: accuracy and MACs vs {what}" if title else f"accuracy and MACs vs {what}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(handles=lines, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig



def plot_sweep(points, path: str | os.PathLike, *, unpruned_accuracy: float | None = None, unpruned_macs: int | None = None,
               title: str = "", force: bool = False) -> None:
    """`sweep_figure` as a PNG."""
    _save(sweep_figure(points, unpruned_accuracy=unpruned_accuracy, unpruned_macs=unpruned_macs, title=title), path, force)


# -- the demo's summary ----------------------------------------------------------------------------
def _paired(ax, groups: list[str], pairs: list[tuple[float, float]], fmt, title: str, errors=None) -> None:
    """Baseline and pruned bars per group, each with its number over it."""
    x = np.arange(len(groups))
    for j, (label, colour) in enumerate((("baseline", BASELINE_COLOUR), ("pruned", PRUNED_COLOUR))):
        values = [p[j] for p in pairs]
        yerr = None if errors is None else np.array([[v - e[j][0] for v, e in zip(values, errors)], [e[j][1] - v for v, e in zip(values, errors)]])
        ax.bar(x + (j - 0.5) * 0.38, values, 0.38, color=colour, label=label, yerr=yerr, capsize=3 if yerr is not None else 0)
        tops = values if errors is None else [e[j][1] for e in errors]
        for xi, v, top in zip(x + (j - 0.5) * 0.38, values, tops):
            ax.annotate(fmt(v), (xi, top), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, groups, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(max(p) for p in pairs) * 1.3 or 1)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)


def _change(a: float, b: float) -> str:
    return f"{(b - a) / a:+.1%}" if a else ""


def summary_figure(report: dict):
    """The demo's report (`DemoReport.to_dict()`, what report.json holds) as small multiples of
    paired bars, baseline against pruned: top-1, kernels of the converted layers, MACs, ONNX file
    size, and p50 latency (runs' p25-p75) at each batch size with the speedup.

    Returns:
        the matplotlib Figure.
    """
    plt = _pyplot()
    stages, kernels, onnx, latency = report["stages"], report["kernels"], report["onnx"], report["latency"]
    base, final = stages[0], stages[-1]
    results = {(r["model"], r["batch_size"]): r for r in latency.get("results", [])}
    comparisons = latency.get("comparisons", [])
    batches = sorted({c["batch_size"] for c in comparisons if c.get("speedup") is not None})
    panels = 4 + len(batches)
    cols = 3 if panels > 4 else panels
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.4 * rows + 0.6), squeeze=False, layout="constrained")
    axes = axes.ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)

    a, b = base["accuracy"], final["accuracy"]
    _paired(axes[0], ["test split, PyTorch"], [(a, b)], lambda v: f"{v:.2f}%", f"top-1 accuracy (%)\n{b - a:+.2f} points")
    total, kept = sum(t for _, t in kernels.values()), sum(k for k, _ in kernels.values())
    _paired(axes[1], [", ".join(kernels)], [(total, kept)], lambda v: f"{v:.0f}", f"kernels in the converted layers\n{kept}/{total} kept")
    macs = [("model", base["macs"], final["macs"])]
    if "macs_executed" in onnx.get("baseline", {}) and "macs_executed" in onnx.get("pruned", {}):  # zeros in dense convolutions count
        macs.append(("float ONNX, executed", onnx["baseline"]["macs_executed"], onnx["pruned"]["macs_executed"]))
    _paired(axes[2], [m[0] for m in macs], [(m0 / 1e6, m1 / 1e6) for _, m0, m1 in macs], lambda v: f"{v:.2f}M",
            "MACs per image (millions)\n" + ", ".join(f"{name} {_change(m0, m1)}" for name, m0, m1 in macs))
    files = [p for p in ("", "-int8") if f"baseline{p}" in onnx and f"pruned{p}" in onnx]
    sizes = [(onnx[f"baseline{p}"]["file_bytes"] / 1024, onnx[f"pruned{p}"]["file_bytes"] / 1024) for p in files]
    _paired(axes[3], ["float" if not p else "int8" for p in files], sizes, lambda v: f"{v:.0f}",
            "ONNX file size (KiB)\n" + ", ".join(f"{'float' if not p else 'int8'} {_change(*s)}" for p, s in zip(files, sizes)))
    for ax, batch in zip(axes[4:], batches):
        comps = [c for c in comparisons if c["batch_size"] == batch and c.get("speedup") is not None]
        pairs = [(results[(c["baseline"], batch)], results[(c["model"], batch)]) for c in comps]
        _paired(ax, [c["precision"] for c in comps], [(r0["p50_ms"], r1["p50_ms"]) for r0, r1 in pairs], lambda v: f"{v:.3g}",
                f"ONNX Runtime latency, batch {batch} (ms, p50)\n" + ", ".join(f"{c['precision']} {c['speedup']:.2f}x {c['verdict']}" for c in comps),
                errors=[(_quartiles(r0), _quartiles(r1)) for r0, r1 in pairs])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, ["baseline (unconverted)", "pruned (after recovery)"], loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    c = report.get("config", {})
    fig.suptitle(f"gaborprune demo: {c.get('model', '')} on {c.get('data', '')}, baseline vs pruned "
                 f"(latency bars: p25-p75 of the runs; timings depend on the machine)", fontsize=10)
    return fig


def plot_summary(report: dict, path: str | os.PathLike, *, force: bool = False) -> None:
    """`summary_figure` as a PNG."""
    _save(summary_figure(report), path, force)
