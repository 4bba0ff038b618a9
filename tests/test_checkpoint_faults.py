"""Checkpoints under faults: markers in any shape, a trainer killed in the middle of a save, and
S3 that drops connections and throttles. Each run ends bit-identical to one without the fault."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from trainer_runs import assert_same_state, checkpoint_state, launch, losses, write_config

from mae_core import storage
from mae_core.checkpoint import Checkpointer
from mae_core.config import TrainConfig
from mae_core.contract import CHECKPOINTS_DIR, MARKER, STEP_DIR, scan_checkpoints, step_dir
from mae_core.data.demo import build_demo
from orchestrator.testing.fault_proxy import start_fault_proxy

# Markers a crash, a hand edit or another program could leave; each must read as "incomplete".
GOOD_MARKER: dict[str, Any] = {"step": 2, "epoch": 0, "permanent": False, "world_size": 1, "time": 0.0,
                               "meta": {"fingerprint": "f"}, "files": {"__0_0.distcp": 4}}
BAD_MARKERS: dict[str, bytes] = {
    "not json": b'{"step": 2, "files": {',
    "not utf-8": b"\xff\xfe\x00",
    "a list": b"[]",
    **{f"no {key}": json.dumps({k: v for k, v in GOOD_MARKER.items() if k != key}).encode()
       for key in ("step", "epoch", "permanent", "world_size", "meta", "files")},
    "step a string": json.dumps({**GOOD_MARKER, "step": "2"}).encode(),
    "step a bool": json.dumps({**GOOD_MARKER, "step": True}).encode(),
    "permanent a number": json.dumps({**GOOD_MARKER, "permanent": 0}).encode(),
    "meta null": json.dumps({**GOOD_MARKER, "meta": None}).encode(),
    "files a list": json.dumps({**GOOD_MARKER, "files": ["__0_0.distcp"]}).encode(),
    "size a string": json.dumps({**GOOD_MARKER, "files": {"__0_0.distcp": "4"}}).encode(),
    "negative step": json.dumps({**GOOD_MARKER, "step": -2}).encode(),
}


def fake_checkpoint(root: Path, step: int, marker: bytes) -> Path:
    folder = root / step_dir(step)
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"data")
    (folder / MARKER).write_bytes(marker)
    return folder


@pytest.mark.parametrize("bad", BAD_MARKERS)
def test_a_malformed_marker_is_an_incomplete_checkpoint(tmp_path: Path, bad: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    fake_checkpoint(tmp_path, 1, json.dumps({**GOOD_MARKER, "step": 1}).encode())
    broken = fake_checkpoint(tmp_path, 2, BAD_MARKERS[bad])
    with caplog.at_level(logging.WARNING, logger="mae_core"):
        complete, incomplete = scan_checkpoints(str(tmp_path))
        latest = Checkpointer(str(tmp_path), rank=0, world_size=1).latest()
    assert [c.step for c in complete] == [1] and incomplete == [str(broken)]
    assert latest is not None and latest.step == 1
    reasons = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert reasons and all(str(broken) in r and MARKER in r for r in reasons), caplog.text


def test_a_well_formed_marker_is_a_complete_checkpoint(tmp_path: Path) -> None:
    # The control for the cases above: the same folder with a good marker is found.
    fake_checkpoint(tmp_path, 2, json.dumps(GOOD_MARKER).encode())
    complete, incomplete = scan_checkpoints(str(tmp_path))
    assert [(c.step, c.meta) for c in complete] == [(2, {"fingerprint": "f"})] and incomplete == []


# A real kill in the middle of a save ---------------------------------------------------------

def unmarked_step(checkpoints: str, after: int) -> tuple[int, list[str]] | None:
    """The first step after ``after`` whose folder has files but no marker, with those files;
    one listing of the storage (a single request on S3)."""
    fs, root = storage.filesystem(checkpoints)
    fs.invalidate_cache(root)
    files: dict[int, list[str]] = {}
    for path in fs.find(root):
        match = STEP_DIR.search(path)
        if match and int(match.group(1)) > after:
            files.setdefault(int(match.group(1)), []).append(path.rsplit("/", 1)[-1])
    unmarked = sorted(step for step, names in files.items() if MARKER not in names)
    return (unmarked[0], files[unmarked[0]]) if unmarked else None


def kill_during_save(config: Path, nproc: int, after: int, log: Path) -> tuple[int, list[str]]:
    """Start the trainer in its own process group, poll its checkpoints until a save after step
    ``after`` is under way (files, no marker) and SIGKILL the whole group right then. Returns
    the step and the files its folder had when the kill was sent."""
    checkpoints = storage.join(TrainConfig.from_yaml(config).output, CHECKPOINTS_DIR)
    with log.open("a") as err:
        # TMPDIR: the launcher's rendezvous folder, which a killed launcher cannot remove.
        proc = subprocess.Popen([sys.executable, "-m", "mae_core.launch", "--nproc", str(nproc), str(config)],
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                env={**os.environ, "TMPDIR": str(log.parent)})
    try:
        while proc.poll() is None:
            found = unmarked_step(checkpoints, after)
            if found is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                return found
            time.sleep(0.001)
        pytest.fail(f"the trainer exited ({proc.returncode}) before a save after step {after} was seen: "
                    f"{log.read_text()[-2000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_kill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path: Path, where: str,
                                                                 request: pytest.FixtureRequest) -> None:
    root = str(tmp_path / "runs") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/runs"
    # A save at every step, so the poller always has one to catch; two ranks, so the kill must
    # take the launcher and every rank at once.
    over: dict[str, Any] = {"optim": {"epochs": 2}, "checkpoint": {"interval_steps": 1}}
    straight = write_config(tmp_path, "straight", f"{root}/straight", **over)
    proc = launch(straight, 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    killed = write_config(tmp_path, "killed", f"{root}/killed", **over)
    checkpoints = f"{root}/killed/{CHECKPOINTS_DIR}"

    after, log = 2, tmp_path / "killed.log"  # steps 1 and 2 complete first: something to fall back to
    for _ in range(3):
        step, files_at_kill = kill_during_save(killed, 2, after, log)
        if not storage.exists(storage.join(checkpoints, step_dir(step), MARKER)):
            break
        after = step  # the marker landed between the listing and the kill: catch a later save
    else:
        pytest.fail("three kills in a row came after the save had committed")
    # The kill came mid-save: the folder had files and still has no marker, so it is not a checkpoint.
    assert files_at_kill and MARKER not in files_at_kill
    cut = storage.join(checkpoints, step_dir(step))
    complete, incomplete = scan_checkpoints(checkpoints)
    assert cut in incomplete and complete[-1].step == step - 1

    proc = launch(killed, 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"ignoring incomplete checkpoint {cut}" in proc.stderr
    assert f"resumed from {storage.join(checkpoints, step_dir(step - 1))} at step {step - 1}" in proc.stderr
    assert losses(f"{root}/killed") == losses(f"{root}/straight")
    assert_same_state(checkpoint_state(straight), checkpoint_state(killed))


# S3 that drops connections and throttles -----------------------------------------------------

def test_training_through_s3_faults_matches_a_run_without_them(tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Real JPEG shards in the bucket: data, checkpoints and metrics all go through the faults.
    build_demo(f"{s3_bucket}/demo", 160, (40, 40), shard_bytes=40_000)
    over: dict[str, Any] = {
        "data": {"url": f"{s3_bucket}/demo", "num_samples": None, "input_size": 32, "num_workers": 1,
                 "shuffle_buffer": 64},
        "optim": {"epochs": 2}, "checkpoint": {"interval_steps": 2}}
    clean = write_config(tmp_path, "clean", f"{s3_bucket}/runs/clean", **over)
    proc = launch(clean)
    assert proc.returncode == 0, proc.stderr[-2000:]

    out = f"{s3_bucket}/runs/faulty"
    faulty = write_config(tmp_path, "faulty", out, **over)
    proxy = start_fault_proxy(s3_endpoint, fault_rate=0.1, seed=11)
    try:
        with monkeypatch.context() as mp:
            mp.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
            # A stop half-way, so the checkpoint is also read back through the faults.
            first = launch(write_config(tmp_path, "faulty-first", out, stop_after_step=5, **over))
            rest = launch(faulty)
    finally:
        proxy.stop()
    assert first.returncode == 0, first.stderr[-2000:]
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert f"resumed from {out}/{CHECKPOINTS_DIR}/{step_dir(5)} at step 5" in rest.stderr
    print(f"fault proxy: {dict(proxy.counts)}")
    assert proxy.counts["drop"] > 0 and proxy.counts["slow_down"] > 0 and proxy.counts["forwarded"] > 0
    assert len(losses(out)) > 5 and losses(out) == losses(f"{s3_bucket}/runs/clean")
    assert_same_state(checkpoint_state(clean), checkpoint_state(faulty))
