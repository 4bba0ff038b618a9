"""Sharded checkpoints with torch.distributed.checkpoint (DCP) at any fsspec URL.

Layout of one checkpoint, ``<url>/step-000001200/``:
- DCP shards and ``.metadata``: model and optimizer state, resharded on load to any world size;
- ``rank-<r>.json``: that rank's RNG states and data position (JSON, nothing pickled);
- ``COMMITTED``: written last by rank 0, listing every file and its size.

A checkpoint exists only once its marker does and every listed file has its recorded size, so a
save killed mid-write (no marker, or a truncated shard) is reported and skipped, never loaded.
"""

from __future__ import annotations

import base64
import logging
import random
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from mae_core import storage
from mae_core.config import CheckpointConfig
from mae_core.contract import MARKER, STEP_DIR, CheckpointInfo, scan_checkpoints, step_dir

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


class TrainState(Stateful):
    """Model and optimizer as DCP sees them: full logical tensors, whatever the sharding."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])


@dataclass(frozen=True)
class Save:
    permanent: bool  # kept past retention (keep_every_epochs)


class SavePolicy:
    """When to save, in one place: on request (preemption, a stop), at the end, every
    ``interval_steps``, every ``interval_minutes`` and at the epochs kept for good."""

    def __init__(self, cfg: CheckpointConfig, steps_per_epoch: int, total_steps: int) -> None:
        self.cfg, self.steps_per_epoch, self.total_steps = cfg, steps_per_epoch, total_steps
        self._last = time.monotonic()

    def time_due(self) -> bool:
        """This process's vote for a time-based save; the trainer agrees on it across ranks,
        since clocks differ and every rank must take part in a save."""
        minutes = self.cfg.interval_minutes
        return minutes is not None and time.monotonic() - self._last >= minutes * 60

    def decide(self, step: int, requested: bool, time_due: bool) -> Save | None:
        epoch_end = step % self.steps_per_epoch == 0
        every = self.cfg.keep_every_epochs
        permanent = bool(epoch_end and every and (step // self.steps_per_epoch) % every == 0)
        interval = self.cfg.interval_steps
        if requested or permanent or time_due or step == self.total_steps or (interval and step % interval == 0):
            self._last = time.monotonic()
            return Save(permanent=permanent)
        return None


def rng_state() -> dict[str, Any]:
    """Every RNG the process uses, as JSON."""
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])


class Checkpointer:
    def __init__(self, url: str, rank: int, world_size: int, keep_last: int = 2,
                 async_save: bool = False) -> None:
        self.url, self.rank, self.world_size = url.rstrip("/"), rank, world_size
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: tuple[Future[Any], CheckpointInfo] | None = None
        # The newest complete checkpoint this process loaded or committed: what a resume would
        # start from now. An async save in flight is not one until it commits.
        self.committed_step: int | None = None
        # Async saves run their collectives on a group of their own: sharing the default group
        # with the training collectives mismatches gloo operations.
        self._group = dist.new_group(backend="gloo") if async_save else None

    def step_url(self, step: int) -> str:
        return storage.join(self.url, step_dir(step))

    # Discovery -----------------------------------------------------------------------------
    def scan(self) -> tuple[list[CheckpointInfo], list[str]]:
        """Complete checkpoints (oldest first) and the URLs of incomplete ones."""
        return scan_checkpoints(self.url)

    def latest(self) -> CheckpointInfo | None:
        complete, incomplete = self.scan()
        for url in incomplete:
            if self.rank == 0:
                log.warning("ignoring incomplete checkpoint %s (no valid %s marker)", url, MARKER)
        return complete[-1] if complete else None

    # Save ----------------------------------------------------------------------------------
    def save(self, state: TrainState, step: int, epoch: int, meta: dict[str, Any],
             rank_state: dict[str, Any], permanent: bool = False) -> None:
        """Collective. ``meta`` (rank 0's) goes into the marker; ``rank_state`` is per rank."""
        self.wait()
        url = self.step_url(step)
        # Per-rank files first: DCP's save ends with a gather to rank 0, so once rank 0 returns
        # from it every rank has finished writing everything, these files included.
        storage.write_json(storage.join(url, f"rank-{self.rank}.json"), rank_state)
        info = CheckpointInfo(url=url, step=step, epoch=epoch, permanent=permanent,
                              world_size=self.world_size, meta=meta)
        writer = FsspecWriter(url)
        if self.async_save:
            future = dcp.async_save({"train": state}, storage_writer=writer, process_group=self._group)
            self._pending = (future, info)
        else:
            dcp.save({"train": state}, storage_writer=writer)
            self._commit(info)

    def wait(self) -> None:
        """Finish an in-flight async save and commit it. Call before exit."""
        if self._pending is None:
            return
        future, info = self._pending
        self._pending = None
        future.result()
        self._commit(info)

    def _commit(self, info: CheckpointInfo) -> None:
        if self.rank == 0:
            files = {e["name"].rsplit("/", 1)[-1]: e["size"] for e in storage.listdir(info.url)
                     if e["type"] == "file"}
            storage.write_json(storage.join(info.url, MARKER), {
                "step": info.step, "epoch": info.epoch, "permanent": info.permanent, "meta": info.meta,
                "world_size": info.world_size, "time": time.time(), "files": files,
            })
            self._retain(info.step)
        dist.barrier()
        self.committed_step = info.step

    def _retain(self, just_committed: int) -> None:
        complete, incomplete = self.scan()
        rolling = [c for c in complete if not c.permanent]
        for old in rolling[: max(0, len(rolling) - self.keep_last)]:
            storage.remove(old.url)
        for url in incomplete:
            # Leftovers of saves that died before the one just committed; a newer one may be in flight.
            match = STEP_DIR.search(url)
            if match and int(match.group(1)) < just_committed:
                storage.remove(url)

    # Load ----------------------------------------------------------------------------------
    def load(self, info: CheckpointInfo, state: TrainState) -> dict[str, Any]:
        """Load model and optimizer into ``state``; returns this rank's JSON state (or rank 0's,
        when the world size changed)."""
        try:
            dcp.load({"train": state}, storage_reader=FsspecReader(info.url))
        except Exception as e:  # noqa: BLE001 - DCP raises a CheckpointException wrapping many kinds
            raise CheckpointError(f"checkpoint {info.url} could not be read ({type(e).__name__}); "
                                  f"delete its {MARKER} file to fall back to the previous one") from e
        own = storage.join(info.url, f"rank-{self.rank}.json")
        same_world = info.world_size == self.world_size
        rank_state = storage.read_json(own if same_world else storage.join(info.url, "rank-0.json"))
        self.committed_step = info.step
        return rank_state


def load_weights(info: CheckpointInfo, model: nn.Module) -> nn.Module:
    """Load a checkpoint's model weights into a plain, unsharded module, e.g. for fine-tuning or
    evaluation. Needs no process group."""
    state = {"train": {"model": model.state_dict()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=FsspecReader(info.url), no_dist=True)
    model.load_state_dict(state["train"]["model"])
    return model
