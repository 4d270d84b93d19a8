"""The one way an ONNX file is read (`read_onnx`), and what gaborprune wrote into it (`metadata_of`).

A file from elsewhere is data, not a program: before anything is allocated, every tensor's declared
shape and element type must match the bytes the file (or its external data) holds, so a 100-byte
file cannot claim a 2 GB initializer; external data is pulled in only from regular files inside the
model's own folder, reached without a symbolic link at any step (`external-data locations` below),
and only after every location of the file has passed. The model that comes back is self-contained
(its external data inlined), so neither ONNX nor ONNX Runtime is ever handed a location to resolve
(both would resolve it against the current directory for a model given as bytes, and follow links).

External-data locations: relative paths (`/`-separated), no `..` part, no absolute path, no link,
a regular file at the end, `offset` and `length` inside it, `length` the tensor's declared size.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from gaborprune._validate import available_memory
from gaborprune.errors import OnnxFileError

#: The most bytes a model may hold, its external data included: protobuf's limit on one message,
#: which the inlined model must fit to be checked and handed to ONNX Runtime.
MAX_BYTES = 2**31 - 1


def read_onnx(path: str | os.PathLike):
    """The parsed, checked, self-contained model in `path` (onnx.ModelProto): sizes checked, external
    data pulled in from the model's folder, the ONNX checker passed, graph inputs and outputs present.

    Raises:
        OnnxFileError: the file is missing, unreadable, corrupt, declares more data than it holds, has
            a negative dimension, keeps external data outside its folder, or fails the ONNX checker
            (one line).
    """
    import onnx

    p = Path(path)
    if p.is_dir():
        raise OnnxFileError(f"'{p}' is a directory, not an ONNX file")
    if not p.exists():
        raise OnnxFileError(f"ONNX file '{p}' not found")
    if not p.is_file():
        raise OnnxFileError(f"'{p}' is not a regular file (a FIFO, socket or device); give an .onnx file")
    try:
        size = p.stat().st_size
        if size > MAX_BYTES:
            raise OnnxFileError(f"'{p}' is {size / 1e9:.1f} GB, more than the {MAX_BYTES / 1e9:.1f} GB an ONNX model can hold in one file")
        data = p.read_bytes()
    except OSError as e:
        raise OnnxFileError(f"cannot read '{p}': {e.strerror or e}") from None
    try:
        proto = onnx.load_from_string(data)
    except Exception:  # protobuf's DecodeError, whatever the damage
        raise OnnxFileError(f"'{p}' is not an ONNX model (corrupt, truncated or another kind of file); export it again") from None
    _check_dims(proto, p)
    external = _check_tensors(proto, p)
    if external:
        _pull_in(external, p)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        lines = str(e).strip().splitlines()
        raise OnnxFileError(f"'{p}' is not a valid ONNX model (the ONNX checker: {lines[0][:160] if lines else type(e).__name__}); export it again") from None
    if not proto.graph.input or not proto.graph.output:
        raise OnnxFileError(f"'{p}' has no graph {'inputs' if not proto.graph.input else 'outputs'}; it cannot be run")
    return proto


# -- sizes ----------------------------------------------------------------------------------------
def _bits() -> dict[int, int]:
    from onnx import TensorProto as T

    sizes = {"FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64, "BOOL": 8, "FLOAT16": 16,
             "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "COMPLEX64": 64, "COMPLEX128": 128, "BFLOAT16": 16, "FLOAT8E4M3FN": 8,
             "FLOAT8E4M3FNUZ": 8, "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8, "FLOAT8E8M0": 8, "UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4,
             "UINT2": 2, "INT2": 2}
    return {getattr(T, name): bits for name, bits in sizes.items() if hasattr(T, name)}


def _graph_tensors(graph):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes):
    """Every tensor the nodes hold in attributes (Constant values, subgraphs of If and Loop, ...)."""
    for node in nodes:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sparse in [a.sparse_tensor] * a.HasField("sparse_tensor") + list(a.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for g in [a.g] * a.HasField("g") + list(a.graphs):
                yield from _graph_tensors(g)


def _all_tensors(proto):
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        yield from _node_tensors(function.node)


def _check_dims(proto, p: Path) -> None:
    """No negative dimension in the graph's declared inputs, outputs and intermediate values (bench
    would build its input from them)."""
    graph = proto.graph
    for v in [*graph.input, *graph.output, *graph.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value < 0:
                raise OnnxFileError(f"'{p}' declares dimension {d.dim_value} for {v.name!r} (dimensions are at least 0); export it again")


def _check_tensors(proto, p: Path) -> list[tuple]:
    """Check every tensor's declared size against the data present; returns the external tensors as
    (tensor, file path, offset, bytes), every location checked, none opened."""
    from onnx import TensorProto

    bits, external, total = _bits(), [], 0
    for t in _all_tensors(proto):
        what = f"'{p}': tensor {t.name!r}"
        if any(d < 0 for d in t.dims):
            raise OnnxFileError(f"{what} has a negative dimension {list(t.dims)}; export it again")
        n = math.prod(t.dims)
        if t.data_type == TensorProto.STRING:
            if t.data_location == TensorProto.EXTERNAL or len(t.string_data) != n:
                raise OnnxFileError(f"{what} declares {n} strings but holds {len(t.string_data)}; export it again")
            total += sum(map(len, t.string_data))
            continue
        if t.data_type not in bits:
            raise OnnxFileError(f"{what} has element type {t.data_type}, which gaborprune cannot size; export it again")
        nbytes = (n * bits[t.data_type] + 7) // 8
        total += nbytes
        if total > MAX_BYTES:
            raise OnnxFileError(f"{what} declares shape {list(t.dims)} ({nbytes / 1e9:.1f} GB): the model would hold more than the "
                                f"{MAX_BYTES / 1e9:.1f} GB an ONNX model can; export it again")
        if t.data_location == TensorProto.EXTERNAL:
            external.append((t, *_external(t, nbytes, p), nbytes))
            continue
        entries = sum(len(f) for f in (t.float_data, t.int32_data, t.int64_data, t.double_data, t.uint64_data))
        want = nbytes if bits[t.data_type] < 8 else 2 * n if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else n
        if t.raw_data and entries:
            raise OnnxFileError(f"{what} holds its values twice (raw and typed); export it again")
        held, unit, expected = (len(t.raw_data), "bytes", nbytes) if t.raw_data else (entries, "values", want)
        if held != expected:
            raise OnnxFileError(f"{what} declares shape {list(t.dims)} ({expected} {unit}) but holds {held} {unit}; export it again")
    need = sum(e[3] for e in external)
    limit = available_memory()
    if limit is not None and need > limit:
        raise OnnxFileError(f"'{p}' keeps {need / 1e9:.1f} GB of external data, more than the {limit / 1e9:.1f} GB of memory available")
    return external


# -- external data --------------------------------------------------------------------------------
def _external(t, nbytes: int, p: Path) -> tuple[Path, int]:
    """(the file, the offset) of an external tensor, checked without opening anything."""
    entries = {e.key: e.value for e in t.external_data}
    location = entries.get("location", "")
    what = f"'{p}': tensor {t.name!r} keeps its data at {location!r}"
    parts = location.replace("\\", "/").split("/")
    if not location or "\0" in location:
        raise OnnxFileError(f"'{p}': tensor {t.name!r} is external but names no file; export it again")
    if location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":") or ".." in parts:
        raise OnnxFileError(f"{what}, outside the model's folder; external data must be a file beside the model (no absolute path, no `..`)")
    folder = p.parent
    current = folder
    steps = [x for x in parts if x not in ("", ".")]
    for k, part in enumerate(steps):
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except OSError:
            raise OnnxFileError(f"{what}, which does not exist in '{folder}'; keep the external data beside the model") from None
        if stat.S_ISLNK(mode):
            raise OnnxFileError(f"{what}, through the symbolic link '{current}'; external data must be a plain file inside the model's folder")
        if k < len(steps) - 1 and not stat.S_ISDIR(mode):
            raise OnnxFileError(f"{what}, but '{current}' is not a folder; export it again")
    if current == folder or not stat.S_ISREG(os.lstat(current).st_mode):
        raise OnnxFileError(f"{what}, which is not a regular file; external data must be a plain file inside the model's folder")
    numbers = {}
    for key in ("offset", "length"):
        value = entries.get(key)
        if value is not None and not (value.isascii() and value.isdigit()):
            raise OnnxFileError(f"{what} with {key} {value!r}, not a whole number of bytes; export it again")
        numbers[key] = int(value) if value is not None else None
    offset, length, size = numbers["offset"] or 0, numbers["length"], os.lstat(current).st_size
    if length is not None and length != nbytes:
        raise OnnxFileError(f"{what} with length {length}, but its shape {list(t.dims)} needs {nbytes} bytes; export it again")
    if offset + nbytes > size:
        raise OnnxFileError(f"{what} (bytes {offset} to {offset + nbytes}), past the end of the {size}-byte file; export it again")
    return current, offset


def _pull_in(external: list[tuple], p: Path) -> None:
    """Read each external tensor's bytes into it (no link followed at the last step either)."""
    from onnx import TensorProto

    for t, file, offset, nbytes in external:
        try:
            fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise OnnxFileError(f"cannot read the external data of tensor {t.name!r} in '{file}': {e.strerror or e}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OnnxFileError(f"'{p}': tensor {t.name!r} keeps its data in '{file}', which is not a regular file")
            chunks, got = [], 0
            while got < nbytes:
                chunk = os.pread(fd, min(nbytes - got, 1 << 26), offset + got)
                if not chunk:
                    raise OnnxFileError(f"'{p}': the external data of tensor {t.name!r} in '{file}' ends early (it changed while read)")
                chunks.append(chunk)
                got += len(chunk)
        except OSError as e:
            raise OnnxFileError(f"cannot read the external data of tensor {t.name!r} in '{file}': {e.strerror or e}") from None
        finally:
            os.close(fd)
        t.raw_data = b"".join(chunks)
        t.data_location = TensorProto.DEFAULT
        del t.external_data[:]


# -- gaborprune's metadata ---------------------------------------------------------------------
def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


#: The keys `gaborprune.export.api.export_model` writes, with the shape each value must have and
#: that shape in words (for the note that replaces a value of another shape).
EXPECTED = {
    "gaborprune.version": (lambda v: isinstance(v, str), "a string"),
    "gaborprune.source": (lambda v: isinstance(v, str), "a string"),
    "gaborprune.conversions": (_is_count, "a count"),
    "gaborprune.prune_plans": (_is_count, "a count"),
    "gaborprune.macs": (_is_count, "a count"),
    "gaborprune.kernels_kept": (lambda v: isinstance(v, dict) and all(isinstance(k, list) and len(k) == 2 and all(map(_is_count, k))
                                                                      for k in v.values()), "{layer: [kept, kernels]}"),
    "gaborprune.lowering": (lambda v: isinstance(v, dict) and all(isinstance(f, str) for f in v.values()), "{layer: form}"),
    "gaborprune.input_shape": (lambda v: isinstance(v, list) and all(map(_is_count, v)), "a list of dimensions"),
}
_STRINGS = ("gaborprune.version", "gaborprune.source", "gaborprune.quant_pre_process_skipped")


def metadata_of(proto) -> dict[str, object]:
    """The model's metadata_props, JSON values decoded (export stores non-strings as JSON; plain
    strings stay strings). A gaborprune key whose value has not the shape export writes (`EXPECTED`)
    is kept as a note, "(ignored: ...)", so that nothing reading the metadata trips over it."""
    out: dict[str, object] = {}
    for e in proto.metadata_props:
        value: object = e.value
        if e.key not in _STRINGS:
            try:
                decoded = json.loads(e.value)
            except (ValueError, RecursionError):
                decoded = e.value
            value = e.value if isinstance(decoded, str) else decoded
        check, shape = EXPECTED.get(e.key, (None, ""))
        if check is not None and not check(value):
            value = f"(ignored: {_kind(value)}, not {shape})"
        out[e.key] = value
    return out


def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a negative or too large number" if isinstance(value, int) else "a number")
