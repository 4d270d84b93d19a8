"""Reading torch files that a stranger may have written, with bounded work (`check_torch_file`).

`torch.load(weights_only=True)` runs no code, but it trusts every size a file declares: a zip entry
deflated from 1.5 GB, a tensor viewing one stored value through stride 0 as 20000x15000, a pickle of
30 million opcodes, 200,000 tensors, a list nested 3,000 deep. Each costs memory or time out of all
proportion to the file, and most surface later as a traceback. So before torch loads a zip-format
file, this module

1. reads the zip's central directory: no entry named twice, stored entries within the file, at most
   `MAX_INFLATED` bytes inflated from compressed entries (torch.save never compresses), a pickle of
   at most `MAX_PICKLE` bytes and at most `MAX_TENSORS` entries;
2. surveys the pickle with Python's C unpickler, every global it names replaced by an inert stand-in
   (so nothing is imported or called, and no tensor data is read): a global outside torch's
   weights-only allow-list is refused as torch would; each tensor's declared storage, offset, shape
   and strides are recorded;
3. walks what the survey built: at most `MAX_TENSORS` tensors, nesting at most `MAX_DEPTH` deep and no
   container that holds itself; every tensor dense (not sparse, meta, quantized, nested or a
   subclass), its strides positive and non-overlapping (no broadcast view, so a tensor never holds
   more values than the file stores), its view inside its storage, and each storage exactly as large
   as its zip entry.

Then `torch.load` reads at most the file's own bytes. A file in torch's legacy (non-zip) format is
loaded by torch (its storages are checked against the file as it reads them) and walked the same way
afterwards. Everything here raises `_BadFile`, which the caller turns into its own error type.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

MAX_TENSORS = 20_000  # torchvision's largest classifier has 1,548 state_dict entries
MAX_DEPTH = 32  # a recipe nests about 8 deep; JSON reports and torch.save recurse on depth
MAX_PICKLE = 64 * 2**20  # the pickle (plain data and tensor references): a recipe's is KBs to a few MBs
MAX_INFLATED = 4 * 2**20  # bytes inflated from compressed entries, in all (torch.save stores entries as they are)
MAX_ENTRIES = MAX_TENSORS + 64  # one entry per storage, and a few records


class _BadFile(Exception):
    """A file that fails a check; the message says why and what was found (it follows "'PATH' ...")."""


def _mb(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n} bytes"


# -- 1. the zip ----------------------------------------------------------------------------------
def _zip_records(path: Path) -> tuple[zipfile.ZipFile, str, dict[str, zipfile.ZipInfo]] | None:
    """The open zip, its archive prefix and its entries by name, after the size checks; None when
    `path` is not a zip file (torch's legacy format, or not a torch file at all)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        return None
    try:
        infos = zf.infolist()
        if not infos:
            raise _BadFile("is an empty zip archive, not a torch file")
        if len(infos) > MAX_ENTRIES:
            raise _BadFile(f"has {len(infos)} zip entries, more than the {MAX_ENTRIES} read (one per stored tensor)")
        entries: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename in entries:  # readers disagree on which copy counts: the one surveyed may not be the one loaded
                raise _BadFile(f"names the zip entry '{info.filename[:80]}' twice")
            entries[info.filename] = info
        size = os.path.getsize(path)
        stored = sum(i.file_size for i in infos if i.compress_type == zipfile.ZIP_STORED)
        if stored > size:
            raise _BadFile(f"declares {_mb(stored)} of stored zip entries in a file of {_mb(size)} (overlapping or forged entries)")
        inflated = sum(i.file_size for i in infos if i.compress_type != zipfile.ZIP_STORED)
        if inflated > MAX_INFLATED:
            big = max((i for i in infos if i.compress_type != zipfile.ZIP_STORED), key=lambda i: i.file_size)
            raise _BadFile(f"has compressed zip entries that would inflate to {_mb(inflated)} (e.g. '{big.filename[:80]}' to {_mb(big.file_size)}), "
                                 f"more than the {_mb(MAX_INFLATED)} read; torch.save never compresses, so another tool made this file")
        prefix = infos[0].filename.split("/", 1)[0]  # torch reads the records under the first entry's folder
        pkl = entries.get(f"{prefix}/data.pkl")
        if pkl is None:
            raise _BadFile(f"has no '{prefix}/data.pkl' record; it is not a torch file")
        if pkl.file_size > MAX_PICKLE:
            raise _BadFile(f"has a pickle of {_mb(pkl.file_size)}, more than the {_mb(MAX_PICKLE)} read")
        return zf, prefix, entries
    except BaseException:
        zf.close()
        raise


# -- 2. the survey -------------------------------------------------------------------------------
class _Storage:
    """A storage the pickle refers to (a persistent id): its element type, zip record and size."""

    def __init__(self, dtype: Any, key: str, location: str, numel: int) -> None:
        self.dtype, self.key, self.location, self.numel = dtype, key, location, numel


class _Tensor:
    """A tensor as the pickle declares it: storage, offset, shape, strides."""

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any, dtype: Any = None) -> None:
        self.storage, self.offset, self.size, self.stride, self.dtype = storage, offset, size, stride, dtype
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Refused:
    """A tensor of a kind never read (sparse, meta, quantized, nested, a subclass)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind


class _Call:
    """What an inert global returns when called: its arguments and whatever is added to it."""

    def __init__(self, key: str, args: tuple) -> None:
        self.key, self.children = key, list(args)

    def __setstate__(self, state: Any) -> None:
        self.children.append(state)

    def append(self, item: Any) -> None:
        self.children.append(item)

    def extend(self, items: Any) -> None:
        self.children.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.children += [key, value]


_REFUSED = {
    "torch._utils._rebuild_sparse_tensor": "a sparse tensor",
    "torch._utils._rebuild_meta_tensor_no_storage": "a meta tensor (shape only, no values)",
    "torch._utils._rebuild_qtensor": "a quantized tensor",
    "torch._utils._rebuild_nested_tensor": "a nested tensor",
    "torch._utils._rebuild_wrapper_subclass": "a tensor subclass",
    "torch._utils._rebuild_device_tensor_from_numpy": "a device tensor built from numpy",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": "a device tensor",
}


class _Global:
    """An allowed global as the survey sees it: calling it records, never runs anything."""

    def __init__(self, key: str, survey: _Survey) -> None:
        self.key, self.survey = key, survey

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self.key
        if key in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v3"):
            self.survey.count_tensor()
            if len(args) < 4:
                raise _BadFile("declares a tensor without its storage, offset, shape and strides")
            dtype = args[6] if key.endswith("_v3") and len(args) > 6 else None
            return _Tensor(*args[:4], dtype=dtype)
        if key in _REFUSED:
            self.survey.count_tensor()
            return _Refused(_REFUSED[key])
        if key in ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"):
            return args[0] if args else None
        if key == "torch._tensor._rebuild_from_type_v2":  # (func, new_type, args, state): a Tensor or Parameter rebuilt by func
            func, inner = (args[0], args[2]) if len(args) > 2 else (None, ())
            return func(*inner) if isinstance(func, _Global) and isinstance(inner, tuple) else _Call(key, args)
        if key == "torch.Size":
            return tuple(args[0]) if args and isinstance(args[0], (tuple, list)) else ()
        if key == "collections.OrderedDict":
            return collections.OrderedDict(*args[:1])
        return _Call(key, args)


class _Survey(pickle.Unpickler):
    """Python's C unpickler with every allowed global replaced by a `_Global` and every storage by a
    `_Storage`: it builds the file's plain data at C speed and runs nothing."""

    def __init__(self, data: bytes, allowed: set[str]) -> None:
        super().__init__(io.BytesIO(data))
        self.allowed, self.tensors = allowed, 0

    def count_tensor(self) -> None:
        self.tensors += 1
        if self.tensors > MAX_TENSORS:
            raise _BadFile(f"holds more than {MAX_TENSORS} tensors, more than any model this reads")

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key not in self.allowed:
            raise _Unsafe(key)
        return _Global(key, self)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Global)):
            raise _BadFile("refers to stored data in a form torch.save does not write")
        _, kind, key, location, numel = pid
        if not (isinstance(key, str) and isinstance(location, str) and isinstance(numel, int) and numel >= 0):
            raise _BadFile("declares a storage without a record name, a location and a size")
        return _Storage(kind.key, key, location, numel)


