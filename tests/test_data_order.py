"""The epoch order as pure functions: partition, determinism and elastic resumes, without any I/O."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mae_core.data.order import (
    Layout,
    Segment,
    emission_order,
    epoch_items,
    reader_emissions,
    segment_batches,
    segment_items,
)

layouts = st.builds(Layout, st.integers(1, 4), st.integers(1, 3), st.integers(1, 6), st.integers(1, 3),
                    st.integers(1, 8))
unit_counts = st.lists(st.integers(0, 30), min_size=1, max_size=12)


def rank_batches(items: np.ndarray, layout: Layout, seed: int, epoch: int, segment: int,
                 rank: int) -> list[np.ndarray]:
    """A rank's batches as a DataLoader delivers them: round-robin over its readers' batches."""
    per_worker = []
    for worker in range(layout.workers):
        start, emitted = reader_emissions(len(items), layout, seed, epoch, segment, rank, worker)
        ids = items[start + emitted]
        per_worker.append([ids[i : i + layout.batch_size] for i in range(0, len(ids), layout.batch_size)])
    total = segment_batches(len(items), layout)
    return [per_worker[t % layout.workers][t // layout.workers] for t in range(total)]


@settings(max_examples=60, deadline=None)
@given(unit_counts, layouts, st.integers(0, 2**40), st.integers(0, 5))
def test_one_epoch_partitions_the_kept_items(counts: list[int], layout: Layout, seed: int, epoch: int) -> None:
    items = epoch_items(counts, seed, epoch)
    assert sorted(items.tolist()) == list(range(sum(counts)))
    total = segment_batches(len(items), layout)
    seen: list[int] = []
    for rank in range(layout.world_size):
        batches = rank_batches(items, layout, seed, epoch, 0, rank)
        assert len(batches) == total and total % layout.multiple == 0
        assert all(len(b) == layout.batch_size for b in batches)
        seen += [int(i) for b in batches for i in b]
    assert len(seen) == len(set(seen))
    assert set(seen) == set(items[: total * layout.global_batch].tolist())
    assert len(items) - len(seen) < layout.global_batch * layout.multiple


@settings(max_examples=60, deadline=None)
@given(unit_counts, st.lists(st.tuples(layouts, st.floats(0, 1)), min_size=1, max_size=4), st.integers(0, 2**40))
def test_resumes_under_new_layouts_see_each_item_at_most_once(counts: list[int],
                                                              stops: list[tuple[Layout, float]],
                                                              seed: int) -> None:
    """Each segment stops at a fraction of its batches (the last runs to the end): together the
    segments never repeat an item and leave out less than the last segment's drop-last."""
    finished: list[Segment] = []
    seen: list[int] = []
    for index, (layout, fraction) in enumerate(stops):
        items = segment_items(counts, seed, 3, finished)
        total = segment_batches(len(items), layout)
        stop = total if index == len(stops) - 1 else int(total * fraction)
        for rank in range(layout.world_size):
            batches = rank_batches(items, layout, seed, 3, index, rank)
            seen += [int(i) for b in batches[:stop] for i in b]
        finished.append(Segment(layout, stop))
    assert len(seen) == len(set(seen))
    left = sum(counts) - len(seen)
    last = stops[-1][0]
    assert left < last.global_batch * last.multiple
    assert left == len(segment_items(counts, seed, 3, finished))


def test_order_is_a_function_of_seed_and_epoch() -> None:
    counts = [7] * 20
    assert np.array_equal(epoch_items(counts, 1, 0), epoch_items(counts, 1, 0))
    assert not np.array_equal(epoch_items(counts, 1, 0), epoch_items(counts, 1, 1))
    assert not np.array_equal(epoch_items(counts, 1, 0), epoch_items(counts, 2, 0))
    layout = Layout(2, 2, 4, 1, 16)
    first = reader_emissions(140, layout, 1, 0, 0, 1, 1)[1]
    assert np.array_equal(first, reader_emissions(140, layout, 1, 0, 0, 1, 1)[1])
    assert not np.array_equal(first, reader_emissions(140, layout, 1, 1, 0, 1, 1)[1])


@given(st.integers(0, 300), st.integers(1, 50), st.integers(0, 1000))
def test_shuffle_buffer_holds_at_most_buffer_items(length: int, buffer: int, seed: int) -> None:
    order = emission_order(length, buffer, np.random.default_rng(seed))
    assert sorted(order.tolist()) == list(range(length))
    # output t goes out once input t + buffer has arrived: the reader never holds more than buffer
    assert all(pos < t + buffer for t, pos in enumerate(order.tolist()))
