"""Multi-process training with torch.distributed (``torchrun``): ranks, reductions, set-up.

``torchrun --nproc_per_node=N -m sbm_transformer.cli train ...`` starts N processes with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` in their environment;
:meth:`Distributed.from_env` reads them, and the trainer then wraps the model in
DistributedDataParallel (gloo on CPUs, nccl on GPUs). Without those variables everything here is
a no-op for one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor


@dataclass(frozen=True)
class Distributed:
    """This process's place in a multi-process run (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> Distributed:
        """The ranks torchrun sets (``RANK``, ``WORLD_SIZE``, ...); one process without them."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            world = int(os.environ["WORLD_SIZE"])
            rank = int(os.environ.get("RANK", "0"))
            local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        except ValueError as err:
            raise ValueError(f"torchrun environment variables are not integers: {err}") from None
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
        return cls(rank, world, local_rank, local_world)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes the run directory."""
        return self.rank == 0

    def start(self, device: torch.device) -> bool:
        """Join the process group (nccl on CUDA, gloo otherwise) unless already in one;
        True when this call created it (and :meth:`stop` should end it)."""
        if not self.enabled or torch_dist.is_initialized():
            return False
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return True

    def stop(self) -> None:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()

    def sum(self, values: Tensor) -> Tensor:
        """``values`` summed over all processes (in place; returned)."""
        if self.enabled:
            torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
        return values

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is set on some process (a collective: every rank must call it)."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=device)
        return bool(self.sum(t).item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, by rank (picklable; for small, infrequent values)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def default_threads(self) -> int:
        """CPU threads per process when the user set none: the machine's CPUs shared by the
        processes on it (torch's default, all CPUs, would oversubscribe them N times)."""
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, (cpus or 1) // self.local_world_size)
