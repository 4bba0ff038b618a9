"""The contract every backend keeps: submit, status, cancel, logs. Nothing else is backend-specific.

``status`` only reads: it says whether the run's process or job has ended without the run
recording an end. ``reconcile`` is the one place that writes what it found into the registry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Protocol

from orchestrator.registry import Registry, RunState


@dataclass(frozen=True)
class Ended:
    """A backend's finding that a run's process or job is gone though the registry says active."""

    status: Literal["failed", "cancelled"]
    message: str


class Backend(Protocol):
    name: str

    def submit(self, registry: Registry, runs: list[RunState]) -> list[str]:
        """Start (or restart) runs; returns one backend job id per run, also recorded in the registry."""
        ...

    def status(self, registry: Registry, state: RunState) -> Ended | None:
        """What the backend knows beyond the registry: None while the run's job lives (or the
        registry is fresh enough to trust), else how it ended. Reads only."""
        ...

    def cancel(self, registry: Registry, state: RunState) -> None:
        """Stop a run; a running one checkpoints first, so `resume` loses nothing."""
        ...

    def logs(self, registry: Registry, state: RunState, attempt: int | None = None) -> str:
        """The attempt's trainer logs (default: the latest attempt) plus what the backend keeps."""
        ...


def reconcile(registry: Registry, backend: Backend, state: RunState) -> RunState:
    """The run's state with the backend's finding written into the registry."""
    ended = backend.status(registry, state)
    if ended is None:
        return state
    # A run that was asked to stop and whose process is gone is cancelled, however it went.
    status = "cancelled" if state.status == "cancelling" else ended.status
    return registry.update(state.experiment, state.run_id, status=status, ended=time.time(), message=ended.message)
