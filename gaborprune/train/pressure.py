"""The sparsity pressure as one object for any training loop: your own, Lightning's, a detector toolkit's.

    pressure = gp.Pressure(model, images, strength=0.05)        # the channel groups, found once
    loss = criterion(model(images), labels) + pressure()        # strength x the penalty, differentiable
    print(pressure.report())                                    # groups alive 120/300 (40%), kernels alive 900/1200

The penalty is `gaborprune.sparsity.GaborSparsity.penalty`: L1/L2 ratios of BatchNorm-scale-invariant
kernel and channel-group strengths, so it makes channels die rather than shrinking everything while
BatchNorm scales them back. A model that torch.fx cannot trace whole (a detector) is pressed in its
part (`gaborprune.prune.part`: by default its `backbone`); the report names the whole model's modules.
`finetune_` trains with the same object.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gaborprune._validate import check_finite, is_int
from gaborprune.errors import InputShapeError, TrainingError
from gaborprune.scopes import SCOPES, STRUCTURES
from gaborprune.strength import DEFAULT_THRESHOLD

__all__ = ["Pressure", "PressureReport"]


@dataclass(frozen=True)
class PressureReport:
    """What is alive under the pressure, by full module path in the model.

    Attributes:
        kernels_alive, kernels_total: {Gabor bank: kernels alive / all}; alive: relative strength at
            least the threshold (`GaborSparsity.alive`). Empty without Gabor banks.
        groups_alive, groups_total: {group label: channel groups alive / all}, labels like
            'backbone.conv1 out' or 'layer1.0.conv2+layer1.1.conv2 out' (`GaborSparsity.groups_alive`).
        threshold: the relative strength below which a kernel or group counts as dead.
    """

    kernels_alive: dict[str, int] = field(default_factory=dict)
    kernels_total: dict[str, int] = field(default_factory=dict)
    groups_alive: dict[str, int] = field(default_factory=dict)
    groups_total: dict[str, int] = field(default_factory=dict)
    threshold: float = DEFAULT_THRESHOLD

    @property
    def kernels(self) -> tuple[int, int]:
        """(alive, total) kernels over all Gabor banks."""
        return sum(self.kernels_alive.values()), sum(self.kernels_total.values())

    @property
    def groups(self) -> tuple[int, int]:
        """(alive, total) channel groups over all labels."""
        return sum(self.groups_alive.values()), sum(self.groups_total.values())

    def to_dict(self, per_label: bool = False) -> dict[str, int | float]:
        """Plain numbers for a logger (`self.log_dict(...)`, `writer.add_scalar` per key): the totals,
        and with `per_label` also 'groups_alive/LABEL' and 'kernels_alive/BANK'."""
        (ka, kt), (ga, gt) = self.kernels, self.groups
        out: dict[str, int | float] = {"groups_alive": ga, "groups_total": gt, "groups_alive_fraction": ga / gt if gt else 1.0,
                                       "kernels_alive": ka, "kernels_total": kt}
        if per_label:
            out.update({f"groups_alive/{k}": v for k, v in self.groups_alive.items()})
            out.update({f"kernels_alive/{k}": v for k, v in self.kernels_alive.items()})
        return out

    def __str__(self) -> str:
        (ka, kt), (ga, gt) = self.kernels, self.groups
        groups = f"groups alive {ga}/{gt} ({100 * ga / gt:.0f}%)" if gt else "no channel groups"
        return f"{groups}, kernels alive {ka}/{kt}" if kt else f"{groups}, no Gabor banks"


def _input_shape(example_input: object) -> tuple[int, ...]:
    """(C, H, W) from a Tensor[N, C, H, W] or a shape (C, H, W)."""
    if isinstance(example_input, Tensor):
        if example_input.dim() == 4:
            return tuple(example_input.shape[1:])
        got = f"a Tensor of shape {list(example_input.shape)}"
    elif isinstance(example_input, Sequence) and not isinstance(example_input, str):
        shape = tuple(example_input)
        if len(shape) == 3 and all(is_int(d) and d > 0 for d in shape):
            return shape
        got = repr(example_input)
    else:
        got = f"a {type(example_input).__name__}"
    raise InputShapeError(f"`example_input` must be a Tensor[N, C, H, W] the model takes, or its shape (C, H, W); got {got}")


def _check_strength(strength: object) -> float:
    check_finite(strength, "`strength`", TrainingError)
    if strength < 0:
        raise TrainingError(f"`strength` must be >= 0 (0 disables the pressure), not {strength!r}")
    return strength


class Pressure:
    """The sparsity pressure on `model`, for any training loop: `loss + pressure()`.

    Args:
        model: the model trained (whole: a classifier, a detector, ...). Its modules must not change
            afterwards (the channel groups are found once); make a new Pressure after surgery.
        example_input: a Tensor[N, C, H, W] the model takes (only its shape is used), or (C, H, W).
        structure: "channel" (default): whole channel groups are pressed too, which is what turns into
            speed; "kernel": single Gabor kernels only (see `gaborprune.sparsity`).
        scope: "all" (default): the channel groups of every convolution (plain ones by their
            BatchNorm gain; needs structure "channel"); "banks": those of the Gabor banks only.
        strength: the factor on the penalty (>= 0; 0 disables it). Settable, e.g. for a warm-up.
        module: the part of the model to press, by module path ("" for the whole model); None
            (default): the whole model when torch.fx traces it, else its `backbone`.

    Raises:
        InputShapeError: `example_input` is neither a Tensor[N, C, H, W] nor a shape (C, H, W).
        TrainingError: a bad `strength`, or nothing to press (no Gabor banks with scope "banks").
        GaborPruneError: an unknown `structure` or `scope`; PruneError: a `module` that is not a
            traceable module of the model, or a model that does not trace and has no `backbone`.
    """

    def __init__(self, model: nn.Module, example_input: Tensor | Sequence[int], structure: str = "channel", scope: str = "all",
                 strength: float = 0.05, module: str | None = None) -> None:
        self._setup(model, _input_shape(example_input), structure, scope, strength, module)
        if not self.sparsity:
            where = self.part.describe()
            if scope == "banks":
                raise TrainingError(f"{where} has no Gabor banks to press with `scope` banks; convert some layers first "
                                    "(`gp.gaborize_`) or use `scope` 'all'")
            note = self.sparsity.groups.note if self.sparsity.groups is not None else None
            raise TrainingError(f"{where} has no convolution channels to press{f' ({note})' if note else ''}; "
                                "name the part holding the convolutions with `module`")

    @classmethod
    def _for_finetune(cls, model: nn.Module, input_shape: tuple[int, int, int], structure: str, scope: str, strength: float) -> Pressure:
        """The pressure of `finetune_`: the whole model, and nothing to press is allowed (the run
        then trains without it and reports no banks), as the loop always has."""
        from gaborprune.prune.part import Part
        from gaborprune.sparsity import GaborSparsity

        self = cls.__new__(cls)
        self.strength = strength
        self.part = Part("", tuple(input_shape))
        self.sparsity = GaborSparsity(model, self.part.input_shape, structure, scope)
        self._device_of = model
        return self

    def _setup(self, model: nn.Module, input_shape: tuple[int, ...], structure: str, scope: str, strength: float,
               module: str | None) -> None:
        from gaborprune.prune.part import analysed_part  # the prune package is heavy; import it when used
        from gaborprune.sparsity import GaborSparsity

        self.strength = strength
        # checked before the analysis, which can take seconds on a big model (GaborSparsity checks the same)
        if structure not in STRUCTURES:
            raise TrainingError(f"unknown `structure` {structure!r}; known: {', '.join(STRUCTURES)}")
        if scope not in SCOPES:
            raise TrainingError(f"unknown `scope` {scope!r}; known: {', '.join(SCOPES)}")
        if scope == "all" and structure != "channel":
            raise TrainingError("`scope` all presses channel groups of every convolution, which `structure` kernel does not press; "
                                "use `structure` channel or `scope` banks")
        part, analysis = analysed_part(model, input_shape, module)  # as `prune_model_` finds it
        self.part = part
        #: The penalty's terms, counts and channel groups, on the part (its names are the part's own).
        self.sparsity = GaborSparsity(part.of(model), part.input_shape, structure, scope, analysis=analysis)
        self._device_of = part.of(model)

    @property
    def strength(self) -> float:
        """The factor on the penalty (>= 0)."""
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._strength = _check_strength(value)

    def __call__(self) -> Tensor:
        """strength x the penalty: a differentiable scalar Tensor on the model's device, to add to the
        loss of each training step (after the forward pass, inside `tracking`). Strength 0 gives an
        exact 0 without computing the penalty."""
        if not self._strength:
            p = next(self._device_of.parameters(), None)
            return torch.zeros((), device=p.device if p is not None else None,
                               dtype=p.dtype if p is not None and p.is_floating_point() else None)
        return self._strength * self.sparsity.penalty()

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Within it, `pressure()` reuses the Gabor kernels of the latest forward pass (with autograd)
        instead of computing them again, visibly faster on a GPU. Call it once per forward pass, before
        the backward pass; outside it, or after a forward pass without autograd, it computes them."""
        with self.sparsity.track_forward():
            yield

    def _full_label(self, label: str) -> str:
        """A group label (`ChannelGroup.label`, 'a+b out') with the whole model's module paths."""
        names, kind = label.rsplit(" ", 1)
        return f"{'+'.join(self.part.full(n) for n in names.split('+'))} {kind}"

    @torch.no_grad()
    def report(self, threshold: float = DEFAULT_THRESHOLD) -> PressureReport:
        """What is alive now (kernels and channel groups whose relative strength is at least `threshold`)."""
        check_finite(threshold, "`threshold`", TrainingError)
        s, full, label = self.sparsity, self.part.full, self._full_label
        return PressureReport({full(n): v for n, v in s.alive(threshold).items()}, {full(n): v for n, v in s.totals().items()},
                              {label(k): v for k, v in s.groups_alive(threshold).items()}, {label(k): v for k, v in s.groups_total().items()},
                              threshold)

    def __repr__(self) -> str:
        s = self.sparsity
        return f"Pressure(strength={self._strength}, structure={s.structure!r}, scope={s.scope!r}, part={self.part.describe()})"
