"""Per-head budgets (`spattn_compile.policies.budgets`): the average density is the setting's to one block per head,
no head is below its floor, the budgets are deterministic and water-filling's split is the best one for its estimated
mass; the residual policy weighs each skipped block by what rectification leaves of it (and is water-filling when it
leaves everything); the uniform policy selects exactly what selection always selected, and both implementations
agree."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import reference_call, sparse_call, triton_implementation

from spattn_compile import SparseAttentionConfig
from spattn_compile.layout import token_layout
from spattn_compile.plan import PooledStats, SparsePlan, block_budget
from spattn_compile.policies import (
    CalibratedResidual,
    MissingMassCalibration,
    ResidualFilling,
    TopK,
    Trust,
    UniformBudget,
    WaterFilling,
    selection_settings,
)
from spattn_compile.policies.budgets import (
    calibrated_missing,
    calibrated_recall,
    calibrated_residual_budgets,
    concave_gains,
    residual_budgets,
    residual_share,
    top_share,
    water_fill_budgets,
)
from spattn_compile.policies.topk import head_budgets, select_blocks
from spattn_compile.testing import dit_attention_inputs


def _scores(batch: int, heads: int, nb: int, seed: int, sharpness: torch.Tensor | None = None) -> torch.Tensor:
    """Row-stochastic block scores `(B, H, NB, NB + 1)` whose heads differ in how concentrated they are."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, nb, nb + 1, generator=generator, dtype=torch.float64)
    if sharpness is None:
        sharpness = torch.rand(heads, generator=generator, dtype=torch.float64) * 6
    return (logits * sharpness[:, None, None]).softmax(-1)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 6),
    nb=st.integers(1, 24),
    density=st.floats(0.01, 1.0),
    min_share=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_water_fill_keeps_the_average_and_the_floors(batch, heads, nb, density, min_share, seed):
    scores = _scores(batch, heads, nb, seed)
    forced = torch.eye(nb, dtype=torch.bool)
    uniform = block_budget(density, nb)
    budgets = water_fill_budgets(scores, forced, uniform, min_share)
    assert budgets.dtype == torch.int32 and budgets.shape == (batch, heads)
    floor = max(1, math.ceil(min_share * uniform - 1e-9))
    assert int(budgets.min()) >= floor and int(budgets.max()) <= nb
    # The floors fit (each is at most the uniform budget), so the total is exactly the uniform one's.
    assert torch.equal(budgets.sum(-1), torch.full((batch,), heads * uniform, dtype=torch.int64))
    assert torch.equal(budgets, water_fill_budgets(scores.clone(), forced, uniform, min_share))


