"""Fine-tuning settings, and the record of a run that a recipe keeps, as validated data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from gaborprune._validate import check_finite, check_int, check_seed
from gaborprune.errors import GaborPruneError
from gaborprune.scopes import SCOPES, STRUCTURES

OPTIMIZERS = ("sgd", "adamw")
#: The settings of runs recorded before a field existed: before `structure`, runs trained with the
#: kernel pressure; before `latency_aware`, without it. Older records are read with these under them.
LEGACY_SETTINGS = {"structure": "kernel", "latency_aware": False, "latency_batch": 1}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a fine-tuning run (the device is chosen at run time, not here).

    Attributes:
        epochs, batch_size: the global batch size; under torchrun each of N processes takes 1/N.
        lr: peak learning rate, reached after `warmup_epochs` of linear warm-up, then cosine to 0.
        optimizer: "sgd" (momentum, optionally Nesterov) or "adamw".
        weight_decay: on conv/linear weights and Gabor amplitudes; never on biases, norms or Gabor
            shape parameters (orientation, width, wavelength, phase, aspect ratio).
        sparsity: strength of the Gabor sparsity pressure (0 disables); see `gaborprune.sparsity`.
        structure: "channel" (default): the pressure also pushes whole channel groups to zero, the
            kernels whose death removes a channel, which is what turns into speed; "kernel": single
            kernels only (the seed paper's pressure, which `reproduce` keeps).
        latency_aware: weigh each channel group by the ONNX Runtime time its removal saves, from a
            per-layer cost table measured before training (`gaborprune.export.costs`), instead of
            by the MACs it saves. Needs structure "channel" (the kernel pressure has no groups).
        scope: "banks" (default): the channel groups of the Gabor banks; "all": of every
            convolution, plain ones measured by their BatchNorm gain (needs structure "channel").
        recalibrate: re-estimate the BatchNorm running statistics on the training split before each
            evaluation (`gaborprune.train.loop.recalibrate_norms_`). None (default): exactly when the
            pressure reaches plain layers (scope "all" with sparsity > 0), whose channels it shrinks
            faster than the running averages follow: on resnet20 a run's test accuracy read 89%
            with the stale statistics and 97% with fresh ones.
        latency_batch: the batch size that cost table is measured at (1 thread).
        amp: mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling).
        channels_last: memory format; None means on for CUDA, off for CPU.
        compile: wrap the model in torch.compile.
        deterministic: deterministic algorithms (slower), for bit-reproducible runs.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    sparsity: float = 0.0
    structure: str = "channel"
    scope: str = "banks"
    latency_aware: bool = False
    latency_batch: int = 1
    recalibrate: bool | None = None
    seed: int = 0
    amp: bool = True
    channels_last: bool | None = None
    compile: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        check_seed(self.seed, "`seed`")
        check_int(self.epochs, "`epochs`")
        check_int(self.batch_size, "`batch_size`")
        check_int(self.latency_batch, "`latency_batch`")
        for name in ("lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing", "sparsity"):
            check_finite(getattr(self, name), f"`{name}`")
        checks = [
            (self.lr > 0, f"`lr` must be positive, not {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"unknown `optimizer` '{self.optimizer}'; known: {', '.join(OPTIMIZERS)}"),
            (0 <= self.momentum < 1, f"`momentum` must be in [0, 1), not {self.momentum}"),
            (self.weight_decay >= 0, f"`weight_decay` must be >= 0, not {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"`warmup_epochs` must be >= 0, not {self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1, f"`label_smoothing` must be in [0, 1), not {self.label_smoothing}"),
            (self.sparsity >= 0, f"`sparsity` must be >= 0 (0 disables), not {self.sparsity}"),
            (self.structure in STRUCTURES, f"unknown `structure` '{self.structure}'; known: {', '.join(STRUCTURES)}"),
            (self.scope in SCOPES, f"unknown `scope` '{self.scope}'; known: {', '.join(SCOPES)}"),
            (not (self.scope == "all" and self.structure == "kernel"),
             "`scope` all presses channel groups of every convolution, which `structure` kernel does not press; use `structure` channel"),
            (self.recalibrate in (None, True, False), f"`recalibrate` must be true, false or unset, not {self.recalibrate!r}"),
            (isinstance(self.latency_aware, bool), f"`latency_aware` must be true or false, not {self.latency_aware!r}"),
            (not (self.latency_aware and self.structure == "kernel"),
             "`latency_aware` weighs channel groups, which `structure` kernel does not press; use `structure` channel or drop `latency_aware`"),
        ]
        for ok, message in checks:
            if not ok:
                raise GaborPruneError(message)

    @property
    def recalibrates(self) -> bool:
        """Whether BatchNorm statistics are re-estimated before each evaluation (see `recalibrate`)."""
        return self.recalibrate if self.recalibrate is not None else self.scope == "all" and self.sparsity > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**d)


@dataclass(frozen=True)
class FinetuneStep:
    """A fine-tuning run as a recipe records it, in order with the conversions and prunes.

    Training changes weights, not the architecture, so replay skips it; it says how the recipe's
    weights came about (and, by its place among the steps, at which stage).

    Attributes:
        config: the run's settings.
        data: the dataset spec it trained on.
        epochs_done: epochs completed (fewer than `config.epochs` in a checkpoint of a run under way).
        best_accuracy: the best top-1 percent on the test split over those epochs.
        history: one record per epoch (`finetune_`'s metrics: losses, accuracies, kernels alive, ...).
    """

    config: TrainConfig
    data: str
    epochs_done: int
    best_accuracy: float
    history: tuple[dict, ...] = ()
    kind: ClassVar[str] = "finetune"

    def __post_init__(self) -> None:
        object.__setattr__(self, "history", tuple(self.history))

    def replay_(self, model):
        return model

    def to_dict(self) -> dict:
        return {"kind": self.kind, "config": self.config.to_dict(), "data": self.data, "epochs_done": self.epochs_done,
                "best_accuracy": self.best_accuracy, "history": [dict(r) for r in self.history]}

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneStep:
        return cls(TrainConfig.from_dict(d["config"]), d["data"], d["epochs_done"], d["best_accuracy"], tuple(d.get("history") or ()))
