"""What this CPU's ONNX Runtime works in: the channel block of its blocked convolutions (a leaf module:
pruning rounds channel counts to it, export pads to it, the target search prefers counts on it)."""

from __future__ import annotations

import os
from pathlib import Path

from gaborprune.errors import GaborPruneError

#: Set to a channel count to prune and export for another CPU than this one (e.g. 8 on an AVX-512
#: workstation for an AVX2 device; 0: no block), and in the test suite, so that no test depends on the host.
ENV = "GABORPRUNE_CPU_BLOCK"


def cpu_block(cpuinfo: str | None = None) -> int:
    """ONNX Runtime's NCHWc channel block on this CPU: 16 with AVX-512 (avx512f), 8 with AVX2, 0 when
    neither is known (no padding or rounding is tried then); `GABORPRUNE_CPU_BLOCK` overrides it.

    Args:
        cpuinfo: the text of /proc/cpuinfo; read when None (0 where there is none).
    """
    if cpuinfo is None and os.environ.get(ENV, "").strip():
        value = os.environ[ENV].strip()
        if not (value.isdigit() and int(value) <= 1024):
            raise GaborPruneError(f"{ENV}={value!r} is not a channel count; set it to 0, 8, 16 (or unset it to read this CPU's)")
        return int(value)
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return 0
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags |= set(value.split())
    return 16 if "avx512f" in flags else 8 if "avx2" in flags else 0
