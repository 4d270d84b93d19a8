"""The machine a bench ran on (`environment`: CPU, cores, versions, load) and the notes its load
gives the reports (`load_note`, `load_warning`)."""

from __future__ import annotations

import os
import platform
import time


def environment(threads: list[int], provider: str) -> dict:
    import onnxruntime as ort
    import torch

    from gaborprune._threads import load_average, usable_cores

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable_cores(), "platform": platform.platform(),
        "python": platform.python_version(), "onnxruntime": ort.__version__, "torch": torch.__version__, "provider": provider,
        "threads": threads, "inter_op_threads": 1, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average": load_average(),  # 1-minute load when timing began: above the cores, the figures are noisy
    }


def load_note(env: dict) -> str:
    """" (1-minute load 0.42)" for a title, or "" where the platform has no load average."""
    load = env.get("load_average")
    return "" if load is None else f" (1-minute load {load:.2f})"


def load_warning(env: dict) -> str | None:
    """One line when the 1-minute load was above the usable cores: the models then wait for the CPU."""
    load, cores = env.get("load_average"), env.get("usable_cores") or env.get("cores")
    if load is None or not cores or load <= cores:
        return None
    return (f"the machine is busy (1-minute load {load:.1f} on {cores} cores): these timings are noisy and their intervals wide; "
            "rerun when the machine is quiet")
