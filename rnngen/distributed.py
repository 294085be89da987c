"""Training on several processes or machines with torchrun + DistributedDataParallel.

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; without them this is a world of one and every
call below is a no-op, so single-process training is unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rnngen.errors import UsageError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return t.tolist()

    def share_digest(self, hexdigest: str) -> str:
        """Rank 0's SHA-256 hex digest on every rank (the others pass anything); waits for rank 0 like a barrier."""
        if self.size == 1:
            return hexdigest
        mine = list(bytes.fromhex(hexdigest)) if self.main else [0] * 32
        return bytes(int(v) for v in self.sum([float(v) for v in mine])).hex()

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(layers, rows, hidden) per rank -> (layers, all rows, hidden), in rank order."""
        if self.size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=1)

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def join(device: torch.device) -> tuple[World, torch.device]:
    """Join the torchrun job this process belongs to (gloo on CPU, NCCL on CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:  # NCCL needs a GPU of its own for each process
            raise UsageError(f"torchrun started {int(os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1))} processes on "
                             f"this machine but it has {gpus} GPU(s): give --nproc-per-node {gpus} (one process per "
                             f"GPU), or --device cpu to train on the CPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank), device


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_rank() -> int:
    """This process's rank under torchrun (0 when run alone), read before joining."""
    return int(os.environ.get("RANK", "0"))
