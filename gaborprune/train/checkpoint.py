"""Checkpoint files of a fine-tuning run, beside its output OUT.pt:

    OUT.last.pt        a recipe plus the training state (optimiser, schedule, scaler, RNG, epoch):
                       written atomically every epoch; `--resume OUT.last.pt` continues exactly
    OUT.best.pt        the recipe of the epoch with the best test accuracy
    OUT.metrics.jsonl  one strict-JSON object per epoch, rewritten whole (atomically) every epoch

A resume file's training state is validated, field by field, before anything of it is used or any
file is written: a malformed one is refused with one line naming the field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gaborprune._io import _first_line, to_json, write_text
from gaborprune._validate import is_int
from gaborprune.errors import GaborPruneError
from gaborprune.models import fit_state_dict
from gaborprune.recipe import Recipe, read_payload, save_payload, save_recipe
from gaborprune.train.config import LEGACY_SETTINGS, TrainConfig

NOT_RESUMABLE = "the checkpoint is not a resumable OUT.last.pt (it may be corrupt)"


class Checkpoints:
    def __init__(self, output: str | Path) -> None:
        output = Path(output)
        if not output.name or output.name == ".." or output.is_dir():  # '' and '.' arrive as Path('.')
            raise GaborPruneError(f"output '{output}' is a directory; give a file path")
        stem = output.name.removesuffix(".pt")
        self.last = output.with_name(f"{stem}.last.pt")
        self.best = output.with_name(f"{stem}.best.pt")
        self.metrics = output.with_name(f"{stem}.metrics.jsonl")
        self._records: list[dict] = []

    @property
    def paths(self) -> list[Path]:
        return [self.last, self.best, self.metrics]

    def start(self, history: list[dict]) -> None:
        """Begin the metrics log with a resumed run's epochs (a new run's log appears with its first epoch)."""
        self._records = list(history)
        if self._records:
            self._write_metrics()

    def log(self, record: dict) -> None:
        self._records.append(record)
        self._write_metrics()

    def _write_metrics(self) -> None:
        # rewritten whole rather than appended: a failed write (full disk) leaves the previous log, never a torn line
        write_text(self.metrics, "".join(to_json(r) + "\n" for r in self._records), force=True)

    def save_last(self, model: nn.Module, recipe: Recipe, train_state: dict, config: TrainConfig, data: str) -> None:
        save_payload(self.last, model, recipe, {"train_state": train_state | {"config": config.to_dict(), "data": data}}, force=True)

    def save_best(self, model: nn.Module, recipe: Recipe) -> None:
        save_recipe(self.best, model, recipe, force=True)

    @staticmethod
    def load_train_state(path: str | Path, model: nn.Module, recipe: Recipe, config: TrainConfig, data: str) -> dict:
        """Load a resumable checkpoint's weights into `model` and return its training state.

        The state's fields are checked for type and range here; `restore` checks that the
        optimiser, schedule, scaler and RNG states fit this run as it loads them.

        Raises:
            GaborPruneError: not a resumable checkpoint, a malformed one, or one from a different run.
        """
        payload = read_payload(path)
        state = payload.get("train_state")
        if not isinstance(state, dict):
            raise GaborPruneError(f"'{path}' is a recipe without training state; resume from the OUT.last.pt that finetune writes")
        _check_fields(path, state)
        # the fine-tuning steps differ by design (the checkpoint's records this run, under way); the rest must match
        written = Recipe.from_payload(payload, str(path))
        theirs = {"model source": payload["source"], "conversions": [s.to_dict() for s in written.conversions], "dataset": state["data"]}
        ours = {"model source": recipe.source.to_dict(), "conversions": [s.to_dict() for s in recipe.conversions], "dataset": data}
        theirs |= {f"`{k}`": v for k, v in (LEGACY_SETTINGS | state["config"]).items()}
        ours |= {f"`{k}`": v for k, v in config.to_dict().items()}
        for key in ours:
            if theirs.get(key) != ours[key]:
                raise GaborPruneError(
                    f"resume file '{path}' is from a different run: its {key} is {theirs.get(key)!r}, this run's is {ours[key]!r}; "
                    "repeat the original command with `resume`, or start a new run"
                )
        if written.prunes != recipe.prunes:
            raise GaborPruneError(f"resume file '{path}' is from a different run: its prune plan differs")
        if not 0 <= state["epoch"] <= config.epochs:
            raise _malformed(path, "epoch", f"is {state['epoch']}, outside 0..{config.epochs}")
        if len(state["history"]) != state["epoch"]:
            raise _malformed(path, "history", f"has {len(state['history'])} epochs, its epoch is {state['epoch']}")
        fit_state_dict(model, payload["state_dict"], f"the checkpoint '{path}'", f"model '{recipe.source.spec}'")
        return state

    @staticmethod
    def restore(path: str | Path, state: dict, *, optimizer: torch.optim.Optimizer, scheduler, scaler, data_rng: torch.Generator,
                device: torch.device) -> None:
        """Load a training state from `load_train_state` into this run's optimiser, schedule, scaler and RNGs.

        Raises:
            GaborPruneError: a state that does not fit this run (names the field).
        """
        _check_like(path, "optimizer.param_groups", state["optimizer"].get("param_groups"), optimizer.state_dict()["param_groups"])
        _check_like(path, "scheduler", state["scheduler"], scheduler.state_dict())
        if "last_epoch" not in state["scheduler"]:
            raise _malformed(path, "scheduler", "lacks last_epoch")
        _check_like(path, "scaler", state["scaler"], scaler.state_dict())
        rng = state["rng"]
        _check_like(path, "rng.torch", rng["torch"], torch.get_rng_state())
        _check_like(path, "rng.data", rng["data"], data_rng.get_state())
        for name, load, value in (
            ("optimizer", optimizer.load_state_dict, state["optimizer"]),
            ("scheduler", scheduler.load_state_dict, dict(state["scheduler"])),  # LambdaLR pops from the dict it loads
            ("scaler", scaler.load_state_dict, state["scaler"]),
            ("rng.torch", torch.set_rng_state, rng["torch"]),
            ("rng.data", data_rng.set_state, rng["data"]),
        ):
            try:
                load(value)
            except (ValueError, KeyError, RuntimeError, TypeError, IndexError, AttributeError) as e:
                raise _malformed(path, name, f"does not load into this run ({_first_line(e)})") from None
        for group in optimizer.param_groups:  # load_state_dict does not look at buffer shapes; a step would
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    if isinstance(value, Tensor) and value.ndim and value.shape != p.shape:
                        raise _malformed(path, f"optimizer state '{key}'", f"has shape {list(value.shape)} for a parameter of shape {list(p.shape)}")
        if device.type == "cuda" and rng.get("cuda") is not None:
            try:
                torch.cuda.set_rng_state(rng["cuda"], device)
            except (RuntimeError, TypeError, ValueError) as e:
                raise _malformed(path, "rng.cuda", f"does not load ({_first_line(e)})") from None


def _check_fields(path, state: dict) -> None:
    """Types of the training state's fields (their fit to this run is checked later)."""

    def need(name: str, ok: bool, what: str) -> None:
        if name not in state:
            raise _malformed(path, name, "is missing")
        if not ok:
            raise _malformed(path, name, f"is {_describe(state[name])}, not {what}")

    need("config", isinstance(state.get("config"), dict), "a dict of fine-tuning settings")
    try:
        TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError, GaborPruneError) as e:
        raise _malformed(path, "config", f"is not a valid fine-tuning config ({_first_line(e)})") from None
    need("data", isinstance(state.get("data"), str), "a dataset spec")
    need("epoch", is_int(state.get("epoch")), "an integer")
    need("best_accuracy", _is_number(state.get("best_accuracy")), "a finite number")
    need("history", isinstance(state.get("history"), list) and all(isinstance(r, dict) for r in state.get("history") or []),
         "a list of epoch records")
    for name in ("optimizer", "scheduler", "scaler", "rng"):
        need(name, isinstance(state.get(name), dict), "a dict")
    for name in ("torch", "data"):
        if name not in state["rng"]:
            raise _malformed(path, f"rng.{name}", "is missing")


