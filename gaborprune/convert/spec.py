"""Conversion specs (data), `gaborize_`, the in-place transform they drive, and the step a recipe records."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from gaborprune._validate import check_int, check_seed
from gaborprune.convert.kernel import GABOR_PARAMS
from gaborprune.convert.layer import GaborConv2d
from gaborprune.errors import ConversionError
from gaborprune.norms import recalibrate_norms_
from gaborprune.probe import probe

INITS = ("fit", "random")
TARGETS = ("gabor", "cada")
CADA_KNOBS = ("heads", "bases", "context", "invariance", "rel_pos", "basis")
#: Far beyond the papers' kernels (3 to 9); fitting VGG-16's second layer (4096 kernels) at 31x31
#: already takes about a minute on one core, and the time grows with K squared.
MAX_KERNEL_SIZE = 31
MAX_BASES = 64  # CADA base kernels per head


@dataclass(frozen=True)
class ConversionSpec:
    """Which convolutions become Gabor banks, and how they start.

    Exactly one of `first` and `targets` selects the layers.

    Attributes:
        first: the first N convolutions in execution order.
        targets: qualified module names (`layer1.0.conv1`) or regexes prefixed `re:` (full match).
        kernel_size: enlarge kernels to K x K (padding grows so output shapes do not change); at
            most MAX_KERNEL_SIZE and 2 x min(H, W) - 1 of every converted layer's input.
        init: "fit" (least squares to the trained kernels) or "random" (a spread bank).
        freeze: Gabor parameters that stay fixed during training, from GABOR_PARAMS.
        seed: seeds the random bank, 0 to 2**63-1.
        fit_steps: refinement steps of the fit.
    """

    first: int | None = None
    targets: tuple[str, ...] = ()
    kernel_size: int | None = None
    init: str = "fit"
    freeze: tuple[str, ...] = ()
    seed: int = 0
    fit_steps: int = 150
    to: str = field(default="gabor")
    heads: int = 1
    bases: int | None = None  # CADA default: 4 when relaxed, else 1
    context: int | None = None  # CADA default: 0 when strict, else 3
    invariance: str = "relaxed"
    rel_pos: bool = False
    basis: str = "free"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "freeze", tuple(self.freeze))
        if self.to not in TARGETS:
            raise ConversionError(f"unknown conversion '{self.to}'; known: {', '.join(TARGETS)}")
        check_seed(self.seed, "`seed`", ConversionError)
        if self.kernel_size is not None:
            check_int(self.kernel_size, "`kernel_size`", error=ConversionError)
            if self.kernel_size > MAX_KERNEL_SIZE:
                raise ConversionError(f"`kernel_size` {self.kernel_size} is too large; give at most {MAX_KERNEL_SIZE}")
        if self.to == "cada":
            if self.freeze:
                raise ConversionError("`freeze` applies to Gabor banks, not CADA blocks")
            from gaborprune.convert.cada import CADAConv2d

            check_int(self.heads, "`heads`", error=ConversionError)
            if self.bases is not None and check_int(self.bases, "`bases`", error=ConversionError) > MAX_BASES:
                raise ConversionError(f"`bases` {self.bases} is too many; give at most {MAX_BASES} (default 4)")
            if self.context is not None and check_int(self.context, "`context`", 0, ConversionError) > MAX_KERNEL_SIZE:
                raise ConversionError(f"`context` {self.context} is too large; give at most {MAX_KERNEL_SIZE}")
            with torch.device("meta"):  # the knobs' sense only: a trial block of 20000 heads would allocate gigabytes
                CADAConv2d(self.heads, self.heads, self.kernel_size or 3, **self.cada_knobs())  # refuses knobs that make no sense
        if (self.first is None) == (not self.targets):
            raise ConversionError("say which layers to convert: either `first` N or `targets` NAME (not both)")
        if self.first is not None:
            check_int(self.first, "`first`", error=ConversionError)
        if self.init not in INITS:
            raise ConversionError(f"unknown `init` '{self.init}'; known: {', '.join(INITS)}")
        bad = [f for f in self.freeze if f not in GABOR_PARAMS]
        if bad:
            raise ConversionError(f"cannot freeze '{bad[0]}'; Gabor parameters are {', '.join(GABOR_PARAMS)}")
        check_int(self.fit_steps, "`fit_steps`", 0, ConversionError)
        for t in self.targets:
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as e:
                    raise ConversionError(f"target '{t}' is not a valid regex: {e}") from None

    def cada_knobs(self) -> dict:
        """CADAConv2d keyword arguments, with the invariance's defaults for bases and context."""
        knobs = {k: getattr(self, k) for k in CADA_KNOBS}
        if knobs["bases"] is None:
            knobs["bases"] = 4 if self.invariance == "relaxed" else 1
        if knobs["context"] is None:
            knobs["context"] = 0 if self.invariance == "strict" else 3
        return knobs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"], d["freeze"] = list(self.targets), list(self.freeze)
        if self.to != "cada":
            for k in CADA_KNOBS:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ConversionSpec:
        return cls(**d)


