"""The README's quickstart command, run exactly as written there."""

from __future__ import annotations

from conftest import Quickstart
from trainer_runs import losses

from mae_core import storage


def test_quickstart_from_the_readme_completes(readme_quickstart: Quickstart) -> None:
    registry, state, stdout = readme_quickstart
    assert state.status == "completed" and state.step == state.total_steps > 0
    assert state.last_checkpoint_step == state.total_steps
    run_url = registry.run_url(state.experiment, state.run_id)
    curve = losses(run_url)
    assert len(curve) == state.total_steps
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10  # it learns
    assert storage.exists(storage.join(run_url, "checkpoints", f"step-{state.total_steps:09d}", "COMMITTED"))
    assert "completed" in stdout