class _Unsafe(Exception):
    """The pickle names a global outside torch's weights-only allow-list (it would need arbitrary unpickling)."""


def _allowed_globals() -> set[str]:
    from torch import _weights_only_unpickler

    return set(_weights_only_unpickler._get_allowed_globals())


_STORAGE_TYPES = {"Double": "float64", "Float": "float32", "Half": "float16", "BFloat16": "bfloat16", "Long": "int64", "Int": "int32",
                  "Short": "int16", "Char": "int8", "Byte": "uint8", "Bool": "bool", "ComplexDouble": "complex128", "ComplexFloat": "complex64"}


def _element_size(storage_type: str) -> int | None:
    """Bytes per element of a storage type as the pickle names it ("torch.FloatStorage"), or None
    for one that holds no plain numbers (quantized storages)."""
    import torch

    name = storage_type.rsplit(".", 1)[-1]
    if name in ("UntypedStorage", "TypedStorage"):
        return 1
    dtype = _STORAGE_TYPES.get(name.removesuffix("Storage"))
    return getattr(torch, dtype).itemsize if dtype else None


# -- 3. the walk ---------------------------------------------------------------------------------
_LEAVES = (str, bytes, bytearray, int, float, complex, bool, type(None))


def _children(obj: Any) -> list[tuple[str, Any]] | None:
    """(label, child) pairs of a container, or None for a leaf."""
    if isinstance(obj, dict):
        items = [(f"[{k!r}]" if isinstance(k, (str, int)) else "[...]", v) for k, v in obj.items()]
        attrs = getattr(obj, "__dict__", {})  # an OrderedDict state_dict's `_metadata`
        return items + [("(key)", k) for k in obj if not isinstance(k, _LEAVES)] + [(f".{k}", v) for k, v in attrs.items()]
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return [("{...}", v) for v in obj]
    if isinstance(obj, _Call):
        return [(f"<{obj.key}>", v) for v in obj.children]
    return None


