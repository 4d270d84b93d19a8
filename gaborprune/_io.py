"""Atomic, overwrite-safe output files."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gaborprune.errors import GaborPruneError, OutputExistsError


def check_output(path: str | os.PathLike | None, force: bool = False) -> None:
    """Fail early, before any work, when `path` exists and may not be overwritten.

    Raises:
        OutputExistsError: `path` exists and `force` is false.
        GaborPruneError: `path` is a directory.
    """
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise GaborPruneError(f"output '{p}' is a directory; give a file path")
    if p.exists() and not force:
        raise OutputExistsError(f"output '{p}' exists; pass --force to overwrite it")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], force: bool = False) -> Path:
    """Write a file through a temporary sibling and an atomic rename.

    `write` receives the temporary path. A failure leaves neither a partial file nor a
    changed original behind.
    """
    p = Path(path)
    check_output(p, force)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        os.close(fd)
    except OSError as e:
        raise GaborPruneError(f"cannot write '{p}': {e.strerror or e}") from None
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes the file private; outputs get the usual mode
        os.replace(tmp_path, p)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise GaborPruneError(f"cannot write '{p}': {e.strerror or e}") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return p


def write_json(path: str | os.PathLike, data: Any, force: bool = False) -> Path:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text), force)


def safe_torch_load(path: Path, what: str, error: type[GaborPruneError]) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, with one-line errors of type `error`.

    A file that needs arbitrary unpickling (it could run code) is refused; nothing in it runs.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():  # a class or function reference, not data
            raise error(f"refusing to load '{path}': it needs arbitrary unpickling, which could run code; {what} must hold only tensors and plain data") from None
        raise error(f"'{path}' is not a readable {what} (corrupt, not a torch file, or a pickle the safe loader refuses)") from None
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise error(f"'{path}' is not a readable {what} (corrupt or not a torch file: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:160] if lines else type(e).__name__
