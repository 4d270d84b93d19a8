"""How many CPU threads torch computes with, and whether the machine can give them.

torch's default is one intra-op thread per core. On a shared machine whose cores are already busy,
that default is the slowest choice: threads that wait for each other at every operator wait for the
scheduler too (measured here: fine-tuning at 21 images/s with two threads on a busy 2-core machine,
178 with one). So every computing command takes `--threads N`, and says when the machine is
oversubscribed instead of silently running several times slower.
"""

from __future__ import annotations

import os

import torch

from gaborprune._validate import check_threads, usable_cores

__all__ = ["busy_warning", "load_average", "machine_note", "set_threads", "usable_cores"]


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads for this process and return the count in use.

    Args:
        threads: 1..usable_cores(); None keeps torch's default (one per usable core).

    Raises:
        GaborPruneError: `threads` out of range.
    """
    if threads is not None:
        torch.set_num_threads(check_threads(threads))
    return torch.get_num_threads()


def load_average() -> float | None:
    """The 1-minute load average, where the platform has one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_warning(threads: int) -> str | None:
    """One line when the machine is oversubscribed (1-minute load above the usable cores) and torch
    would run more than one thread."""
    load, cores = load_average(), usable_cores()
    if load is None or threads < 2 or load <= cores:
        return None
    return (f"the machine is busy (1-minute load {load:.1f} on {cores} cores) and torch would use {threads} threads, "
            "which then wait for each other at every step (several times slower); pass `threads` 1, or run when the machine is quiet")


def machine_note() -> str:
    """One line for a benchmark's output: torch's threads, the usable cores and the load now."""
    load = load_average()
    return (f"torch threads {torch.get_num_threads()} of {usable_cores()} usable cores; "
            f"1-minute load {'n/a' if load is None else f'{load:.2f}'} at the start")
