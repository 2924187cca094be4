"""Block-importance estimators (`spattn_compile.estimators`): each registered estimator's kernel against its float64
reference, the properties the scores must have (rows are distributions; `SampledRows(rows=block_size)` is the true
block mass; the pooled estimator's outlier is the key farthest from its tile mean; a sink's block is kept), the probe
helpers, and the registry's errors.

Kernels run under the Triton interpreter on small prime-sided grids (float16 / float32); the reference runs in float64
on the same inputs (converted exactly). Outputs of the kernels are poisoned before the launches.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import (
    make_inputs,
    make_key_valid,
    poisoned_allocations,
    reference_prepared,
    score_tolerance,
    triton_prepared,
)

from spattn_compile import SparseAttentionConfig, reference, select_plan
from spattn_compile.estimators import (
    EstimatorConfig,
    PooledTiles,
    QueryTiles,
    SampledRows,
    base,
    estimator_for,
    parse_estimator,
    register_estimator,
    registered_estimators,
)
from spattn_compile.estimators.pooled import pooled_scores_reference, tile_outliers_reference
from spattn_compile.estimators.probes import probe_scores_reference, probe_weights, sampled_row_probes
from spattn_compile.inputs import key_padding_valid
from spattn_compile.kernels.statistics import prepare_statistics
from spattn_compile.layout import token_layout
from spattn_compile.plan import block_budget
from spattn_compile.testing import dit_attention_inputs, relative_error
from spattn_compile.testing.strategies import head_dims, kernel_grids, seeds

F64 = torch.float64
DEFAULT_ESTIMATORS = (PooledTiles(), SampledRows(), QueryTiles())


def _settings_for(block_size: int) -> list[EstimatorConfig]:
    """Every registered estimator in several settings valid for `block_size` (16 or 32)."""
    options = [
        PooledTiles(16, outliers=True),
        PooledTiles(16, outliers=False),
        SampledRows(1),
        SampledRows(3),
        SampledRows(8),
        SampledRows(block_size),
        QueryTiles(16),
    ]
    if block_size >= 32:
        options += [PooledTiles(32, outliers=True), QueryTiles(32)]
    return options


def test_every_registered_estimator_is_covered():
    """The kernel test below draws from these settings types; a newly registered estimator must be added there."""
    covered = {type(e) for e in _settings_for(32)}
    assert set(registered_estimators().values()) == covered
    assert set(registered_estimators()) == {"pooled", "sampled_rows", "query_tiles"}


# Relative error bounds of the float32 scores against float64. The probe of QueryTiles (a float32 tile mean) is cast
# to the keys' dtype before the products, so with float16 keys its scores carry float16 rounding of the probe.
def _usable_rows(prepared) -> torch.Tensor:
    """bool `(B, H, NB)`: the video query block has a usable query and the call has a usable key (its row of scores
    must be a distribution; otherwise it must be zero)."""
    layout = prepared.layout
    nb, bs = layout.num_video_blocks, layout.block_size
    real = (layout.source_index[: nb * bs] >= 0).reshape(nb, bs)
    finite = torch.isfinite(prepared.q[..., : nb * bs, :]).all(-1).reshape(*prepared.q.shape[:2], nb, bs)
    has_query = (real & finite).any(-1)
    has_key = prepared.key_usable.any(-1, keepdim=True)
    return has_query & has_key


@st.composite
def estimator_cases(draw):
    block_size = draw(st.sampled_from([16, 32]))
    text_len = draw(st.sampled_from([0, 0, 5, 37]))
    return {
        "seed": draw(seeds()),
        "batch": draw(st.integers(1, 2)),
        "heads": draw(st.integers(1, 3)),
        "head_dim": draw(head_dims()),
        "grid": draw(kernel_grids()),
        "text_len": text_len,
        "text_first": draw(st.booleans()),
        "block_size": block_size,
        "estimator": draw(st.sampled_from(_settings_for(block_size))),
        "mask_kind": draw(st.sampled_from(["none", "per_batch", "per_head", "empty"])),
        "gain": draw(st.sampled_from([0.5, 1.0, 3.0])),
        "dtype": draw(st.sampled_from([torch.float16, torch.float32])),
    }


@settings(max_examples=30)
@given(estimator_cases())
def test_estimator_kernel_matches_reference(case):
    generator = torch.Generator().manual_seed(case["seed"])
    layout = token_layout(case["grid"], case["text_len"], case["text_first"], case["block_size"])
    query, key, value = make_inputs(
        generator,
        batch=case["batch"],
        heads=case["heads"],
        head_dim=case["head_dim"],
        layout=layout,
        dtype=case["dtype"],
        memory="transposed",
        gain=case["gain"],
    )
    mask = make_key_valid(
        generator, batch=case["batch"], heads=case["heads"], layout=layout, kind=case["mask_kind"], masked_share=0.3
    )
    estimator = case["estimator"]
    tile = estimator.pool_tile_size(layout.block_size)
    scale = case["head_dim"] ** -0.5
    with poisoned_allocations():
        valid = key_padding_valid(mask, case["batch"], case["heads"], layout.seq_len)
        found = prepare_statistics(
            query, key, value, layout, tile_size=tile, key_valid=valid, outliers=estimator.reads_tile_outliers
        )
        scores = estimator_for(estimator).kernel(found.estimator_inputs(query, key, scale), estimator)
    expected_prepared = reference_prepared(query, key, value, mask, layout, tile, scale)
    expected = estimator_for(estimator).reference(expected_prepared.estimator_inputs(), estimator)

    nb = layout.num_video_blocks
    assert scores.shape == (case["batch"], case["heads"], nb, nb + 1) and scores.dtype == torch.float32
    assert expected.dtype == F64
    assert torch.isfinite(scores).all(), "unwritten (poisoned) or non-finite scores"
    error = relative_error(scores, expected)
    assert error < score_tolerance(estimator, case["dtype"]), f"{estimator}: relative error {error:.3g}"
    # Each row of a query block with a usable query is a distribution over the key blocks and the text column.
    rows = _usable_rows(expected_prepared)
    assert (scores >= 0).all()
    torch.testing.assert_close(scores.sum(-1), rows.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(expected.sum(-1), rows.to(F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("estimator", DEFAULT_ESTIMATORS, ids=lambda e: e.name)
def test_scores_are_not_uniform_or_trivial(estimator):
    """A guard that the comparison above means something: on video-like inputs every estimator's scores are far from
    uniform, and two estimators disagree more than a kernel and its reference."""
    inputs = dit_attention_inputs((3, 5, 7), heads=2, head_dim=32, text_len=11, text_padding=3, seed=4)
    layout = token_layout((3, 5, 7), 11, False, 16)
    prepared = reference_prepared(inputs.query, inputs.key, inputs.value, inputs.attn_mask, layout, 16, 32**-0.5)
    scores = estimator_for(estimator).reference(prepared.estimator_inputs(), estimator)
    nb = layout.num_video_blocks
    uniform = torch.full_like(scores, 1.0 / (nb + 1))
    assert relative_error(scores, uniform) > 0.3
    other = SampledRows(16) if not isinstance(estimator, SampledRows) else PooledTiles(16, outliers=False)
    assert relative_error(estimator_for(other).reference(prepared.estimator_inputs(), other), scores) > 1e-3


# --------------------------------------------------------------------------------------------------------------------
# SampledRows(rows=block_size) is the true block mass
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grid", "text_len", "text_first", "text_padding", "block_size"),
    [
        ((3, 5, 7), 0, False, 0, 16),  # 105 tokens: a partial last block of 9 rows
        ((2, 5, 7), 13, False, 4, 16),  # text last, padded (masked)
        ((3, 3, 3), 37, True, 9, 32),  # text first, padded, 27 video tokens in one partial block
        ((1, 1, 13), 5, True, 0, 16),
    ],
)
def test_sampled_rows_at_block_size_is_the_true_block_mass(grid, text_len, text_first, text_padding, block_size):
    inputs = dit_attention_inputs(
        grid,
        batch=2,
        heads=2,
        head_dim=24,
        text_len=text_len,
        text_first=text_first,
        text_padding=text_padding,
        dtype=F64,
        seed=sum(grid),
    )
    layout = token_layout(grid, text_len, text_first, block_size)
    estimator = SampledRows(rows=block_size)
    scale = 24**-0.5
    truth = reference.attention_block_mass(inputs.query, inputs.key, layout, inputs.attn_mask, scale=scale)
    assert layout.num_video % block_size, "the case must have a partial last block"
    prepared = reference_prepared(inputs.query, inputs.key, inputs.value, inputs.attn_mask, layout, block_size, scale)
    scores = estimator_for(estimator).reference(prepared.estimator_inputs(), estimator)
    assert relative_error(scores, truth) < 1e-12
    # The kernel in float32, to float32 precision.
    q, k, v = (t.float() for t in (inputs.query, inputs.key, inputs.value))
    with poisoned_allocations():
        kernel_prepared = triton_prepared(q, k, v, inputs.attn_mask, layout, block_size, scale)
        kernel_scores = estimator_for(estimator).kernel(kernel_prepared.estimator_inputs(), estimator)
    assert relative_error(kernel_scores, truth) < 2e-6


def test_sampled_rows_below_block_size_is_the_mass_of_its_rows():
    """With r < block_size the scores are the exact mass of the sampled rows (their strata-weighted mean), not an
    approximation of it: recompute it from dense softmax rows."""
    grid, block_size, rows = (2, 5, 7), 16, 3
    inputs = dit_attention_inputs(grid, heads=2, head_dim=16, text_len=6, dtype=F64, seed=9)
    layout = token_layout(grid, 6, False, block_size)
    prepared = reference_prepared(inputs.query, inputs.key, inputs.value, None, layout, block_size, 0.25)
    scores = estimator_for(SampledRows(rows)).reference(prepared.estimator_inputs(), SampledRows(rows))
    positions, weights = sampled_row_probes(layout, rows, torch.device("cpu"))
    logits = 0.25 * prepared.q @ prepared.k.transpose(-1, -2)
    probabilities = torch.softmax(logits.masked_fill(~prepared.key_valid[..., None, :], -math.inf), -1)
    nb = layout.num_video_blocks
    column = (torch.arange(layout.padded_len) // block_size).clamp(max=nb)
    per_block = torch.zeros(*probabilities.shape[:-1], nb + 1, dtype=F64).index_add_(-1, column, probabilities)
    sampled = per_block[..., positions, :].reshape(1, 2, nb, rows, nb + 1)
    w = weights.to(F64).reshape(nb, rows, 1)
    expected = (sampled * w).sum(-2) / w.sum(-2)
    assert relative_error(scores, expected) < 1e-12


# --------------------------------------------------------------------------------------------------------------------
# Probe helpers
# --------------------------------------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(
    grid=st.tuples(st.integers(1, 4), st.integers(1, 7), st.integers(1, 9)),
    text_len=st.integers(0, 20),
    block_size=st.sampled_from([16, 32, 64]),
    rows=st.integers(1, 64),
)
def test_sampled_row_probes_are_one_real_row_per_stratum(grid, text_len, block_size, rows):
    rows = min(rows, block_size)
    layout = token_layout(grid, text_len, False, block_size)
    positions, weights = sampled_row_probes(layout, rows, torch.device("cpu"))
    nb = layout.num_video_blocks
    assert positions.shape == weights.shape == (nb * rows,)
    assert positions.dtype == torch.int64 and weights.dtype == torch.float32
    real = layout.row_count[:nb]
    for block in range(nb):
        mine = positions[block * rows : (block + 1) * rows] - block * block_size
        w = weights[block * rows : (block + 1) * rows]
        # The strata partition the block's real rows: weights sum to the real row count, probes are real rows.
        assert int(w.sum()) == int(real[block])
        assert ((mine >= 0) & (mine < max(1, int(real[block])))).all()
        assert (layout.source_index[positions[block * rows : (block + 1) * rows]] >= 0).all()
        # Probes of non-empty strata are distinct and ascending (consecutive strata along the curve).
        used = mine[w > 0]
        assert (used[1:] > used[:-1]).all()
        if rows == block_size:
            # Every real row is a probe of weight 1 (empty strata of a short last block weigh 0).
            assert torch.equal(used, torch.arange(int(real[block])))
            assert set(w.tolist()) <= {0.0, 1.0}


def test_probe_weights_drop_non_finite_probes():
    probes = torch.randn(2, 3, 8, 4, dtype=F64)
    probes[0, 1, 2, 3] = math.nan
    probes[1, 2, 5, 0] = -math.inf
    weights = torch.arange(1, 9, dtype=torch.float32)
    got = probe_weights(probes, weights)
    assert got.shape == (2, 3, 8) and got.dtype == torch.float32
    expected = weights.expand(2, 3, 8).clone()
    expected[0, 1, 2] = 0
    expected[1, 2, 5] = 0
    assert torch.equal(got, expected)


@settings(max_examples=10)
@given(
    seed=seeds(),
    grid=kernel_grids(),
    text_len=st.sampled_from([0, 7, 37]),
    per_block=st.integers(1, 5),
    head_dim=head_dims(),
    per_head_weights=st.booleans(),
    mask_kind=st.sampled_from(["none", "per_head", "empty"]),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    source_order=st.booleans(),
)
# The NaN probe's row of logits is all NaN: the interpreter's numpy says so while the kernel gives it no weight.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_probe_kernel_matches_reference_with_any_probes(
    seed, grid, text_len, per_block, head_dim, per_head_weights, mask_kind, dtype, source_order
):
    """`probe_scores` on arbitrary probe vectors and weights (per head or shared; a NaN probe weighs nothing), the
    keys as canonical copies or the caller's (B, S, H, D)-strided tensor read through the layout."""
    from spattn_compile.kernels.probe_scores import probe_scores

    generator = torch.Generator().manual_seed(seed)
    layout = token_layout(grid, text_len, False, 16)
    query, key, value = make_inputs(generator, batch=2, heads=2, head_dim=head_dim, layout=layout, dtype=dtype)
    mask = make_key_valid(generator, batch=2, heads=2, layout=layout, kind=mask_kind, masked_share=0.3)
    prepared = triton_prepared(query, key, value, mask, layout, 16, 0.3)
    num_probes = layout.num_video_blocks * per_block
    probes = 2 * torch.randn(2, 2, num_probes, head_dim, generator=generator).to(dtype)
    probes[0, 1, 0, 0] = math.nan
    shape = (2, 2, num_probes) if per_head_weights else (num_probes,)
    weights = torch.rand(shape, generator=generator) + 0.1
    canonical_keys = reference.gather_canonical(key, layout)
    keys = {"k_c": canonical_keys}
    if source_order:
        keys = {"k_c": key.transpose(1, 2).contiguous().transpose(1, 2), "source_index": layout.source_index}
    with poisoned_allocations():
        scores = probe_scores(probes, weights, keys.pop("k_c"), prepared.key_usable, layout, 0.3, **keys)
    expected = probe_scores_reference(
        probes.double(), weights, canonical_keys.double(), prepared.key_usable, layout, 0.3
    )
    assert torch.isfinite(scores).all()
    # Probes are cast to the keys' dtype in the kernel: float16 probes are exact, so one tolerance fits both.
    assert relative_error(scores, expected) < 2e-5


