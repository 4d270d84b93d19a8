"""Parsing dataset specs and loading each kind, offline only."""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gaborprune import _validate
from gaborprune._validate import check_batch_memory, check_int
from gaborprune.data import tree
from gaborprune.data.tensor import TensorData
from gaborprune.errors import DataError

KINDS = ("cifar10:DIR", "cifar100:DIR", "imagefolder:DIR", "digits", "fake:N[:CLASSES]")
MAX_FAKE_CLASSES = 100_000  # ImageNet-21k has 21,841; each class costs a float template of the input's size
MAX_BATCH_BYTES = 2**30  # CIFAR's largest batch file (CIFAR-100's train) is 155 MB; each is read whole
MAX_FAKE_SAMPLES = 10**15  # far past any memory: the bound keeps the numbers in messages short

_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    key="labels", classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], key="fine_labels", classes=100,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


@dataclass(frozen=True)
class DataSpec:
    """A parsed dataset spec: `kind` plus a folder (`path`) or a sample count (`samples`)."""

    kind: str
    path: str | None = None
    samples: int | None = None
    classes: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "fake":
            _check_fake(self.samples, self.classes, str(self))

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        kind, _, rest = text.partition(":")
        if kind in ("cifar10", "cifar100", "imagefolder"):
            if not rest:
                raise DataError(f"dataset '{_shown(text)}' needs a folder: {kind}:DIR")
            return cls(kind, path=rest)
        if kind == "digits" and not rest:
            return cls("digits")
        if kind == "fake":
            try:
                parts = [int(v) for v in rest.split(":")] if rest else [1000]
                if len(parts) > 2:
                    raise ValueError
            except ValueError:  # also a number of more than 4,300 digits
                parts = [0]
            samples, classes = parts[0], (parts[1] if len(parts) > 1 else 10)
            _check_fake(samples, classes, text)
            return cls("fake", samples=samples, classes=classes)
        raise DataError(f"unknown dataset '{_shown(text)}'; known: {', '.join(KINDS)}")

    def __str__(self) -> str:
        if self.kind == "fake":
            return f"fake:{self.samples}:{self.classes}"
        return f"{self.kind}:{self.path}" if self.path else self.kind


def _shown(text: str, limit: int = 80) -> str:
    """A spec as quoted in a message: a long one cut short, so that a line stays a line."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_fake(samples: object, classes: object, text: str) -> None:
    """fake:N:CLASSES bounds, checked before anything is allocated (`_fake` checks the memory)."""
    if not (_validate.is_int(samples) and _validate.is_int(classes) and samples >= 2 and classes >= 2):
        raise DataError(f"dataset '{_shown(text)}' is not fake:N or fake:N:CLASSES with N >= 2 samples and >= 2 classes")
    if classes > MAX_FAKE_CLASSES:
        raise DataError(f"dataset '{_shown(text)}' asks for {_shown(str(classes), 24)} classes; fake data has at most {MAX_FAKE_CLASSES}")
    if samples > MAX_FAKE_SAMPLES:
        raise DataError(f"dataset '{_shown(text)}' asks for more than 10**15 samples; give a smaller N")


def load_data(spec: DataSpec | str, input_shape: tuple[int, int, int], *, resize: int | None = None):
    """The (train, test) splits of a dataset, brought to the model's input shape (C, H, W).

    Args:
        resize: ImageFolder's validation resize of the shorter side, H to 8 * H (checked for every kind).

    Returns:
        Two `TensorData` (digits, CIFAR, fake: on the CPU; move them with `.to(device)`), or two
        `FolderData` for an ImageFolder tree.
    """
    spec = DataSpec.parse(spec) if isinstance(spec, str) else spec
    if resize is not None:
        size = input_shape[1]
        check_int(resize, "`resize`", error=DataError)
        if not size <= resize <= 8 * size:  # smaller: the centre crop pads the image; beyond: huge decodes for a tiny patch
            raise DataError(f"`resize` {resize} does not suit a {size}-pixel crop; give {size} to {8 * size} (default {round(size * 256 / 224)})")
    if spec.kind in _CIFAR:
        return _cifar(spec, input_shape)
    if spec.kind == "digits":
        return _digits(input_shape)
    if spec.kind == "fake":
        return _fake(spec, input_shape)
    from gaborprune.data.folder import load_image_folder

    return load_image_folder(Path(spec.path).expanduser(), input_shape, resize)


def _fit_images(images: torch.Tensor, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 Tensor[N, c, h, w] -> uint8 Tensor[N, C, H, W]: bilinear resize, grey replicated to C.
    The resize's float copies are checked against the memory available first (`memory_budget`)."""
    c, h, w = input_shape
    if images.shape[1] not in (1, c):
        raise DataError(f"images have {images.shape[1]} channels but the model takes {c}; pass `input_shape`")
    if images.shape[-2:] != (h, w):
        need, limit = (9 * images.shape[1] + c) * h * w * len(images), _validate.memory_budget()  # two float copies and the uint8 results
        if limit is not None and need > limit:
            raise DataError(f"the dataset's {len(images)} images resized to {c}x{h}x{w} need about {_validate._gb(need)} of memory (estimated), "
                            f"more than the {_validate._gb(limit)} available; give a smaller `input_shape`")
        images = F.interpolate(images.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, c, -1, -1).contiguous() if images.shape[1] != c else images