def _where(path: list[str]) -> str:
    text = "".join(path) or "the top level"
    return text if len(text) <= 120 else text[:57] + "..." + text[-60:]


def walk(root: Any, check_tensor) -> int:
    """Visit every object under `root` once (depth first, without recursion): refuse nesting deeper
    than MAX_DEPTH and containers that hold themselves; call `check_tensor(obj, where)` for each
    tensor-like leaf (`_Tensor`, `_Refused`, `torch.Tensor`). Returns the number of tensors."""
    import torch

    height: dict[int, int] = {}  # id -> levels below a finished container (shared ones are walked once)
    on_path: set[int] = set()
    path: list[str] = []
    stack: list[tuple[Any, Any, int]] = []  # (container, iterator over its children, tallest child so far)
    tensors = 0

    def enter(obj: Any, label: str) -> None:
        nonlocal tensors
        if isinstance(obj, _LEAVES):
            return
        if isinstance(obj, (_Tensor, _Refused, torch.Tensor, _Storage)):
            if not isinstance(obj, _Storage):
                tensors += 1
                check_tensor(obj, _where(path + [label]))
            return
        key = id(obj)
        if key in on_path:
            raise _BadFile(f"holds a container that contains itself (at {_where(path + [label])})")
        if key in height:
            if len(path) + height[key] > MAX_DEPTH:
                raise _BadFile(f"nests data more than {MAX_DEPTH} levels deep (at {_where(path + [label])})")
            if stack:
                parent, it, best = stack[-1]
                stack[-1] = (parent, it, max(best, height[key]))
            return
        children = _children(obj)
        if children is None:
            raise _BadFile(f"holds a {type(obj).__name__} (at {_where(path + [label])}), not plain data")
        if len(path) >= MAX_DEPTH:
            raise _BadFile(f"nests data more than {MAX_DEPTH} levels deep (at {_where(path + [label])})")
        path.append(label)
        on_path.add(key)
        stack.append((obj, iter(children), 0))

    enter(root, "")
    while stack:
        obj, children, tallest = stack[-1]
        step = next(children, None)
        if step is not None:
            enter(step[1], step[0])
            continue
        stack.pop()
        on_path.discard(id(obj))
        path.pop()
        height[id(obj)] = tallest + 1
        if stack:
            parent, it, best = stack[-1]
            stack[-1] = (parent, it, max(best, tallest + 1))
    return tensors