# --------------------------------------------------------------------------------------------------------------------
# The pooled estimator's outlier keys
# --------------------------------------------------------------------------------------------------------------------


def _loop_tile_outliers(k: torch.Tensor, valid: torch.Tensor, num_tiles: int, tile: int):
    """The definition with loops: per tile, the valid key farthest from the mean of the valid keys (first on ties),
    the mean of the others."""
    b, h, _, d = k.shape
    rest = torch.zeros(b, h, num_tiles, d, dtype=F64)
    rest_count = torch.zeros(b, h, num_tiles, dtype=F64)
    outlier = torch.zeros(b, h, num_tiles, d, dtype=F64)
    has = torch.zeros(b, h, num_tiles, dtype=F64)
    for bi in range(b):
        for hi in range(h):
            for t in range(num_tiles):
                rows = [r for r in range(t * tile, (t + 1) * tile) if valid[bi, hi, r]]
                if not rows:
                    continue
                keys = k[bi, hi, rows].double()
                distance = (keys - keys.mean(0)).pow(2).sum(-1)
                far = int(distance.argmax())
                has[bi, hi, t] = 1
                outlier[bi, hi, t] = keys[far]
                others = torch.cat([keys[:far], keys[far + 1 :]])
                rest_count[bi, hi, t] = len(others)
                if len(others):
                    rest[bi, hi, t] = others.mean(0)
    return rest, rest_count, outlier, has


