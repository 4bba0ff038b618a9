"""Validation accuracy over ranks (``mae_core.evaluate.job.top_k``), 3 gloo processes: uneven
shares and an empty one count each sample once; a rank whose data fails raises on every rank
instead of leaving the others waiting in a collective."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mae_core.data.stream import DataError
from mae_core.distributed import DistEnv
from mae_core.evaluate.classifier import EncoderClassifier
from mae_core.evaluate.job import top_k
from mae_core.model import build_model

WORLD = 3
CLASSES = 7
SHARES = (5, 2, 0)  # batches per rank: uneven, and one rank with none
BATCH = 4


def classifier() -> EncoderClassifier:
    torch.manual_seed(0)
    return EncoderClassifier(build_model("mae_vit_micro_patch4", img_size=16), CLASSES, "finetune", "avg").eval()


def data(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    # The last batch of each share is short, like a split that does not divide evenly.
    return [(torch.randn(BATCH - (i == SHARES[rank] - 1), 3, 16, 16, generator=g),
             torch.randint(0, CLASSES, (BATCH - (i == SHARES[rank] - 1),), generator=g))
            for i in range(SHARES[rank])]


def failing(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    yield batches[0]
    raise DataError("data: shard-7.tar does not decode")


def worker(rank: int, port: int, out: str) -> None:
    """Two validations in one process group: every rank's data reads; then rank 1's fails."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        env = DistEnv(rank=rank, local_rank=rank, world_size=WORLD, device=torch.device("cpu"))
        mine = data(rank)
        for case, batches in (("reads", iter(mine)), ("fails", failing(mine) if rank == 1 else iter(mine))):
            try:
                result: object = top_k(classifier(), (len(mine), batches), env)
            except Exception as e:  # noqa: BLE001 - what each rank raised is the result
                result = f"{type(e).__name__}: {e}"
            torch.save(result, f"{out}/{case}-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[object]]:
    out = tmp_path_factory.mktemp("topk")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = mp.start_processes(worker, args=(port, str(out)), nprocs=WORLD, start_method="spawn", join=False)
    deadline = time.monotonic() + 300
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:  # a rank left waiting in a collective: the defect under test
            for p in ranks.processes:
                p.kill()
            pytest.fail("the ranks did not finish within 300 s: one is waiting in a collective")
    return {case: [torch.load(out / f"{case}-{r}.pt", weights_only=False) for r in range(WORLD)]
            for case in ("reads", "fails")}


def test_every_sample_counts_once_over_uneven_and_empty_shares(results: dict[str, list[object]]) -> None:
    model = classifier()
    imgs = torch.cat([b[0] for r in range(WORLD) for b in data(r)])
    labels = torch.cat([b[1] for r in range(WORLD) for b in data(r)])
    with torch.no_grad():
        logits = model(imgs)
    expected = {"val_top1": 100.0 * (logits.argmax(-1) == labels).float().mean().item(),
                "val_top5": 100.0 * (logits.topk(5, -1).indices == labels[:, None]).any(-1).float().mean().item(),
                "val_loss": torch.nn.functional.cross_entropy(logits, labels).item()}
    assert len(labels) == 5 * BATCH - 1 + 2 * BATCH - 1
    for result in results["reads"]:  # every rank reports the whole split's numbers, the empty one too
        assert isinstance(result, dict) and result.keys() == expected.keys()
        assert all(result[k] == pytest.approx(expected[k], rel=1e-5) for k in expected), (result, expected)


def test_a_rank_whose_data_fails_fails_every_rank_without_a_hang(results: dict[str, list[object]]) -> None:
    fails = results["fails"]
    assert fails[1] == "DataError: data: shard-7.tar does not decode"
    assert fails[0] == fails[2] == "RuntimeError: validation failed on 1 other rank(s); their logs say why"
