"""Candidate prunes for a measured target: ordered families of exact, replayable prunes.

A family holds candidates 1..n; candidate k removes at least what candidate k - 1 removes, so the
time falls (about monotonically) with k and `gaborprune.search` can bisect over k. Each candidate
prunes through the normal `prune_model_` path, so the recipe records an ordinary plan. A family
knows nothing of timing: `gaborprune.search` exports and times the candidates.

- `GroupCandidates` (`scope` banks): k removes the k weakest channel groups of the Gabor banks
  (`gaborprune.prune.groups`), ranked by the measure the channel pressure uses (the L2 norm of the
  members' relative kernel strengths). Their channel counts are known before any is pruned, which
  lets the search predict each candidate's time.
- `RatioCandidates` (`scope` all): k removes the k-th of `TARGET_RATIOS` of the channels that can go
  exactly, the weakest first (`PruneSpec(scope="all", ratio=...)`; by the BatchNorm gain, or by the
  Taylor `scores` when given: `gaborprune.prune.importance`), so a target is reached whenever
  removing channels can reach it, however far the pressure separated them. (Relative thresholds, the
  earlier candidates, stopped at 0.8 of the strongest channel: after a short or weak pressure they
  could not remove enough.)
"""

from __future__ import annotations

import copy
from dataclasses import replace

from torch import nn

from gaborprune.convert.layer import GaborConv2d
from gaborprune.errors import PruneError
from gaborprune.prune.analysis import ModelAnalysis
from gaborprune.prune.groups import ChannelGroup
from gaborprune.prune.part import analysed_part
from gaborprune.prune.report import PruneReport
from gaborprune.prune.select import PruneSpec

#: The shares of the removable channels `RatioCandidates` tries, in increasing order: steps of 2%, so that a
#: bisection over them needs at most 6 candidates, and a step that removes many residual branches at once (with
#: the BatchNorm-gain ranking of an unpressed resnet20 on CIFAR-10, 5% steps went from MAC ratio 0.70 to 0.08)
#: is as small as the grid allows.
TARGET_RATIOS = tuple(round(0.02 * k, 2) for k in range(1, 50))


