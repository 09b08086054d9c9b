"""Where a run executes: the device, the torchrun job (if any), and the seeds."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from refilled.errors import UserError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (a CUDA GPU when there is one), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a device
    that this machine does not have is an error that says so."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"device '{name}' is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}' was asked for but no CUDA device is available; use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device '{name}': this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s), numbered from 0")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"device '{name}' (Apple GPU) is not available here; use device=cpu")
    elif device.type != "cpu":
        raise UserError(f"device '{name}' is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated in rank order along dim 0 (same size per rank).

        Gradients flow back to each rank's own slice (the gather is differentiable).
        """
        if self.world == 1:
            return tensor
        if tensor.requires_grad:
            from torch.distributed.nn.functional import all_gather

            return torch.cat(all_gather(tensor))
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the torchrun job described by the environment (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device_name)
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size()), device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