def _latin1(text: object, encoding: object) -> bytes:
    """`_codecs.encode` as pickles of protocol 0 to 2 use it (bytes written as latin-1 text), and only that:
    any other codec name would make the codec registry import a module by that name."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not allowed in a dataset batch")
    return text.encode("latin1")


class _ArrayType:
    """Stands for `numpy.ndarray` in a batch. numpy's pickles only hand the array type to `_reconstruct`;
    numpy's class itself would be an allocator (an array of any declared size from a few bytes)."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("it calls numpy.ndarray itself (an array of any size from a few bytes), as numpy's pickles never do")


@cache
def _allowed() -> dict[tuple[str, str], object]:
    """Every global a CIFAR batch may name, (module, name) -> the object it stands for: numpy arrays,
    dtypes and scalars as numpy 1 (`numpy.core`) and numpy 2 (`numpy._core`) name them, in every
    pickle protocol. The objects come from numpy's own reductions, so nothing is imported by name,
    and those that could allocate take only the arguments numpy's pickles give them: memory stays
    bounded by the file's bytes (an array's or a scalar's data must be in the file)."""
    reconstruct = np.zeros(1).__reduce__()[0]  # protocols 0 to 4
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5: a view of bytes in the file
    scalar = np.int64(0).__reduce__()[0]  # a numpy integer among the labels

    def empty_array(subtype, shape, dtype):  # then filled by the array's state, which must hold its bytes
        if subtype is not _ArrayType or shape != (0,):
            raise pickle.UnpicklingError("it reconstructs an array of a declared shape, as numpy's pickles never do")
        return reconstruct(np.ndarray, shape, dtype)

    def number(dtype, data=None):
        if not (isinstance(dtype, np.dtype) and dtype.kind in "biufc" and isinstance(data, (bytes, str)) and len(data) == dtype.itemsize):
            raise pickle.UnpicklingError("it holds a numpy scalar that is not a number given by its bytes")
        return scalar(dtype, data)

    allowed = {("numpy", "ndarray"): _ArrayType, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1}
    for core in ("numpy.core", "numpy._core"):
        allowed |= {(f"{core}.multiarray", "_reconstruct"): empty_array, (f"{core}.multiarray", "scalar"): number,
                    (f"{core}.numeric", "_frombuffer"): frombuffer}
    return allowed


class _NumpyOnly(pickle.Unpickler):
    """CIFAR batches are pickles: numpy arrays and plain data only. Each global a batch names is looked
    up in `_allowed()`; nothing else is imported or called (importing alone can run code: a batch
    naming numpy.f2py.__main__ would run f2py's command line)."""

    def find_class(self, module: str, name: str):
        found = _allowed().get((module, name))
        if found is None:
            shown = _shown(f"{module}.{name}").encode("unicode_escape").decode("ascii")  # no control characters on the terminal
            raise pickle.UnpicklingError(f"it names the global {shown}, which a dataset batch may not (only numpy arrays and plain data)")
        return found