def layer_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) channels of every convolution and linear layer."""
    counts = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, GaborConv2d)):
            counts[name] = (m.out_channels, m.in_channels)
        elif isinstance(m, nn.Linear):
            counts[name] = (m.out_features, m.in_features)
    return counts


def changed_counts(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    """{layer: [out, in]} of the layers of `before` whose counts differ in `after`."""
    return {name: list(after[name]) for name, counts in before.items() if name in after and tuple(after[name]) != counts}


def rank_groups(model: nn.Module, input_shape: tuple[int, int, int], analysis: ModelAnalysis | None = None) -> tuple[list[ChannelGroup], list[float]]:
    """The channel groups of the Gabor banks, weakest first (ties in model order), with their strengths.

    Raises:
        PruneError: the model has no Gabor bank, or its banks have no channel group.
    """
    from gaborprune.sparsity import GaborSparsity

    sparsity = GaborSparsity(model, input_shape, structure="channel", analysis=analysis)
    if not sparsity:
        raise PruneError("the model has no Gabor banks to prune; convert some layers first "
                         "(e.g. the first two convolutions), fine-tune with `sparsity`, then prune")
    if not sparsity.groups.groups:
        why = "; ".join(sparsity.groups.reasons()) or "no channel of a Gabor bank can go on its own"
        raise PruneError(f"no channel groups to remove ({why}); prune with `threshold`, `ratio` or `keep` instead")
    relative = sparsity.relative_strengths()
    strengths = {label: f.strength(relative).tolist() for label, f in sparsity.families.items()}
    seen: dict[str, int] = {}
    ranked = []
    for position, g in enumerate(sparsity.groups.groups):
        index = seen[g.label] = seen.get(g.label, -1) + 1
        ranked.append((float(strengths[g.label][index]), position, g))
    ranked.sort(key=lambda t: t[:2])
    return [g for _, _, g in ranked], [s for s, _, _ in ranked]


def mask_groups_(model: nn.Module, groups: list[ChannelGroup]) -> None:
    """Mask every Gabor kernel of `groups` in `model`."""
    from gaborprune.prune.plan import PrunePlan, apply_plan_

    kernels: dict[str, list[list[int]]] = {}
    for g in groups:
        for bank, members in g.members:
            kernels.setdefault(bank, []).extend([o, i] for o, i in members)
    apply_plan_(model, PrunePlan(kernels=kernels))


def _labels(groups: list[ChannelGroup]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for g in groups:
        counts[g.label] = counts.get(g.label, 0) + 1
    return counts


class GroupCandidates:
    """k = 1..n removes the k weakest channel groups of the Gabor banks (see the module doc).

    A group is skipped when its removal (after the weaker ones) would remove no further channel (its
    time is already saved, or its channel stays for a reason `analyse_channels` gives), or would leave
    a Gabor bank without a kernel or a layer without a channel; `notes` says how many were.

    Raises:
        PruneError: no Gabor banks, no channel groups, or none that can go.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        from gaborprune.prune.graph import analyse_channels

        self.input_shape = tuple(input_shape)
        self.analysis = ModelAnalysis(model, self.input_shape)  # one trace for the ranking, the layouts and every candidate
        found, _ = rank_groups(model, self.input_shape, self.analysis)
        base = layer_counts(model)
        work = copy.deepcopy(model)
        self.ranked: list[ChannelGroup] = []
        self.layouts: list[dict[str, list[int]]] = [{}]
        for g in found:
            trial = copy.deepcopy(work)
            mask_groups_(trial, [g])
            if any(not bool((m.mask != 0).any()) for m in trial.modules() if isinstance(m, GaborConv2d)):
                continue
            remove = analyse_channels(trial, self.input_shape, analysis=self.analysis).remove
            now = {name: (o - len(remove.get(name, {}).get("out", [])), i - len(remove.get(name, {}).get("in", [])))
                   for name, (o, i) in base.items()}
            changed = changed_counts(base, now)
            if any(min(c) < 1 for c in changed.values()) or changed == self.layouts[-1]:
                continue
            work = trial
            self.ranked.append(g)
            self.layouts.append(changed)
        self.found = len(found)
        if not self.ranked:
            raise PruneError(f"removing any channel group would empty a Gabor bank ({self.found} groups); "
                             "prune with `threshold`, `ratio` or `keep` instead")
        self.notes = [] if len(self.ranked) == self.found else [
            f"{self.found - len(self.ranked)} of the {self.found} channel groups are not candidates: after the weaker ones, each would "
            "remove no further channel, or leave a Gabor bank or a layer empty"]

    def __len__(self) -> int:
        return len(self.ranked)

    def describe(self) -> str:
        return f"{self.found} channel groups of the Gabor banks, weakest first"

    def everything(self) -> str:
        """What the last candidate removes, in words."""
        return "every group" if len(self) == self.found else f"{len(self)} of {self.found} groups (all that can go)"

    def label(self, k: int) -> str:
        return f"{k} weakest channel groups"

    def details(self, k: int) -> dict:
        return {"groups": _labels(self.ranked[:k])}

    def channels(self, k: int) -> dict[str, list[int]] | None:
        """The changed channel counts of candidate k, known before it is pruned."""
        return self.layouts[k]

    def prune_(self, model: nn.Module, k: int) -> PruneReport:
        """Mask the k weakest groups and prune exactly those kernels the normal way (threshold 0 keeps
        every present kernel), so the recipe records an ordinary, replayable plan."""
        from gaborprune.prune.report import layer_shapes
        from gaborprune.prune.run import prune_model_
        from gaborprune.summary import summarize

        before, shapes = summarize(model, self.input_shape, self.analysis.norms), layer_shapes(model)
        mask_groups_(model, self.ranked[:k])
        report = prune_model_(model, self.input_shape, PruneSpec(threshold=0.0), self.analysis)
        # prune_model_ saw the masked model: its "before" is the model as it came in
        report.before = before
        report.layers = [replace(c, kernels_before=shapes[c.name].kernels) for c in report.layers]
        return report


class RatioCandidates:
    """k = 1..n removes the k-th of `ratios` of the channels that can go exactly, weakest first (the
    `scope` all prune, each layer's count rounded to `round_to`)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], round_to: int | None, ratios: tuple[float, ...] = TARGET_RATIOS,
                 scores: dict[str, float] | None = None, module: str | None = None) -> None:
        self.input_shape, self.round_to, self.ratios, self.scores = tuple(input_shape), round_to, tuple(ratios), scores
        # every candidate is a copy of `model`: one trace, of the part the analysis reads (`gaborprune.prune.part`)
        part, self.analysis = analysed_part(model, self.input_shape, module)
        self.module = part.name or None
        self.notes: list[str] = []

    def __len__(self) -> int:
        return len(self.ratios)

    def describe(self) -> str:
        by = "the channels of least Taylor loss change first" if self.scores is not None else "the weakest channels first"
        return f"scope all, {by}, in multiples of {self.round_to or 1}"

    def everything(self) -> str:
        return f"{self.ratios[-1]:.0%} of the removable channels"

    def label(self, k: int) -> str:
        return f"{self.ratios[k - 1]:.0%} of the channels"

    def details(self, k: int) -> dict:
        return {"ratio": self.ratios[k - 1]}

    def channels(self, k: int) -> dict[str, list[int]] | None:
        return None  # known only once pruned

    def spec(self, k: int) -> PruneSpec:
        return PruneSpec(ratio=self.ratios[k - 1], scope="all", round_to=self.round_to, importance="gain" if self.scores is None else "taylor",
                         module=self.module)

    def prune_(self, model: nn.Module, k: int) -> PruneReport:
        from gaborprune.prune.run import prune_model_

        return prune_model_(model, self.input_shape, self.spec(k), self.analysis, self.scores)