def _stats(batch: int, heads: int, nb: int, seed: int, key_spread: torch.Tensor | None = None) -> PooledStats:
    """Pooled block statistics `(B, H, NB, D = 8)` whose heads' keys spread by `key_spread (H,)` (default: random)
    around their block means; a block of each head may be empty."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    if key_spread is None:
        key_spread = torch.rand(heads, generator=generator, dtype=torch.float64) * 4
    d = 8
    count = torch.full((batch, heads, nb), 16.0, dtype=torch.float64)
    count[..., 0] = torch.randint(0, 2, (batch, heads), generator=generator).to(torch.float64) * 16
    mean_key = randn(batch, heads, nb, d)
    return PooledStats(
        tile_size=16, q_tile=randn(batch, heads, nb, d), q_tile_count=count, k_tile=mean_key, k_tile_count=count,
        q_block=randn(batch, heads, nb, d), q_block_mad=randn(batch, heads, nb, d).abs(), k_block=mean_key,
        k_block_mad=randn(batch, heads, nb, d).abs() * key_spread[:, None, None], v_block=randn(batch, heads, nb, d),
        k_block_count=count,
    )  # fmt: skip


TRUSTS = [None, Trust(compensate=False, gapr=False), Trust(compensate=True, gapr=False), Trust(True, True)]


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 6),
    nb=st.integers(1, 24),
    density=st.floats(0.01, 1.0),
    min_share=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    trust=st.sampled_from(TRUSTS),
    scale=st.sampled_from([None, 0.05, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_residual_keeps_the_average_and_the_floors(batch, heads, nb, density, min_share, trust, scale, seed):
    scores = _scores(batch, heads, nb, seed)
    stats = _stats(batch, heads, nb, seed)
    forced = torch.eye(nb, dtype=torch.bool)
    uniform = block_budget(density, nb)
    budgets = residual_budgets(scores, forced, uniform, stats, scale, trust, min_share)
    assert budgets.dtype == torch.int32 and budgets.shape == (batch, heads)
    floor = max(1, math.ceil(min_share * uniform - 1e-9))
    assert int(budgets.min()) >= floor and int(budgets.max()) <= nb
    assert torch.equal(budgets.sum(-1), torch.full((batch,), heads * uniform, dtype=torch.int64))
    # Deterministic, and the same from float32 inputs of the same values (the kernel path's dtype).
    assert torch.equal(budgets, residual_budgets(scores.clone(), forced, uniform, stats, scale, trust, min_share))
    single = PooledStats(**{f.name: getattr(stats, f.name) for f in dataclasses.fields(PooledStats)})
    assert torch.equal(budgets, residual_budgets(scores, forced, uniform, single, scale, trust, min_share))


@settings(max_examples=40, deadline=None)
@given(
    heads=st.integers(1, 5),
    nb=st.integers(1, 20),
    density=st.floats(0.01, 1.0),
    trust=st.sampled_from(TRUSTS[:2]),
    seed=st.integers(0, 2**16),
)
def test_residual_without_rectification_is_water_filling(heads, nb, density, trust, seed):
    """Where no skipped block is compensated, skipping costs its whole mass: the residual policy's split is
    water-filling's (whose gains already do not increase, so the concave majorant leaves them as they are)."""
    scores = _scores(1, heads, nb, seed)
    forced = torch.eye(nb, dtype=torch.bool)
    uniform = block_budget(density, nb)
    expected = water_fill_budgets(scores, forced, uniform, 0.25)
    stats = _stats(1, heads, nb, seed)
    assert torch.equal(residual_budgets(scores, forced, uniform, stats, None, trust, 0.25), expected)


