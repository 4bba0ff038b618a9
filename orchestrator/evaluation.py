"""Evaluation runs: a pre-training run's linear probe and fine-tune, each a run of its own in the
registry, next to the run it evaluates, so it has the same backends, budgets, cancel and resume.

    <experiment>/<run_id>/                 pre-training
    <experiment>/<run_id>.linprobe/        its linear probe (``.finetune``: its fine-tune)
    <experiment>/<run_id>.linprobe-step0/  one started by hand on a chosen checkpoint (0: random init)

A run whose spec has an ``eval:`` section starts its evaluations when it completes
(``start_evaluations``, called by the runner); ``maestro eval`` starts one by hand.
"""

from __future__ import annotations

from orchestrator.backends import get_backend
from orchestrator.errors import UserError
from orchestrator.profiles import Profile
from orchestrator.registry import Registry, RunState
from orchestrator.spec import Derived, EvalJobSpec, EvalSpec, EvaluationOf, ExperimentSpec, SweepSpec, validate
from orchestrator.sweep import PlannedRun


def eval_run_id(run_id: str, job: str, step: int | None = None) -> str:
    return f"{run_id}.{job}" + ("" if step is None else f"-step{step}")


def plan_evaluation(spec: ExperimentSpec, of: RunState, job: str, step: int | None, named_step: bool,
                    val_url: str | None = None) -> PlannedRun:
    """The evaluation run of ``of`` (a pre-training run with spec ``spec``): its spec is the run's
    own with ``evaluation`` set, and it shows the run's swept values. ``step`` None evaluates the
    latest checkpoint; with ``named_step`` the step is part of the run id (a run started by hand on
    a chosen checkpoint)."""
    run_id = of.run_id
    if spec.evaluation is not None:
        raise UserError(f"{spec.name}/{run_id} is itself an evaluation; evaluate its pre-training run")
    ev = spec.eval
    if ev is None:
        if val_url is None:
            raise UserError(f"{spec.name}/{run_id} has no eval section; pass --val URL (the labelled validation "
                            "split) or add eval: {val_url: ...} to the spec")
        ev = EvalSpec(val_url=val_url)
    elif val_url is not None:
        ev = ev.model_copy(update={"val_url": val_url})
    if getattr(ev, job) is None:
        ev = ev.model_copy(update={job: EvalJobSpec()})
    raw = spec.model_copy(update={"eval": ev, "evaluation": EvaluationOf(job=job, run_id=run_id, step=step),  # type: ignore[arg-type]
                                  "sweep": SweepSpec()}).model_dump(mode="json")
    run_spec = validate(raw, f"evaluation {job} of {spec.name}/{run_id}")
    return PlannedRun(experiment=spec.name, run_id=eval_run_id(run_id, job, step if named_step else None),
                      spec=run_spec, swept=of.swept)


def create_and_submit(registry: Registry, runs: list[PlannedRun], profile: Profile) -> list[RunState]:
    """Record evaluation runs (existing ones are kept) and start the new ones on ``profile``'s backend."""
    with registry.creating(runs, profile, {r.run_id: Derived.of(r.spec).total_steps for r in runs}) as new:
        if new:
            get_backend(profile).submit(registry, new)
    return new


def start_evaluations(registry: Registry, state: RunState) -> list[RunState]:
    """After a pre-training run completed: its spec's evaluations, on its final checkpoint."""
    spec = registry.spec(state.experiment, state.run_id)
    if spec.eval is None or spec.evaluation is not None:
        return []
    runs = [plan_evaluation(spec, state, job, state.last_checkpoint_step, named_step=False) for job in spec.eval.jobs()]
    new = create_and_submit(registry, runs, registry.profile(state.experiment, state.run_id))
    for run in new:
        registry.event(state, "evaluation", run_id=run.run_id, step=state.last_checkpoint_step)
    return new
