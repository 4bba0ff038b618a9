"""``maestro report``: one row per run of a sweep, from the registry alone (any backend, any machine).

Each row holds the run's swept values, its evaluations' final top-1 (the status of those not
completed), its final and best loss (from its clean curve), epochs
done, wall time, GPU-hours (allocated device time), attempts with how each ended, and goodput
(``mae_core.goodput``). Rendered as a rich table, CSV, Markdown or JSON.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from rich.table import Table

from mae_core.metrics_log import read_records
from orchestrator.registry import TRAINING, Registry, RunState

Format = Literal["table", "csv", "markdown", "json"]
# After the swept values, in this order.
COLUMNS = ("run", "status", "final_loss", "best_loss", "epochs", "wall_h", "gpu_h", "attempts", "ended_by", "goodput")
# The column suffix of an evaluation's top-1.
TOP1 = "_top1"
# Runs read at once: each is a listing and a few GETs, latency-bound on object stores.
READERS = 16
# How an attempt ended, per its end event (runner.finish_attempt): the order they are listed in.
_END_EVENTS = ("completed", "requeued", "preempted", "failed", "cancelled")


def _row(registry: Registry, state: RunState, now: float) -> dict[str, Any]:
    records = [r for r in read_records(registry.run_url(state.experiment, state.run_id)) if "loss" in r]
    ends = Counter(e.get("ended_by", e["event"]) for e in registry.events(state.experiment, state.run_id)
                   if e["event"] in _END_EVENTS)
    allocated = state.goodput.allocated_s
    if state.status in TRAINING and state.attempt_started:  # the attempt under way holds its devices too
        allocated += now - state.attempt_started
    wall = (state.ended or now) - state.started if state.started else 0.0
    return {
        "run": state.key, **state.swept, "status": state.status,
        "final_loss": records[-1]["loss"] if records else state.loss,
        "best_loss": min(r["loss"] for r in records) if records else None,
        "epochs": round(records[-1]["epoch"], 3) if records and "epoch" in records[-1] else None,
        "wall_h": round(wall / 3600, 4), "gpu_h": round(allocated * state.devices / 3600, 4),
        "attempts": state.attempts, "ended_by": ", ".join(f"{k} {n}" for k, n in sorted(ends.items())),
        "goodput": None if state.goodput.ratio is None else round(state.goodput.ratio, 4),
    }


def _top1(registry: Registry, state: RunState) -> float | str | None:
    """An evaluation run's result: its final validation top-1 (%) once it completed. Until then
    its status: the top-1 of an epoch it stopped at is not the evaluation's result, and next to
    completed ones it would read as one."""
    if state.status != "completed":
        return state.status
    scored = [r for r in read_records(registry.run_url(state.experiment, state.run_id)) if "val_top1" in r]
    return round(scored[-1]["val_top1"], 2) if scored else None


def rows(registry: Registry, states: list[RunState]) -> list[dict[str, Any]]:
    """The report's rows, in the order of ``states``: one per pre-training run, with the result of
    each of its evaluation runs (``<job>_top1``, e.g. linprobe_top1, linprobe-step0_top1)."""
    now = time.time()
    runs = [s for s in states if s.evaluates is None]
    evaluations = [s for s in states if s.evaluates is not None]
    with ThreadPoolExecutor(READERS) as pool:
        report = list(pool.map(lambda s: _row(registry, s, now), runs))
        scores = list(pool.map(lambda s: _top1(registry, s), evaluations))
    by_run = {row["run"]: row for row in report}
    for ev, top1 in zip(evaluations, scores, strict=True):
        row = by_run.get(f"{ev.experiment}/{ev.evaluates}")
        if row is not None:
            row[f"{ev.run_id.removeprefix(ev.evaluates + '.')}{TOP1}"] = top1
    return report


def columns(report: list[dict[str, Any]]) -> list[str]:
    """The run, its swept values, its evaluations' top-1, then the fixed columns."""
    extra = list(dict.fromkeys(k for row in report for k in row if k not in COLUMNS))
    swept = [k for k in extra if not k.endswith(TOP1)]
    return [COLUMNS[0], *swept, *sorted(k for k in extra if k.endswith(TOP1)), *COLUMNS[1:]]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render(report: list[dict[str, Any]], fmt: Format) -> Table | str:
    cols = columns(report)
    if fmt == "json":
        return json.dumps(report, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=cols, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in report)
        return out.getvalue()
    cells = [[_cell(row.get(c)) for c in cols] for row in report]
    if fmt == "markdown":
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    table = Table()
    for c in cols:
        table.add_column(c, justify="left" if c in ("run", "status", "ended_by") else "right")
    for row in cells:
        table.add_row(*row)
    return table