@settings(max_examples=60, deadline=None)
@given(heads=st.integers(1, 3), nb=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_concave_gains_do_not_increase_and_majorise_the_cumulative_gain(heads, nb, seed):
    generator = torch.Generator().manual_seed(seed)
    gain = torch.rand(1, heads, nb, generator=generator, dtype=torch.float64)
    floor = torch.randint(0, nb + 1, (1, heads), generator=generator)
    concave = concave_gains(gain, floor)
    for h in range(heads):
        f = int(floor[0, h])
        assert torch.equal(concave[0, h, :f], gain[0, h, :f])
        tail, original = concave[0, h, f:], gain[0, h, f:]
        assert bool((tail[1:] <= tail[:-1]).all())
        assert bool((tail.cumsum(0) >= original.cumsum(0) - 1e-12).all())
        if f < nb:  # the majorant meets the cumulative gain where the head ends
            assert float(tail.sum()) == pytest.approx(float(original.sum()), rel=1e-12)


def test_residual_share_is_what_the_stand_in_misses():
    """Keys that do not spread leave nothing of a trusted block (the virtual key is the block); a block GAPR refuses,
    an empty one, or any block without compensation leaves everything; more spread or a larger scale leaves more."""
    stats = _stats(1, 2, 6, 0, key_spread=torch.tensor([0.0, 1.0], dtype=torch.float64))
    full = Trust(compensate=True, gapr=False)
    share = residual_share(stats, None, full)
    nonempty = (stats.k_block_count > 0)[..., None, :].expand_as(share)
    assert torch.equal(share[0, 0][nonempty[0, 0]], torch.zeros_like(share[0, 0][nonempty[0, 0]]))
    assert bool((share[0, 1][nonempty[0, 1]] > 0).all()) and bool((share[0, 1] <= 1).all())
    assert bool((share[~nonempty] == 1).all())
    assert bool((residual_share(stats, 1.0, full)[0, 1] >= share[0, 1]).all())
    assert bool((residual_share(stats, None, Trust(True, True)) >= share).all())
    for trust in TRUSTS[:2]:
        assert bool((residual_share(stats, None, trust) == 1).all())


def test_residual_gives_blocks_to_the_head_whose_skipped_blocks_rectification_cannot_recover():
    """Two heads with the same scores: the head whose keys spread within their blocks (the stand-in misses most of a
    skipped block) gets blocks from the head whose keys agree (rectification recovers its skipped blocks);
    water-filling, which sees only the equal masses, splits them evenly."""
    nb = 12
    scores = _scores(1, 1, nb, 4, sharpness=torch.tensor([1.0], dtype=torch.float64)).expand(1, 2, nb, nb + 1)
    stats = _stats(1, 2, nb, 1, key_spread=torch.tensor([0.05, 3.0], dtype=torch.float64))
    stats = dataclasses.replace(stats, k_block_count=torch.full_like(stats.k_block_count, 16.0))
    forced = torch.eye(nb, dtype=torch.bool)
    even = water_fill_budgets(scores, forced, 4)
    assert even.tolist() == [[4, 4]]
    budgets = residual_budgets(scores, forced, 4, stats, 1.0, Trust(compensate=True, gapr=False), 0.25)
    assert budgets[0, 0] < 4 < budgets[0, 1] and int(budgets.sum()) == 8


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 6),
    nb=st.integers(1, 24),
    density=st.floats(0.01, 1.0),
    min_share=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    relative=st.sampled_from([0.0, 0.5, 1.0]),
    trust=st.sampled_from(TRUSTS),
    seed=st.integers(0, 2**16),
)
def test_calibrated_keeps_the_average_and_the_floors(batch, heads, nb, density, min_share, relative, trust, seed):
    scores = _scores(batch, heads, nb, seed)
    stats = _stats(batch, heads, nb, seed)
    forced = torch.eye(nb, dtype=torch.bool)
    uniform = block_budget(density, nb)
    arguments = (forced, uniform, stats, None, trust, min_share, relative)
    budgets = calibrated_residual_budgets(scores, *arguments)
    assert budgets.dtype == torch.int32 and budgets.shape == (batch, heads)
    floor = max(1, math.ceil(min_share * uniform - 1e-9))
    assert int(budgets.min()) >= floor and int(budgets.max()) <= nb
    assert torch.equal(budgets.sum(-1), torch.full((batch,), heads * uniform, dtype=torch.int64))
    # Deterministic, and the same from float32 scores of the same values (the kernel path's dtype).
    assert torch.equal(budgets, calibrated_residual_budgets(scores.clone(), *arguments))
    assert torch.equal(budgets, calibrated_residual_budgets(scores.float().double(), *arguments)) or not torch.equal(
        scores.float().double(), scores
    )


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 5), nb=st.integers(1, 20), density=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_calibrated_without_calibration_nor_relative_weights_is_the_residual_policy(heads, nb, density, seed):
    scores = _scores(1, heads, nb, seed)
    stats = _stats(1, heads, nb, seed)
    forced = torch.eye(nb, dtype=torch.bool)
    uniform = block_budget(density, nb)
    trust = Trust(compensate=True, gapr=False)
    identity = MissingMassCalibration(0.0, 1.0, 0.0, 1.0, 1.0)
    expected = residual_budgets(scores, forced, uniform, stats, None, trust, 0.25)
    got = calibrated_residual_budgets(scores, forced, uniform, stats, None, trust, 0.25, 0.0, identity)
    assert torch.equal(got, expected)


