"""Process group set-up and FSDP2 sharding.

Every run is a process group, even a single process (a one-rank group on an in-memory store),
so the same FSDP2 and DCP code path runs at every scale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

INIT_METHOD_ENV = "MAESTRO_INIT_METHOD"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join the process group described by the standard env vars (torchrun, SLURM launchers).

    ``MAESTRO_INIT_METHOD`` (e.g. ``file:///tmp/rdzv``) replaces the TCP rendezvous where no
    listening socket is wanted, as in the local launcher.
    """
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        init_method = os.environ.get(INIT_METHOD_ENV, "env://")
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    else:
        rank, world, local_rank = 0, 1, 0
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """FSDP2: each transformer block is its own unit, then the root holds the rest."""
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for blocks in (model.blocks, model.decoder_blocks):
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
