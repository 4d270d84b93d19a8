"""Parsing dataset specs and loading each kind, offline only."""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gaborprune._validate import check_batch_memory, check_int
from gaborprune.data import tree
from gaborprune.data.tensor import TensorData
from gaborprune.errors import DataError

KINDS = ("cifar10:DIR", "cifar100:DIR", "imagefolder:DIR", "digits", "fake:N[:CLASSES]")

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

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        kind, _, rest = text.partition(":")
        if kind in ("cifar10", "cifar100", "imagefolder"):
            if not rest:
                raise DataError(f"dataset '{text}' needs a folder: {kind}:DIR")
            return cls(kind, path=rest)
        if kind == "digits" and not rest:
            return cls("digits")
        if kind == "fake":
            try:
                parts = [int(v) for v in rest.split(":")] if rest else [1000]
                samples, classes = parts[0], (parts[1] if len(parts) > 1 else 10)
                if len(parts) > 2 or samples < 2 or classes < 2:
                    raise ValueError
            except ValueError:
                raise DataError(f"dataset '{text}' is not fake:N or fake:N:CLASSES with N >= 2 samples and >= 2 classes") from None
            return cls("fake", samples=samples, classes=classes)
        raise DataError(f"unknown dataset '{text}'; known: {', '.join(KINDS)}")

    def __str__(self) -> str:
        if self.kind == "fake":
            return f"fake:{self.samples}:{self.classes}"
        return f"{self.kind}:{self.path}" if self.path else self.kind


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
    """uint8 Tensor[N, c, h, w] -> uint8 Tensor[N, C, H, W]: bilinear resize, grey replicated to C."""
    c, h, w = input_shape
    if images.shape[1] not in (1, c):
        raise DataError(f"images have {images.shape[1]} channels but the model takes {c}; pass `input_shape`")
    if images.shape[-2:] != (h, w):
        images = F.interpolate(images.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, c, -1, -1).contiguous() if images.shape[1] != c else images


class _NumpyOnly(pickle.Unpickler):
    """CIFAR batches are pickles: allow numpy arrays and plain data, nothing that could run code."""

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset batch")


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
                    batch = _NumpyOnly(io.BytesIO(f.read()), encoding="latin1").load()
                data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels += list(batch[info["key"]])
            except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as e:
                raise DataError(f"'{folder / name}' is not a {spec.kind} batch ({e}); re-extract {info['url']}") from None
        return torch.from_numpy(np.concatenate(data)), torch.tensor(labels, dtype=torch.int64)

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
