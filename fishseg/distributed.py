"""torch.distributed under torchrun: which process this is, the few collective steps fishseg needs,
and a batch norm whose statistics span all processes (for DistributedDataParallel training).

Without torchrun (no ``WORLD_SIZE`` in the environment) everything here is a no-op for one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fishseg.errors import FishsegError
from fishseg.runtime import ddp_no_buffer_sync

Items = TypeVar("Items", bound=Sequence)
Item = TypeVar("Item")


@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local: int = 1  # processes on this machine

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Items) -> Items:
        """This rank's contiguous share of ``items`` (the last ranks take one more when it does not divide)."""
        start, stop = (len(items) * k // self.world for k in (self.rank, self.rank + 1))
        return items[start:stop]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all(self, flag: torch.Tensor) -> bool:
        """Whether the 0-d ``flag`` (on this rank's device) is true on every rank: one decision for all,
        so that no rank stops while the others wait for it."""
        if self.world > 1:
            flag = flag.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def gather(self, item: Item) -> list[Item]:
        """Every rank's ``item`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [item]
        items: list[Item] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(items, item)
        return items


def torchrun_command(processes: int) -> list[str]:
    """The start of a command line that runs a script (or ``-m module``) in ``processes`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]


def under_torchrun() -> bool:
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a plain process: the one that prints results."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[tuple[Ranks, torch.device]]:
    """Join the process group that torchrun describes (gloo on CPU, nccl on CUDA, one GPU a process)
    and leave it afterwards, unless it was joined already (cross-validation's folds share one)."""
    if not under_torchrun():
        yield Ranks(), device
        return
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise FishsegError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE')} processes on this machine but "
                               f"it has {gpus} GPUs; pass --nproc-per-node {gpus} (one process a GPU) or "
                               f"`device='cpu'`")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    joined = dist.is_initialized()
    if not joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))), device
    finally:
        if not joined:
            # Free what still refers to the group (DistributedDataParallel's reducer sits in reference
            # cycles) while the group and the interpreter are alive: left to interpreter shutdown, gloo's
            # threads can abort the process.
            gc.collect()
            dist.destroy_process_group()


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: each rank's statistics feed every rank's
    loss, so each rank's share of the gradient comes back from all of them."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.clone()
        dist.all_reduce(summed)
        return summed

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> torch.Tensor:
        summed = gradient.clone()
        dist.all_reduce(summed)
        return summed


class SyncedBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, summed over all ranks.

    torch's own SyncBatchNorm runs on GPUs only (DistributedDataParallel refuses it on CPU); this one
    all-reduces per-channel sums with autograd-aware collectives, so it works with gloo too, and its
    gradients are those of one process holding the whole batch. Outside a process group, or in eval
    mode, it is a plain BatchNorm2d.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(features)
        features = features.float()
        channels = features.shape[1]
        local_count = features.new_tensor([features.numel() / channels])
        sums = _SumOverRanks.apply(torch.cat([features.sum((0, 2, 3)), local_count]))
        count, mean = sums[-1], sums[:-1] / sums[-1]
        centered = features - mean[:, None, None]
        variance = _SumOverRanks.apply(centered.square().sum((0, 2, 3))) / count
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(variance * count / (count - 1), self.momentum)  # unbiased, as torch keeps it
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(variance + self.eps)
        return centered * scale[:, None, None] + self.bias[:, None, None]


def sync_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d replaced, in place, by a SyncedBatchNorm with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = SyncedBatchNorm(child.num_features, child.eps, child.momentum).to(child.weight.device)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            sync_batch_norm(child)
    return module


def data_parallel(decoder: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """``decoder`` itself in one process; under torchrun, wrapped in DistributedDataParallel with its
    batch norms synchronised (their buffers then agree on every rank: no broadcast before each forward)."""
    if ranks.world == 1:
        return decoder
    return DistributedDataParallel(sync_batch_norm(decoder), device_ids=[device] if device.type == "cuda" else None,
                                   **ddp_no_buffer_sync(DistributedDataParallel.__init__))