@settings(max_examples=15)
@given(
    seed=seeds(),
    grid=kernel_grids(),
    tile=st.sampled_from([16, 32]),
    head_dim=head_dims(),
    mask_kind=st.sampled_from(["none", "per_head", "empty"]),
    masked_share=st.sampled_from([0.0, 0.5, 0.95]),
    dtype=st.sampled_from([torch.float16, torch.float32]),
)
def test_tile_outliers_reference_matches_the_definition(seed, grid, tile, head_dim, mask_kind, masked_share, dtype):
    generator = torch.Generator().manual_seed(seed)
    layout = token_layout(grid, 5, False, 32)
    query, key, value = make_inputs(generator, batch=1, heads=2, head_dim=head_dim, layout=layout, dtype=dtype)
    mask = make_key_valid(generator, batch=1, heads=2, layout=layout, kind=mask_kind, masked_share=masked_share)
    prepared = reference_prepared(query, key, value, mask, layout, tile, 0.25)
    num_tiles = layout.num_video_blocks * layout.block_size // tile
    expected = tile_outliers_reference(prepared.k, prepared.key_usable, num_tiles, tile)
    by_loops = _loop_tile_outliers(prepared.k, prepared.key_usable, num_tiles, tile)
    # A tile whose two farthest keys are as far as rounding can tell (two keys are always equally far from their
    # mean) may take either; elsewhere the two agree.
    tied = _farthest_candidates(prepared.k, prepared.key_usable, num_tiles, tile).sum(-1) > 1
    for name, b, c in zip(("rest_mean", "rest_count", "outlier", "outlier_count"), expected, by_loops):
        torch.testing.assert_close(b[~tied], c[~tied], rtol=1e-12, atol=1e-12, msg=name)


