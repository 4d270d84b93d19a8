"""Recipes: the project's checkpoint format.

A recipe is an immutable record: a model source, an input shape, and the steps made on the model in
order (conversions, fine-tuning runs, prunes), each with its spec or plan. Verbs never see it: they
take a model and an input shape and return a report whose `step` the caller appends,

    report = gaborize_(model, spec, recipe.input_shape)
    recipe = recipe.with_step(report.step)

so this module depends on `convert/`, `prune/` and `train.config`, and none of them on it.

On disk a recipe is a plain dict of strings, numbers, lists and tensors, so it loads with
`torch.load(weights_only=True)` and nothing in it can run code (format version 2):

    {"format": "gaborprune.recipe", "version": 2, "gaborprune_version": "0.1.0",
     "source": {"spec", "num_classes", "kwargs"}, "input_shape": [C, H, W],
     "steps": [{"kind": "convert", "spec": {...}, "layers": [names]},
               {"kind": "finetune", "config": {...}, "data", "epochs_done", "best_accuracy", "history": [...]},
               {"kind": "prune", "plan": {"kernels", "channels", "spec", "folds", "constants"}}],   # replayed in order
     "metadata": {...},                                     # free-form: the CLI's prune reports, notes
     "state_dict": {name: Tensor}}

The architecture is rebuilt by replay (build the source, replay each step: conversions and prunes
change it, fine-tuning does not), then the state_dict is loaded strictly. Every field is validated
before anything is built.

Format 1 (`conversions`, `prune_plans` with `after_conversions`, the last fine-tuning record in
`metadata["finetune"]`) is read and upgraded: see `_steps_of_v1`.

Recipes are data, and only data: a built-in or `torchvision:` source rebuilds by name, but a
`package.module:factory` source would import and call code that whoever wrote the file chose, so
replay refuses it unless the caller trusts it (`trust_factory=True`, `--trust-factory`, or the module
listed in GABORPRUNE_TRUSTED_MODULES).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gaborprune import __version__
from gaborprune._io import safe_torch_load, save_torch
from gaborprune._validate import check_seed, is_int
from gaborprune.convert.spec import ConversionSpec, ConversionStep
from gaborprune.errors import GaborPruneError, ModelSourceError, RecipeError
from gaborprune.models import (
    TRUST_ENV,
    ModelSource,
    fit_state_dict,
    load_state_dict_file,
    non_finite,
    portable_state_dict,
    state_dict_problems,
    trusted_factory,
)
from gaborprune.models.budget import check_footprint, meta_build, weight_bytes
from gaborprune.prune.plan import PrunePlan, PruneStep, fold_problem
from gaborprune.train.config import LEGACY_SETTINGS, FinetuneStep, TrainConfig

FORMAT = "gaborprune.recipe"
VERSION = 2
_MAX_SIDE, _MAX_INPUT = 16384, 2**26  # a stored input shape beyond these is corruption, not a model
_METADATA_DEPTH = 16  # levels of nesting in metadata; reports nest a few
_SMALL_MODEL = 64 * 2**20  # weight bytes a recipe's source may have beyond 4x its stored weights before it is replayed on meta first
# what replaying validated data can still raise (a layer name the model lacks, a plan that does not fit)
_REPLAY_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError, ArithmeticError)

Step = ConversionStep | PruneStep | FinetuneStep
#: {kind: step class}: what a recipe's steps can be.
STEPS: dict[str, type] = {cls.kind: cls for cls in (ConversionStep, PruneStep, FinetuneStep)}
_STEP_KEYS = {"convert": {"kind", "spec", "layers"}, "prune": {"kind", "plan"},
              "finetune": {"kind", "config", "data", "epochs_done", "best_accuracy", "history"}}
_PLAN_KEYS = {"kernels", "channels", "spec", "folds", "constants"}


@dataclass(frozen=True)
class Recipe:
    """Everything needed to rebuild a model except its weights: where it came from and what was done to it.

    Attributes:
        source: how to build the architecture from nothing.
        input_shape: (C, H, W) of one input.
        steps: the conversions, fine-tuning runs and prunes, in the order they were made.
        metadata: free-form plain data (JSON-like) saved with the recipe.
        origin: the file it was read from, for messages (not compared, not saved).
    """

    source: ModelSource
    input_shape: tuple[int, int, int]
    steps: tuple[Step, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    origin: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "steps", tuple(self.steps))
        for step in self.steps:
            _check_step(step)

    def with_step(self, step: Step) -> Recipe:
        """This recipe with `step` made after its others (a report's `step`: `ConversionReport`,
        `PruneReport`, `TrainResult`, `TargetReport`)."""
        return dataclasses.replace(self, steps=(*self.steps, _check_step(step)))

    def provenance(self) -> dict[str, Any]:
        """What an export records of this recipe (`export_model`'s `provenance`): the source, the
        numbers of conversions and prune plans, and whether a prune removed channels."""
        channels = any(idx for step in self.prunes for sides in step.plan.channels.values() for idx in sides.values())
        return {"source": self.source.spec, "conversions": len(self.conversions), "prune_plans": len(self.prunes), "channels_pruned": channels}

    def with_metadata(self, **entries: Any) -> Recipe:
        """This recipe with `entries` added to (or replacing keys of) its metadata."""
        return dataclasses.replace(self, metadata=self.metadata | entries)

    @property
    def conversions(self) -> tuple[ConversionStep, ...]:
        return tuple(s for s in self.steps if isinstance(s, ConversionStep))

    @property
    def prunes(self) -> tuple[PruneStep, ...]:
        return tuple(s for s in self.steps if isinstance(s, PruneStep))

    @property
    def finetunes(self) -> tuple[FinetuneStep, ...]:
        return tuple(s for s in self.steps if isinstance(s, FinetuneStep))

    def build(self, *, trust_factory: bool = False) -> nn.Module:
        """The architecture by replay, with fresh (not trained) weights.

        Args:
            trust_factory: allow a `package.module:factory` source to be imported and called (it runs
                code the recipe's author chose); without it, only a module listed in
                GABORPRUNE_TRUSTED_MODULES is.

        Raises:
            RecipeError: an untrusted factory source (refused before any import), or a step that
                does not replay on the model.
        """
        where = f"recipe '{self.origin}'" if self.origin else "the recipe"
        spec = self.source.spec
        if self.source.kind == "factory" and not (trust_factory or trusted_factory(spec)):
            raise RecipeError(
                f"{where} names the model factory '{spec}', which rebuilding would import and call (code chosen by whoever wrote the file); "
                f"refused. If you trust it, pass `trust_factory` (trust_factory=True in the API) or set {TRUST_ENV}={spec.partition(':')[0]}"
            )
        return self._replay(where)

    def _replay(self, where: str) -> nn.Module:
        """Build the source and replay the steps (`build`, after its trust check)."""
        label = "its model source"
        try:
            model = self.source.build()
            for i, step in enumerate(self.steps):
                label = f"steps[{i}] ({step.kind})"
                step.replay_(model)
        except GaborPruneError as e:  # already one clear line; say where it came from, keep its type
            raise type(e)(f"{where}, {label}: {e}") from None
        except _REPLAY_ERRORS as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise RecipeError(f"{where}: {label} does not replay on its model ({type(e).__name__}: {detail}); the file may be corrupt") from None
        return model

    def check_fits(self, state: dict[str, torch.Tensor]) -> None:
        """Before `build` allocates anything, build the source on the meta device (no memory) and
        refuse it when its weights and one input's forward pass would not fit in memory: the same
        estimate as a command-line source (`check_footprint`). When the source is much larger than
        `state` (its builder arguments ask for more than the file holds), replay the steps on meta
        too and refuse a `state` that does not fit the result (names, shapes, kinds of number). A
        factory source (code the user trusted) and an architecture that cannot be built on meta are
        left to the real build.

        Raises:
            RecipeError: the estimate exceeds the memory available.
            ModelSourceError: `state` does not fit the architecture (or what `build` raises).
        """
        if self.source.kind == "factory":
            return
        where = f"recipe '{self.origin}'" if self.origin else "the recipe"
        source = meta_build(self.source.build)
        if source is None:
            return
        args = f" with {self.source.kwargs}" if self.source.kwargs else ""
        check_footprint(source, self.input_shape, f"{where} (model '{self.source.spec}'{args})", RecipeError)
        stored = sum(t.numel() * t.element_size() for t in state.values())
        if weight_bytes(source) <= 4 * stored + _SMALL_MODEL:  # proportionate to the file: the real build tells
            return
        # replaying on meta loads torch's Python decompositions (a second): only for a model out of proportion;
        # a step that reads values meta tensors lack returns None, and the real build tells
        model = meta_build(lambda: self._replay(where))
        problems = state_dict_problems(model.state_dict(), state) if model is not None else []
        if problems:
            raise ModelSourceError(f"the state_dict in '{self.origin}' does not fit its own architecture (corrupt recipe?): {'; '.join(problems)}; "
                                   "check the model name and `num_classes`")

    def to_dict(self) -> dict[str, Any]:
        """The file's contents without the state_dict (format `VERSION`)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "gaborprune_version": __version__,
            "source": self.source.to_dict(),
            "input_shape": list(self.input_shape),
            "steps": [s.to_dict() for s in self.steps],
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_payload(cls, obj: dict[str, Any], origin: str | None = None) -> Recipe:
        """The recipe of a validated file's contents (`read_payload`), format 1 upgraded."""
        metadata = dict(obj.get("metadata") or {})
        if obj["version"] == 1:
            steps = _steps_of_v1(obj, metadata)
        else:
            steps = [STEPS[d["kind"]].from_dict(d) for d in obj["steps"]]
        return cls(ModelSource.from_dict(obj["source"]), tuple(obj["input_shape"]), tuple(steps), metadata, origin=origin)


def _check_step(step: Any) -> Step:
    if not isinstance(step, tuple(STEPS.values())):
        raise RecipeError(f"a recipe step must be a {', '.join(c.__name__ for c in STEPS.values())} (a report's `step`), not {type(step).__name__}")
    return step


def _steps_of_v1(obj: dict[str, Any], metadata: dict[str, Any]) -> list[Step]:
    """Format 1's steps in the order they were made; what becomes a step leaves `metadata` (the caller's copy).

    Each prune plan goes before the conversion it preceded (its `after_conversions`; plans with the
    same count keep their order). Format 1 kept only the last fine-tuning run, in
    `metadata["finetune"]`, and not when it ran: it becomes a step after the last conversion and
    before the prunes that followed it, where the pipeline (convert, fine-tune, prune) runs it. A
    record that is not a valid run stays in the metadata.
    """
    conversions = [ConversionStep.from_dict(c) for c in obj["conversions"]]
    plans = sorted(obj.get("prune_plans") or [], key=lambda p: p.get("after_conversions", 0))
    record = metadata.get("finetune")
    tuned = None
    if isinstance(record, dict) and isinstance(record.get("config"), dict):
        record = record | {"config": LEGACY_SETTINGS | record["config"]}
        if _finetune_problem(record) is None:
            tuned = FinetuneStep.from_dict(record)
            del metadata["finetune"]
    steps: list[Step] = []
    for k in range(len(conversions) + 1):
        if k == len(conversions) and tuned is not None:
            steps.append(tuned)
        steps += [PruneStep(PrunePlan.from_dict(p)) for p in plans if p.get("after_conversions", 0) == k]
        if k < len(conversions):
            steps.append(conversions[k])
    return steps


def save_recipe(path: str | os.PathLike, model: nn.Module, recipe: Recipe, *, force: bool = False) -> Path:
    """Write `model`'s weights with `recipe`, atomically; refuses to overwrite unless `force`."""
    return save_payload(path, model, recipe, force=force)


def read_payload(path: str | os.PathLike) -> dict[str, Any]:
    """The raw, validated contents of a recipe file (plain data and tensors). Raises RecipeError."""
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"recipe file '{p}' not found")
    if not p.is_file():
        raise RecipeError(f"recipe path '{p}' is not a file")
    obj = safe_torch_load(p, "recipe", RecipeError)
    _validate(obj, p)
    return obj


def _show(value: Any) -> str:
    """A short, one-line description of a value for an error message."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value).replace("\n", " ")
    return f"{text[:40] + '...' if len(text) > 40 else text} ({type(value).__name__})"


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(map(is_int, value))


def _json_like(value: Any, depth: int = 0, keys: tuple[type, ...] = (str,)) -> bool:
    """Plain data (None, numbers, strings, lists, dicts with keys of `keys`), containers nested at most
    `_METADATA_DEPTH` levels below `depth`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if depth > _METADATA_DEPTH:
        return False
    if isinstance(value, (list, tuple)):
        return all(_json_like(v, depth + 1, keys) for v in value)
    return isinstance(value, dict) and all(isinstance(k, keys) and _json_like(v, depth + 1, keys) for k, v in value.items())


def metadata_problem(metadata: dict[str, Any]) -> str | None:
    """Why `metadata` cannot be a recipe's (words that follow "'metadata'"), or None: it must be plain
    data (JSON-like) at most `_METADATA_DEPTH` levels deep, which reports, JSON files and torch.save
    all handle, and its `prunes` (the prune records that `prune` appends to) a list of dicts."""
    # dict keys as json.dumps writes them: numbers, booleans and None too
    bad = next((k for k, v in metadata.items() if not (isinstance(k, str) and _json_like(v, 2, (str, int, float, type(None))))), None)
    if bad is not None:
        return (f"must be plain data (dicts, lists, strings, numbers) under string keys, nested at most {_METADATA_DEPTH} levels deep; "
                f"the entry {_show(bad)} is not")
    prunes = metadata.get("prunes", [])
    if not (isinstance(prunes, list) and all(isinstance(r, dict) for r in prunes)):
        return f"has 'prunes' {_show(prunes)}, not a list of prune records"
    return None


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` (plain data) has the type a dataclass field declares: int, float, str, bool,
    tuple[str, ...] (a list in the file) and their `| None`. Other hints are left to the class."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_int(value) or isinstance(value, float)
    if hint is str:
        return isinstance(value, str)
    return True


def _validate(obj: Any, p: Path) -> None:
    """Check a loaded recipe's whole schema (format 1 or 2), before anything is built from it.

    Raises:
        RecipeError: one line naming the first field that is missing, of the wrong type or out of range.
    """
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise RecipeError(f"'{p}' is a plain state_dict, not a recipe; pass it as `weights` with its model name")
        raise RecipeError(f"'{p}' is not a gaborprune recipe")

    def bad(name: str, problem: str) -> RecipeError:
        return RecipeError(f"recipe '{p}' is malformed: {name} {problem}; the file may be corrupt")

    version = obj.get("version")
    if is_int(version) and version > VERSION:
        raise RecipeError(f"recipe '{p}' has format version {version}, newer than this gaborprune reads ({VERSION}); upgrade gaborprune")
    record = "conversions" if is_int(version) and version == 1 else "steps"
    missing = [k for k in ("version", "source", "input_shape", record, "state_dict") if k not in obj]
    if missing:
        raise RecipeError(f"recipe '{p}' is incomplete (missing {', '.join(missing)}); it may be corrupt")
    if not is_int(version) or version < 1:
        raise bad("'version'", f"must be an integer from 1 to {VERSION}, not {_show(version)}")
    if not isinstance(obj.get("gaborprune_version", ""), str):
        raise bad("'gaborprune_version'", f"must be a string, not {_show(obj['gaborprune_version'])}")

    source = obj["source"]
    if not isinstance(source, dict):
        raise bad("'source'", f"must be a dict with 'spec', 'num_classes' and 'kwargs', not {_show(source)}")
    if set(source) - {"spec", "num_classes", "kwargs"}:
        raise bad("'source'", f"has unknown keys {sorted(map(str, set(source) - {'spec', 'num_classes', 'kwargs'}))}")
    if not isinstance(source.get("spec"), str) or not source["spec"]:
        raise bad("'source.spec'", f"must be a model name, not {_show(source.get('spec'))}")
    classes = source.get("num_classes")
    if classes is not None and not (is_int(classes) and classes >= 1):
        raise bad("'source.num_classes'", f"must be a positive integer or None, not {_show(classes)}")
    kwargs = source.get("kwargs", {})
    if kwargs is not None and not (isinstance(kwargs, dict) and all(isinstance(k, str) and k.isidentifier() for k in kwargs) and _json_like(kwargs)):
        raise bad("'source.kwargs'", f"must be a dict of keyword arguments with plain (JSON-like) values, not {_show(kwargs)}")

    shape = obj["input_shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(is_int(v) and 1 <= v <= _MAX_SIDE for v in shape)
            and shape[0] * shape[1] * shape[2] <= _MAX_INPUT):
        raise bad("'input_shape'", f"must be [C, H, W], three positive integers of at most {_MAX_SIDE} and {_MAX_INPUT} in all, not {_show(shape)}")

    if version == 1:
        _validate_v1(obj, bad)
    else:
        steps = obj["steps"]
        if not isinstance(steps, list):
            raise bad("'steps'", f"must be a list, not {_show(steps)}")
        for i, step in enumerate(steps):
            name = f"steps[{i}]"
            if not isinstance(step, dict) or step.get("kind") not in STEPS:
                raise bad(f"'{name}'", f"must be a dict whose 'kind' is one of {', '.join(STEPS)}, not {_show(step)}")
            kind = step["kind"]
            if set(step) != _STEP_KEYS[kind]:
                raise bad(f"'{name}'", f"must be a {kind} step with keys {', '.join(sorted(_STEP_KEYS[kind]))}, not {sorted(map(str, step))}")
            if kind == "convert":
                _check_conversion(step["spec"], step["layers"], name, bad)
            elif kind == "prune":
                plan = step["plan"]
                if not isinstance(plan, dict):
                    raise bad(f"'{name}.plan'", f"must be a dict, not {_show(plan)}")
                unknown = sorted(map(str, set(plan) - _PLAN_KEYS))
                if unknown:
                    raise bad(f"'{name}.plan'", f"has unknown key '{unknown[0]}'")
                _check_plan(plan, f"{name}.plan", bad)
            else:
                problem = _finetune_problem(step)
                if problem:
                    raise bad(f"'{name}.{problem[0]}'", problem[1])

    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise bad("'metadata'", f"must be a dict, not {_show(obj['metadata'])}")
    problem = metadata_problem(metadata)
    if problem:
        raise bad("'metadata'", problem)

    state = obj["state_dict"]
    if not isinstance(state, dict):
        raise bad("'state_dict'", f"must be a dict of tensors, not {_show(state)}")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise bad(f"'state_dict[{k!r}]'", f"must be a tensor under a string name, not {_show(v)}")
    bad_tensors = non_finite(state)
    if bad_tensors:
        more = f" (and {len(bad_tensors) - 1} more)" if len(bad_tensors) > 1 else ""
        raise RecipeError(f"recipe '{p}' is unusable: 'state_dict[{bad_tensors[0]!r}]' holds NaN or infinite values{more}; "
                          "it is from a diverged run or damaged")


def _validate_v1(obj: dict[str, Any], bad) -> None:
    """Format 1's `conversions` and `prune_plans` (see `_steps_of_v1`); its metadata was never checked."""
    conversions = obj["conversions"]
    if not isinstance(conversions, list):
        raise bad("'conversions'", f"must be a list, not {_show(conversions)}")
    for i, record in enumerate(conversions):
        if not isinstance(record, dict) or set(record) != {"spec", "layers"}:
            raise bad(f"'conversions[{i}]'", f"must be a dict with 'spec' and 'layers', not {_show(record)}")
        _check_conversion(record["spec"], record["layers"], f"conversions[{i}]", bad)
    plans = obj.get("prune_plans", [])
    if not isinstance(plans, list):
        raise bad("'prune_plans'", f"must be a list, not {_show(plans)}")
    for i, plan in enumerate(plans):
        name = f"prune_plans[{i}]"
        if not isinstance(plan, dict):
            raise bad(f"'{name}'", f"must be a dict, not {_show(plan)}")
        unknown = sorted(map(str, set(plan) - _PLAN_KEYS - {"after_conversions"}))
        if unknown:
            raise bad(f"'{name}'", f"has unknown key '{unknown[0]}'")
        after = plan.get("after_conversions", 0)
        if not (is_int(after) and 0 <= after <= len(conversions)):
            raise bad(f"'{name}.after_conversions'", f"must be an integer from 0 to {len(conversions)} (the conversions), not {_show(after)}")
        _check_plan(plan, name, bad)


def _check_conversion(spec: Any, layers: Any, name: str, bad) -> None:
    """A recorded conversion: its spec's keys, types and sense, and its layer names."""
    if not isinstance(spec, dict):
        raise bad(f"'{name}.spec'", f"must be a dict, not {_show(spec)}")
    hints = typing.get_type_hints(ConversionSpec)
    unknown = sorted(map(str, set(spec) - {f.name for f in fields(ConversionSpec)}))
    if unknown:
        raise bad(f"'{name}.spec'", f"has unknown key '{unknown[0]}'")
    wrong = [k for k, v in spec.items() if not _fits(v, hints[k])]
    if wrong:
        raise bad(f"'{name}.spec.{wrong[0]}'", f"must be {hints[wrong[0]]}, not {_show(spec[wrong[0]])}")
    try:
        ConversionSpec.from_dict(spec)
    except (GaborPruneError, TypeError, ValueError, RuntimeError) as e:
        raise bad(f"'{name}.spec'", f"is invalid ({e})") from None
    if not (isinstance(layers, list) and all(isinstance(n, str) for n in layers)):
        raise bad(f"'{name}.layers'", f"must be a list of layer names, not {_show(layers)}")


def _check_plan(plan: dict[str, Any], name: str, bad) -> None:
    """A recorded prune plan's fields (`PrunePlan`)."""
    kernels, channels = plan.get("kernels"), plan.get("channels")
    if not (isinstance(kernels, dict) and all(isinstance(k, str) and isinstance(v, list) and all(_ints(q) and len(q) == 2 for q in v)
                                              for k, v in kernels.items())):
        raise bad(f"'{name}.kernels'", f"must map layer names to [output, input] index pairs, not {_show(kernels)}")
    if not (isinstance(channels, dict) and all(isinstance(k, str) and isinstance(v, dict) and set(v) <= {"out", "in"} and all(map(_ints, v.values()))
                                               for k, v in channels.items())):
        raise bad(f"'{name}.channels'", f"must map module names to {{'out': [...], 'in': [...]}} channel indices, not {_show(channels)}")
    if not isinstance(plan.get("spec", {}), dict):
        raise bad(f"'{name}.spec'", f"must be a dict, not {_show(plan['spec'])}")
    problem = fold_problem(plan.get("folds", []))  # absent in plans written before folds were stored
    if problem:
        raise bad(f"'{name}.folds'", problem)
    try:
        PrunePlan.from_dict(plan)
    except GaborPruneError as e:
        raise bad(f"'{name}'", f"is invalid ({e})") from None


def _finetune_problem(record: dict[str, Any]) -> tuple[str, str] | None:
    """(field, problem) of the first field of a fine-tuning record (`FinetuneStep.to_dict`) that is
    wrong, or None when it is a valid one."""
    config = record.get("config")
    if not isinstance(config, dict):
        return "config", f"must be a dict of fine-tuning settings, not {_show(config)}"
    try:
        TrainConfig.from_dict(config)
    except (GaborPruneError, TypeError, ValueError) as e:
        return "config", f"is not a valid fine-tuning config ({e})"
    if not isinstance(record.get("data"), str):
        return "data", f"must be a dataset spec, not {_show(record.get('data'))}"
    if not (is_int(record.get("epochs_done")) and record["epochs_done"] >= 0):
        return "epochs_done", f"must be a count of epochs, not {_show(record.get('epochs_done'))}"
    best = record.get("best_accuracy")
    if not (isinstance(best, (int, float)) and not isinstance(best, bool) and math.isfinite(best)):
        return "best_accuracy", f"must be a finite number, not {_show(best)}"
    history = record.get("history", [])
    if not (isinstance(history, list) and all(isinstance(r, dict) for r in history) and _json_like(history)):
        return "history", f"must be a list of epoch records (plain data), not {_show(history)}"
    return None


def read_recipe(path: str | os.PathLike) -> tuple[Recipe, dict[str, torch.Tensor]]:
    """Read a recipe file safely (format 1 is upgraded): (recipe, state_dict). Nothing is imported
    or built. Raises RecipeError."""
    obj = read_payload(path)
    return Recipe.from_payload(obj, origin=str(path)), obj["state_dict"]


def save_payload(path: str | os.PathLike, model: nn.Module, recipe: Recipe, extra: dict[str, Any] | None = None, *, force: bool = False) -> Path:
    """Write a recipe with extra top-level entries (plain data and tensors), atomically."""
    problem = metadata_problem(recipe.metadata)
    if problem:  # refused here, with the reason, rather than as a failed torch.save
        raise RecipeError(f"cannot save the recipe to '{path}': its metadata {problem}")
    payload = recipe.to_dict() | (extra or {})
    payload["state_dict"] = portable_state_dict(model)
    return save_torch(path, payload, force)


def is_recipe_path(spec: str) -> bool:
    return spec.endswith((".pt", ".pth")) or os.path.isfile(spec)


def load_model(
    spec: str,
    *,
    num_classes: int | None = None,
    weights: str | None = None,
    model_args: dict[str, Any] | None = None,
    input_shape: tuple[int, int, int] | None = None,
    trust_factory: bool = False,
    seed: int = 0,
) -> tuple[nn.Module, Recipe]:
    """Build a model from any model source, with its weights, and the recipe that describes it.

    Args:
        spec: a built-in name, `torchvision:NAME`, `package.module:factory`, or a recipe file.
        num_classes: classifier size (not for recipes, which fix it).
        weights: a local state_dict file for a fresh source.
        model_args: extra builder keyword arguments (e.g. {"k1": 9} for resnet20_altered).
        input_shape: (C, H, W) override.
        trust_factory: let a recipe file rebuild the `package.module:factory` it names (see
            `Recipe.build`); a factory given as `spec` itself is always called.
        seed: a fresh source's initial weights are drawn from it, in a forked random stream (the
            caller's is left as it was), so that `load_model("resnet20")` and `gaborprune convert
            resnet20` build the same weights. A recipe carries its weights and ignores it.

    Returns:
        (model in train mode on the CPU, its recipe).
    """
    if is_recipe_path(spec):
        if num_classes is not None or weights is not None or model_args:
            raise ModelSourceError(f"'{spec}' is a recipe, which fixes its classes, weights and model arguments; drop `num_classes`/`weights`/`model_args`")
        recipe, state = read_recipe(spec)
        if input_shape is not None:
            recipe = dataclasses.replace(recipe, input_shape=tuple(input_shape))
        recipe.check_fits(state)  # before anything is allocated
        model = recipe.build(trust_factory=trust_factory)
        fit_state_dict(model, state, f"the state_dict in '{spec}'", "its own architecture (corrupt recipe?)")
        return model, recipe
    source = ModelSource(spec, num_classes, dict(model_args or {}))
    if source.kind != "factory":  # a factory is the user's own code: called once, for real
        meta = meta_build(source.build)
        if meta is not None:
            shape = tuple(input_shape or source.input_shape(meta))
            args = f" with {source.kwargs}" if source.kwargs else ""
            check_footprint(meta, shape, f"model '{spec}'{args}", ModelSourceError)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(check_seed(seed))
        model = source.build()
    if weights is not None:
        load_state_dict_file(model, weights, source)
    return model, Recipe(source, input_shape or source.input_shape(model))
