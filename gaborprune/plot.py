"""Pictures of filter banks: one tile per 2-D kernel, removed kernels left blank."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from gaborprune._io import save_figure
from gaborprune.convert.layer import GaborConv2d
from gaborprune.convert.spec import conv_modules
from gaborprune.summary import alive_kernels


SEPARATOR = (0.25, 0.25, 0.25, 1.0)  # dark grey lines between kernels
REMOVED = (0.82, 0.82, 0.82, 1.0)  # light grey tiles: removed kernels (a live zero is white)


def bank_image(conv: nn.Module, max_rows: int = 64, max_cols: int = 64) -> np.ndarray:
    """An RGBA grid of a layer's kernels: rows are output channels, columns input channels.

    Live kernels use a diverging colour map scaled by the layer's largest |weight| (so weak kernels
    look faint); removed kernels are flat light grey.

    Returns:
        float array [rows * (kh + 1) + 1, cols * (kw + 1) + 1, 4].
    """
    import matplotlib

    with torch.no_grad():
        w = conv.weight.detach().float().cpu()[:max_rows, :max_cols]  # [O, I, kh, kw]
        alive = alive_kernels(conv).cpu()[:max_rows, :max_cols]
    o, i, kh, kw = w.shape
    scale = float(w.abs().max()) or 1.0
    colours = matplotlib.colormaps["RdBu_r"]((w.numpy() / scale + 1) / 2)  # [O, I, kh, kw, 4]
    img = np.empty((o * (kh + 1) + 1, i * (kw + 1) + 1, 4))
    img[:] = SEPARATOR
    for r in range(o):
        for c in range(i):
            y, x = 1 + r * (kh + 1), 1 + c * (kw + 1)
            img[y:y + kh, x:x + kw] = colours[r, c] if alive[r, c] else REMOVED
    return img


def plot_banks(model: nn.Module, path: str | os.PathLike, *, layers: list[str] | None = None, force: bool = False) -> list[str]:
    """Draw the Gabor banks of `model` (or the first convolution if it has none) into a PNG.

    Returns:
        The names of the layers drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    convs = conv_modules(model)
    if layers is None:
        layers = [n for n, m in convs.items() if isinstance(m, GaborConv2d)] or list(convs)[:1]
    images = [bank_image(convs[n]) for n in layers]
    fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4), squeeze=False)
    for ax, name, img in zip(axes[0], layers, images):
        m = convs[name]
        ax.imshow(img, interpolation="nearest")
        present = int(alive_kernels(m).sum())
        total = m.out_channels * m.in_channels // m.groups
        ax.set_title(f"{name}\n{present}/{total} kernels present (grey: removed)", fontsize=9)
        ax.set_xlabel("input channel")
        ax.set_ylabel("output channel")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(path, fig, force)
    plt.close(fig)
    return layers


def plot_sweep(points, path: str | os.PathLike, *, title: str = "", force: bool = False) -> None:
    """Accuracy against the share of Gabor kernels kept, one labelled point per threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = [100 * p.kernels_kept / p.kernels_total for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(kept, [p.accuracy for p in points], "o-")
    for x, p in zip(kept, points):
        ax.annotate(f"T={p.threshold:g}", (x, p.accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("Gabor kernels kept (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{title}: accuracy vs kernels kept" if title else "accuracy vs kernels kept", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(path, fig, force)
    plt.close(fig)


def plot_latency(report, path: str | os.PathLike, *, force: bool = False) -> None:
    """A bench report as bars: median latency per configuration with its 95% interval, each
    compared model labelled with its speedup (and verdict when it is not a finding)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gaborprune.export.bench import load_note

    runtimes = {"onnxruntime": "ONNX Runtime", "pytorch": "PyTorch"}
    configs = sorted({(r.batch_size, r.threads) for r in report.results})
    keys = list(dict.fromkeys((r.model, r.runtime) for r in report.results))
    speedups = {(c.model, c.batch_size, c.threads): c for c in report.comparisons}
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(configs) * len(keys)), 4.5))
    width = 0.8 / len(keys)
    for k, (model, rt) in enumerate(keys):
        rows = {(r.batch_size, r.threads): r for r in report.results if (r.model, r.runtime) == (model, rt)}
        xs = [i + k * width for i, c in enumerate(configs) if c in rows]
        found = [rows[c] for c in configs if c in rows]
        mid = [r.interval.median for r in found]
        err_bars = [[r.interval.median - r.interval.low for r in found], [r.interval.high - r.interval.median for r in found]]
        ax.bar(xs, mid, width, yerr=err_bars, capsize=3, label=f"{os.path.basename(model)} - {runtimes.get(rt, rt)}")
        for x, r in zip(xs, found):
            c = speedups.get((model, r.batch_size, r.threads)) if rt == "onnxruntime" else None
            if c is not None:
                text = c.verdict if c.speedup is None else f"{c.speedup:.2f}x" + ("" if c.stable else f"\n{c.verdict}")
                ax.annotate(text, (x, r.interval.high), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=7)
    batches = [b for b, _ in configs]
    if max(batches) >= 10 * min(batches):  # batch 1 and 32 side by side: a linear axis flattens batch 1
        ax.set_yscale("log")
    ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(configs))], [f"batch {b}, {t} thread{'s' * (t > 1)}" for b, t in configs])
    ax.set_ylabel("median latency per batch (ms), 95% CI")
    env = report.environment
    runtime_names = " vs ".join(dict.fromkeys(runtimes.get(rt, rt) for _, rt in keys))
    ax.set_title(f"{runtime_names} latency, speedup against the baseline of the same precision\n"
                 f"{env['cpu']}, {env['cores']} cores{load_note(env)}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.margins(y=0.15)
    fig.tight_layout()
    save_figure(path, fig, force)
    plt.close(fig)