@settings(max_examples=40, deadline=None)
@given(nb=st.integers(2, 16), density=st.floats(0.05, 0.9), seed=st.integers(0, 2**16))
def test_relative_weights_protect_the_head_whose_error_is_small(nb, density, seed):
    """Two heads: raising `relative` (each head's gains over its own residual at the uniform budget to that power)
    never takes blocks from the head whose residual at the uniform budget is the smaller."""
    scores = _scores(1, 2, nb, seed, sharpness=torch.tensor([6.0, 0.5], dtype=torch.float64))
    stats = _stats(1, 2, nb, seed)
    forced = torch.eye(nb, dtype=torch.bool)
    uniform = block_budget(density, nb)
    trust = Trust(compensate=True, gapr=False)
    identity = MissingMassCalibration(0.0, 1.0, 0.0, 1.0, 1.0)
    order = (scores[..., :nb] + 2.0 * forced).sort(dim=-1, descending=True, stable=True).indices
    gain = (scores[..., :nb] * residual_share(stats, None, trust)).gather(-1, order).mean(-2)
    small = int(gain[0, :, uniform:].sum(-1).argmin())
    kept = [
        int(calibrated_residual_budgets(scores, forced, uniform, stats, None, trust, 0.0, r, identity)[0, small])
        for r in (0.0, 0.5, 1.0)
    ]
    assert kept == sorted(kept)


def test_calibrated_missing_is_the_stated_function():
    """`m * clamp(exp(intercept + top_share * T) * m ** (power - 1), low, high)`, at most 1, with `T` the mean
    largest share of a head's rows: one-hot rows have T = 1, uniform rows 1 / NB; invariant to the rows' scale, the
    text column and a permutation of the key blocks."""
    nb = 8
    one_hot = torch.zeros(1, 1, nb, nb + 1, dtype=torch.float64)
    one_hot[..., 3] = 0.7
    flat = torch.full((1, 1, nb, nb + 1), 1.0 / (nb + 1), dtype=torch.float64)
    scores = torch.cat([one_hot, flat], 1)
    assert torch.allclose(top_share(scores), torch.tensor([[1.0, 1.0 / nb]], dtype=torch.float64))
    c = MissingMassCalibration(intercept=0.3, power=0.5, top_share=-0.4, low=0.01, high=100.0)
    missing = torch.tensor([[0.04, 0.09]], dtype=torch.float64)
    expected = missing.sqrt() * torch.tensor([[math.exp(0.3 - 0.4), math.exp(0.3 - 0.4 / nb)]], dtype=torch.float64)
    assert torch.allclose(calibrated_missing(missing, top_share(scores), c), expected, rtol=1e-12)
    permutation = torch.randperm(nb, generator=torch.Generator().manual_seed(0))
    permuted = torch.cat([scores[..., permutation], scores[..., nb:]], -1)
    rescaled = scores * 3.0
    rescaled[..., nb] = 0.0
    for other in (permuted, rescaled):
        assert torch.allclose(calibrated_missing(missing, top_share(other), c), expected, rtol=1e-12)
    # The factors are 4.52 and 4.28: clamped from above, then from below.
    for low, high, factor in ((1.5, 2.0, 2.0), (5.0, 6.0, 5.0)):
        tight = dataclasses.replace(c, low=low, high=high)
        assert torch.allclose(calibrated_missing(missing, top_share(scores), tight), missing * factor, rtol=1e-12)
    doubled = dataclasses.replace(c, low=2.0, high=2.0)
    assert calibrated_missing(torch.tensor([[0.0, 0.9]]), top_share(scores), doubled).tolist() == [[0.0, 1.0]]
    for bad in (dict(low=0.0), dict(low=2.0, high=1.0), dict(intercept=math.nan), dict(power=0.0)):
        with pytest.raises(ValueError, match="MissingMassCalibration"):
            MissingMassCalibration(**bad)
    with pytest.raises(ValueError, match="CalibratedResidual.relative=2"):
        CalibratedResidual(relative=2)


