"""Which patches are removed: counts, inverse permutations and uniformity of every strategy."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mae_core.masking import num_visible, sample_mask


@settings(max_examples=40, deadline=None)
@given(ratio=st.floats(0.05, 0.95), side=st.integers(2, 16), batch=st.integers(1, 8),
       strategy=st.sampled_from(["random", "block"]))
def test_visible_count_is_exact_and_restore_inverts_shuffle(ratio: float, side: int, batch: int,
                                                            strategy: str) -> None:
    num_patches = side * side
    m = sample_mask(strategy, batch, (side, side), ratio, torch.Generator().manual_seed(0))
    keep = num_visible(num_patches, ratio)
    assert m.ids_keep.shape == (batch, keep)
    assert torch.all((m.mask == 0).sum(dim=1) == keep)
    # The kept ids are exactly the zeros of the mask.
    visible = torch.zeros(batch, num_patches).scatter_(1, m.ids_keep, 1.0)
    assert torch.equal(visible, 1 - m.mask)
    # ids_restore inverts the shuffle: unshuffling a shuffled arange gives arange.
    shuffle = torch.argsort(m.ids_restore, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, m.ids_restore), torch.arange(num_patches).expand(batch, -1))


def test_random_masking_is_uniform_over_patches() -> None:
    side, ratio, draws = 8, 0.75, 4000
    m = sample_mask("random", draws, (side, side), ratio, torch.Generator().manual_seed(1))
    counts = m.mask.sum(dim=0)
    # Each patch is removed with probability r; chi-square over 64 cells against r * draws.
    expected = ratio * draws
    chi2 = (((counts - expected) ** 2) / (expected * (1 - ratio))).sum().item()
    # 63 degrees of freedom: the 99.99th percentile is about 117.
    assert chi2 < 117, chi2


def test_block_masks_are_clustered_and_exact() -> None:
    side, ratio = 14, 0.5
    m = sample_mask("block", 64, (side, side), ratio, torch.Generator().manual_seed(2))
    assert torch.all(m.mask.sum(dim=1) == side * side - num_visible(side * side, ratio))
    grid = m.mask.view(64, side, side)
    # Blocks make removed patches neighbour each other far more often than random masking does.
    same_h = (grid[:, :, 1:] == grid[:, :, :-1]).float().mean()
    rand = sample_mask("random", 64, (side, side), ratio, torch.Generator().manual_seed(2)).mask.view(64, side, side)
    rand_h = (rand[:, :, 1:] == rand[:, :, :-1]).float().mean()
    assert same_h > rand_h + 0.15


def test_grid_masks_keep_one_in_four() -> None:
    m = sample_mask("grid", 3, (8, 8), 0.75)
    grid = m.mask.view(3, 8, 8)
    assert torch.all(grid[:, ::2, ::2] == 0)
    assert grid.sum().item() == 3 * 48


def test_same_generator_seed_gives_same_mask() -> None:
    a = sample_mask("random", 4, (8, 8), 0.75, torch.Generator().manual_seed(5))
    b = sample_mask("random", 4, (8, 8), 0.75, torch.Generator().manual_seed(5))
    c = sample_mask("random", 4, (8, 8), 0.75, torch.Generator().manual_seed(6))
    assert torch.equal(a.mask, b.mask) and not torch.equal(a.mask, c.mask)
