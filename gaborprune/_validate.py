"""Range checks shared by the configs, builders and commands.

Each check returns the value it was given, or raises one line that names the option and the value.
Typer only checks types, so without these a seed past 2**63, an `inf` or a batch of 100000 would
reach torch and fail there (a traceback, or minutes of work, or a process the kernel kills).
"""

from __future__ import annotations

import math
import os

from gaborprune.errors import GaborPruneError

MAX_SEED = 2**63 - 1  # non-negative int64: a seed every consumer here (torch, its generators, numpy, JSON) holds exactly
#: An environment variable that lowers the memory a command may plan to use (bytes, or with a unit: 2GB, 512MB).
MEMORY_ENV = "GABORPRUNE_MEMORY_LIMIT"
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def is_int(value: object) -> bool:
    """An int that is not a bool (True is an int in Python; as a count or a seed it is a mistake)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_seed(seed: object, what: str = "`seed`", error: type[GaborPruneError] = GaborPruneError) -> int:
    """A seed: an int in 0..2**63-1."""
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise error(f"{what} must be an integer from 0 to 2**63-1, not {seed!r}")
    return seed


def check_finite(value: object, what: str, error: type[GaborPruneError] = GaborPruneError) -> float:
    """A real number that is neither NaN nor infinite (NaN fails every comparison, so range checks alone let it through)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise error(f"{what} must be a finite number, not {value!r}")
    return value


def check_int(value: object, what: str, minimum: int = 1, error: type[GaborPruneError] = GaborPruneError) -> int:
    """An int (not a bool, not a float) of at least `minimum`."""
    if not is_int(value) or value < minimum:
        raise error(f"{what} must be an integer of at least {minimum}, not {value!r}")
    return value


def check_threads(threads: object, what: str = "`threads`", error: type[GaborPruneError] = GaborPruneError) -> int:
    """A thread count from 1 to the cores this process may use (more only oversubscribes them; 100000 hangs)."""
    cores = usable_cores()
    if not is_int(threads) or not 1 <= threads <= cores:
        raise error(f"{what} must be from 1 to {cores} (the cores this process may use), not {threads!r}")
    return threads


def available_memory() -> int | None:
    """Bytes of memory a new allocation can get without swapping: MemAvailable on Linux, else the
    free physical pages where the platform says, else None (unknown: nothing is refused)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def memory_limit_from_env() -> int | None:
    """GABORPRUNE_MEMORY_LIMIT in bytes (None when unset).

    Raises:
        GaborPruneError: a value that is not a positive size.
    """
    text = os.environ.get(MEMORY_ENV, "").strip()
    if not text:
        return None
    number = text.rstrip("KMGTiBkmgtib ")
    unit = text[len(number):].strip().upper()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        value = float("nan")
    if not (math.isfinite(value) and value >= 1):
        raise GaborPruneError(f"{MEMORY_ENV}={text[:40]!r} is not a memory size; give bytes or a size such as 2GB or 512MB")
    return int(value)


def memory_budget() -> int | None:
    """Bytes a command may plan to allocate: the memory available now (`available_memory`), or
    GABORPRUNE_MEMORY_LIMIT when that is lower; None when neither is known (nothing is refused)."""
    limits = [n for n in (available_memory(), memory_limit_from_env()) if n is not None]
    return min(limits) if limits else None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def check_batch_memory(per_sample: int, count: int, what: str, option: str = "`batch_size`",
                       error: type[GaborPruneError] = GaborPruneError) -> None:
    """Refuse `count` samples of `per_sample` bytes each (an estimate such as
    `gaborprune.probe.activation_bytes`) when they exceed the memory available now (`memory_budget`),
    before anything is allocated: the kernel would otherwise kill the process after minutes of swapping.

    Raises:
        `error`: naming `what`, the count, the estimate, the limit and the largest count that fits.
    """
    limit = memory_budget()
    need = per_sample * count
    if limit is None or need <= limit:
        return
    fits = limit // max(1, per_sample)
    hint = f"give a smaller {option} (at most about {fits})" if fits else "give a smaller input"
    raise error(f"{what} needs about {_gb(need)} of memory for {count} samples (estimated), more than the {_gb(limit)} available; {hint}")
