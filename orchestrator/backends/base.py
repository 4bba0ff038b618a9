"""The contract every backend keeps: submit, status, cancel, logs. Nothing else is backend-specific."""

from __future__ import annotations

from typing import Protocol

from orchestrator.registry import Registry, RunState


class Backend(Protocol):
    name: str

    def submit(self, registry: Registry, runs: list[RunState]) -> list[str]:
        """Start (or restart) runs; returns one backend job id per run, also recorded in the registry."""
        ...

    def status(self, registry: Registry, state: RunState) -> RunState:
        """The registry state reconciled with what the backend knows (e.g. a dead process)."""
        ...

    def cancel(self, registry: Registry, state: RunState) -> None:
        """Stop a run; a running one checkpoints first, so `resume` loses nothing."""
        ...

    def logs(self, registry: Registry, state: RunState, attempt: int | None = None) -> str:
        ...
