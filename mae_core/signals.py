"""Preemption: a signal only sets a flag; the train loop acts on it at a step boundary."""

from __future__ import annotations

import signal
from types import FrameType

from mae_core.contract import PREEMPT_SIGNALS


class PreemptionFlag:
    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> PreemptionFlag:
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None
