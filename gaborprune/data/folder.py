"""ImageFolder trees (DIR/train/CLASS/*.jpg, DIR/val/CLASS/*.jpg or DIR/test/), read by DataLoader workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from gaborprune.data.tensor import shard_order
from gaborprune.errors import DataError

#: ImageNet's channel statistics: what ImageFolder trees (and torchvision's pretrained weights) are normalised by.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
        from torchvision.datasets import ImageFolder

        try:
            self.dataset = ImageFolder(str(root), transform=transform)
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
