"""Process group set-up and FSDP2 sharding.

Every run is a process group, even a single process (a one-rank group on an in-memory store),
so the same FSDP2 and DCP code path runs at every scale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from mae_core.config import RuntimeConfig
from mae_core.contract import INIT_METHOD_ENV
from mae_core.model import MaskedAutoencoderViT

# An MAE, or an encoder classifier built from one (mae_core.evaluate): both have .blocks.
M = TypeVar("M", bound=MaskedAutoencoderViT | torch.nn.Module)


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


def parallelize(model: M, env: DistEnv, runtime: RuntimeConfig) -> M:
    """Everything that changes how the model computes but not what, in the order that composes:
    activation checkpointing of each block (the model recomputes a block's activations in
    backward), then ``torch.compile`` per block (so a compiled block is also the unit FSDP2
    gathers), then FSDP2 over the blocks and the root.

    With ``precision: bf16`` FSDP2 keeps fp32 parameters and optimizer state and gathers bf16
    copies for compute (gradients are reduced in fp32), so all-gathers move half the bytes.
    """
    model.grad_checkpointing = runtime.activation_checkpointing
    blocks = [*model.blocks, *getattr(model, "decoder_blocks", [])]  # an encoder classifier has no decoder
    if runtime.compile:
        for block in blocks:
            block.compile()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if runtime.precision == "bf16" else MixedPrecisionPolicy()
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@dataclass(frozen=True)
class StepVotes:
    """What every rank must agree on after a step, carried by one all-reduce."""

    loss: float  # mean over ranks
    nonfinite: bool  # some rank's loss is NaN or inf
    stop: bool  # some rank was asked to stop (preemption, cancel)
    save_due: bool  # some rank's clock says a timed checkpoint is due

    @classmethod
    def all_reduce(cls, loss: torch.Tensor, stop: bool, save_due: bool, env: DistEnv) -> StepVotes:
        loss = loss.reshape(1).float()
        votes = torch.cat([loss, (~torch.isfinite(loss)).float(),
                           torch.tensor([float(stop), float(save_due)], device=loss.device)])
        dist.all_reduce(votes)
        total, nonfinite, stop_votes, save_votes = votes.tolist()
        return cls(loss=total / env.world_size, nonfinite=nonfinite > 0, stop=stop_votes > 0,
                   save_due=save_votes > 0)