def _batch(raw: bytes, classes: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """One unpickled CIFAR batch -> (uint8 images [N, 3, 32, 32], int64 labels [N]), every label in 0..classes-1.

    Raises:
        pickle.UnpicklingError: saying what is wrong with it (the caller names the file).
    """
    try:
        batch = _NumpyOnly(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError:
        raise
    except Exception as e:  # a malformed pickle raises nearly anything: EOFError, ValueError, KeyError, IndexError, ...
        lines = str(e).strip().splitlines()
        raise pickle.UnpicklingError(f"{type(e).__name__}: {lines[0] if lines else 'unreadable'}") from None
    if not isinstance(batch, dict) or "data" not in batch or key not in batch:
        raise pickle.UnpicklingError(f"it is not a dict with 'data' and '{key}'")
    data, labels = batch["data"], batch[key]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] in ((3072,), (3, 32, 32))):
        what = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise pickle.UnpicklingError(f"its data is {what}, not uint8 [N, 3072]")
    if isinstance(labels, np.ndarray):
        ints = labels.ndim == 1 and labels.dtype.kind in "iu"
    else:  # a list of python ints (numpy integers are np.integer; bools are ints but not labels)
        ints = isinstance(labels, list) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels)
    if not ints:
        raise pickle.UnpicklingError(f"its labels are not integers in a list or a 1-d array ({type(labels).__name__})")
    if len(labels) != len(data):
        raise pickle.UnpicklingError(f"it has {len(data)} images but {len(labels)} labels")
    if len(labels):
        for bad in (min(labels), max(labels)):
            if not 0 <= bad < classes:
                raise pickle.UnpicklingError(f"label {int(bad)} is outside 0..{classes - 1} ({classes} classes)")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _cifar(spec: DataSpec, input_shape):
    info = _CIFAR[spec.kind]
    root = Path(spec.path).expanduser()
    folder = root / info["folder"] if (root / info["folder"]).is_dir() else root
    expected = info["train"] + info["test"]
    missing = [f for f in expected if not (folder / f).is_file()]
    if missing and tree.is_tree(root):
        arrays, _ = tree.load_tree(root, info["classes"])
        return _cifar_splits(info, input_shape, *(tuple(torch.from_numpy(a) for a in arrays[s]) for s in ("train", "test")))
    if missing:
        raise DataError(
            f"{spec.kind} folder '{root}' lacks {', '.join(missing)}; expected the python-version batches "
            f"({', '.join(expected)}) in '{root / info['folder']}' or '{root}', or an image tree "
            f"('{root}/train/CLASS/*.png' and '{root}/test/CLASS/*.png'). Download {info['url']} on a machine "
            f"with internet and extract it into '{root}'"
        )

    def read(names):
        data, labels = [], []
        for name in names:
            try:
                with open(folder / name, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size > MAX_BATCH_BYTES:
                        raise DataError(f"'{folder / name}' is {size / 1e9:.1f} GB, more than a {spec.kind} batch "
                                        f"(at most {MAX_BATCH_BYTES / 1e9:.1f} GB); re-extract {info['url']}")
                    images, targets = _batch(f.read(), info["classes"], info["key"])
            except OSError as e:
                raise DataError(f"cannot read '{folder / name}': {e.strerror}") from None
            except pickle.UnpicklingError as e:
                raise DataError(f"'{folder / name}' is not a {spec.kind} batch: {e}; re-extract {info['url']}") from None
            data.append(images)
            labels.append(targets)
        return torch.from_numpy(np.concatenate(data)), torch.from_numpy(np.concatenate(labels))

    return _cifar_splits(info, input_shape, read(info["train"]), read(info["test"]))


def _cifar_splits(info: dict, input_shape, train: tuple, test: tuple):
    """(images uint8 [N, 3, 32, 32], labels [N]) per split -> two `TensorData` with CIFAR's augmentation."""
    mean, std = torch.tensor(info["mean"]), torch.tensor(info["std"])
    return tuple(TensorData(_fit_images(images, input_shape), labels, mean, std, info["classes"],
                            crop_padding=4 * input_shape[1] // 32 if is_train else 0, flip=is_train)
                 for (images, labels), is_train in ((train, True), (test, False)))


def _digits(input_shape):
    """scikit-learn's 1,797 handwritten digits (8x8, 0..16), upscaled; a fixed stratified 80/20 split.

    No augmentation: flips and shifted crops would change what some digits mean or cut them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images * (255 / 16)).round().to(torch.uint8)[:, None]  # [N, 1, 8, 8]
    labels = torch.from_numpy(digits.target).to(torch.int64)
    g = torch.Generator().manual_seed(0)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):  # every fifth sample of each class, in a fixed random order, is a test sample
        idx = (labels == c).nonzero().flatten()
        test[idx[torch.randperm(len(idx), generator=g)][::5]] = True
    images = _fit_images(images, input_shape)
    train_px = images[~test].float() / 255
    mean = train_px.mean(dim=(0, 2, 3))
    std = train_px.std(dim=(0, 2, 3))
    return (TensorData(images[~test], labels[~test], mean, std, 10), TensorData(images[test], labels[test], mean, std, 10))


def _fake(spec: DataSpec, input_shape):
    """Learnable synthetic data: a fixed random template per class plus noise; 80/20 split."""
    c, h, w = input_shape
    limit, templates = _validate.available_memory(), 4 * c * h * w * spec.classes  # a float32 template per class
    if limit is not None and templates > limit:
        raise DataError(f"dataset '{spec}' needs about {templates / 1e9:.1f} GB of memory for its {spec.classes} class templates "
                        f"(estimated), more than the {limit / 1e9:.1f} GB available; give fewer CLASSES in fake:N:CLASSES")
    # float32 noise, templates and their blend, and the uint8 images, all at once
    check_batch_memory(17 * c * h * w, spec.samples, f"dataset '{spec}'", "N of fake:N", DataError)
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(spec.classes, c, h, w, generator=g)
    labels = torch.arange(spec.samples) % spec.classes
    labels = labels[torch.randperm(spec.samples, generator=g)]
    noise = torch.rand(spec.samples, c, h, w, generator=g)
    images = ((0.6 * templates[labels] + 0.4 * noise) * 255).round().to(torch.uint8)
    n_test = max(1, spec.samples // 5)
    mean, std = torch.full((c,), 0.5), torch.full((c,), 0.25)
    return (TensorData(images[n_test:], labels[n_test:], mean, std, spec.classes, crop_padding=0, flip=False),
            TensorData(images[:n_test], labels[:n_test], mean, std, spec.classes))