@settings(max_examples=60, deadline=None)
@given(
    heads=st.integers(1, 4),
    nb=st.integers(1, 16),
    power=st.floats(0.05, 2.0),
    intercept=st.floats(-2.0, 2.0),
    slope=st.floats(-2.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_calibrated_missing_is_monotone(heads, nb, power, intercept, slope, seed):
    """For every calibration with `power > 0`: more estimated missing mass never predicts less true missing mass
    (so a head's calibrated residual curve still falls as its budget grows), and the prediction stays in [0, 1]."""
    scores = _scores(1, heads, nb, seed)
    calibration = MissingMassCalibration(intercept, power, slope, 0.25, 8.0)
    missing = torch.linspace(0.0, 1.0, 257, dtype=torch.float64).expand(1, heads, 257)
    predicted = calibrated_missing(missing, top_share(scores), calibration)
    assert bool((predicted[..., 1:] >= predicted[..., :-1]).all())
    assert bool(((predicted >= 0) & (predicted <= 1)).all()) and bool((predicted[..., 0] == 0).all())


@settings(max_examples=30, deadline=None)
@given(heads=st.integers(1, 4), nb=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_calibrated_recall_is_monotone_in_the_kept_blocks(heads, nb, seed):
    """Keeping more blocks never lowers the calibrated recall; it stays in [0, 1] and is the calibrated missing mass
    of the plan's estimated recall."""
    grid = (1, 1, nb * 16)
    scores = _scores(1, heads, nb, seed)
    order = scores[..., :nb].argsort(-1, descending=True)
    previous = None
    for kept in range(1, nb + 1):
        mask = torch.zeros(1, heads, nb, nb, dtype=torch.bool)
        mask.scatter_(-1, order[..., :kept], True)
        plan = SparsePlan.from_mask(mask, video_grid=grid, block_size=16, reorder="none", block_scores=scores)
        recall = calibrated_recall(plan)
        assert bool(((recall >= 0) & (recall <= 1 + 1e-6)).all())
        expected = 1 - calibrated_missing(1 - plan.estimated_recall().double(), top_share(scores))
        assert torch.allclose(recall.double(), expected, atol=1e-6)
        if previous is not None:
            assert bool((recall >= previous - 1e-6).all())
        previous = recall


def test_residual_needs_the_statistics():
    layout = token_layout((1, 2, 16), 0, False, 16, "none")
    with pytest.raises(ValueError, match="head_budget='residual' needs the pooled statistics"):
        head_budgets(_scores(1, 2, 2, 0), layout, TopK(0.5, budget=ResidualFilling()))


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 3), nb=st.integers(1, 6), density=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_water_fill_maximises_the_estimated_recall(heads, nb, density, seed):
    """Against every split of `H * uniform` blocks (each head at least its diagonal): no split holds more estimated
    mass than water-filling's."""
    scores = _scores(1, heads, nb, seed)
    forced = torch.eye(nb, dtype=torch.bool)
    uniform = block_budget(density, nb)
    budgets = water_fill_budgets(scores, forced, uniform)[0].tolist()
    # A row's mass at budget b: its diagonal and its b - 1 best other blocks (selection's order).
    video = scores[0, :, :, :nb]
    others = video.masked_fill(forced, -1.0).sort(-1, descending=True).values.clamp(min=0)
    curve = torch.cat([video.diagonal(dim1=-2, dim2=-1)[..., None], others[..., :-1]], -1).cumsum(-1).mean(-2)

    def held(split):
        return sum(float(curve[h, b - 1]) for h, b in enumerate(split))

    best = max(
        held(split)
        for split in itertools.product(range(1, nb + 1), repeat=heads)
        if sum(split) == heads * uniform
    )
    assert held(budgets) >= best - 1e-12


def test_forced_blocks_raise_the_floor():
    """A head whose rows must keep more blocks than its share (neighbours, non-finite keys) keeps at least those."""
    nb, heads = 8, 3
    scores = _scores(1, heads, nb, 0, sharpness=torch.tensor([8.0, 0.1, 0.1], dtype=torch.float64))
    forced = torch.eye(nb, dtype=torch.bool).expand(1, heads, nb, nb).clone()
    forced[0, 0, :, :5] = True
    budgets = water_fill_budgets(scores, forced, 2)
    # Rows 5-7 of head 0 keep blocks 0-4 and their diagonal: a floor of 6. The floors (6 + 1 + 1) exceed the
    # 3 * 2 blocks of the uniform budget, so every head keeps its floor.
    assert budgets.tolist() == [[6, 1, 1]]


def test_budgets_go_to_the_concentrated_heads():
    """A head whose mass sits in a few blocks per row gives its far tail to a head whose mass is spread: with the
    uniform budget at 4 of 16 blocks the diffuse head ends above 4, the concentrated one below."""
    nb = 16
    sharp = torch.zeros(1, 1, nb, nb + 1, dtype=torch.float64)
    sharp[..., :nb] = torch.eye(nb, dtype=torch.float64) * 0.9 + 0.1 / nb
    diffuse = torch.full((1, 1, nb, nb + 1), 1.0 / (nb + 1), dtype=torch.float64)
    scores = torch.cat([sharp, diffuse], 1)
    budgets = water_fill_budgets(scores, torch.eye(nb, dtype=torch.bool), 4)
    assert budgets.tolist()[0][0] < 4 < budgets.tolist()[0][1] and int(budgets.sum()) == 8


@settings(max_examples=30, deadline=None)
@given(heads=st.integers(1, 4), nb=st.integers(2, 16), density=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_a_uniform_budget_tensor_selects_what_the_uniform_budget_selects(heads, nb, density, seed):
    """The `(B, H)` budget path of `select_blocks` filled with the uniform budget is bitwise the int path's (with and
    without the mass threshold)."""
    grid = (1, 1, nb * 16)
    layout = token_layout(grid, 0, False, 16, "none")
    scores = _scores(1, heads, nb, seed)
    nonempty = torch.ones(1, heads, layout.num_blocks, dtype=torch.bool)
    uniform = torch.full((1, heads), block_budget(density, nb), dtype=torch.int32)
    for threshold in (None, 0.9):
        common = dict(density=density, key_block_nonempty=nonempty, mass_threshold=threshold, max_density=0.5)
        assert torch.equal(
            select_blocks(scores, layout, **common), select_blocks(scores, layout, **common, head_budget=uniform)
        )


def test_settings_choose_the_budget_policy():
    assert selection_settings(SparseAttentionConfig()) == TopK(0.25, None, 0.5, False, UniformBudget())
    chosen = selection_settings(SparseAttentionConfig(head_budget="water_fill")).budget
    assert chosen == WaterFilling()
    assert selection_settings(SparseAttentionConfig(head_budget="residual")).budget == ResidualFilling()
    assert selection_settings(SparseAttentionConfig(head_budget="calibrated")).budget == CalibratedResidual()
    with pytest.raises(ValueError, match="head_budget='best'.*uniform"):
        SparseAttentionConfig(head_budget="best")
    layout = token_layout((1, 2, 16), 0, False, 16, "none")
    assert head_budgets(_scores(1, 2, 2, 0), layout, TopK(0.5)) is None


@pytest.mark.parametrize("policy", ["water_fill", "residual", "calibrated"])
@pytest.mark.parametrize("text_len", [0, 9])
def test_plans_keep_the_average_density(text_len, policy):
    """End to end through the reference orchestrator: each head's plan keeps its budget per video query block and the
    mean over heads is the setting's budget; the plan is the same on a second call (deterministic)."""
    grid = (2, 6, 8)
    inputs = dit_attention_inputs(
        grid, heads=4, head_dim=16, text_len=text_len, temperatures=(1.0, 3.0, 0.5, 2.0), seed=3, dtype=torch.float64
    )
    config = SparseAttentionConfig(sparsity=0.7, block_size=16, head_budget=policy, min_seq_len=0)
    layout = token_layout(grid, text_len, False, config.block_size, config.reorder)
    plans = [
        reference_call(inputs.query, inputs.key, inputs.value, None, layout, config).plan() for _ in range(2)
    ]
    assert torch.equal(plans[0].kv_indices, plans[1].kv_indices)
    nb = layout.num_video_blocks
    kept = plans[0].density() * nb  # (B, H): blocks per video query block
    assert float((kept.mean(-1) - block_budget(config.density, nb)).abs().max()) <= 1.0
    assert float(kept.min()) >= 1.0


@pytest.mark.parametrize("policy", ["water_fill", "residual", "calibrated"])
def test_triton_implementation_selects_the_reference_plan(policy):
    """The Triton implementation with per-head budgets gives the reference's plan for the same scores."""
    grid = (2, 4, 8)
    inputs = dit_attention_inputs(grid, heads=3, head_dim=16, temperatures=(1.0, 3.0, 0.5), seed=5)
    config = SparseAttentionConfig(sparsity=0.6, block_size=16, head_budget=policy, min_seq_len=0)
    layout = token_layout(grid, 0, False, config.block_size, config.reorder)
    call = sparse_call(inputs.query, inputs.key, inputs.value, None, layout, config, triton_implementation())
    plan = call.plan()
    assert call.prepared is not None
    reference = reference_call(inputs.query, inputs.key, inputs.value, None, layout, config)
    expected = reference.select(call.prepared, plan.block_scores)
    assert torch.equal(plan.to_dense(), expected.to_dense())
    assert torch.equal(plan.trusted_mask(), expected.trusted_mask())
    uniform = dataclasses.replace(config, head_budget="uniform")
    kernel_plan = sparse_call(inputs.query, inputs.key, inputs.value, None, layout, uniform, triton_implementation())
    assert float(kernel_plan.plan().density().mean()) == pytest.approx(float(plan.density().mean()), abs=1 / 8)


def test_the_budget_policy_is_part_of_the_cached_plans_key():
    """A plan cached under one budget policy is never reused under another (`runtime.op.plan_signature`)."""
    from spattn_compile.runtime import op

    grid = (2, 4, 8)
    inputs = dit_attention_inputs(grid, heads=2, head_dim=16, seed=1, dtype=torch.float64)
    layout = token_layout(grid, 0, False, 16, "hilbert")
    signatures = set()
    for budget in ("uniform", "water_fill", "residual", "calibrated"):
        config = SparseAttentionConfig(block_size=16, head_budget=budget, min_seq_len=0)
        call = reference_call(inputs.query, inputs.key, inputs.value, None, layout, config)
        signatures.add(op.plan_signature(call, config))
    assert len(signatures) == 4


def test_report_shows_each_heads_density_and_estimated_recall(tmp_path):
    import spattn_compile
    from spattn_compile.runtime import model_state
    from spattn_compile.runtime.binding import default_registry
    from spattn_compile.runtime.plan_cache import plan_summary
    from spattn_compile.runtime.records import head_summary

    inputs = dit_attention_inputs((4, 8, 8), heads=3, head_dim=16, temperatures=(0.3, 1.0, 4.0), seed=2)
    config = SparseAttentionConfig(block_size=16, sparsity=0.7, head_budget="water_fill")
    plan = spattn_compile.select_plan(
        inputs.query, inputs.key, inputs.value, video_grid=(4, 8, 8), config=config, impl="reference"
    )
    context = model_state.StepContext(default_registry().anonymous("perhead"), 0, 1, 0, "override")
    kept, recall, share = plan_summary(plan)
    model_state.record(
        context, 0, "sparse", "refresh", kept, recall, keep_share=share, layer="blocks.0",
        head_summary=head_summary(plan),
    )  # fmt: skip
    result = spattn_compile.report()
    ((step, density, estimated),) = result.heads.values()
    assert step == 1
    assert torch.allclose(density, plan.density()[0]) and torch.allclose(estimated, plan.estimated_recall()[0])
    assert len(set(density.tolist())) > 1, "water-filling gave these heads different densities"
    table = result.head_table()
    assert "blocks.0" in table and f"2: {density[2]:.3f}/{estimated[2]:.3f}" in table
    pytest.importorskip("matplotlib")
    result.plot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 0
