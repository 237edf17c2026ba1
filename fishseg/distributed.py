"""torch.distributed under torchrun: which process this is, and the few collective steps fishseg needs.

Without torchrun (no ``WORLD_SIZE`` in the environment) everything here is a no-op for one process.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

Item = TypeVar("Item")


@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Item]) -> list[Item]:
        """This rank's contiguous share of ``items`` (the first ranks take one more when it does not divide)."""
        start, stop = (len(items) * k // self.world for k in (self.rank, self.rank + 1))
        return list(items[start:stop])

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def start(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group that torchrun describes (gloo on CPU, nccl on CUDA, one GPU a process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def stop(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
