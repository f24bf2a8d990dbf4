"""The training processes: one alone, or several under ``torchrun`` (DDP).

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in each process's environment;
``Processes.start`` reads them, joins the process group (NCCL on GPUs, gloo on the CPU) and
pins each process to its own GPU. Everything else in training asks this object whether it is
the main process and how to combine values across processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from model.inference.runtime import Runtime


@dataclass(frozen=True)
class Processes:
    """This process's ``rank`` among ``world`` training processes, and its ``runtime``."""

    rank: int
    world: int
    runtime: Runtime

    @classmethod
    def start(cls, device: str, precision: str) -> Processes:
        """Join the process group when started by ``torchrun``; a lone process otherwise.

        Args:
            device: ``auto``, ``cpu`` or ``cuda[:N]``; under ``torchrun`` a GPU process uses
                ``cuda:LOCAL_RANK`` whatever index was named.
            precision: ``auto`` or a key of ``model.inference.runtime.PRECISIONS``.
        """
        runtime = Runtime.resolve(device, precision)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(0, 1, runtime)
        if runtime.device.type == "cuda":
            local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(local)
            runtime = Runtime(local, runtime.precision)
        dist.init_process_group("nccl" if runtime.device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), world, runtime)

    @property
    def is_main(self) -> bool:
        """Whether this process logs, evaluates and writes files (rank 0)."""
        return self.rank == 0

    def wrap(self, network: nn.Module) -> nn.Module:
        """The module to train: ``network`` itself, or a DDP wrapper that averages gradients
        across processes. Keep ``network`` for saving: the wrapper prefixes its names."""
        return DistributedDataParallel(network) if self.world > 1 else network

    def mean(self, values: Tensor) -> Tensor:
        """``values`` averaged over all processes (in place; the same tensor when alone)."""
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        return values

    def agree(self, value: int) -> int:
        """The main process's ``value`` on every process: a decision taken from a clock (the
        time budget) differs between processes, and they must stop at the same step."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.runtime.device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def barrier(self) -> None:
        """Wait until every process gets here (nothing to wait for when alone)."""
        if self.world > 1:
            dist.barrier()

    @staticmethod
    def stop() -> None:
        """Leave the process group, if one was joined."""
        if dist.is_initialized():
            dist.destroy_process_group()