def _dense_problem(size: Any, stride: Any, offset: Any, numel: int) -> str | None:
    """Why a view (shape `size`, `stride`, `offset`) of a storage of `numel` elements is not one this
    reads, or None: each stored value at most once, all of them inside the storage."""
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in (*size, *stride, offset))):
        return "a malformed shape or strides"
    shown = "x".join(map(str, size)) or "a scalar"
    if min(size, default=0) < 0 or offset < 0:
        return f"a negative size or offset (shape {shown})"
    if 0 in size:
        return None
    dims = sorted((st, n) for n, st in zip(size, stride) if n > 1)
    span = 1  # elements the dimensions so far reach; a stride below it re-reads values (0 broadcasts one)
    for st, n in dims:
        if st < span:
            what = "stride 0 (one stored value broadcast)" if st == 0 else f"overlapping strides {list(stride)}"
            return f"a view of shape {shown} with {what}"
        span += st * (n - 1)
    last = offset + sum(st * (n - 1) for n, st in zip(size, stride))
    if last >= numel:
        return f"a view of shape {shown} past the end of its storage of {numel} values"
    return None


def _survey_check(entries: dict[str, zipfile.ZipInfo], prefix: str):
    def check(obj: Any, where: str) -> None:
        if isinstance(obj, _Refused):
            raise _BadFile(f"holds {obj.kind} at {where}; only dense tensors are read")
        storage = obj.storage
        if not isinstance(storage, _Storage):
            raise _BadFile(f"holds a tensor without stored data at {where}")
        if storage.location == "meta":
            raise _BadFile(f"holds a meta tensor (shape only, no values) at {where}; only dense tensors are read")
        element = _element_size(storage.dtype)
        if element is None:
            raise _BadFile(f"holds a tensor of type '{storage.dtype[:40]}' at {where}; only tensors of plain numbers are read")
        info = entries.get(f"{prefix}/data/{storage.key}")
        if info is None:
            raise _BadFile(f"holds a tensor whose data record 'data/{storage.key[:40]}' is missing, at {where}")
        if storage.numel * element != info.file_size:
            raise _BadFile(f"declares {_mb(storage.numel * element)} for the tensor at {where}, but its record holds {_mb(info.file_size)}")
        problem = _dense_problem(obj.size, obj.stride, obj.offset, storage.numel * element // _view_element(obj, element))
        if problem:
            raise _BadFile(f"holds {problem} at {where}; a tensor must hold each of its values once")

    return check


def _view_element(obj: _Tensor, element: int) -> int:
    """The element size of the view (a v3 tensor names its dtype, which may differ from its storage's)."""
    if not isinstance(obj.dtype, _Global):
        return element
    import torch

    dtype = getattr(torch, obj.dtype.key.rsplit(".", 1)[-1], None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) and dtype.itemsize else element


def _loaded_check(obj: Any, where: str) -> None:
    """The walk's check of a tensor torch has loaded (a legacy-format file)."""
    import torch

    if obj.layout != torch.strided or obj.is_quantized or obj.is_nested or type(obj) not in (torch.Tensor, torch.nn.Parameter):
        raise _BadFile(f"holds a {obj.layout} {type(obj).__name__} at {where}; only dense tensors are read")
    if obj.device.type == "meta":
        raise _BadFile(f"holds a meta tensor (shape only, no values) at {where}; only dense tensors are read")
    numel = obj.untyped_storage().nbytes() // max(1, obj.element_size())
    problem = _dense_problem(tuple(obj.shape), tuple(obj.stride()), obj.storage_offset(), numel)
    if problem:
        raise _BadFile(f"holds {problem} at {where}; a tensor must hold each of its values once")


def check_torch_file(path: Path) -> bool:
    """Run the checks above on a zip-format torch file, before torch reads it.

    Returns:
        True when `path` is a zip file that passed, False when it is not a zip file (the caller
        loads it with torch and passes the result to `check_loaded`).

    Raises:
        _BadFile: a check failed.
        _Unsafe: the pickle names a global that only arbitrary unpickling could load.
    """
    found = _zip_records(path)
    if found is None:
        return False
    zf, prefix, entries = found
    with zf:
        try:
            data = zf.read(f"{prefix}/data.pkl")
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise _BadFile(f"has an unreadable pickle record ({e})") from None
    survey = _Survey(data, _allowed_globals())
    try:
        root = survey.load()
    except (_BadFile, _Unsafe):
        raise
    except RecursionError:
        raise _BadFile(f"nests data more than {MAX_DEPTH} levels deep") from None
    except Exception as e:  # a corrupt or hand-made pickle: whatever the C unpickler raises
        raise _BadFile(f"has a pickle that does not read ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    del data
    walk(root, _survey_check(entries, prefix))
    return True


def check_loaded(obj: Any) -> None:
    """The walk's checks on what torch loaded from a legacy-format file. Raises _BadFile."""
    walk(obj, _loaded_check)