def _farthest_candidates(k: torch.Tensor, valid: torch.Tensor, num_tiles: int, tile: int) -> torch.Tensor:
    """bool `(B, H, NT, tile)`: the valid keys whose distance from their tile's mean is within float32 rounding
    (1e-5 relative) of the largest."""
    keys = k[..., : num_tiles * tile, :].reshape(*k.shape[:2], num_tiles, tile, -1).double()
    ok = valid[..., : num_tiles * tile].reshape(*k.shape[:2], num_tiles, tile)
    mean = keys.masked_fill(~ok[..., None], 0).sum(-2) / ok.sum(-1, keepdim=True).clamp(min=1)
    distance = (keys - mean[..., None, :]).pow(2).sum(-1).masked_fill(~ok, -1.0)
    farthest = distance.max(-1, keepdim=True).values
    return ok & (distance >= farthest * (1 - 1e-5))


@settings(max_examples=10)
@given(
    seed=st.integers(0, 2**31 - 1),
    grid=kernel_grids(),
    tile=st.sampled_from([16, 32]),
    head_dim=head_dims(),
    mask_kind=st.sampled_from(["none", "per_head", "empty"]),
    masked_share=st.sampled_from([0.0, 0.5, 0.95]),
    dtype=st.sampled_from([torch.float16, torch.float32]),
)
def test_prepared_outliers_match_the_definition(seed, grid, tile, head_dim, mask_kind, masked_share, dtype):
    """The outliers `prepare_statistics` finds in its pass over the caller's keys are the definition's (the loops of
    `_loop_tile_outliers` on the canonical keys), near-tied tiles up to which of their farthest keys is taken."""
    generator = torch.Generator().manual_seed(seed)
    layout = token_layout(grid, 5, False, 32)
    query, key, value = make_inputs(
        generator, batch=1, heads=2, head_dim=head_dim, layout=layout, dtype=dtype, memory="transposed"
    )
    mask = make_key_valid(generator, batch=1, heads=2, layout=layout, kind=mask_kind, masked_share=masked_share)
    valid = key_padding_valid(mask, 1, 2, layout.seq_len)
    with poisoned_allocations():
        found = prepare_statistics(
            query, key, value, layout, tile_size=tile, key_valid=valid, outliers=True, tile_dtype=torch.float32
        ).outliers
    assert found is not None
    canonical = reference_prepared(query, key, value, mask, layout, tile, 0.25)
    num_tiles = layout.num_video_blocks * layout.block_size // tile
    by_loops = _loop_tile_outliers(canonical.k, canonical.key_usable, num_tiles, tile)
    candidates = _farthest_candidates(canonical.k, canonical.key_usable, num_tiles, tile)
    tied = candidates.sum(-1) > 1
    got = (found.rest_mean, found.rest_count, found.outlier, found.outlier_count)
    for name, a, c in zip(("rest_mean", "rest_count", "outlier", "outlier_count"), got, by_loops):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        if name.endswith("count"):
            assert torch.equal(a.double(), c), name
        elif name == "outlier":
            assert torch.equal(a[~tied].double(), c[~tied]), name  # a selection: exact
        else:
            torch.testing.assert_close(a[~tied].double(), c[~tied], rtol=1e-5, atol=1e-5, msg=name)
    keys = canonical.k[..., : num_tiles * tile, :].reshape(*found.outlier.shape[:3], tile, -1)
    is_chosen = (keys == found.outlier.double()[..., None, :]).all(-1) & candidates
    assert is_chosen[tied].any(-1).all(), "a near-tied tile's outlier is not one of its farthest keys"


