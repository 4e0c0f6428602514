"""Where a training process runs: its device and, under torchrun, its DDP rank; and the few
collectives the trainer needs (a sum or max over ranks, a barrier), which are no-ops alone.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from shipkit.device import resolve_device


@dataclass
class Placement:
    """Where this process trains: its device, DDP rank and world size."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False  # we joined it, so we leave it when the run ends

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def setup_placement(device: str) -> Placement:
    """Resolve `auto|cpu|cuda` and, under torchrun (WORLD_SIZE > 1), join the process group
    (NCCL on CUDA, gloo on CPU)."""
    # The same rule as every stage's; on CUDA each DDP rank then takes its own device, LOCAL_RANK.
    use_cuda = resolve_device(device).type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    joins = world_size > 1 and not dist.is_initialized()
    if joins:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Placement(torch_device, rank, local_rank, world_size, owns_process_group=joins)


def leave_process_group(placement: Placement) -> None:
    """Destroy the process group if `setup_placement` joined it."""
    if placement.owns_process_group:
        dist.destroy_process_group()


def device_info(placement: Placement, compiled: bool, cuda_graph: bool) -> dict[str, Any]:
    """The evidence's `device`."""
    if placement.is_cuda:
        name = torch.cuda.get_device_name(placement.device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    return {
        "type": placement.device.type,
        "name": name,
        "world_size": placement.world_size,
        "dtype": "bfloat16" if placement.is_cuda else "float32",
        "compiled": compiled,
        "cuda_graph": cuda_graph,
    }


def all_reduce(values: list[float], placement: Placement, op: Any = None) -> list[float]:
    """`values` summed (or reduced by `op`) over all ranks; every rank must call it."""
    if placement.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=placement.device)
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier(placement: Placement) -> None:
    if placement.world_size > 1:
        dist.barrier()
