"""Checkpoint files of a fine-tuning run, beside its output OUT.pt:

    OUT.last.pt        a recipe plus the training state (optimiser, schedule, scaler, RNG, epoch):
                       written atomically every epoch; `--resume OUT.last.pt` continues exactly
    OUT.best.pt        the recipe of the epoch with the best test accuracy
    OUT.metrics.jsonl  one JSON object per epoch
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from gaborprune.errors import GaborPruneError
from gaborprune.models import fit_state_dict
from gaborprune.recipe import Recipe, read_payload, save_payload, save_recipe
from gaborprune.train.config import TrainConfig


class Checkpoints:
    def __init__(self, output: str | Path) -> None:
        output = Path(output)
        stem = output.name.removesuffix(".pt")
        self.last = output.with_name(f"{stem}.last.pt")
        self.best = output.with_name(f"{stem}.best.pt")
        self.metrics = output.with_name(f"{stem}.metrics.jsonl")

    @property
    def paths(self) -> list[Path]:
        return [self.last, self.best, self.metrics]

    def start(self, history: list[dict]) -> None:
        """Begin the metrics log: empty for a new run, the checkpoint's epochs for a resumed one."""
        self.metrics.parent.mkdir(parents=True, exist_ok=True)
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in history))

    def log(self, record: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def save_last(self, model: nn.Module, recipe: Recipe, train_state: dict, config: TrainConfig, data: str) -> None:
        save_payload(self.last, model, recipe, {"train_state": train_state | {"config": config.to_dict(), "data": data}}, force=True)

    def save_best(self, model: nn.Module, recipe: Recipe) -> None:
        save_recipe(self.best, model, recipe, force=True)

    @staticmethod
    def load_train_state(path: str | Path, model: nn.Module, recipe: Recipe, config: TrainConfig, data: str) -> dict:
        """Load a resumable checkpoint's weights into `model` and return its training state.

        Raises:
            GaborPruneError: not a resumable checkpoint, or one from a different run.
        """
        payload = read_payload(path)
        state = payload.get("train_state")
        if not isinstance(state, dict):
            raise GaborPruneError(f"'{path}' is a recipe without training state; resume from the OUT.last.pt that finetune writes")
        theirs = {"model source": payload["source"], "conversions": payload["conversions"], "dataset": state["data"]}
        ours = {"model source": recipe.source.to_dict(), "conversions": recipe.conversions, "dataset": data}
        theirs |= {f"--{k.replace('_', '-')}": v for k, v in state["config"].items()}
        ours |= {f"--{k.replace('_', '-')}": v for k, v in config.to_dict().items()}
        for key in ours:
            if theirs.get(key) != ours[key]:
                raise GaborPruneError(
                    f"resume file '{path}' is from a different run: its {key} is {theirs.get(key)!r}, this run's is {ours[key]!r}; "
                    "repeat the original command with --resume, or start a new run"
                )
        if (payload.get("prune_plans") or []) != recipe.prune_plans:
            raise GaborPruneError(f"resume file '{path}' is from a different run: its prune plan differs")
        fit_state_dict(model, payload["state_dict"], f"the checkpoint '{path}'", f"model '{recipe.source.spec}'")
        return state