def test_pooled_kernel_inputs_are_checked():
    """The pooled kernel reads the caller's keys through the layout (no canonical copies), and the outliers come from
    the preparation's pass over the keys."""
    from spattn_compile.kernels.pooled_scores import pooled_scores

    generator = torch.Generator().manual_seed(0)
    layout = token_layout((2, 4, 8), 3, False, 16)
    query, key, value = make_inputs(generator, batch=1, heads=1, head_dim=16, layout=layout, dtype=torch.float32)
    inputs = prepare_statistics(query, key, value, layout, tile_size=16).estimator_inputs(query, key, 0.25)
    assert inputs.in_source_order
    with pytest.raises(ValueError, match="outliers=True needs inputs.outliers"):
        pooled_scores(inputs, outliers=True)
    canonical = reference_prepared(query, key, value, None, layout, 16, 0.25).estimator_inputs()
    with pytest.raises(ValueError, match="pooled_scores reads the caller's keys through inputs.source_index"):
        pooled_scores(canonical, outliers=False)


def test_estimator_inputs_in_source_order_gather_for_the_references():
    """`canonical_q()` / `canonical_k()` of inputs in source order are the reference's canonical copies; a bundle
    whose tensors do not fit the layout is refused."""
    generator = torch.Generator().manual_seed(2)
    layout = token_layout((2, 3, 5), 7, True, 16)
    query, key, value = make_inputs(generator, batch=1, heads=2, head_dim=16, layout=layout, dtype=torch.float32)
    inputs = prepare_statistics(query, key, value, layout, tile_size=16).estimator_inputs(query, key, 0.25)
    assert torch.equal(inputs.canonical_q(), reference.gather_canonical(query, layout))
    assert torch.equal(inputs.canonical_k(), reference.gather_canonical(key, layout))
    q_c, k_c = inputs.canonical_q(), inputs.canonical_k()
    copies = base.EstimatorInputs(q_c, k_c, inputs.key_valid, inputs.stats, layout, 1.0)
    assert not copies.in_source_order and copies.canonical_k() is copies.k
    with pytest.raises(ValueError, match="with source_index, q and k must be the caller's"):
        base.EstimatorInputs(copies.q, copies.k, inputs.key_valid, inputs.stats, layout, 1.0,
                             source_index=inputs.source_index)  # fmt: skip


