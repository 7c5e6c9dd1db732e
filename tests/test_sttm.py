"""Tests of the ``sttm`` merging library against hand-worked examples, an independent
reference implementation of the spec, and the properties the spec promises."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sttm
from sttm import merging as merge_module
from sttm.segment_sum import weighted_segment_sum
from sttm_reference import reference_merge

# ----------------------------------------------------------------------------- helpers


def orthogonal_features(count: int, channels: int | None = None) -> torch.Tensor:
    """``count`` mutually orthogonal unit vectors (cosine 0 between any two)."""
    return torch.eye(channels or count, dtype=torch.float64)[:count].clone()


def spatial_boxes(tokens: sttm.TokenSet, frame: int) -> list[tuple]:
    return [tuple(b) for b, f in zip(tokens.box.tolist(), tokens.frame.tolist()) if f == frame]


# ----------------------------------------------------------------------------- level sizes


def test_level_sizes_follow_the_spec_examples():
    assert sttm.level_sizes(14, 14) == [(2, 2), (4, 4), (7, 7), (14, 14)]
    assert sttm.level_sizes(27, 27) == [(2, 2), (4, 4), (7, 7), (14, 14), (27, 27)]
    assert sttm.level_sizes(3, 5) == [(2, 3), (3, 5)]
    assert sttm.level_sizes(2, 9) == [(2, 9)]
    assert sttm.level_sizes(1, 1) == [(1, 1)]


# ----------------------------------------------------------------------------- hand-worked examples


def test_4x4_frame_with_a_uniform_quadrant():
    # Levels are [2x2, 4x4]. The top-left quadrant holds one vector four times; every
    # other patch is orthogonal to everything, so only that quadrant can merge.
    patches = orthogonal_features(16)
    patches[[1, 4, 5]] = patches[0].clone()
    x = patches.reshape(1, 4, 4, 16)
    tokens = sttm.merge(x, tau_s=0.5, root_level=0)

    assert tokens.num_tokens == 13
    assert tokens.box[0].tolist() == [0, 0, 2, 2]
    assert tokens.num_patches.tolist() == [4] + [1] * 12
    assert torch.equal(tokens.features[0], patches[0])
    expected_assignment = torch.tensor([[0, 0, 1, 2],
                                        [0, 0, 3, 4],
                                        [5, 6, 7, 8],
                                        [9, 10, 11, 12]], dtype=torch.int32)
    assert torch.equal(tokens.assignment[0], expected_assignment)
    # Root level 1 is the finest level of a 4x4 grid: nothing can merge.
    assert sttm.merge(x, tau_s=0.5, root_level=1).num_tokens == 16


def test_two_frame_static_scene_merges_every_token_across_time():
    frame = orthogonal_features(9).reshape(1, 3, 3, 9)
    x = torch.cat([frame, frame])
    tokens = sttm.merge(x, tau_s=1.5, tau_t=0.99)

    assert tokens.num_tokens == 9
    assert tokens.frame.tolist() == [0] * 9
    assert tokens.num_patches.tolist() == [2] * 9
    assert torch.equal(tokens.assignment[0], tokens.assignment[1])
    assert torch.equal(tokens.assignment[0].flatten(), torch.arange(9, dtype=torch.int32))
    assert torch.equal(tokens.features, frame.reshape(9, 9))
    # Without temporal merging the two frames stay apart.
    assert sttm.merge(x, tau_s=1.5).num_tokens == 18


def test_odd_3x5_grid_has_1x1_1x2_2x1_and_2x2_cells():
    # Levels [2x3, 3x5]: rows group {0},{1,2}; columns {0},{1,2},{3,4}.
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64)
    tokens = sttm.merge(x, tau_s=-1.0, root_level=0)
    assert tokens.box.tolist() == [
        [0, 0, 1, 1], [0, 1, 1, 3], [0, 3, 1, 5],
        [1, 0, 3, 1], [1, 1, 3, 3], [1, 3, 3, 5],
    ]
    assert tokens.num_patches.tolist() == [1, 2, 2, 2, 4, 4]
    assert torch.allclose(tokens.features[4], x[0, 1:3, 1:3].reshape(4, 6).mean(0))
    assert torch.allclose(tokens.features[1], x[0, 0, 1:3].mean(0))

    # Make only the 2x2 cell's children disagree: it splits, the rest stay whole.
    uniform = torch.ones(1, 3, 5, 6, dtype=torch.float64)
    uniform[0, 1:3, 1:3] = orthogonal_features(4, 6).reshape(2, 2, 6)
    split = sttm.merge(uniform, tau_s=0.9, root_level=0)
    assert split.box.tolist() == [
        [0, 0, 1, 1], [0, 1, 1, 3], [0, 3, 1, 5],
        [1, 0, 3, 1], [1, 1, 2, 2], [1, 2, 2, 3], [1, 3, 3, 5], [2, 1, 3, 2], [2, 2, 3, 3],
    ]


def test_mean_of_means_versus_patch_weighted_mean_on_an_odd_grid():
    # 3x3 -> 2x2: cell (1,1) has four children, cell (0,0) one. Two levels only, so
    # build a 5x5 grid to get three levels and a difference between the two means.
    x = torch.randn(1, 5, 5, 4, dtype=torch.float64)
    plain = sttm.merge(x, tau_s=-1.0, root_level=0)
    weighted = sttm.merge(x, tau_s=-1.0, root_level=0, weighted=True)
    # Root cell (1,1) of 2x2 covers rows 1-4, cols 1-4 via 3x3 cells {1,2}x{1,2}.
    assert plain.box[3].tolist() == [1, 1, 5, 5]
    level1 = {(r, c): x[0, max(0, 2 * r - 1):2 * r + 1, max(0, 2 * c - 1):2 * c + 1].reshape(-1, 4).mean(0)
              for r in range(3) for c in range(3)}
    mean_of_means = torch.stack([level1[(1, 1)], level1[(1, 2)], level1[(2, 1)], level1[(2, 2)]]).mean(0)
    assert torch.allclose(plain.features[3], mean_of_means)
    assert torch.allclose(weighted.features[3], x[0, 1:5, 1:5].reshape(-1, 4).mean(0))
    # Root cell (0,0) covers only patch (0,0) through 3x3 cell (0,0).
    assert plain.box[0].tolist() == [0, 0, 1, 1]


def test_temporal_parent_is_the_most_similar_candidate_and_ties_go_to_the_earlier_token():
    # Frame 0: four 1x1 tokens... use a 2x2 grid (one level, no spatial merging).
    a = orthogonal_features(4)
    frame0 = a.reshape(1, 2, 2, 4)
    frame1 = a[[0, 0, 0, 0]].reshape(1, 2, 2, 4)  # every patch equals frame 0's first patch
    tokens = sttm.merge(torch.cat([frame0, frame1]), tau_s=1.5, tau_t=0.5)
    # Only the patch at (0,0) is nested with a similar token; the rest have cosine 0.
    assert tokens.num_tokens == 7
    assert tokens.assignment[1].tolist() == [[0, 4], [5, 6]]


def test_finer_token_picks_among_several_nested_candidates():
    # 4x4 grid, root level 0 (levels 2x2, 4x4). Frame 0: a uniform top-left quadrant
    # -> one coarse token. Frame 1: the quadrant's four patches differ; each nested
    # fine token of frame 1 has exactly one candidate, the coarse token of frame 0.
    base = orthogonal_features(16)
    f0 = base.clone()
    f0[[1, 4, 5]] = f0[0].clone()
    f1 = base.clone()
    f1[0] = base[0]
    f1[1] = base[0] * 0.9 + base[1] * 0.1
    x = torch.stack([f0, f1]).reshape(2, 4, 4, 16)
    tokens = sttm.merge(x, tau_s=0.999, tau_t=0.9, root_level=0)
    # frame 0: 13 tokens; frame 1: 16 fine tokens of which patches (0,0),(0,1) join the
    # coarse token; the other 14 find a same-box identical token in frame 0 only when
    # equal (patches outside the quadrant are equal across frames) -> 12 more joins.
    assert tokens.num_patches[0].item() == 6
    assert tokens.num_tokens == 13 + 16 - 2 - 12


# ----------------------------------------------------------------------------- the reference


shapes = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9))
thresholds = st.floats(-1.2, 1.2, allow_nan=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, channels=st.sampled_from([1, 2, 4, 6]), tau_s=thresholds,
       tau_t=st.one_of(st.none(), thresholds), root_level=st.integers(0, 4), weighted=st.booleans(),
       heads=st.sampled_from([1, 2]), low_rank=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_the_reference_implementation(shape, channels, tau_s, tau_t, root_level, weighted, heads,
                                              low_rank, seed):
    generator = torch.Generator().manual_seed(seed)
    t, h, w = shape
    if low_rank:  # few distinct directions -> many high similarities, many merges
        basis = torch.randn(2, channels, generator=generator, dtype=torch.float64)
        x = torch.rand(t, h, w, 2, generator=generator, dtype=torch.float64) @ basis
    else:
        x = torch.randn(t, h, w, channels, generator=generator, dtype=torch.float64)
    head_dim = channels // heads if channels % heads == 0 else None
    got = sttm.merge(x, tau_s=tau_s, tau_t=tau_t, root_level=root_level, weighted=weighted, head_dim=head_dim)
    want = reference_merge(x.numpy(), tau_s, tau_t, root_level, weighted, head_dim)
    assert got.box.tolist() == want["box"].tolist()
    assert got.frame.tolist() == want["frame"].tolist()
    assert got.num_patches.tolist() == want["num_patches"].tolist()
    assert np.array_equal(got.assignment.numpy(), want["assignment"])
    np.testing.assert_allclose(got.features.numpy(), want["features"], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- properties


def random_video(data, max_t=4, max_side=10, channels=(3, 8)) -> torch.Tensor:
    t = data.draw(st.integers(1, max_t), label="T")
    h = data.draw(st.integers(1, max_side), label="H")
    w = data.draw(st.integers(1, max_side), label="W")
    c = data.draw(st.integers(*channels), label="C")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    generator = torch.Generator().manual_seed(seed)
    # A smooth-ish video: a shared background plus noise, so merges actually happen.
    background = torch.randn(1, h, w, c, generator=generator)
    noise = data.draw(st.sampled_from([0.05, 0.3, 1.0]), label="noise")
    return background + noise * torch.randn(t, h, w, c, generator=generator)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), tau_s=thresholds, tau_t=st.one_of(st.none(), thresholds),
       root_level=st.integers(0, 4), weighted=st.booleans())
def test_every_patch_belongs_to_exactly_one_token_and_features_are_means(data, tau_s, tau_t, root_level, weighted):
    x = random_video(data)
    tokens = sttm.merge(x, tau_s=tau_s, tau_t=tau_t, root_level=root_level, weighted=weighted)
    n = tokens.num_tokens
    t, h, w, c = x.shape

    assert tokens.assignment.shape == (t, h, w) and tokens.assignment.dtype == torch.int32
    assert int(tokens.assignment.min()) == 0 and int(tokens.assignment.max()) == n - 1
    assert torch.equal(torch.bincount(tokens.assignment.flatten().long(), minlength=n), tokens.num_patches.long())
    assert tokens.retention == n / (t * h * w)

    # Output order: strictly increasing (t, y0, x0) of the roots.
    keys = tokens.frame.long() * h * w + tokens.box[:, 0].long() * w + tokens.box[:, 1].long()
    assert bool((keys[1:] > keys[:-1]).all())
    # Each token's root box lies in its own frame and is covered by the token.
    for i in range(n):
        y0, x0, y1, x1 = tokens.box[i].tolist()
        assert bool((tokens.assignment[tokens.frame[i], y0:y1, x0:x1] == i).all())

    if weighted:  # patch-weighted: exactly the mean of every input patch it covers
        patch_sums = torch.zeros(n, c, dtype=torch.float64).index_add_(
            0, tokens.assignment.flatten().long(), x.reshape(-1, c).double())
        expected = patch_sums / tokens.num_patches[:, None].double()
        assert torch.allclose(tokens.features.double(), expected, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), tau_s=thresholds, root_level=st.integers(0, 4))
def test_spatial_token_boxes_tile_each_frame(data, tau_s, root_level):
    x = random_video(data)
    tokens = sttm.merge(x, tau_s=tau_s, root_level=root_level)
    t, h, w, _ = x.shape
    for f in range(t):
        covered = torch.zeros(h, w, dtype=torch.int64)
        for y0, x0, y1, x1 in spatial_boxes(tokens, f):
            covered[y0:y1, x0:x1] += 1
        assert bool((covered == 1).all())


@settings(max_examples=40, deadline=None)
@given(data=st.data(), weighted=st.booleans())
def test_thresholds_above_one_keep_every_token_and_unmerge_returns_the_input(data, weighted):
    x = random_video(data)
    tokens = sttm.merge(x, tau_s=1.01, tau_t=None, weighted=weighted)
    assert tokens.num_tokens == x[..., 0].numel()
    assert torch.equal(tokens.unmerge(), x)
    assert torch.equal(tokens.features, x.reshape(-1, x.shape[-1]))
    # tau_t above one: still nothing merges.
    assert sttm.merge(x, tau_s=1.01, tau_t=1.01).num_tokens == x[..., 0].numel()


@settings(max_examples=40, deadline=None)
@given(data=st.data(), root_level=st.integers(0, 4))
def test_threshold_minus_one_merges_maximally(data, root_level):
    x = random_video(data)
    t, h, w, _ = x.shape
    levels = sttm.level_sizes(h, w)
    rh, rw = levels[min(root_level, len(levels) - 1)]
    assert sttm.merge(x, tau_s=-1.0, root_level=root_level).num_tokens == t * rh * rw
    assert sttm.merge(x, tau_s=-1.0, tau_t=-1.0, root_level=root_level).num_tokens == rh * rw
    assert sttm.merge(x, tau_s=-5.0, tau_t=-5.0, root_level=root_level).num_tokens == rh * rw


@settings(max_examples=40, deadline=None)
@given(data=st.data(), taus=st.lists(thresholds, min_size=2, max_size=5), fixed=thresholds)
def test_token_count_is_monotone_in_each_threshold(data, taus, fixed):
    x = random_video(data)
    taus = sorted(taus)
    spatial_only = [sttm.merge(x, tau_s=tau).num_tokens for tau in taus]
    assert spatial_only == sorted(spatial_only)
    temporal = [sttm.merge(x, tau_s=fixed, tau_t=tau).num_tokens for tau in taus]
    assert temporal == sorted(temporal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_is_preserved_and_unmerged_singletons_are_unchanged(dtype):
    x = (torch.randn(1, 14, 14, 8) * 0.3 + torch.randn(3, 14, 14, 8)).to(dtype)
    tokens = sttm.merge(x, tau_s=0.6, tau_t=0.6)
    assert tokens.features.dtype == dtype
    restored = tokens.unmerge()
    assert restored.dtype == dtype and restored.shape == x.shape
    single = tokens.num_patches[tokens.assignment.long()] == 1  # [T, H, W]
    assert bool(single.any())
    assert torch.equal(restored[single], x[single])


def test_head_dim_averages_per_head_cosines():
    # Two heads: head 0 identical across the quadrant, head 1 orthogonal. One head over
    # all channels gives cosine ~0.5 per child; per head it averages to 0.5 as well, but
    # with head_dim the identical head alone cannot reach 0.9.
    x = torch.zeros(1, 2, 2, 4, dtype=torch.float64)
    x[0, :, :, 0] = 1.0
    x[0, 0, 0, 2], x[0, 0, 1, 3], x[0, 1, 0, 2], x[0, 1, 1, 3] = 10.0, 10.0, -10.0, -10.0
    # A 2x2 grid has a single level: use 4x4 with the pattern in the top-left quadrant.
    big = torch.zeros(1, 4, 4, 4, dtype=torch.float64)
    big[:, :2, :2] = x
    big[:, :2, 2:] = x
    big[:, 2:, :2] = x
    big[:, 2:, 2:] = x
    whole = sttm.merge(big, tau_s=0.0, root_level=0)
    per_head = sttm.merge(big, tau_s=0.0, root_level=0, head_dim=2)
    # Children of each quadrant: head 0 = (1, 0) everywhere -> cosine 1 per head;
    # head 1 = +-10 along two axes, mean over the quadrant = 0 -> cosine 0 per head.
    # Averaged over heads: 0.5 >= 0 -> merge. Over all channels the parent (1,0,0,0)
    # against a child (1,0,10,0) gives ~0.0995 >= 0 -> merge too; at 0.3 they differ.
    assert whole.num_tokens == per_head.num_tokens == 4
    assert sttm.merge(big, tau_s=0.3, root_level=0).num_tokens == 16
    assert sttm.merge(big, tau_s=0.3, root_level=0, head_dim=2).num_tokens == 4


@contextlib.contextmanager
def torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def in_index_order(rows: torch.Tensor, weight: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """The segment sum by its definition: each segment's weighted rows added one after
    another in increasing row index, starting from zero (one elementwise add per step)."""
    sums = torch.zeros(num_segments, rows.shape[1], dtype=weight.dtype)
    # rank: how many earlier rows share the row's segment.
    order = torch.argsort(segment, stable=True)
    first_of_segment = torch.bincount(segment, minlength=num_segments).cumsum(0) - torch.bincount(segment, minlength=num_segments)
    rank = torch.empty_like(segment)
    rank[order] = torch.arange(len(segment)) - first_of_segment[segment[order]]
    for k in range(int(rank.max()) + 1):
        step = (rank == k).nonzero().squeeze(1)  # at most one row per segment
        sums[segment[step]] = sums[segment[step]] + rows[step].to(weight.dtype) * weight[step, None]
    return sums.to(rows.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_segment_sum_adds_in_index_order_at_any_thread_count(dtype):
    # Few segments, many rows each and enough elements for several threads: an
    # accumulation in thread-dependent order (index_put_'s atomics) differs here.
    generator = torch.Generator().manual_seed(0)
    rows = (torch.randn(3000, 48, generator=generator) * 10).to(dtype)
    segment = torch.randint(0, 7, (3000,), generator=generator)
    counts = torch.bincount(segment, minlength=7)
    weight = (1.0 / counts.to(torch.float64 if dtype == torch.float64 else torch.float32))[segment]
    expected = in_index_order(rows, weight, segment, 7)
    for threads in (1, 2, 4):
        with torch_threads(threads):
            for _ in range(3):
                got = weighted_segment_sum(rows, weight, segment, counts)
                assert got.dtype == dtype
                assert torch.equal(got, expected), f"{threads} threads"


@pytest.mark.parametrize("seed", range(8))
def test_is_bitwise_deterministic_at_any_thread_count(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 14, 14, 32, generator=generator)
    results = []
    for threads in (1, 2, 4):
        with torch_threads(threads):
            results += [sttm.merge_to_budget(x, 0.3), sttm.merge_to_budget(x, 0.3, weighted=True)]
    for i, got in enumerate(results):
        want = results[i % 2]  # the same call at 1 thread
        assert torch.equal(got.features, want.features) and torch.equal(got.assignment, want.assignment)
        assert got.tau_s == want.tau_s


# ----------------------------------------------------------------------------- budget


def counts_along_the_schedule(x: torch.Tensor, root_level: int, weighted: bool) -> list[int]:
    """Token count at every threshold the budget search may choose (exhaustive)."""
    sims = merge_module.cell_similarities(x, root_level, weighted, None, temporal=True)
    candidates = merge_module._threshold_candidates(sims)
    return [sttm.merge(x, tau_s=tau, tau_t=tau, root_level=root_level, weighted=weighted).num_tokens
            for tau in candidates.tolist()]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), taus=st.lists(thresholds, min_size=1, max_size=6), root_level=st.integers(0, 3),
       weighted=st.booleans())
def test_batched_token_counts_equal_the_merged_counts(data, taus, root_level, weighted):
    # The budget search counts many thresholds at once without building the tokens.
    x = random_video(data)
    sims = merge_module.cell_similarities(x, root_level, weighted, None, temporal=True)
    counts = merge_module._token_counts(sims, torch.tensor(taus, dtype=sims.min_child_sim.dtype)).tolist()
    assert counts == [sttm.merge(x, tau_s=tau, tau_t=tau, root_level=root_level, weighted=weighted).num_tokens
                      for tau in taus]


def test_a_number_threshold_rounds_like_the_budget_searchs_threshold_tensors():
    # merge compares similarities with a Python float, the budget search with float32
    # tensors made from the same float64 candidates: both must round alike, or the
    # chosen threshold would not reproduce its token count. Midpoints between
    # neighbouring float32 values are the hard case.
    sims = torch.rand(4096, dtype=torch.float32) * 2 - 1
    upper = torch.nextafter(sims, torch.tensor(2.0))
    for tau in ((sims.double() + upper.double()) / 2).tolist()[:512] + torch.rand(512, dtype=torch.float64).tolist():
        assert torch.equal(sims >= tau, sims >= torch.tensor([tau], dtype=torch.float64).float())


@settings(max_examples=40, deadline=None)
@given(data=st.data(), retention=st.floats(0.05, 1.0), root_level=st.integers(0, 2), weighted=st.booleans())
def test_budget_mode_meets_the_budget_closely_and_is_reproducible(data, retention, root_level, weighted):
    x = random_video(data, max_t=4, max_side=9)
    t, h, w, _ = x.shape
    budget = math.floor(retention * t * h * w)
    levels = sttm.level_sizes(h, w)
    rh, rw = levels[min(root_level, len(levels) - 1)]
    if budget < rh * rw:
        with pytest.raises(ValueError, match="retention"):
            sttm.merge_to_budget(x, retention, root_level=root_level, weighted=weighted)
        return
    tokens = sttm.merge_to_budget(x, retention, root_level=root_level, weighted=weighted)
    assert tokens.num_tokens <= budget
    assert tokens.budget == retention and tokens.tau_s == tokens.tau_t
    # Close: within a few tokens of the best count any threshold of the schedule gives
    # (the count is not strictly monotone along the schedule, so bisection can land a
    # step short of the exhaustive optimum).
    best = max(n for n in counts_along_the_schedule(x, root_level, weighted) if n <= budget)
    assert tokens.num_tokens >= best - 3
    again = sttm.merge(x, tau_s=tokens.tau_s, tau_t=tokens.tau_t, root_level=root_level, weighted=weighted)
    assert again.num_tokens == tokens.num_tokens
    assert torch.equal(again.assignment, tokens.assignment)


def test_budget_mode_on_a_realistic_grid_lands_on_the_budget():
    torch.manual_seed(0)
    x = (torch.randn(1, 14, 14, 64) + 0.5 * torch.randn(16, 14, 14, 64)).to(torch.bfloat16)
    for retention in (0.5, 0.3, 0.1):
        tokens = sttm.merge_to_budget(x, retention)
        budget = math.floor(retention * x[..., 0].numel())
        assert budget * 0.99 <= tokens.num_tokens <= budget
        assert tokens.features.dtype == torch.bfloat16


def test_full_retention_merges_nothing():
    x = torch.randn(3, 7, 9, 5)
    tokens = sttm.merge_to_budget(x, 1.0)
    assert tokens.num_tokens == 3 * 7 * 9
    assert torch.equal(tokens.unmerge(), x)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("x, message", [
    (torch.randn(4, 4, 8), "rank 4"),
    (torch.randn(1, 2, 4, 4, 8), "rank 4"),
    (torch.randn(0, 4, 4, 8), "empty"),
    (torch.randn(2, 4, 0, 8), "empty"),
    (torch.ones(2, 4, 4, 8, dtype=torch.int64), "floating point"),
    (torch.tensor(float("nan")).expand(1, 2, 2, 2).clone(), "NaN or inf"),
    (torch.tensor(float("inf")).expand(1, 2, 2, 2).clone(), "NaN or inf"),
    (np.zeros((1, 2, 2, 2)), "torch.Tensor"),
])
def test_bad_input_raises_a_value_error_that_says_what_is_wrong(x, message):
    with pytest.raises(ValueError, match=message):
        sttm.merge(x, tau_s=0.5)
    with pytest.raises(ValueError, match=message):
        sttm.merge_to_budget(x, 0.5)


def test_bad_parameters_raise_value_errors():
    x = torch.randn(2, 4, 4, 6)
    with pytest.raises(ValueError, match="tau_s"):
        sttm.merge(x, tau_s=float("nan"))
    with pytest.raises(ValueError, match="tau_t"):
        sttm.merge(x, tau_s=0.5, tau_t=float("nan"))
    with pytest.raises(ValueError, match="head_dim=4"):
        sttm.merge(x, tau_s=0.5, head_dim=4)
    with pytest.raises(ValueError, match="head_dim"):
        sttm.merge_to_budget(x, 0.5, head_dim=5)
    with pytest.raises(ValueError, match="root_level"):
        sttm.merge(x, tau_s=0.5, root_level=-1)
    for retention in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="retention"):
            sttm.merge_to_budget(x, retention)
    with pytest.raises(ValueError, match="retention"):
        sttm.merge_to_budget(torch.randn(1, 14, 14, 4), 0.01)  # 1 token asked, 16 root cells


def test_api_is_documented():
    assert "[T, H, W, C]" in sttm.merge.__doc__
    assert "schedule" in sttm.merge_to_budget.__doc__.lower()
    assert "unmerge" in dir(sttm.TokenSet)
