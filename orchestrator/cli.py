"""The `maestro` command: plan, submit, list, watch, cancel and resume runs."""

from __future__ import annotations

import json
import sys
import time
import warnings
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from mae_core import storage
from mae_core.config import RuntimeConfig
from mae_core.contract import CHECKPOINTS_DIR, scan_checkpoints
from orchestrator.backends import Backend, get_backend
from orchestrator.backends.base import reconcile
from orchestrator.errors import UserError
from orchestrator.profiles import RayProfile, SlurmProfile, load_profile
from orchestrator.registry import ACTIVE, FINISHED, TRAINING, Registry, RunState, collector_paused, default_root
from orchestrator.spec import Derived, EvaluationOf, ExperimentSpec, load_spec, schema
from orchestrator.sweep import expand

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# Tables are wide; off a terminal (pipes, CI logs) do not squeeze them into 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)

RootOpt = Annotated[str | None, typer.Option("--root", help="registry URL; default $MAESTRO_ROOT or ./runs")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a spec field: a.b=value")]
ClusterOpt = Annotated[str | None, typer.Option("--cluster", help="cluster profile YAML (overrides the spec's)")]


def _target(value: str) -> str:
    return Registry.check_target(value)


def _experiment(value: str | None) -> str | None:
    return None if value is None else Registry.check_target(value, runs=False)


# Targets are checked as they are parsed: a name, never a path (see Registry.check_target).
RunArg = Annotated[str, typer.Argument(metavar="RUN", callback=_target)]
TargetArg = Annotated[str, typer.Argument(metavar="RUN|EXPERIMENT", callback=_target)]
ExperimentArg = Annotated[str | None, typer.Argument(callback=_experiment)]
_debug = {"on": False}
# A run whose state and trainer heartbeat (progress.json) are both older than this is checked with
# its backend, which may know its process or job is gone.
STALE_S = 30.0


def registry_for(root: str | None, spec: ExperimentSpec | None = None) -> Registry:
    if root:
        return Registry(root)
    if spec is not None and spec.storage.root != "runs":
        return Registry(spec.storage.root)
    return Registry(default_root())


def _spec(path: str, overrides: list[str] | None, cluster: str | None) -> ExperimentSpec:
    spec = load_spec(path, (overrides or []) + ([f"cluster={cluster}"] if cluster else []))
    load_profile(spec.cluster)  # fail before anything is created
    return spec


def one_run(registry: Registry, target: str) -> RunState:
    """The single run ``target`` names: an experiment of several runs is not one."""
    states = registry.resolve(target)
    if len(states) != 1:
        raise UserError(f"{target!r} names {len(states)} runs; give one as EXPERIMENT/RUN_ID "
                        f"(see `maestro ls {target}`)")
    return states[0]


def backend_of(registry: Registry, state: RunState) -> Backend:
    return get_backend(registry.profile(state.experiment, state.run_id))


def refresh(registry: Registry, state: RunState) -> RunState:
    """A run whose heartbeat went quiet, checked with its backend (its process or job may be gone)."""
    if state.status in ACTIVE and time.time() - max(state.updated, state.heartbeat or 0.0) > STALE_S:
        return reconcile(registry, backend_of(registry, state), state)
    return state


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _elapsed(s: RunState) -> str:
    if not s.started:
        return "-"
    secs = int((s.ended or time.time()) - s.started)
    return f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"


@app.command()
def plan(spec_path: Annotated[str, typer.Argument(metavar="SPEC")], set_: SetOpt = None,
         cluster: ClusterOpt = None) -> None:
    """Dry run: the expanded runs and their derived values. Nothing is submitted."""
    spec = _spec(spec_path, set_, cluster)
    runs = expand(spec)
    profile = load_profile(spec.cluster)
    table = Table(title=f"{spec.name}: {len(runs)} run(s) on {profile.backend}")
    for col in ("run", "devices", "per-device", "accum", "lr", "steps/epoch", "warmup", "total steps", "GPU-h"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for run in runs:
        d = Derived.of(run.spec)
        r = run.spec.resources
        table.add_row(run.run_id, f"{r.nodes}x{r.gpus_per_node}", str(r.per_device_batch), str(d.accum_steps),
                      f"{d.lr:.3g}", str(d.steps_per_epoch), str(d.warmup_steps), str(d.total_steps),
                      _fmt(d.gpu_hours, ".0f"))
    console.print(table)
    first = runs[0].spec
    ckpt = first.checkpoint
    console.print(f"checkpoint every {ckpt.interval_steps or '-'} steps / {ckpt.interval_minutes or '-'} min, "
                  f"keeping the last {ckpt.keep_last}")
    if first.eval is not None:
        runtime = RuntimeConfig(per_device_batch=first.resources.per_device_batch)
        for job in first.eval.jobs():
            cfg = first.eval_config("", runtime, EvaluationOf(job=job, run_id=runs[0].run_id))
            o = cfg.optim
            console.print(f"then, once each run completes, its {job} (`<run>.{job}`): {o.epochs} epochs, global batch "
                          f"{o.global_batch}, lr {o.blr * o.global_batch / 256:.3g}; validation {first.eval.val_url}")
    if isinstance(profile, SlurmProfile):
        # Imported here, not at the top: it loads torch, and ls/watch must start fast.
        from orchestrator.backends.slurm import SlurmBackend

        budget = first.requeue
        limit = profile.time_min
        console.print(f"time limit {limit // 60}:{limit % 60:02d} h per job, USR2 {profile.signal_delay_s} s before; "
                      f"requeue budget: preemptions {budget.max_preemptions or 'unlimited'}, "
                      f"timeouts {budget.max_timeouts}, failures {budget.max_failures}")
        console.print(f"sbatch script ({'one array of ' + str(len(runs)) + ' tasks' if len(runs) > 1 else 'one job'}"
                      f", shown for {runs[0].run_id}):")
        console.print(Text(SlurmBackend(profile).sbatch_script(first)), soft_wrap=True)
    if isinstance(profile, RayProfile):
        from orchestrator.backends.ray import RayBackend

        console.print(Text(RayBackend(profile).describe(first, registry_for(None, first).root)), soft_wrap=True)


@app.command()
def submit(spec_path: Annotated[str, typer.Argument(metavar="SPEC")], set_: SetOpt = None,
           cluster: ClusterOpt = None, root: RootOpt = None) -> None:
    """Create the spec's runs in the registry and start them; existing runs are not duplicated."""
    spec = _spec(spec_path, set_, cluster)
    registry = registry_for(root, spec)
    profile = load_profile(spec.cluster)
    backend = get_backend(profile)
    runs = expand(spec)
    with registry.creating(runs, profile, {run.run_id: Derived.of(run.spec).total_steps for run in runs}) as new:
        created = {s.run_id for s in new}
        for run in runs:
            if run.run_id not in created:
                console.print(f"[dim]{run.experiment}/{run.run_id} already exists; `maestro resume` continues it[/]")
        if new:
            backend.submit(registry, new)
    console.print(f"submitted {len(new)} run(s) of {spec.name} to {backend.name}; registry {registry.root}")


COLUMNS = ("run", "backend", "status", "step/total", "loss", "img/s", "attempts", "last ckpt", "elapsed")
COLOURS = {"completed": "green", "failed": "red", "cancelled": "yellow", "running": "cyan", "hung": "magenta"}
# A rich table costs ~0.6 ms a row to lay out (0.6 s of every `ls` of 1,000 runs).
RICH_ROWS = 100
# Training runs whose progress.json `ls` fetches, one GET each. Each GET costs the S3 client ~5 ms
# of CPU on a small machine (botocore's request and response handling), wherever the server is:
# with 12,000 runs training at once, 1,000 of those GETs were half of a 100,000-run `ls`.
LIVE_PROGRESS = 500


def _show(states: list[RunState]) -> None:
    """The states as a table: a rich one up to RICH_ROWS rows; longer listings, which scroll past
    anyway, as plain aligned columns written straight out (status still coloured on a terminal):
    at 100,000 runs rich took 7 s to lay out what this writes in well under one."""
    rows = []
    for s in states:
        job = f" ({s.job_ids[-1]})" if s.job_ids else ""
        rows.append([s.key, f"{s.backend}{job}", "hung" if s.hung else s.status, f"{s.step}/{s.total_steps}",
                     _fmt(s.loss), _fmt(s.img_s, ".1f"), str(s.attempts),
                     "-" if s.last_checkpoint_step is None else str(s.last_checkpoint_step), _elapsed(s)])
    if len(rows) <= RICH_ROWS:
        table = Table()
        for col in COLUMNS:
            table.add_column(col)
        for row in rows:
            table.add_row(*row[:2], Text(row[2], style=COLOURS.get(row[2], "white")), *row[3:])
        console.print(table)
        return
    widths = [max(map(len, column)) for column in zip(COLUMNS, *rows, strict=True)]
    coloured: dict[str, str] = {}  # each status padded and styled once, by rich, for this console
    for status in {row[2] for row in rows}:
        with console.capture() as captured:
            console.print(Text(status.ljust(widths[2]), style=COLOURS.get(status, "white")), end="")
        coloured[status] = captured.get()
    with console.capture() as captured:
        console.print(Text("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)).rstrip(), style="bold"))
    # One format string for every row: one C call a row instead of a join over nine ljusts.
    line = "  ".join(f"{{:<{w}}}" if i != 2 else "{}" for i, w in enumerate(widths))
    lines = [captured.get().rstrip("\n"),
             *(line.format(*row[:2], coloured[row[2]], *row[3:]).rstrip() for row in rows)]
    console.file.write("\n".join(lines) + "\n")
    console.file.flush()


@app.command("ls")
def list_runs(experiment: ExperimentArg = None, root: RootOpt = None) -> None:
    """All runs (or one experiment's) with status and progress."""
    # Everything `ls` reads lives until it has been shown and holds no cycles: the collector off
    # until then spares it walking 100,000 states several times (about 2 s).
    with collector_paused():
        _list_runs(experiment, root)


def _list_runs(experiment: str | None, root: str | None) -> None:
    registry = registry_for(root)
    states = registry.runs(experiment)
    _show(registry.with_progress(states, most=LIVE_PROGRESS))
    training = sum(s.status in TRAINING for s in states)
    if training > LIVE_PROGRESS:
        console.print(f"[dim]live progress of the {LIVE_PROGRESS:,} training runs that started last; the other "
                      f"{training - LIVE_PROGRESS:,} show the step their state last recorded (`maestro ls EXPERIMENT` "
                      "or `maestro status RUN` for theirs)[/]")


@app.command()
def status(run: RunArg, root: RootOpt = None) -> None:
    """One run: its state and its recent events."""
    registry = registry_for(root)
    for state in registry.resolve(run):
        state = reconcile(registry, backend_of(registry, state), state)
        _show(registry.with_progress([state]))
        if state.message:
            console.print(f"message: {state.message}")
        g = state.goodput
        if g.ratio is not None:
            console.print(f"goodput {g.ratio:.1%} of {g.allocated_s / 3600:.3f} h allocated over {state.attempts} "
                          f"attempt(s): productive {g.productive_s:.0f} s, lost {g.lost_s:.0f} s, restart overhead "
                          f"{g.overhead_s:.0f} s, checkpoint {g.checkpoint_s:.0f} s")
        for event in registry.events(state.experiment, state.run_id)[-10:]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.pop("time")))
            console.print(f"  {when} {event.pop('event')} {json.dumps(event)}")


@app.command()
def logs(run: RunArg, follow: Annotated[bool, typer.Option("-f")] = False,
         attempt: Annotated[int | None, typer.Option(help="attempt number; default the latest")] = None,
         root: RootOpt = None) -> None:
    """A run's trainer log (-f follows it until the run ends)."""
    registry = registry_for(root)
    state = one_run(registry, run)
    backend = backend_of(registry, state)
    shown = 0
    while True:
        text = backend.logs(registry, state, attempt)
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)
        state = registry.state(state.experiment, state.run_id)
        if not follow or state.status in FINISHED:
            return
        time.sleep(2)


@app.command()
def watch(experiment: ExperimentArg = None, root: RootOpt = None,
          interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 2.0) -> None:
    """Live progress bars with ETA until every run has finished."""
    registry = registry_for(root)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[status]}"), TextColumn("loss {task.fields[loss]}"),
               TextColumn("attempt {task.fields[attempts]}"), TextColumn("goodput {task.fields[goodput]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bars:
        tasks: dict[str, Any] = {}
        while True:
            # Progress first: a trainer's fresh heartbeat spares asking its backend about it.
            states = [refresh(registry, s) for s in registry.with_progress(registry.runs(experiment))]
            for s in states:
                fields = {"status": "hung" if s.hung else s.status, "loss": _fmt(s.loss), "attempts": s.attempts,
                          "goodput": "-" if s.goodput.ratio is None else f"{s.goodput.ratio:.0%}"}
                if s.key not in tasks:
                    tasks[s.key] = bars.add_task(s.key, total=s.total_steps or 1, **fields)
                bars.update(tasks[s.key], completed=s.step, **fields)
            if states and all(s.status not in ACTIVE for s in states):
                break
            time.sleep(interval)
    failed = [s for s in states if s.status == "failed"]
    for s in failed:
        console.print(f"[red]{s.key} failed[/]: {s.message}")
    if failed:
        raise typer.Exit(1)


@app.command()
def cancel(target: TargetArg, root: RootOpt = None) -> None:
    """Stop runs; running ones checkpoint first, so `resume` loses nothing."""
    registry = registry_for(root)
    for state in registry.resolve(target):
        if state.status in FINISHED:
            console.print(f"{state.key} is already {state.status}")
            continue
        backend_of(registry, state).cancel(registry, state)
        console.print(f"cancelling {state.key}")


@app.command()
def resume(target: TargetArg, root: RootOpt = None) -> None:
    """Continue stopped runs from their latest complete checkpoint."""
    registry = registry_for(root)
    for state in registry.resolve(target):
        state = reconcile(registry, backend_of(registry, state), state)  # e.g. a queue whose supervisor died
        if state.status == "cancelling":
            # One attempt at a time: the cancelled one is still checkpointing on its way out.
            raise UserError(f"{state.key} is still cancelling: its attempt is checkpointing and has not left yet; "
                            "resume once `maestro status` shows it cancelled")
        if state.status == "completed" or state.status in ACTIVE - {"preempted"}:
            console.print(f"{state.key} is {state.status}; nothing to resume")
            continue
        registry.clear_cancels([state])
        # A fresh requeue budget: the events keep the history of earlier ones.
        state = registry.update(state.experiment, state.run_id, status="pending", message=None, ended=None,
                                preemptions=0, timeouts=0, failures=0)
        registry.event(state, "resumed", last_checkpoint_step=state.last_checkpoint_step)
        backend_of(registry, state).submit(registry, [state])
        console.print(f"resuming {state.key} from step {state.last_checkpoint_step or 0}")


@app.command("eval")
def evaluate(run: RunArg,
             linprobe: Annotated[bool, typer.Option("--linprobe", help="linear probe (frozen encoder)")] = False,
             finetune: Annotated[bool, typer.Option("--finetune", help="fine-tune every layer")] = False,
             step: Annotated[int | None, typer.Option(help="checkpoint step; default the latest; 0: a "
                                                      "random-init encoder, the floor to beat")] = None,
             val: Annotated[str | None, typer.Option("--val", help="labelled validation split URL; default the "
                                                     "spec's eval.val_url")] = None,
             root: RootOpt = None) -> None:
    """Evaluate a run's encoder by hand, as runs of their own (RUN.linprobe, RUN.finetune)."""
    from orchestrator.evaluation import create_and_submit, plan_evaluation

    jobs = [job for job, on in (("linprobe", linprobe), ("finetune", finetune)) if on]
    if not jobs:
        raise UserError("choose what to run: --linprobe, --finetune or both")
    registry = registry_for(root)
    state = one_run(registry, run)
    complete, _ = scan_checkpoints(storage.join(registry.run_url(state.experiment, state.run_id), CHECKPOINTS_DIR))
    steps = [c.step for c in complete]
    if step is None and not steps:
        raise UserError(f"{state.key} has no complete checkpoint yet; wait for its first save, or pass --step 0 "
                        "for a random-init encoder")
    if step not in (None, 0) and step not in steps:
        raise UserError(f"--step {step}: {state.key} has no complete checkpoint there; complete: "
                        f"{', '.join(map(str, steps)) or 'none'}")
    chosen = steps[-1] if step is None else step
    spec = registry.spec(state.experiment, state.run_id)
    # RUN.<job> is the evaluation of the final checkpoint, the one an eval: section starts and the
    # report shows; any other checkpoint's carries its step in its name.
    named = step is not None or state.status != "completed"
    planned = [plan_evaluation(spec, state, job, chosen, named_step=named, val_url=val) for job in jobs]
    new = {s.run_id for s in create_and_submit(registry, planned, registry.profile(state.experiment, state.run_id))}
    for run_ in planned:
        done = "started" if run_.run_id in new else "already exists, with its own settings (`maestro resume` " \
            "continues it)"
        console.print(f"{run_.experiment}/{run_.run_id}: {done}; step {chosen}")


@app.command()
def report(experiment: Annotated[str, typer.Argument(callback=_experiment)],
           format_: Annotated[str, typer.Option("--format", help="table, csv, markdown or json")] = "table",
           root: RootOpt = None) -> None:
    """One row per run: swept values, final and best loss, epochs, wall time, GPU-hours, attempts, goodput."""
    from orchestrator.report import render, rows

    if format_ not in ("table", "csv", "markdown", "json"):
        raise UserError(f"--format {format_!r} is not one of table, csv, markdown, json")
    registry = registry_for(root)
    out = render(rows(registry, registry.runs(experiment)), format_)  # type: ignore[arg-type]
    if isinstance(out, str):
        sys.stdout.write(out)
    else:
        console.print(out)


@app.command()
def plot(target: TargetArg, output: Annotated[str, typer.Option("-o", "--output", help="PNG to write")] = "loss.png",
         metric: Annotated[str, typer.Option(help="the scalar to plot (loss, lr, grad_norm, img_s, ...)")] = "loss",
         root: RootOpt = None) -> None:
    """Curves of an experiment's runs (or one run) against epochs, labelled by swept values."""
    from orchestrator.plot import plot_runs  # matplotlib: loaded only by the commands that draw

    registry = registry_for(root)
    curves = plot_runs(registry, registry.resolve(target), output, metric)
    console.print(f"wrote {output}: {metric} of {len(curves)} run(s)")


@app.command()
def viz(run: RunArg, step: Annotated[int | None, typer.Option(help="checkpoint step; default the latest")] = None,
        images: Annotated[int, typer.Option(help="rows: images from the run's dataset")] = 8,
        mask_ratio: Annotated[float | None, typer.Option(help="default: the run's own")] = None,
        seed: Annotated[int, typer.Option(help="chooses the images' masks")] = 0,
        output: Annotated[str, typer.Option("-o", "--output", help="PNG to write")] = "recon.png",
        root: RootOpt = None) -> None:
    """MAE reconstructions from a checkpoint: masked input, reconstruction, original (Figure 2)."""
    from orchestrator.viz import render_reconstructions

    registry = registry_for(root)
    state = one_run(registry, run)
    used = render_reconstructions(registry, state, output, step=step, images=images, mask_ratio=mask_ratio,
                                  seed=seed)
    console.print(f"wrote {output}: {images} image(s) from {state.key} at step {used}")


@app.command("sync-tb")
def sync_tb(destination: Annotated[str, typer.Argument(metavar="DEST", help="local folder for tensorboard")],
            experiment: ExperimentArg = None, root: RootOpt = None) -> None:
    """Copy runs' TensorBoard event files into DEST/<experiment>/<run_id>/ (new files only)."""
    from orchestrator.tensorboard import sync

    registry = registry_for(root)
    copied = sync(registry, registry.runs(experiment), destination)
    console.print(f"copied {copied} event file(s); run `tensorboard --logdir {destination}`")


@app.command("schema")
def print_schema() -> None:
    """The spec's JSON Schema, for editor completion of YAML specs."""
    sys.stdout.write(json.dumps(schema(), indent=2) + "\n")


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    _debug["on"] = debug


def _error(message: str) -> None:
    # Text, not markup: messages quote user input, which may contain [brackets].
    console.print(Text("error: ", style="red") + Text(" ".join(message.split())), soft_wrap=True)


def _warn(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
          line: str | None = None) -> None:
    """Warnings (e.g. a deprecated spec key) as one line on stderr, without source locations."""
    Console(stderr=True).print(Text("warning: ", style="yellow") + Text(str(message)), soft_wrap=True)


def _debug_first(args: list[str]) -> list[str]:
    """``--debug`` wherever it was typed (``maestro plan X --debug``, as error messages suggest),
    moved before the command, where the group option is parsed; nothing after ``--`` moves."""
    end = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:end]:
        return args
    return ["--debug", *(a for a in args[:end] if a != "--debug"), *args[end:]]


def main() -> None:
    warnings.showwarning = _warn
    try:
        app(args=_debug_first(sys.argv[1:]), standalone_mode=False)
    except UserError as e:
        if _debug["on"]:
            raise
        _error(str(e))
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # the one place that turns unexpected failures into one line
        if _debug["on"]:
            raise
        _error(f"{type(e).__name__}: {e} (rerun with --debug for the traceback)")
        sys.exit(1)



if __name__ == "__main__":
    main()