def test_outlier_is_the_planted_far_key():
    """Hand-checked: a tile of keys close to a mean and one planted far key (not the longest: the farthest from the
    mean); the rest mean excludes it, masked keys are never chosen."""
    generator = torch.Generator().manual_seed(0)
    k = 0.1 * torch.randn(1, 1, 32, 8, generator=generator, dtype=F64) + 5.0
    k[0, 0, 21] = 5.0 - 2.0  # far from the mean (~5), though shorter than the others
    k[0, 0, 3] = 100.0  # the farthest of all, but masked
    valid = torch.ones(1, 1, 32, dtype=torch.bool)
    valid[0, 0, 3] = False
    rest, rest_count, outlier, has = tile_outliers_reference(k, valid, 1, 32)
    kept = [r for r in range(32) if r not in (3, 21)]
    assert torch.equal(outlier[0, 0, 0], k[0, 0, 21])
    assert has.tolist() == [[[1.0]]] and rest_count.tolist() == [[[30.0]]]
    torch.testing.assert_close(rest[0, 0, 0], k[0, 0, kept].mean(0), rtol=1e-14, atol=0)


def test_pooled_kernel_refuses_bfloat16_under_the_interpreter():
    from spattn_compile.kernels.common import INTERPRETED
    from spattn_compile.kernels.pooled_scores import pooled_scores

    if not INTERPRETED:
        pytest.skip("the interpreter's limit")
    generator = torch.Generator().manual_seed(0)
    layout = token_layout((2, 4, 8), 0, False, 16)
    query, key, value = make_inputs(generator, batch=1, heads=1, head_dim=16, layout=layout, dtype=torch.bfloat16)
    inputs = triton_prepared(query, key, value, None, layout, 16, 0.25, outliers=True).estimator_inputs()
    with pytest.raises(TypeError, match="the Triton interpreter cannot multiply bfloat16"):
        pooled_scores(inputs, outliers=True)


def test_pooled_with_outliers_sees_a_sink_that_the_tile_mean_hides():
    """Reference scores of a call with one sink key: with outliers the sink's block gets about its true mass, the
    plain tile mean dilutes it (the reason the option exists)."""
    grid = (3, 8, 16)
    inputs = dit_attention_inputs(grid, heads=1, head_dim=32, head_kinds=("global",), num_sinks=1, dtype=F64, seed=1)
    layout = token_layout(grid, 0, False, 16)
    sink_block = _sink_block(inputs, layout)[0, 0]
    truth = reference.attention_block_mass(inputs.query, inputs.key, layout)[..., sink_block]
    prepared = reference_prepared(inputs.query, inputs.key, inputs.value, None, layout, 16, 32**-0.5)
    with_outliers = pooled_scores_reference(prepared.estimator_inputs(), PooledTiles(16, outliers=True))
    plain = pooled_scores_reference(prepared.estimator_inputs(), PooledTiles(16, outliers=False))
    error_with = (with_outliers[..., sink_block] - truth).abs().mean()
    error_plain = (plain[..., sink_block] - truth).abs().mean()
    assert error_with < 0.5 * error_plain


# --------------------------------------------------------------------------------------------------------------------
# A sink key's block is kept
# --------------------------------------------------------------------------------------------------------------------


def _sink_block(inputs, layout) -> torch.Tensor:
    """int64 `(B, H)`: the canonical block of each head's sink key (the longest video key: the generator makes sink
    keys much longer than the others)."""
    video = slice(inputs.text_len, None) if inputs.text_first else slice(0, inputs.num_video)
    longest = inputs.key[..., video, :].norm(dim=-1).argmax(-1) + video.start
    position = torch.empty_like(layout.source_index)
    real = layout.source_index >= 0
    position[layout.source_index[real]] = torch.nonzero(real).squeeze(-1)
    return position[longest] // layout.block_size


def _sink_margin(inputs, layout, density: float) -> float:
    """The smallest, over heads and video query blocks (other than the sink's own), of the true mass on the sink's
    block divided by the mass of the last other off-diagonal block an exact top-k at `density` would keep."""
    nb = layout.num_video_blocks
    mass = reference.attention_block_mass(inputs.query, inputs.key, layout, inputs.attn_mask)[..., :nb].double()
    sinks = _sink_block(inputs, layout)
    budget = block_budget(density, nb)
    margin = math.inf
    for b in range(mass.shape[0]):
        for h in range(mass.shape[1]):
            sink = int(sinks[b, h])
            others = mass[b, h].clone()
            others.fill_diagonal_(-1.0)
            others[:, sink] = -1.0
            kth = others.topk(budget - 1, dim=-1).values[:, -1]
            ratio = mass[b, h, :, sink] / kth
            ratio[sink] = math.inf
            margin = min(margin, float(ratio.min()))
    return margin


