"""The fine-tuning loop and evaluation.

`finetune_` trains in place with the Gabor sparsity pressure, evaluates every epoch, and (on rank 0)
writes a resumable checkpoint every epoch, the best recipe, and a JSON-lines metrics log. It never
prints: progress goes to the `on_step` / `on_epoch` callbacks. It does not change the recipe it is
given: its result's `step` is the run's record, which the caller appends (`recipe.with_step`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gaborprune._validate import check_int
from gaborprune.convert.layer import GaborConv2d
from gaborprune.errors import TrainingError
from gaborprune.norms import batch_norms, recalibrate_norms_ as recalibrate_batches_
from gaborprune.probe import probe
from gaborprune.recipe import Recipe
from gaborprune.train.checkpoint import Checkpoints
from gaborprune.train.config import FinetuneStep, TrainConfig
from gaborprune.train.distributed import Dist
from gaborprune.train.pressure import Pressure


@dataclass(frozen=True)
class EvalResult:
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, classes))
    loss: float
    samples: int


@dataclass
class TrainResult:
    epochs: int
    best_accuracy: float
    final_accuracy: float
    kernels_alive: dict[str, int]
    kernels_total: dict[str, int]
    images_per_second: float
    device: str
    history: list[dict] = field(default_factory=list)
    groups_total: dict[str, int] = field(default_factory=dict)  # {label: n}, e.g. {"conv1 out": 16}: see gaborprune.prune.groups
    groups_alive: dict[str, int] = field(default_factory=dict)
    groups_notes: dict[str, str] = field(default_factory=dict)  # {label: condition on a dead group's channel}
    groups_missing: list[str] = field(default_factory=list)  # bank sides without groups, and why
    group_weights: str = ""  # what the groups are weighed by in the pressure: equal, macs or latency
    cost_table: dict = field(default_factory=dict)  # latency_aware: gaborprune.export.costs.CostTable.to_dict()
    step: FinetuneStep | None = None  # what a recipe records of the run (`Recipe.with_step`)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "step"}


@dataclass(frozen=True)
class StepInfo:
    epoch: int
    step: int
    steps: int
    loss: float
    accuracy: float
    images_per_second: float


def output_classes(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """The size of the model's output for one input (its number of classes).

    Raises:
        TrainingError: the model's output is not logits [N, classes] (a detector's boxes, a
            segmenter's masks): the built-in loop trains and evaluates classifiers only."""
    out = probe(model, input_shape)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        what = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a tensor of shape {list(out.shape)}"
        raise TrainingError(f"the model's output ({what}) is not logits [N, classes]: fine-tuning and evaluation here are for classifiers; "
                            "train a detector or segmenter in your own loop with `gp.Pressure` (README: Your own training loop)")
    return out.shape[-1]


def check_classes(model: nn.Module, recipe: Recipe, num_classes: int, data_name: str) -> None:
    outputs = output_classes(model, recipe.input_shape)
    if outputs != num_classes:
        raise TrainingError(
            f"model '{recipe.source.spec}' has {outputs} outputs but dataset '{data_name}' has {num_classes} classes; "
            f"build the model with `num_classes` {num_classes}"
        )


