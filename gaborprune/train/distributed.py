"""torchrun support: one process per device, NCCL on GPUs and gloo on CPUs; rank 0 does all I/O."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gaborprune.errors import GaborPruneError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sum floats over all processes (identity in a single process)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over all processes, in place (nothing in a single process)."""
        if self.world > 1:
            for t in tensors:
                dist.all_reduce(t)
                t.div_(self.world)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: CUDA when available, else CPU. Raises GaborPruneError for cuda without a GPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise GaborPruneError(f"unknown `device` '{name}'; use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise GaborPruneError("`device` cuda was asked for but no CUDA GPU is available; use `device` cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank), device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
