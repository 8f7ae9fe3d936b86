"""The process group for ``recvit train`` / ``recvit eval`` under torchrun (DDP: NCCL on GPUs, Gloo
on CPUs); a plain ``python`` launch runs as a single process with no group."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Context:
    """Join torchrun's process group if launched by it (``WORLD_SIZE`` > 1), and pick this process's
    device: ``auto`` = ``cuda:LOCAL_RANK`` where CUDA is available, else the CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA device is available here (use --device cpu)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Context(rank, dist.get_world_size() if dist.is_initialized() else 1, target)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, context: Context) -> torch.Tensor:
    """Sum of ``values`` (a float64 / int64 tensor) over the processes; a copy on the CPU."""
    if context.distributed:
        values = values.to(context.device)
        dist.all_reduce(values)
    return values.cpu()


def gather_objects(value, context: Context) -> list:
    """``[value of rank 0, value of rank 1, ...]`` (picklable objects) on every process."""
    if not context.distributed:
        return [value]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered
