"""Output files: checked before any work, written all-or-nothing, strict JSON.

Every file the project writes (recipes, checkpoints, ONNX, JSON, PNG, Markdown, the metrics log)
goes through `write_atomic`: the content goes to a temporary file in the target directory, which
is then renamed over the target. An I/O error (full disk, read-only or missing directory, no
permission) becomes one `GaborPruneError` line naming the path and the cause; it leaves no partial
or temporary file, and an existing file at the path stays as it was. A missing output directory
is created (with its parents), as `mkdir -p` would; a path through an existing *file* is an error.

Outputs only ever replace regular files (or a symlink, which is replaced, not followed): a
directory, device, FIFO or socket at an output path, or a symlink to one, is refused even with
`force`, and so is an output that is one of the command's input files (`check_not_inputs`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from gaborprune.errors import GaborPruneError, OutputExistsError

#: The longest name of one path component, in bytes, on Linux, macOS and Windows file systems.
NAME_MAX = 255

_SPECIAL = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
            (stat.S_ISSOCK, "a socket"))


def check_output(path: str | os.PathLike | None, force: bool = False) -> None:
    """Fail early, before any work, when `path` may not be written.

    An existing regular file (or symlink, which the write replaces without following it) needs
    `force`; anything else there (a directory, device, FIFO or socket, or a symlink to one) is
    refused even with `force`; so is a folder that `mkdir -p` could not make (a file, a symlink
    loop or a broken link on the way) and a name the file system cannot hold.

    Raises:
        OutputExistsError: `path` exists and `force` is false.
        GaborPruneError: `path` is not a regular file, or cannot be written.
    """
    if path is None:
        return
    p = Path(path)
    try:
        mode = os.lstat(p).st_mode
    except FileNotFoundError:
        _check_folder(p)
        return
    except OSError as e:  # a file or a loop on the way (named by _check_folder), a name too long, no access
        _check_folder(p)
        raise _write_error(p, e) from None
    if stat.S_ISLNK(mode):
        try:
            mode = os.stat(p).st_mode
        except OSError:  # a broken link or a loop: replaced like a file
            pass
    if stat.S_ISDIR(mode):
        raise GaborPruneError(f"output '{p}' is a directory; give a file path")
    kind = next((name for test, name in _SPECIAL if test(mode)), None)
    if kind is not None:
        raise GaborPruneError(f"output '{p}' is {kind}, not a regular file; outputs only replace regular files, "
                              "even with `force`: give a file path")
    if not force:
        raise OutputExistsError(f"output '{p}' exists; pass `force` to overwrite it")


def _check_folder(p: Path) -> None:
    """The folder of the missing output `p` exists or can be made, as `mkdir -p` would."""
    for folder in p.parents:
        try:
            mode = os.stat(folder).st_mode
        except (FileNotFoundError, NotADirectoryError):  # made by mkdir -p, or a file further up
            if os.path.islink(folder):
                raise GaborPruneError(f"cannot write '{p}': '{folder}' is a symlink to a missing folder") from None
            continue
        except OSError as e:
            raise _write_error(p, e, folder) from None
        if not stat.S_ISDIR(mode):
            raise GaborPruneError(f"cannot write '{p}': '{folder}' is a file, not a directory")
        return


def check_not_inputs(outputs: Iterable[str | os.PathLike | None], inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that is one of the command's input files, even with `force`: the same file
    after resolving links and `..`, or by a hard link. Inputs that are no existing file (a model
    name, an option not given) are skipped.

    Raises:
        GaborPruneError: naming the output and the input.
    """
    files = [Path(i) for i in inputs if i is not None and str(i) and os.path.isfile(i)]
    for o in (Path(o) for o in outputs if o is not None):
        for i in files:
            if _resolved(o) == _resolved(i) or (os.path.exists(o) and os.path.samefile(o, i)):
                also = f" ('{i}')" if str(i) != str(o) else ""
                raise GaborPruneError(f"output '{o}' is also an input of this command{also}; an output never replaces an input, "
                                      "even with `force`: write to another path")


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # a symlink loop: check_output reports what is wrong with it
        return p.absolute()


def check_outputs(paths: Iterable[str | os.PathLike | None], force: bool = False, *,
                  reused: Iterable[str | os.PathLike] = (), inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """`check_output` for all of a command's outputs at once, no path given twice, none an input.

    `reused` are outputs that may exist without `force` (a resumed run's own checkpoints); they
    still may not coincide with another output. `inputs` are the files the command reads
    (`check_not_inputs`). `None` entries (options not given) are skipped.

    Raises:
        GaborPruneError: two outputs are the same file (compared after resolving links and `..`),
            an output is an input, or `check_output` fails for one of them.
    """
    outputs = [(Path(p), True) for p in paths if p is not None] + [(Path(p), False) for p in reused]
    seen: dict[Path, Path] = {}
    for p, _ in outputs:
        key = _resolved(p)
        if key in seen:
            also = f" (also as '{seen[key]}')" if str(seen[key]) != str(p) else ""
            raise GaborPruneError(f"output '{p}' is given twice{also}; give each output its own path")
        seen[key] = p
    check_not_inputs([p for p, checked in outputs if checked], inputs)
    for p, checked in outputs:
        check_output(p, force or not checked)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], force: bool = False) -> Path:
    """Write a file through a temporary sibling and an atomic rename (see the module docstring).

    `write` receives the temporary path. Prefer the helpers below, which write through one open file.

    Raises:
        GaborPruneError: `path` may not be overwritten, or an I/O error (the message names `path`
            and the cause).
    """
    p = Path(path)
    check_output(p, force)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((a for a in p.parents if a.exists() and not a.is_dir()), p.parent)
        raise GaborPruneError(f"cannot write '{p}': '{blocking}' is a file, not a directory") from None
    except OSError as e:
        raise _write_error(p, e) from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(p.name), suffix=".tmp", dir=p.parent)
        os.close(fd)
    except OSError as e:
        raise _write_error(p, e) from None
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes the file private; outputs get the usual mode
        check_output(p, force)  # again: a FIFO or folder may have appeared there while `write` ran
        os.replace(tmp_path, p)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise _write_error(p, e) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return p