def _check_like(path, where: str, theirs: Any, ours: Any) -> None:
    """`theirs` has the structure of this run's fresh `ours`: shared keys, list lengths, scalar types, tensor shapes.

    Keys only one side has are allowed (another torch version may add some); `load_state_dict` checks the rest.
    """
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            raise _malformed(path, where, f"is {_describe(theirs)}, not a dict")
        for key in ours.keys() & theirs.keys():
            _check_like(path, f"{where}.{key}", theirs[key], ours[key])
    elif isinstance(ours, (list, tuple)):
        if not isinstance(theirs, (list, tuple)) or len(theirs) != len(ours):
            raise _malformed(path, where, f"is {_describe(theirs)}, not a list of {len(ours)}")
        for i, (a, b) in enumerate(zip(theirs, ours)):
            _check_like(path, f"{where}[{i}]", a, b)
    elif isinstance(ours, Tensor):
        if not isinstance(theirs, Tensor) or theirs.dtype != ours.dtype or theirs.shape != ours.shape:
            raise _malformed(path, where, f"is {_describe(theirs)}, not a {ours.dtype} tensor of shape {list(ours.shape)}")
    elif isinstance(ours, bool) or isinstance(ours, str):
        if type(theirs) is not type(ours):
            raise _malformed(path, where, f"is {_describe(theirs)}, not a {type(ours).__name__}")
    elif isinstance(ours, (int, float)):
        if not _is_number(theirs):
            raise _malformed(path, where, f"is {_describe(theirs)}, not a finite number")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    text = repr(x)
    return text if len(text) <= 40 else f"a {type(x).__name__}"


def _malformed(path, field: str, problem: str) -> GaborPruneError:
    return GaborPruneError(f"resume file '{path}': its {field} {problem}; {NOT_RESUMABLE}")

