"""`maestro plot`: runs' curves against epochs, one line per run labelled by its swept values.

The curve of a run is ``read_records`` (one clean curve across attempts), so a plot shows what
TensorBoard shows and works on runs still training. The x axis is the epoch, not the step: runs
of a sweep over the batch size take different numbers of steps per epoch.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mae_core.metrics_log import read_records
from orchestrator.errors import UserError
from orchestrator.registry import Registry, RunState

# Qualitative, so neighbouring runs never get near-identical shades; past 10 runs the colours repeat
# with another line style.
PALETTE: tuple[tuple[float, float, float], ...] = tuple(colormaps["tab10"].colors)
STYLES = ("-", "--", ":", "-.")
# Record fields that are not scalars to plot.
NOT_SCALARS = frozenset({"step", "time", "epoch"})
# How an attempt ended (runner.finish_attempt's events, which carry the step it reached) and the
# start of a resumed one, each with its own marker shape and legend entry.
MARKERS = {"resumed": ("^", "resumed from checkpoint"), "preempted": ("v", "preempted / requeued"),
           "requeued": ("v", "preempted / requeued"), "failed": ("X", "failed"), "cancelled": ("s", "cancelled")}
# Runs read at once: each costs a listing and a few GETs on object stores, latency-bound.
READERS = 8


def label(state: RunState) -> str:
    """"mask_ratio=0.75, decoder_depth=8": the swept values by their last dotted component."""
    if not state.swept:
        return state.run_id
    return ", ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in state.swept.items())


def _marks(events: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(kind, step) of every resume and every attempt's end the events record."""
    marks = []
    for e in events:
        if e["event"] == "started" and e.get("resumed_from_step") is not None:
            marks.append(("resumed", int(e["resumed_from_step"])))
        elif e["event"] in MARKERS and isinstance(e.get("step"), int):
            # A Ray "cancelled" without a step (stopped without a checkpoint) has no place on the curve.
            marks.append((e["event"], e["step"]))
    return marks


def _scalars(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, epochs and values of the records that hold ``key`` as a number."""
    rows = [(r["step"], r["epoch"], r[key]) for r in records
            if isinstance(r.get(key), int | float) and not isinstance(r[key], bool)]
    return [s for s, _, _ in rows], [float(e) for _, e, _ in rows], [float(v) for _, _, v in rows]


def plot_runs(registry: Registry, states: list[RunState], output: str,
              metric: str = "loss") -> dict[str, list[tuple[float, float]]]:
    """Draw ``metric`` of each run against epochs into the PNG ``output``; returns the plotted
    curves, {label: [(epoch, value), ...]}. Runs without records yet are left out."""

    def read(state: RunState) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return (read_records(registry.run_url(state.experiment, state.run_id)),
                registry.events(state.experiment, state.run_id))

    with ThreadPoolExecutor(READERS) as pool:
        runs = [(s, *found) for s, found in zip(states, pool.map(read, states), strict=True) if found[0]]
    available = sorted({k for _, records, _ in runs for r in records for k in r} - NOT_SCALARS)
    if metric not in available:
        where = f"the records of {len(runs)} run(s)" if runs else "any run's records (none has logged metrics yet)"
        raise UserError(f"metric {metric!r} is not in {where}; available: {', '.join(available) or 'none'}")

    with_lr = metric != "lr" and "lr" in available
    fig = Figure(figsize=(10, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # Agg: renders without a display
    axes: list[Axes] = list(fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])) if with_lr else [fig.subplots()]
    top = axes[0]
    curves: dict[str, list[tuple[float, float]]] = {}
    shown: set[str] = set()  # marker shapes drawn, each with one legend entry
    for i, (state, records, events) in enumerate(runs):
        name = label(state)
        if name in curves:  # the same swept values in two experiments
            name = f"{name} ({state.key})"
        colour, style = PALETTE[i % len(PALETTE)], STYLES[i // len(PALETTE) % len(STYLES)]
        steps, epochs, values = _scalars(records, metric)
        if not steps:
            continue
        curves[name] = list(zip(epochs, values, strict=True))
        top.plot(epochs, values, color=colour, linestyle=style, linewidth=1.5, label=name)
        if with_lr:
            _, lr_epochs, lrs = _scalars(records, "lr")
            axes[1].plot(lr_epochs, lrs, color=colour, linestyle=style, linewidth=1.5)
        # Epochs per step from the newest record: the same for every step of a run.
        per_step = records[-1]["epoch"] / records[-1]["step"]
        for kind, step in _marks(events):
            if not steps[0] <= step <= steps[-1]:
                continue  # before the first record (died at once) or not flushed yet
            shape = MARKERS[kind][0]
            shown.add(shape)
            # On the curve: checkpoint steps are always recorded, so a resume point is a record.
            top.plot(step * per_step, np.interp(step, steps, values), marker=shape, color=colour,
                     markeredgecolor="black", markersize=8, linestyle="none", zorder=3)

    handles, _ = top.get_legend_handles_labels()
    handles += [Line2D([], [], marker=shape, color="grey", markeredgecolor="black", linestyle="none", label=text)
                for shape, text in dict(MARKERS.values()).items() if shape in shown]
    top.legend(handles=handles, fontsize="small")
    top.set_ylabel(metric)
    top.set_title(", ".join(sorted({s.experiment for s, _, _ in runs})))
    if with_lr:
        axes[1].set_ylabel("lr")
    axes[-1].set_xlabel("epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    return curves