# Inputs on which the sink's block clearly belongs in every query block's budget at sparsity 0.9: global heads (the
# sinks take ~30% of the attention on average), 36-60 blocks (a budget of 4-6), and a margin of >= 2x over the last
# block an exact top-k would keep. On smaller grids the sink's block and a query's neighbour blocks are near-ties for
# some query blocks (the oracle itself then drops the sink's block), which is no property of an estimator.
_SINK_CASES = {
    "3x12x16-seed2": dict(video_grid=(3, 12, 16), heads=1, seed=2),
    "5x12x16-seed5": dict(video_grid=(5, 12, 16), heads=1, seed=5),
    "4x16x16-seed1": dict(video_grid=(4, 16, 16), heads=2, seed=1),
}


def _sink_inputs(name: str):
    case = _SINK_CASES[name]
    return dit_attention_inputs(
        case["video_grid"],
        heads=case["heads"],
        head_dim=32,
        head_kinds=("global",),
        num_sinks=1,
        text_len=16,
        text_padding=5,
        seed=case["seed"],
    )


def _kept_sink_blocks(plan, inputs, layout) -> torch.Tensor:
    """bool `(B, H, NB)`: video query block i keeps the block of its head's sink key."""
    nb = layout.num_video_blocks
    sinks = _sink_block(inputs, layout)[..., None, None].expand(-1, -1, nb, 1)
    return plan.to_dense()[..., :nb, :].gather(-1, sinks)[..., 0]


@pytest.mark.parametrize("estimator", DEFAULT_ESTIMATORS, ids=lambda e: e.name)
@pytest.mark.parametrize("case", list(_SINK_CASES))
def test_sink_block_is_kept_by_every_query_block_reference(case, estimator):
    inputs = _sink_inputs(case)
    layout = token_layout(inputs.video_grid, 16, False, 16)
    assert _sink_margin(inputs, layout, 0.1) > 2.0, "precondition: the sink's block clearly belongs in every budget"
    config = SparseAttentionConfig(block_size=16, estimator=estimator, sparsity=0.9, min_seq_len=0)
    plan = select_plan(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config, impl="reference")
    kept = _kept_sink_blocks(plan, inputs, layout)
    assert kept.all(), f"query blocks dropping the sink's block: {(~kept).nonzero()[:, 2].tolist()}"


@pytest.mark.parametrize("case", list(_SINK_CASES))
def test_tile_means_alone_drop_the_sink_block(case):
    """The property above is no property of any top-k: the plain pooled estimator (tile means only, the sink averaged
    into its tile) drops the sink's block for most query blocks of the same inputs."""
    inputs = _sink_inputs(case)
    layout = token_layout(inputs.video_grid, 16, False, 16)
    config = SparseAttentionConfig(
        block_size=16, estimator=PooledTiles(16, outliers=False), sparsity=0.9, min_seq_len=0
    )
    plan = select_plan(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config, impl="reference")
    assert _kept_sink_blocks(plan, inputs, layout).float().mean() < 0.7


@pytest.mark.parametrize("estimator", DEFAULT_ESTIMATORS, ids=lambda e: e.name)
def test_sink_block_is_kept_by_every_query_block_triton(estimator):
    inputs = _sink_inputs("3x12x16-seed2")
    layout = token_layout(inputs.video_grid, 16, False, 16)
    config = SparseAttentionConfig(block_size=16, estimator=estimator, sparsity=0.9, rectify="none", min_seq_len=0)
    plan = select_plan(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config, impl="triton")
    kept = _kept_sink_blocks(plan, inputs, layout)
    assert kept.all(), f"query blocks dropping the sink's block: {(~kept).nonzero()[:, 2].tolist()}"


