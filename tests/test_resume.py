"""A run that stops and restarts in a new process computes exactly what an uninterrupted run does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_runs import assert_same_state, checkpoint_state, final_weights, launch, losses, write_config

from mae_core.data.demo import build_demo
from mae_core.progress import read_progress


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def straight_and_resumed(tmp_path: Path, root: str, nproc: int = 1, stop: int = 4,
                         **over: Any) -> tuple[Path, Path]:
    straight = write_config(tmp_path, "straight", f"{root}/straight", **over)
    resumed = write_config(tmp_path, "resumed", f"{root}/resumed", stop_after_step=stop, **over)
    for cfg in (straight, resumed):
        proc = launch(cfg, nproc)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(losses(f"{root}/resumed")) == stop
    # Same spec without the stop: a fresh process picks up the latest checkpoint.
    resumed_rest = write_config(tmp_path, "resumed", f"{root}/resumed", **over)
    proc = launch(resumed_rest, nproc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr
    return straight, resumed_rest


def test_exact_resume_local(tmp_path: Path) -> None:
    straight, resumed = straight_and_resumed(tmp_path, str(tmp_path / "runs"))
    assert losses(str(tmp_path / "runs/straight")) == losses(str(tmp_path / "runs/resumed"))
    assert len(losses(str(tmp_path / "runs/straight"))) == 8
    assert_same_weights(final_weights(straight), final_weights(resumed))


def test_exact_resume_through_s3(tmp_path: Path, s3_bucket: str) -> None:
    straight, resumed = straight_and_resumed(tmp_path, f"{s3_bucket}/runs")
    assert losses(f"{s3_bucket}/runs/straight") == losses(f"{s3_bucket}/runs/resumed")
    assert_same_weights(final_weights(straight), final_weights(resumed))


def test_exact_resume_mid_epoch_streaming_shards_from_s3(tmp_path: Path, s3_bucket: str) -> None:
    # 2 ranks x 2 loader workers reading real JPEG shards; the stop falls mid-epoch, so the resumed
    # run must restore the data position (not only the weights) to reproduce the curve.
    build_demo(f"{s3_bucket}/demo", 320, (40, 40), shard_bytes=40_000)
    data = {"url": f"{s3_bucket}/demo", "num_samples": None, "input_size": 32, "num_workers": 2, "shuffle_buffer": 64}
    straight, resumed = straight_and_resumed(tmp_path, f"{s3_bucket}/runs", nproc=2, stop=7, data=data,
                                             optim={"epochs": 2})
    curve = losses(f"{s3_bucket}/runs/straight")
    assert len(curve) == 20  # 320 // 32 = 10 steps per epoch
    assert losses(f"{s3_bucket}/runs/resumed") == curve
    assert_same_weights(final_weights(straight), final_weights(resumed))


def test_two_processes_agree_with_one(tmp_path: Path) -> None:
    # Same global batch: one process accumulates two micro-batches, two processes take one each.
    one = write_config(tmp_path, "one", str(tmp_path / "one"), stop_after_step=5)
    two = write_config(tmp_path, "two", str(tmp_path / "two"), stop_after_step=5)
    assert launch(one, 1).returncode == 0
    proc = launch(two, 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = losses(str(tmp_path / "one")), losses(str(tmp_path / "two"))
    assert len(a) == len(b) == 5
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=0)
    wa, wb = final_weights(one), final_weights(two)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7)


def test_checkpoint_from_two_ranks_resumes_in_one_and_back(tmp_path: Path) -> None:
    """World size may change between attempts: the global batch and so the curve stay the same."""
    # Checkpoints at steps 3, 6 and 8 (the end), all kept, in both runs.
    keep = {"checkpoint": {"interval_steps": 3, "keep_last": 10}}
    ref = write_config(tmp_path, "ref", str(tmp_path / "ref"), **keep)
    assert launch(ref, 2).returncode == 0
    out = str(tmp_path / "elastic")
    assert launch(write_config(tmp_path, "e", out, stop_after_step=3, **keep), 2).returncode == 0
    proc = launch(write_config(tmp_path, "e", out, stop_after_step=6, **keep), 1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {out}/checkpoints/step-000000003 at step 3" in proc.stderr
    elastic = write_config(tmp_path, "e", out, **keep)
    proc = launch(elastic, 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {out}/checkpoints/step-000000006 at step 6" in proc.stderr
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(str(tmp_path / "ref"))),
                               rtol=1e-5, atol=0)
    # DCP holds full logical tensors whatever the world size, so every parameter and optimizer
    # value compares: bit-identical before the world size first changed, then within the float
    # tolerance of one rank accumulating what two ranks all-reduce.
    assert_same_state(checkpoint_state(ref, 3), checkpoint_state(elastic, 3))
    assert_same_state(checkpoint_state(ref, 6), checkpoint_state(elastic, 6), exact=False)
    assert_same_state(checkpoint_state(ref), checkpoint_state(elastic), exact=False)


@pytest.mark.parametrize("damage", ["marker", "shard"])
def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path: Path, damage: str) -> None:
    out = tmp_path / "run"
    cfg = write_config(tmp_path, "run", str(out), stop_after_step=4, checkpoint={"interval_steps": 2})
    assert launch(cfg).returncode == 0
    step4 = out / "checkpoints/step-000000004"
    if damage == "marker":
        (step4 / "COMMITTED").unlink()
    else:
        shard = step4 / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = launch(write_config(tmp_path, "run", str(out)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr and "step-000000002 at step 2" in proc.stderr
    reference = write_config(tmp_path, "ref", str(tmp_path / "ref"))
    assert launch(reference).returncode == 0
    assert losses(str(out)) == losses(str(tmp_path / "ref"))


def test_config_change_refuses_to_resume(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    assert launch(write_config(tmp_path, "a", out, stop_after_step=2)).returncode == 0
    proc = launch(write_config(tmp_path, "b", out, model={"arch": "mae_vit_micro_patch4", "mask_ratio": 0.5}))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint") and "different config" in last



def test_async_save_gives_the_same_run_and_complete_checkpoints(tmp_path: Path) -> None:
    sync = write_config(tmp_path, "sync", str(tmp_path / "sync"), stop_after_step=6,
                        checkpoint={"interval_steps": 2})
    asyn = write_config(tmp_path, "async", str(tmp_path / "async"), stop_after_step=6,
                        checkpoint={"interval_steps": 2, "async_save": True})
    for cfg in (sync, asyn):
        proc = launch(cfg, 2)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert losses(str(tmp_path / "sync")) == losses(str(tmp_path / "async"))
    a, b = final_weights(sync), final_weights(asyn)
    assert all(torch.equal(a[k], b[k]) for k in a)
    kept = sorted(p.name for p in (tmp_path / "async/checkpoints").iterdir())
    assert kept == ["step-000000004", "step-000000006"]  # keep_last=2
    # The last progress flush comes after the async save's commit: it names step 6, as `ls` shows.
    assert [(read_progress(str(tmp_path / run)) or {}).get("checkpoint_step") for run in ("sync", "async")] == [6, 6]


def test_non_finite_loss_stops_with_one_line_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = write_config(tmp_path, "run", str(out), optim={"blr": 1e12, "epochs": 3},
                       checkpoint={"interval_steps": 1, "keep_last": 50})
    proc = launch(cfg)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss is not finite at step")
    bad_step = int(last.split("at step ")[1].split(";")[0])
    kept = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    assert kept == list(range(1, bad_step))
    assert final_weights(cfg)["blocks.0.attn.qkv.weight"].isfinite().all()