def write_file(path: str | os.PathLike, write: Callable[[IO[bytes]], None], force: bool = False) -> Path:
    """`write_atomic` where `write` fills an open binary file."""

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return write_atomic(path, fill, force)


def write_bytes(path: str | os.PathLike, data: bytes, force: bool = False) -> Path:
    return write_file(path, lambda f: f.write(data), force)


def write_text(path: str | os.PathLike, text: str, force: bool = False) -> Path:
    return write_bytes(path, text.encode(), force)


def to_json(data: Any, indent: int | None = None) -> str:
    """Strict JSON: non-finite floats (NaN, +-Infinity) become null, which every parser reads."""
    return json.dumps(_finite(data), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, data: Any, force: bool = False) -> Path:
    """Write `data` as indented strict JSON (`to_json`), atomically."""
    return write_text(path, to_json(data, indent=2) + "\n", force)


def save_torch(path: str | os.PathLike, obj: Any, force: bool = False) -> Path:
    """`torch.save(obj)` into `path`, atomically, with one-line I/O errors."""
    return write_file(path, lambda f: _torch_save(obj, f), force)


def save_figure(path: str | os.PathLike, fig: Any, force: bool = False) -> Path:
    """A matplotlib figure as a PNG (120 dpi), atomically."""
    return write_file(path, lambda f: fig.savefig(f, dpi=120, format="png"), force)


def _torch_save(obj: Any, f: IO[bytes]) -> None:
    import torch

    try:
        torch.save(obj, f)
    except RuntimeError as e:
        # torch's stream writer reports a failed write as RuntimeError ("PytorchStreamWriter failed
        # writing file", "basic_ios::clear"); the OSError it hit, if any, is in the chain, and the
        # file's own buffer may still hold the bytes whose flush says what went wrong
        cause = e.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is not None:
            raise cause from None
        f.flush()
        raise OSError(f"torch.save failed ({_first_line(e)})") from None


def _temp_prefix(name: str) -> str:
    """`.NAME.` for the temporary sibling of NAME, NAME shortened so that mkstemp's name (the
    prefix, 8 random characters, `.tmp`) fits NAME_MAX bytes: any name the target may have works."""
    while len(os.fsencode(f".{name}.")) > NAME_MAX - 12:
        name = name[:-1]
    return f".{name}."


def _write_error(path: Path, e: OSError, where: Path | None = None) -> GaborPruneError:
    cause = {errno.ENAMETOOLONG: f"name too long (at most {NAME_MAX} bytes a name)",
             errno.ELOOP: "a symlink loop"}.get(e.errno, e.strerror or str(e))
    at = "" if where is None else f"'{where}' is " if e.errno == errno.ELOOP else f"'{where}': "
    return GaborPruneError(f"cannot write '{path}': {at}{cause}")


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def safe_torch_load(path: Path, what: str, error: type[GaborPruneError]) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, with one-line errors of type `error`.

    A file that needs arbitrary unpickling (it could run code) is refused; nothing in it runs. Sizes,
    counts, strides and nesting are checked before torch reads any data (`gaborprune._load`), so the
    work is bounded by the file's size.
    """
    import pickle

    import torch

    from gaborprune import _load

    unsafe = (f"refusing to load '{path}': it needs arbitrary unpickling, which could run code; "
              f"{what} must hold only tensors and plain data")
    try:
        zipped = _load.check_torch_file(path)
    except _load._Unsafe:
        raise error(unsafe) from None
    except _load._BadFile as e:
        raise error(f"refusing to load '{path}' as a {what}: it {e}") from None
    except OSError as e:
        raise error(f"cannot read '{path}': {e.strerror or e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():  # a class or function reference, not data
            raise error(unsafe) from None
        raise error(f"'{path}' is not a readable {what} (corrupt, not a torch file, or a pickle the safe loader refuses)") from None
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise error(f"'{path}' is not a readable {what} (corrupt or not a torch file: {_first_line(e)})") from None
    if not zipped:  # torch's legacy format: checked once loaded (its storages were checked against the file as read)
        try:
            _load.check_loaded(obj)
        except _load._BadFile as e:
            raise error(f"refusing to load '{path}' as a {what}: it {e}") from None
    return obj


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:160] if lines else type(e).__name__
