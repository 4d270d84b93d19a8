"""The bench report as text: the cells of its results and comparisons tables (shared by the terminal
and Markdown reports), the converted layers' share line and the Markdown report."""

from __future__ import annotations

from gaborprune.export.environment import load_note

RESULT_COLUMNS = ("model", "runtime", "precision", "batch", "threads", "median ms", "95% CI ms", "p90 ms", "p90/p50", "runs in rounds", "images/s", "note")
COMPARISON_COLUMNS = ("model", "baseline", "batch", "threads", "speedup", "95% CI", "executed MAC ratio", "efficiency", "verdict")
PROFILE_ROWS = 15  # layers a profile lists, slowest first


def top_layers(layers: dict[str, float]) -> list[tuple[str, float]]:
    """A profile's slowest `PROFILE_ROWS` layers, slowest first."""
    return sorted(layers.items(), key=lambda kv: -kv[1])[:PROFILE_ROWS]


def _ci(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"{low:.3f}-{high:.3f}"


def result_rows(report) -> list[list[str]]:
    """The cells of a `BenchReport`'s results table (`RESULT_COLUMNS`), shared by the terminal and Markdown reports."""
    rows = []
    for r in report.results:
        d = r.to_dict()
        rows.append([d["model"], d["runtime"], d["precision"], str(d["batch_size"]), str(d["threads"]), f"{d['p50_ms']:.3f}",
                     _ci(d["p50_low_ms"], d["p50_high_ms"]), f"{d['p90_ms']:.3f}", f"{d['p90_over_p50']:.2f}",
                     f"{d['runs']} in {d['rounds']}", f"{d['throughput']:.1f}", d["note"] or "ok"])
    return rows


def comparison_rows(report) -> list[list[str]]:
    """The cells of a `BenchReport`'s comparisons table (`COMPARISON_COLUMNS`)."""
    rows = []
    for c in report.comparisons:
        speedup = "-" if c.speedup is None else f"{c.speedup:.3f}x"
        eff = f"{c.efficiency:.2f}" if c.efficiency is not None else "n/a (" + (c.note if c.stable else c.verdict) + ")"
        verdict = f"{c.verdict} ({c.note})" if c.note and not c.stable else c.verdict
        rows.append([c.model, c.baseline, str(c.batch_size), str(c.threads), speedup, _ci(c.speedup_low, c.speedup_high),
                     f"{c.mac_ratio:.3f}", eff, verdict])
    return rows


def share_line(report, model: str) -> str:
    """One line on how much of `model`'s profiled time the converted layers take (`converted_share`)."""
    share = report.converted[model]
    who = f"baseline {model}" if model in {c.baseline for c in report.comparisons} else model
    if share["share"] is None:
        return f"{who}: none of the converted layers shows in the profile"
    bound = f"at most {share['bound']:.2f}x" if share["bound"] is not None else "no bound (all its time)"
    return (f"{who}: {share['share']:.0%} of the time in the converted layers ({', '.join(share['layers'])}: {share['ms']:.3f} of "
            f"{share['total_ms']:.3f} ms); removing them entirely would give {bound}")


def to_markdown(report, title: str = "gaborprune bench") -> str:
    """A `BenchReport` as Markdown: the settings and machine, the results, the comparisons and the profiles."""
    env, s = report.environment, report.settings
    lines = [f"# {title}", "", f"{env['date']}; {env['cpu']}, {env['cores']} cores{load_note(env)}; onnxruntime {env['onnxruntime']}, "
             f"torch {env['torch']}, provider {env['provider']}, inter-op threads 1. Rounds of {s['runs_per_round']} interleaved runs "
             f"until each median's 95% interval is within +-{s['precision'] / 2:.1%} or {s['max_seconds']:g} s are spent.", ""]
    lines += [f"**Warning:** {w}" for w in report.warnings] + ([""] if report.warnings else [])
    lines += ["| " + " | ".join(RESULT_COLUMNS) + " |", "|---|---|---|" + "---:|" * 8 + "---|"]
    lines += ["| " + " | ".join(row) + " |" for row in result_rows(report)]
    if report.comparisons:
        lines += ["", "Speedup: the median over interleaved runs of t_base / t, with its 95% interval; efficiency = "
                  "(1 - t/t_base) / (1 - MACs/MACs_base) on executed MACs, given only for a speedup beyond the noise.", "",
                  "| " + " | ".join(COMPARISON_COLUMNS) + " |", "|---|---|" + "---:|" * 6 + "---|"]
        lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(report)]
    for model, layers in report.profiles.items():
        lines += ["", f"Per-layer time of {model} (ms per run, top {PROFILE_ROWS}):", "", "| layer | ms |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in top_layers(layers)]
        if model in report.converted:
            lines += ["", share_line(report, model) + "."]
    return "\n".join(lines) + "\n"
