"""CIFAR-shaped image trees (DIR/train/CLASS/*.png|jpg, DIR/test/CLASS/*), decoded once and cached.

An image-tree export of CIFAR holds the same 32x32 images as the python batches, one file each, in
class folders whose sorted names give CIFAR's label order. Decoding 60,000 small files takes the
better part of a minute on one core, so the decoded uint8 arrays are kept in a cache file keyed on
the tree's file list, sizes and modification times: any file added, removed or rewritten makes a new
key. The cache lives in `cache_dir()` (`$GABORPRUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/gaborprune`,
else `~/.cache/gaborprune`); deleting that folder clears it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from pathlib import Path

import numpy as np

from gaborprune.errors import DataError

SUFFIXES = (".png", ".jpg", ".jpeg")
SIDE = 32  # CIFAR's image side; other sizes belong to imagefolder:DIR


def cache_dir() -> Path:
    """Where decoded image trees are cached (see the module docstring)."""
    if os.environ.get("GABORPRUNE_CACHE_DIR"):
        return Path(os.environ["GABORPRUNE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gaborprune"


def is_tree(root: Path) -> bool:
    """Whether `root` is laid out as an image tree (train/ and test/ folders)."""
    return (root / "train").is_dir() and (root / "test").is_dir()


def not_regular(path: str) -> DataError:
    """The error for a FIFO, socket, device or folder named like an image (opening a FIFO would wait forever for a writer)."""
    return DataError(f"'{path}' is not a regular file; remove it from the image tree")


def open_regular(path: str):
    """`path` opened for binary reading, refused unless it is a regular file.

    The listing already refused special files; this closes the gap between listing and reading
    (a file replaced by a FIFO meanwhile): O_NONBLOCK makes opening a FIFO return at once instead
    of waiting for a writer, and the check is on the opened file itself.

    Raises:
        DataError: not a regular file.
        OSError: cannot be opened.
    """
    nonblocking = getattr(os, "O_NONBLOCK", 0)  # POSIX; elsewhere there are no FIFOs to open
    fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise not_regular(path)
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _listing(split: Path, num_classes: int) -> tuple[list[str], list[tuple[str, int]], list[os.stat_result]]:
    """The class names (sorted) and the image files (paths as text) with their class index, in a fixed order.

    Only regular files count (a FIFO named like an image would block the decoder forever);
    symlinks to regular files are read, symlinked class folders and folders inside class folders
    are not followed (so no symlink loop is either). The class count is checked before any class
    folder is read. Paths stay plain strings: pathlib costs seconds over 60,000 files, more than
    reading the cache.
    """
    classes = sorted(e.name for e in os.scandir(split) if e.is_dir(follow_symlinks=False))
    if not classes:
        raise DataError(f"'{split}' has no class folders; expected {split}/CLASS/*.png or *.jpg")
    if len(classes) != num_classes:
        raise DataError(f"'{split}' has {len(classes)} class folders; this set has {num_classes}")
    files, stats = [], []
    for label, name in enumerate(classes):
        for entry in sorted(os.scandir(os.path.join(split, name)), key=lambda e: e.name):
            if not entry.name.lower().endswith(SUFFIXES):
                continue
            try:
                st = entry.stat()  # follows a file symlink: its target's size and mtime key the cache
            except OSError as e:
                raise DataError(f"cannot read image '{entry.path}': {e.strerror}; remove or replace it") from None
            if not stat.S_ISREG(st.st_mode):
                raise not_regular(entry.path)
            files.append((entry.path, label))
            stats.append(st)
    if not files:
        raise DataError(f"'{split}' has no .png or .jpg images in its class folders")
    return classes, files, stats


def _decode(path: str) -> np.ndarray:
    """One image file -> uint8 array [3, 32, 32]."""
    from PIL import Image

    try:
        f = open_regular(path)
    except OSError as e:
        raise DataError(f"cannot read image '{path}': {e.strerror}; remove or replace it") from None
    try:
        with f, Image.open(f) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        lines = str(e).strip().splitlines()
        raise DataError(f"cannot read image '{path}': {lines[0] if lines else type(e).__name__}; remove or replace it") from None
    if array.shape[:2] != (SIDE, SIDE):
        raise DataError(f"image '{path}' is {array.shape[1]}x{array.shape[0]}, not CIFAR's {SIDE}x{SIDE}; "
                        "load trees of other sizes as imagefolder:DIR")
    return array.transpose(2, 0, 1)


def _key(root: Path, listings) -> str:
    digest = hashlib.sha256(str(root.resolve()).encode())
    for split, (classes, files, stats) in listings.items():
        digest.update(f"{split}:{','.join(classes)}\n".encode())
        digest.update("".join(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n" for (path, label), st in zip(files, stats)).encode())
    return digest.hexdigest()[:32]


def _read_cache(path: Path, counts: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The cached arrays, or None when the file is missing, unreadable or of the wrong shapes."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            out = {s: (npz[f"{s}_images"], npz[f"{s}_labels"]) for s in counts}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    ok = all(images.shape == (n, 3, SIDE, SIDE) and images.dtype == np.uint8 and labels.shape == (n,)
             for (images, labels), n in zip(out.values(), counts.values()))
    return out if ok else None


def _write_cache(path: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Atomically; a cache that cannot be written (read-only home, full disk) only costs the next run a decode."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **{f"{s}_{k}": a for s, (images, labels) in arrays.items()
                           for k, a in (("images", images), ("labels", labels))})
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def load_tree(root: Path, num_classes: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], bool]:
    """Both splits of a CIFAR-shaped image tree as uint8 images [N, 3, 32, 32] and int64 labels [N].

    Returns:
        ({"train": (images, labels), "test": (images, labels)}, whether the cache answered).
    """
    listings = {split: _listing(root / split, num_classes) for split in ("train", "test")}
    if listings["train"][0] != listings["test"][0]:
        raise DataError(f"'{root}': train/ and test/ have different class folders")
    counts = {split: len(files) for split, (_, files, _) in listings.items()}
    cache = cache_dir() / f"tree-{_key(root, listings)}.npz"
    cached = _read_cache(cache, counts)
    if cached is not None:
        return cached, True
    arrays = {}
    for split, (_, files, _) in listings.items():
        images = np.empty((len(files), 3, SIDE, SIDE), dtype=np.uint8)
        for i, (path, _) in enumerate(files):
            images[i] = _decode(path)
        arrays[split] = (images, np.array([label for _, label in files], dtype=np.int64))
    _write_cache(cache, arrays)
    return arrays, False
