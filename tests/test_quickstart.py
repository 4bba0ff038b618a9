"""The README's quickstart command, run exactly as written there."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from trainer_runs import losses

from mae_core import storage
from orchestrator.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def readme_command(script: str) -> str:
    """The first-screen command that runs ``script``."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "README has no bash block"
    [line] = [ln for ln in block.group(1).splitlines() if script in ln]
    return line.split("#")[0].strip()


def test_quickstart_from_the_readme_completes(tmp_path: Path) -> None:
    command = readme_command("quickstart")
    env = {**os.environ, "MAESTRO_ROOT": str(tmp_path / "runs"), "MAESTRO_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [state] = Registry(str(tmp_path / "runs")).runs("quickstart")
    assert state.status == "completed" and state.step == state.total_steps > 0
    assert state.last_checkpoint_step == state.total_steps
    run_url = str(tmp_path / "runs" / "quickstart" / state.run_id)
    curve = losses(run_url)
    assert len(curve) == state.total_steps
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10  # it learns
    assert storage.exists(storage.join(run_url, "checkpoints", f"step-{state.total_steps:09d}", "COMMITTED"))
    assert "completed" in proc.stdout
