"""ImageFolder trees (DIR/train/CLASS/*.jpg, DIR/val/CLASS/*.jpg or DIR/test/), read by DataLoader workers.

Only `load_data` imports this module, for imagefolder:DIR specs, so torchvision loads here at the top.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torchvision.datasets import ImageFolder

from gaborprune.data.tensor import shard_order
from gaborprune.data.tree import not_regular, open_regular
from gaborprune.errors import DataError

#: ImageNet's channel statistics: what ImageFolder trees (and torchvision's pretrained weights) are normalised by.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def listed(names: list[str], limit: int = 5) -> str:
    """The first `limit` names quoted, then how many more: a list that fits on one line whatever its length."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"{shown} and {len(names) - limit} more" if len(names) > limit else shown


def _seen_above(folder: str) -> set[tuple[int, int]]:
    """(device, inode) of every folder above `folder`, along its path as given and its real path: a
    symlink to one of them leads back into the tree (a loop, or a walk of the whole disk from '/')."""
    seen = set()
    for path in (os.path.abspath(folder), os.path.realpath(folder)):
        while (parent := os.path.dirname(path)) != path:
            path = parent
            try:
                st = os.stat(path)
            except OSError:
                continue
            seen.add((st.st_dev, st.st_ino))
    return seen


def _class_images(folder: str, label: int, extensions: tuple[str, ...]) -> list[tuple[str, int]]:
    """The images under one class folder, in torchvision's order (folders by path, then file names).

    Symlinked folders are followed, as torchvision follows them (ImageNet class folders are often
    links), but each real folder is walked once and no link back to a folder above is: a symlink
    loop counted every image 41 times, and links that fan out could name 2**N paths. A FIFO, socket
    or device named like an image is refused here, before anything opens it.
    """
    seen, found, stack = _seen_above(folder), {}, [folder]
    while stack:
        path = stack.pop()
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            names = []
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_dir():  # follows a link (a stat for links only; plain entries use the folder's listing)
                        stack.append(entry.path)
                    elif entry.name.lower().endswith(extensions):
                        if not entry.is_file():
                            raise not_regular(entry.path)
                        names.append(entry.name)
        except OSError as e:
            raise DataError(f"cannot list '{path}': {e.strerror}") from None
        found[path] = sorted(names)
    return [(os.path.join(path, name), label) for path in sorted(found) for name in found[path]]


class _ImageFolder(ImageFolder):
    """torchvision's ImageFolder, listed by `_class_images` and read through `open_regular`."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False) -> list[tuple[str, int]]:
        samples, empty = [], []
        for name in sorted(class_to_idx):
            images = _class_images(os.path.join(directory, name), class_to_idx[name], tuple(extensions))
            samples += images
            if not images:
                empty.append(name)
        if empty:
            raise DataError(f"image folder '{directory}' has no images in {len(empty)} of its {len(class_to_idx)} class folders: "
                            f"{listed(empty)}; add images ({', '.join(extensions)}) or remove the folders")
        return samples


def _load_rgb(path: str):
    """The image at `path` as an RGB PIL image, read only if it is (still) a regular file."""
    from PIL import Image

    with open_regular(path) as f:
        return Image.open(f).convert("RGB")


class _Unreadable:
    """Stands in for a sample whose image cannot be decoded, so the error reaches the main process as data
    (an exception raised in a DataLoader worker arrives wrapped in the worker's traceback)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason


class _Checked(torch.utils.data.Dataset):
    """An ImageFolder whose undecodable images become `_Unreadable` samples."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        path, target = self.dataset.samples[index]
        try:
            image = self.dataset.loader(path)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            lines = str(e).strip().splitlines()
            return _Unreadable(path, lines[0] if lines else type(e).__name__)
        if self.dataset.transform is not None:
            image = self.dataset.transform(image)
        return image, target


def _collate(samples: list):
    bad = next((s for s in samples if isinstance(s, _Unreadable)), None)
    return bad if bad is not None else torch.utils.data.default_collate(samples)


class FolderData:
    """One split of an ImageFolder tree, with the `TensorData.batches` interface (CPU pinned batches)."""

    def __init__(self, root: Path, transform, num_workers: int, eval_transform=None) -> None:
        try:
            self.dataset = _ImageFolder(str(root), transform=transform, loader=_load_rgb)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"image folder '{root}' has no images: {e}") from None
        self.num_classes = len(self.dataset.classes)
        self.num_workers = num_workers
        self.eval_transform = eval_transform or transform

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, count: int, *, seed: int = 0) -> FolderData:
        """`count` images drawn at random (seeded), read with the evaluation transform (no augmentation)."""
        import copy

        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count].tolist()
        subset = copy.copy(self)
        subset.dataset = copy.copy(self.dataset)
        subset.dataset.samples = [self.dataset.samples[i] for i in idx]
        subset.dataset.transform = self.eval_transform
        return subset

    def split(self, held: int, *, seed: int = 0) -> tuple[FolderData, FolderData]:
        """(the rest, `held` images drawn at random, seeded): a validation split held out from a
        training split; the held images are read with the evaluation transform."""
        import copy

        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        parts = []
        for idx, transform in ((order[held:], self.dataset.transform), (order[:held], self.eval_transform)):
            part = copy.copy(self)
            part.dataset = copy.copy(self.dataset)
            part.dataset.samples = [self.dataset.samples[i] for i in idx]
            part.dataset.targets = [s[1] for s in part.dataset.samples]
            part.dataset.transform = transform
            parts.append(part)
        return parts[0], parts[1]

    def to(self, device) -> FolderData:
        return self  # images are decoded per batch; the trainer moves each batch

    def batches(self, batch_size: int, *, train: bool, generator: torch.Generator | None = None, rank: int = 0,
                world: int = 1, drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        order = shard_order(len(self), train=train, generator=generator, rank=rank, world=world)
        loader = torch.utils.data.DataLoader(
            _Checked(self.dataset), batch_size=batch_size, sampler=order.tolist(), num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), drop_last=drop_last, persistent_workers=False, collate_fn=_collate,
        )
        for batch in loader:
            if isinstance(batch, _Unreadable):
                raise DataError(f"cannot read image '{batch.path}': {batch.reason}; remove or replace it")
            yield batch


def load_image_folder(root: Path, input_shape: tuple[int, int, int], resize: int | None = None) -> tuple[FolderData, FolderData]:
    """Train split: random resized crop + flip; val split: resize (default size * 256 / 224) + centre crop."""
    from torchvision import transforms as T

    held_out = "val" if (root / "val").is_dir() or not (root / "test").is_dir() else "test"
    missing = [s for s in ("train", held_out) if not (root / s).is_dir()]
    if missing:
        raise DataError(f"image folder '{root}' lacks {' and '.join(f'{s}/' for s in missing)}; expected {root}/train/CLASS/*.jpg "
                        f"and {root}/val/CLASS/*.jpg (or test/)")
    size = input_shape[1]
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    rgb = [T.Grayscale(1)] if input_shape[0] == 1 else []  # ImageFolder's loader already gives RGB
    train = T.Compose(rgb + [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] + normalize)
    val = T.Compose(rgb + [T.Resize(resize or round(size * 256 / 224)), T.CenterCrop(size)] + normalize)
    workers = min(8, os.cpu_count() or 1)
    splits = FolderData(root / "train", train, workers, eval_transform=val), FolderData(root / held_out, val, workers)
    if splits[0].dataset.classes != splits[1].dataset.classes:
        raise DataError(f"image folder '{root}': train/ and {held_out}/ have different class folders")
    return splits