@dataclass(frozen=True)
class LayerConversion:
    """What one converted layer became."""

    name: str
    kernel_size: tuple[int, int]
    original_kernel_size: tuple[int, int]
    in_channels: int
    out_channels: int
    groups: int
    kernels: int
    fit_rel_error: float | None  # ||w - g||_F / ||w||_F over the layer; None for a random init
    #: Relative output error on the calibration images (`gaborprune.convert.outputs.output_error`)
    #: of the weight fit, then of the output fit that replaced it; None without calibration images.
    weight_fit_output_error: float | None = None
    output_error: float | None = None


@dataclass(frozen=True)
class ConversionStep:
    """A conversion as a recipe records it: the spec, and the layers it converted (replay converts
    those by name, without fitting: the recipe's state_dict follows)."""

    spec: ConversionSpec
    layers: tuple[str, ...]
    kind: ClassVar[str] = "convert"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))

    def replay_(self, model: nn.Module) -> nn.Module:
        gaborize_(model, self.spec, layers=list(self.layers), init="none")
        return model

    def to_dict(self) -> dict:
        return {"kind": self.kind, "spec": self.spec.to_dict(), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict) -> ConversionStep:
        return cls(ConversionSpec.from_dict(d["spec"]), tuple(d["layers"]))


@dataclass(frozen=True)
class ConversionReport:
    spec: ConversionSpec
    layers: tuple[LayerConversion, ...]

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def step(self) -> ConversionStep:
        """What a recipe records of this conversion (`Recipe.with_step`)."""
        return ConversionStep(self.spec, tuple(self.layer_names))


def conv_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every 2-D convolution (plain or Gabor) by qualified name, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, GaborConv2d))}