# --------------------------------------------------------------------------------------------------------------------
# Settings and the registry
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: SampledRows(rows=0), ValueError, r"SampledRows\.rows=0 is invalid"),
        (lambda: SampledRows(rows=2.0), TypeError, r"SampledRows\.rows=2\.0 has type float"),
        (lambda: SampledRows(rows=True), TypeError, r"SampledRows\.rows=True"),
        (lambda: QueryTiles(tile_size=8), ValueError, r"QueryTiles\.tile_size=8 is invalid"),
        (lambda: QueryTiles(tile_size=24), ValueError, r"QueryTiles\.tile_size=24"),
        (lambda: QueryTiles(tile_size="16"), TypeError, r"QueryTiles\.tile_size='16'"),
        (lambda: PooledTiles(tile_size=8), ValueError, r"PooledTiles\.tile_size=8 is invalid"),
        (lambda: PooledTiles(tile_size=48), ValueError, r"PooledTiles\.tile_size=48"),
        (lambda: PooledTiles(tile_size=16.0), TypeError, r"PooledTiles\.tile_size=16\.0"),
        (lambda: PooledTiles(outliers=1), TypeError, r"PooledTiles\.outliers=1"),
    ],
)
def test_bad_estimator_settings_name_the_field(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize(
    ("estimator", "block_size", "message"),
    [
        (SampledRows(rows=32), 16, r"SampledRows\(rows=32\) is invalid with block_size=16"),
        (QueryTiles(tile_size=64), 32, r"QueryTiles\(tile_size=64\) is invalid with block_size=32"),
        (PooledTiles(tile_size=64), 32, r"PooledTiles\(tile_size=64\) is invalid with block_size=32"),
    ],
)
def test_estimator_must_fit_the_block_size(estimator, block_size, message):
    with pytest.raises(ValueError, match=message):
        SparseAttentionConfig(block_size=block_size, estimator=estimator)


def test_parse_estimator_names_and_instances():
    assert parse_estimator("pooled") == PooledTiles()
    assert parse_estimator("sampled_rows") == SampledRows()
    assert parse_estimator("query_tiles") == QueryTiles()
    given_settings = SampledRows(rows=5)
    assert parse_estimator(given_settings) is given_settings
    assert SparseAttentionConfig(estimator="query_tiles").estimator == QueryTiles()
    with pytest.raises(ValueError, match=r"estimator='oracle' is invalid: expected one of \['pooled', 'query_tiles'"):
        parse_estimator("oracle")
    with pytest.raises(TypeError, match=r"estimator=3 has type int"):
        parse_estimator(3)
    with pytest.raises(TypeError, match=r"estimator=None has type NoneType"):
        SparseAttentionConfig(estimator=None)


def test_registry_errors_name_the_value():
    @dataclasses.dataclass(frozen=True)
    class Unregistered(EstimatorConfig):
        name = "unregistered"

    with pytest.raises(TypeError, match="no estimator is registered for settings of type Unregistered"):
        estimator_for(Unregistered())
    with pytest.raises(TypeError, match="Unregistered"):
        SparseAttentionConfig(estimator=Unregistered())
    with pytest.raises(TypeError, match="config_type must be a subclass of EstimatorConfig, got <class 'int'>"):
        register_estimator(int, reference=None, kernel=None)

    @dataclasses.dataclass(frozen=True)
    class Impostor(EstimatorConfig):
        name = "pooled"

    with pytest.raises(ValueError, match=r"estimator name 'pooled' of Impostor is empty or taken"):
        register_estimator(Impostor, reference=None, kernel=None)

    @dataclasses.dataclass(frozen=True)
    class Nameless(EstimatorConfig):
        pass

    with pytest.raises(ValueError, match=r"estimator name '' of Nameless is empty or taken"):
        register_estimator(Nameless, reference=None, kernel=None)
    assert set(registered_estimators()) == {"pooled", "sampled_rows", "query_tiles"}


def test_a_registered_estimator_drives_selection(monkeypatch):
    """The extension point: one settings class and one reference function, registered, select the plan (here the true
    block mass, so the plan is the oracle's)."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_BY_NAME", dict(base._BY_NAME))

    @dataclasses.dataclass(frozen=True)
    class TrueMass(EstimatorConfig):
        name = "true_mass"
        measures_mass = True

    def true_mass(inputs, config):
        # Every real video query row is a probe of weight 1.
        video_rows = inputs.layout.text_offset
        weights = (inputs.layout.source_index[:video_rows] >= 0).float()
        return probe_scores_reference(
            inputs.q[..., :video_rows, :], weights, inputs.k, inputs.key_valid, inputs.layout, inputs.scale
        )

    register_estimator(TrueMass, reference=true_mass, kernel=true_mass)
    assert registered_estimators()["true_mass"] is TrueMass
    inputs = dit_attention_inputs((3, 5, 7), heads=2, head_dim=16, text_len=7, dtype=F64, seed=2)
    config = SparseAttentionConfig(block_size=16, estimator="true_mass", sparsity=0.7, min_seq_len=0)
    plan = select_plan(inputs.query, inputs.key, **inputs.kwargs(), config=config, impl="reference")
    assert plan.estimator == "true_mass"
    layout = token_layout((3, 5, 7), 7, False, 16)
    truth = reference.attention_block_mass(inputs.query, inputs.key, layout)
    assert relative_error(plan.block_scores, truth) < 1e-12


def test_estimator_flags_and_costs():
    assert SampledRows.measures_mass and not PooledTiles.measures_mass and not QueryTiles.measures_mass
    assert SampledRows(rows=8).query_probes_per_block(128) == 8
    assert QueryTiles(tile_size=16).query_probes_per_block(128) == 8
    assert PooledTiles().query_probes_per_block(128) == 0
    assert PooledTiles(tile_size=32).pool_tile_size(128) == 32
    assert SampledRows().pool_tile_size(64) == 64
    # Settings are frozen and hashable (they are part of the config, a cache key).
    assert len({SampledRows(8), SampledRows(8), QueryTiles(16)}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        SampledRows().rows = 3  # type: ignore[misc]