@torch.no_grad()
def evaluate(model: nn.Module, data, device: torch.device, *, batch_size: int = 256, dist: Dist = Dist(),
             amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> EvalResult:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy on `data`, sharded over ranks.

    A batch larger than the data is one batch of all of it (nothing is dropped in evaluation)."""
    check_int(batch_size, "`batch_size`")
    was_training = model.training
    model.eval()
    k = min(5, data.num_classes)
    correct1 = correct5 = loss_sum = 0.0
    count = 0
    for x, y in data.batches(batch_size, train=False, rank=dist.rank, world=dist.world):
        x, y = _to(x, device, channels_last), y.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        top = logits.topk(k, dim=1).indices
        correct1 += float((top[:, 0] == y).sum())
        correct5 += float((top == y[:, None]).any(dim=1).sum())
        count += len(y)
    model.train(was_training)
    correct1, correct5, loss_sum, count = dist.sum([correct1, correct5, loss_sum, count], device)
    if count == 0:
        raise TrainingError("the test split is empty")
    return EvalResult(100 * correct1 / count, 100 * correct5 / count, loss_sum / count, int(count))


@torch.no_grad()
def recalibrate_norms_(model: nn.Module, data, batch_size: int, device: torch.device, *, dist: Dist = Dist(),
                       channels_last: bool = False) -> None:
    """Re-estimate every BatchNorm's running statistics as the plain average over one pass of `data`
    (this rank's shard; averaged over processes), with the training augmentation the statistics were
    learnt under (seeded; on CIFAR-10 resnet20 unaugmented statistics cost 2.6 points, docs/results.md)
    and without gradients (`gaborprune.norms.recalibrate_norms_`)."""
    generator = torch.Generator().manual_seed(dist.rank)
    batches = (x for x, _ in data.batches(batch_size, train=True, generator=generator, rank=dist.rank, world=dist.world))
    recalibrate_batches_(model, batches, forward=lambda x: model(_to(x, device, channels_last)))
    if batch_norms(model):  # every rank joins the collective
        dist.average_([t for m in batch_norms(model) for t in (m.running_mean, m.running_var)])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights and Gabor amplitudes only."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, GaborConv2d):
                (decay if name == "amplitude" else no_decay).append(p)
            elif name == "weight" and p.ndim > 1:
                decay.append(p)
            else:
                no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: TrainConfig, steps_per_epoch: int):
    groups = param_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=config.lr)
    total = config.epochs * steps_per_epoch
    warmup = min(round(min(config.warmup_epochs, config.epochs) * steps_per_epoch), total - 1)  # a huge finite value would overflow round()

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def amp_dtype_for(device: torch.device, enabled: bool) -> torch.dtype | None:
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _to(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def finetune_(
    model: nn.Module,
    recipe: Recipe,
    train_data,
    test_data,
    config: TrainConfig,
    *,
    device: torch.device,
    data_name: str,
    checkpoints: Checkpoints | None = None,
    resume: str | Path | None = None,
    dist: Dist = Dist(),
    on_step: Callable[[StepInfo], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train `model` in place; returns the run's summary, whose `step` the caller appends to its
    recipe. See the module docstring.

    Args:
        recipe: the recipe `model` was built from: checks the classes, and the checkpoints written
            are it with this run's step so far (it is not changed).

    Raises:
        TrainingError: among others, a model whose outputs do not match the classes, or a batch
            larger than the training split (both before any training).
    """
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(config.seed)
    data_rng = torch.Generator().manual_seed(config.seed)
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    amp_dtype = amp_dtype_for(device, config.amp)

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    check_classes(model, recipe, train_data.num_classes, data_name)
    if config.batch_size > len(train_data):
        # one step per epoch on a split that small trains next to nothing; say so instead of reporting chance accuracy
        raise TrainingError(f"`batch_size` {config.batch_size} is larger than the {len(train_data)} training samples of '{data_name}'; "
                            f"give `batch_size` {len(train_data)} or less")
    pressure = Pressure._for_finetune(model, recipe.input_shape, config.structure, config.scope, config.sparsity)
    sparsity = pressure.sparsity  # the channel groups, found once, weighed by MACs
    cost_table = {}
    if config.latency_aware and config.sparsity and sparsity.groups.groups:
        from gaborprune.export.costs import measure

        # rank 0 times the layers (ranks timing at once would slow each other); all then weigh alike
        table = measure(model, sparsity.groups, batch=config.latency_batch) if dist.main else None
        saved = table.saved_ms(sparsity.groups) if table else [0.0] * len(sparsity.groups.groups)
        sparsity.weigh(dist.sum(saved, device), "latency")
        cost_table = table.to_dict() if table else {}
    train_data, test_data = train_data.to(device), test_data.to(device)
    per_rank = max(1, config.batch_size // dist.world)
    shard = len(train_data) // dist.world
    drop_last = shard > per_rank  # BatchNorm cannot train on a final batch of one
    steps_per_epoch = shard // per_rank if drop_last else math.ceil(shard / per_rank)
    if steps_per_epoch == 0:
        raise TrainingError(f"the training split of '{data_name}' has {len(train_data)} samples, too few for {dist.world} processes")
    optimizer, scheduler = make_optimizer(model, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, best, history = 0, -1.0, []
    run = recipe  # the recipe with this run's step so far, as the checkpoints record it
    if resume is not None:
        state = Checkpoints.load_train_state(resume, model, recipe, config, data_name)
        Checkpoints.restore(resume, state, optimizer=optimizer, scheduler=scheduler, scaler=scaler, data_rng=data_rng, device=device)
        start_epoch, best, history = state["epoch"], state["best_accuracy"], list(state["history"])

    def train_state(epoch: int) -> dict:
        return {
            "epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "best_accuracy": best, "history": history,
            "rng": {"torch": torch.get_rng_state(), "data": data_rng.get_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        }

    net = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    if checkpoints and dist.main:
        checkpoints.start(history)
        if resume is None:
            checkpoints.save_last(model, run, train_state(0), config, data_name)  # Ctrl-C in epoch 1 is resumable

    ips = 0.0
    # the penalty reuses the kernels of each step's forward pass (not under torch.compile, whose graphs keep no module state)
    track = pressure.tracking() if config.sparsity and sparsity and not config.compile else contextlib.nullcontext()
    with track:
        for epoch in range(start_epoch, config.epochs):
            net.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            seen = 0
            t0 = time.perf_counter()
            report_every = max(1, steps_per_epoch // 20)
            batches = train_data.batches(per_rank, train=True, generator=data_rng, rank=dist.rank, world=dist.world, drop_last=drop_last)
            for step, (x, y) in enumerate(batches):
                x, y = _to(x, device, channels_last), y.to(device, non_blocking=True)
                with _autocast(device, amp_dtype):
                    logits = net(x)
                    loss = criterion(logits, y)
                total = loss.float()
                if config.sparsity and sparsity:
                    total = total + pressure()
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += loss.detach().float() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                if on_step and dist.main and ((step + 1) % report_every == 0 or step + 1 == steps_per_epoch):
                    mean_loss = float(loss_sum) / seen  # one sync per report, not per step
                    on_step(StepInfo(epoch + 1, step + 1, steps_per_epoch, mean_loss, 100 * float(correct) / seen,
                                     seen * dist.world / (time.perf_counter() - t0)))
            train_loss, train_correct, train_seen = dist.sum([float(loss_sum), float(correct), float(seen)], device)
            elapsed = time.perf_counter() - t0
            if not math.isfinite(train_loss):
                where = f"; the last good checkpoint is '{checkpoints.last}'" if checkpoints else ""
                raise TrainingError(f"the loss became non-finite in epoch {epoch + 1}{where}; lower `lr` or `sparsity`")
            ips = train_seen / elapsed
            if config.recalibrates:
                recalibrate_norms_(model, train_data, per_rank, device, dist=dist, channels_last=channels_last)
            result = evaluate(model, test_data, device, dist=dist, amp_dtype=amp_dtype, channels_last=channels_last)
            now = pressure.report()
            record = {
                "epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "train_loss": train_loss / train_seen,
                "train_accuracy": 100 * train_correct / train_seen, "test_loss": result.loss, "test_top1": result.top1,
                "test_top5": result.top5, "images_per_second": ips, "seconds": elapsed, "kernels_alive": now.kernels_alive,
                "groups_alive": now.groups_alive, "groups_total": now.groups_total,
            }
            if sparsity:
                with torch.no_grad():
                    record["sparsity_penalty"] = float(sparsity.penalty())
            history.append(record)
            improved = result.top1 > best
            best = max(best, result.top1)
            run = recipe.with_step(FinetuneStep(config, data_name, epoch + 1, best, tuple(history)))
            if checkpoints and dist.main:
                checkpoints.save_last(model, run, train_state(epoch + 1), config, data_name)
                checkpoints.log(record)
                if improved:
                    checkpoints.save_best(model, run)
            if on_epoch and dist.main:
                on_epoch(record)

    final = history[-1]["test_top1"] if history else evaluate(model, test_data, device, dist=dist).top1
    notes = {g.label: g.note for g in sparsity.groups.groups if g.note}
    best = max(best, final)
    alive = pressure.report()
    return TrainResult(len(history), best, final, alive.kernels_alive, alive.kernels_total, ips, str(device), history,
                       alive.groups_total, alive.groups_alive, notes, sparsity.groups.reasons(), sparsity.weighed_by, cost_table,
                       FinetuneStep(config, data_name, len(history), best, tuple(history)))