def execution_order(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Names of the convolutions in the order a forward pass first calls them.

    Runs one forward pass on zeros of shape [1, *input_shape] in eval mode.
    """
    order: list[str] = []
    probe(model, input_shape, [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
                               for n, m in conv_modules(model).items()])
    return order


def select_layers(model: nn.Module, spec: ConversionSpec, input_shape: tuple[int, ...] | None = None) -> list[str]:
    """The qualified names of the plain convolutions `spec` selects. Never mutates the model.

    Raises:
        ConversionError: a target matches nothing, or matches only modules that are not convolutions.
    """
    modules = dict(model.named_modules())
    convs = conv_modules(model)
    if spec.first is not None:
        if input_shape is None:
            raise ConversionError("`first` N needs the model's input shape to find execution order")
        order = [n for n in execution_order(model, input_shape) if isinstance(convs[n], nn.Conv2d)]
        if not order:
            raise ConversionError("the model has no plain convolution left to convert")
        if spec.first > len(order):
            n = len(order)
            raise ConversionError(f"the model has only {n} convolution{'s' if n > 1 else ''} to convert; give `first` {n}{' or fewer' if n > 1 else ''}")
        return order[: spec.first]
    chosen: list[str] = []
    for target in spec.targets:
        if target.startswith("re:"):
            pattern = re.compile(target[3:])
            hits = [n for n in modules if n and pattern.fullmatch(n)]
            conv_hits = [n for n in hits if isinstance(modules[n], nn.Conv2d)]
            if not conv_hits:
                found = f"only non-convolutions (e.g. '{hits[0]}', a {type(modules[hits[0]]).__name__})" if hits else "nothing"
                raise ConversionError(f"target '{target}' matches {found}; list layer names with `gaborprune inspect`")
            chosen += conv_hits
        elif target not in modules or not target:
            close = [n for n in convs if target.split(".")[-1] in n][:5]
            hint = f"; convolutions include {', '.join(close or list(convs)[:5])}"
            raise ConversionError(f"target '{target}' matches no layer{hint}")
        elif isinstance(modules[target], GaborConv2d):
            raise ConversionError(f"target '{target}' is already a Gabor bank")
        elif not isinstance(modules[target], nn.Conv2d):
            raise ConversionError(f"target '{target}' is a {type(modules[target]).__name__}, not a Conv2d; only 2-D convolutions can become Gabor banks")
        else:
            chosen.append(target)
    return list(dict.fromkeys(chosen))


def _check_kernel_fits(model: nn.Module, names: list[str], k: int, input_shape: tuple[int, ...]) -> None:
    """Refuse, before any fitting, a kernel wider than 2 x a layer's input - 1: centred on any pixel
    of an H-pixel input, taps more than H - 1 away never touch the image, only padding (parameters
    that cannot learn, and fitting them is the slow part)."""
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str, x) -> None:  # a pre-hook that returns something replaces the layer's input
        sizes.setdefault(name, tuple(x.shape[-2:]))

    probe(model, input_shape, [model.get_submodule(n).register_forward_pre_hook(lambda mod, args, n=n: record(n, args[0])) for n in names])
    for name in names:
        h, w = sizes.get(name, (k, k))
        reach = 2 * min(h, w) - 1
        if k > reach:
            fits = reach - (reach - model.get_submodule(name).kernel_size[0]) % 2  # kernels grow by an even number
            raise ConversionError(f"`kernel_size` {k} is too large for the {h}x{w} input of layer '{name}' (its outer taps would only "
                                  f"ever see padding); give at most {fits}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def gaborize_(
    model: nn.Module,
    spec: ConversionSpec,
    input_shape: tuple[int, ...] | None = None,
    *,
    layers: list[str] | None = None,
    init: str | None = None,
    calibration: Sequence[Tensor] | None = None,
) -> ConversionReport:
    """Replace the convolutions that `spec` selects with Gabor banks (or CADA blocks), in place.

    Args:
        model: the network; its selected `nn.Conv2d` layers are replaced.
        spec: which layers and how to initialise them.
        input_shape: (C, H, W), needed when `spec.first` selects by execution order; with it, an
            enlarged `spec.kernel_size` is also checked against each layer's input size.
        layers: the resolved names, when replaying a recorded conversion (skips selection).
        init: override `spec.init`; replay passes "none" because a state_dict follows.
        calibration: normalised input batches, each Tensor[B, *input_shape] on the model's device
            (training images). With them, each fitted bank is refitted to the trained layer's
            outputs (`gaborprune.convert.outputs`), layer by layer in the order given, and every
            BatchNorm's statistics are re-estimated on them after each layer, so each layer's fit
            sees the inputs the converted network really gives it.

    Returns:
        A report per converted layer, with the relative fit error of the whole layer.
    """
    names = layers if layers is not None else select_layers(model, spec, input_shape)
    if spec.kernel_size is not None and layers is None and input_shape is not None:
        _check_kernel_fits(model, names, spec.kernel_size, input_shape)
    generator = torch.Generator().manual_seed(spec.seed)
    original = copy.deepcopy(model).eval() if calibration is not None else None
    results = []
    for name in names:
        conv = model.get_submodule(name)
        if not isinstance(conv, nn.Conv2d):
            raise ConversionError(f"layer '{name}' is a {type(conv).__name__}, not a Conv2d")
        if spec.to == "cada":
            from gaborprune.convert.cada import CADAConv2d

            try:
                block = CADAConv2d.from_conv2d(conv, kernel_size=spec.kernel_size, **spec.cada_knobs())
            except ConversionError as e:
                raise ConversionError(f"layer '{name}': {e}") from None
            replace_module(model, name, block)
            if original is not None:
                recalibrate_norms_(model, calibration)
            k = (block.kernel_size, block.kernel_size)
            bases = 0 if block.invariance == "none" else block.heads * block.bases  # base kernels, shared by all positions
            results.append(LayerConversion(name, k, conv.kernel_size, conv.in_channels, conv.out_channels, conv.groups, bases, None))
            continue
        try:
            layer, target = GaborConv2d.from_conv2d(
                conv, kernel_size=spec.kernel_size, init=init or spec.init, freeze=spec.freeze,
                generator=generator, fit_steps=spec.fit_steps,
            )
        except ValueError as e:
            raise ConversionError(f"layer '{name}': {e}") from None
        error = outputs = None
        if target is not None:
            with torch.no_grad():
                denom = target.norm()
                error = float((target - layer.weight).norm() / denom) if denom > 0 else 0.0
            if original is not None:
                outputs = _fit_to_outputs(model, original, name, layer, target, calibration, spec)
        layer.train(conv.training)
        replace_module(model, name, layer)
        if original is not None:
            recalibrate_norms_(model, calibration)
        results.append(LayerConversion(
            name, layer.kernel_size, conv.kernel_size, conv.in_channels, conv.out_channels, conv.groups,
            layer.mask.numel(), error, *(outputs or (None, None)),
        ))
    return ConversionReport(spec, tuple(results))


class _Captured(Exception):
    """Raised by a capture hook to stop a forward pass once the layer's input is seen."""


def _layer_input(model: nn.Module, name: str, x: Tensor) -> Tensor:
    """The input `model`'s submodule `name` receives for the batch `x` (the pass stops there)."""
    seen: list[Tensor] = []

    def capture(module, args):
        seen.append(args[0])
        raise _Captured

    handle = model.get_submodule(name).register_forward_pre_hook(capture)
    try:
        model(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ConversionError(f"layer '{name}' is not called in the model's forward pass; it cannot be fitted to its outputs")
    return seen[0]


@torch.no_grad()
def _fit_to_outputs(model: nn.Module, original: nn.Module, name: str, layer: GaborConv2d, target: Tensor,
                    calibration: Sequence[Tensor], spec: ConversionSpec) -> tuple[float, float]:
    """Refit `layer` (the weight fit of the plain layer `name` of `model`) to that layer's outputs in
    `original`; returns the relative output errors of the weight fit and of the output fit."""
    from gaborprune.convert.outputs import MomentSum, fit_outputs_, output_error

    was_training = model.training
    model.eval()
    try:
        moments = MomentSum(layer, torch.Generator().manual_seed(spec.seed))
        for x in calibration:
            moments.add(_layer_input(model, name, x), _layer_input(original, name, x))
    finally:
        model.train(was_training)
    m = moments.moments()
    before = output_error(layer, target, m)
    if {"amplitude", "psi"} & set(spec.freeze):  # the solve sets amplitudes and phases: leave a frozen one alone
        return before, before
    with torch.enable_grad():
        fit_outputs_(layer, target, m, steps=spec.fit_steps)
    return before, output_error(layer, target, m)
