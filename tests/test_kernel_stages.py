"""The stage kernels other than the estimators and the attention: the statistics without copies
(`kernels.statistics`), GAPR's gate and the selection by threshold search (`kernels.select`, through the selection
policy's `select_top_k`, with uniform and per-head budgets), against the float64 reference
(`reference.canonical_key_valid`, `key_usable`, `block_non_finite`, `pool_statistics`, `gapr_trusted`,
`select_plan_reference`).

CPU tests run the kernels under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small grids with
prime sides, float16/float32 inputs, head dims that are powers of two and not. Every buffer the launchers allocate is
poisoned (`kernel_helpers.poisoned_allocations`), so an element a kernel fails to write cannot match the reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import (
    make_inputs,
    make_key_valid,
    poisoned_allocations,
    reference_plan,
    reference_prepared,
    selection_of,
    sprinkle_non_finite,
    trust_of,
)

from spattn_compile import reference
from spattn_compile.config import SparseAttentionConfig
from spattn_compile.inputs import key_padding_valid
from spattn_compile.kernels.select import gapr_gate, select_plan
from spattn_compile.kernels.statistics import prepare_statistics
from spattn_compile.layout import token_layout
from spattn_compile.plan import PooledStats
from spattn_compile.policies.base import SelectionInputs
from spattn_compile.policies.rectification import gapr_trusted
from spattn_compile.policies.topk import check_budget, select_top_k
from spattn_compile.testing import relative_error
from spattn_compile.testing.strategies import head_dims, kernel_grids, rectify_modes, seeds

STAT_FIELDS = (
    "q_tile",
    "q_tile_count",
    "k_tile",
    "k_tile_count",
    "q_block",
    "q_block_mad",
    "k_block",
    "k_block_mad",
    "v_block",
    "k_block_count",
)


# The kernels test finiteness as `x - x != 0`; on an infinity the interpreter's numpy says so in a RuntimeWarning.
infinities_in_the_interpreter = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def float32_stats(stats: PooledStats) -> PooledStats:
    return PooledStats(tile_size=stats.tile_size, **{name: getattr(stats, name).float() for name in STAT_FIELDS})


# --------------------------------------------------------------------------------------------------------------------
# Statistics, hand-checked
# --------------------------------------------------------------------------------------------------------------------


def test_statistics_of_partial_and_empty_groups_use_true_counts():
    """Hand-checked: a 1x3x5 grid in blocks of 16 has one partial block of 15 rows, and a masked key is excluded."""
    layout = token_layout((1, 3, 5), 0, False, 16)
    generator = torch.Generator().manual_seed(0)
    query, key, value = make_inputs(generator, batch=1, heads=1, head_dim=16, layout=layout, dtype=torch.float32)
    valid = torch.ones(1, 1, 15, dtype=torch.bool)
    valid[..., 4] = False
    out = prepare_statistics(query, key, value, layout, tile_size=16, key_valid=valid)
    kept = torch.arange(15) != 4
    torch.testing.assert_close(out.stats.q_block[0, 0, 0], query[0, 0].mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.stats.k_block[0, 0, 0], key[0, 0, kept].mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.stats.v_block[0, 0, 0], value[0, 0, kept].mean(0), rtol=1e-6, atol=1e-6)
    mad = (key[0, 0, kept] - key[0, 0, kept].mean(0)).abs().mean(0)
    torch.testing.assert_close(out.stats.k_block_mad[0, 0, 0], mad, rtol=1e-5, atol=1e-6)
    assert out.stats.q_tile_count.tolist() == [[[15.0]]]
    assert out.stats.k_block_count.tolist() == [[[14.0]]]
    assert not out.block_non_finite.any()


@infinities_in_the_interpreter
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_non_finite_rows_are_left_out_and_flag_their_block(impl):
    """Hand-checked on one block of 32 rows (two tiles of 16): a NaN query row, an infinite key row, a NaN value row
    and a masked NaN key. Statistics are the means of the other rows; only the two valid non-finite keys make their
    block non-finite; a masked key never does."""
    layout = token_layout((1, 4, 8), 0, False, 32)
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 32, 24, generator=generator) + 0.5 for _ in range(3))
    q[0, 0, 3, 5] = math.nan
    k[0, 0, 20, 0] = math.inf
    v[0, 0, 7, 23] = math.nan
    k[0, 0, 30, 1] = math.nan
    valid = torch.ones(1, 1, 32, dtype=torch.bool)
    valid[0, 0, 30] = False
    position = torch.empty(32, dtype=torch.int64)
    position[layout.source_index] = torch.arange(32)  # original row -> canonical row
    if impl == "triton":
        out = prepare_statistics(q, k, v, layout, tile_size=16, key_valid=valid)
        stats, usable, non_finite = out.stats, out.key_usable, out.block_non_finite
    else:
        prepared = reference_prepared(q, k, v, valid[:, :, None, :], layout, 16, 1.0)
        stats, usable, non_finite = prepared.stats, prepared.key_usable, prepared.block_non_finite
    assert non_finite.tolist() == [[[True]]]
    expected_usable = torch.ones(32, dtype=torch.bool)
    expected_usable[position[[20, 7, 30]]] = False
    assert torch.equal(usable[0, 0], expected_usable)
    query_rows = torch.arange(32) != 3
    key_rows = ~torch.isin(torch.arange(32), torch.tensor([20, 7, 30]))
    expected_means = ((stats.q_block, query_rows, q), (stats.k_block, key_rows, k), (stats.v_block, key_rows, v))
    for got, rows, source in expected_means:
        torch.testing.assert_close(got[0, 0, 0].double(), source[0, 0, rows].double().mean(0), rtol=1e-6, atol=1e-6)
    assert stats.k_block_count.tolist() == [[[29.0]]]
    # Tile counts: the canonical rows of each tile that are usable.
    tile_of = position // 16
    assert stats.q_tile_count[0, 0].tolist() == [float((tile_of[query_rows] == t).sum()) for t in (0, 1)]
    assert stats.k_tile_count[0, 0].tolist() == [float((tile_of[key_rows] == t).sum()) for t in (0, 1)]
    for name in STAT_FIELDS:
        assert torch.isfinite(getattr(stats, name)).all(), name


# --------------------------------------------------------------------------------------------------------------------
# GAPR's gate
# --------------------------------------------------------------------------------------------------------------------


@settings(max_examples=15)
@given(
    seed=seeds(),
    heads=st.integers(1, 3),
    grid=kernel_grids(),
    head_dim=head_dims(),
    mask_kind=st.sampled_from(["none", "empty"]),
    bias=st.floats(0.0, 1.5),
)
def test_gapr_gate_matches_reference(seed, heads, grid, head_dim, mask_kind, bias):
    layout = token_layout(grid, 0, False, 16)
    generator = torch.Generator().manual_seed(seed)
    q_c = torch.randn(1, heads, layout.padded_len, head_dim, generator=generator, dtype=torch.float64) + bias
    k_c = torch.randn(1, heads, layout.padded_len, head_dim, generator=generator, dtype=torch.float64) + bias
    mask = make_key_valid(generator, batch=1, heads=heads, layout=layout, kind=mask_kind, masked_share=0.2)
    valid = key_padding_valid(mask, 1, heads, layout.seq_len)
    valid_c = reference.canonical_key_valid(valid, layout, 1, heads, q_c.device)
    stats = reference.pool_statistics(q_c, k_c, k_c, valid_c, layout, 16)
    key_block_count = valid_c.reshape(1, heads, layout.num_blocks, 16).sum(-1).float()
    with poisoned_allocations():
        gate = gapr_gate(float32_stats(stats), key_block_count, layout)
    expected = gapr_trusted(stats)

    assert gate.dtype == torch.int8 and set(gate.unique().tolist()) <= {0, 1}
    # Pairs whose gain and error agree to float32 rounding may fall either way.
    gain = (stats.q_block @ stats.k_block.transpose(-1, -2)).abs()
    error = (stats.q_block_mad @ stats.k_block.transpose(-1, -2)).abs() + (
        stats.q_block @ stats.k_block_mad.transpose(-1, -2)
    ).abs()
    clear = (gain - error).abs() > 1e-4 * (gain + error + 1e-6)
    clear |= (stats.k_block_count == 0)[..., None, :]  # decided by the count, not by the products
    assert torch.equal(gate.bool()[clear], expected[clear])
    assert clear.float().mean() > 0.9


# --------------------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------------------


def _selection_case(seed: int, *, heads: int, grid, text_len: int, text_first: bool, empty_share: float, forced: float):
    """Random float64 statistics (for GAPR), a canonical key validity with some blocks entirely masked, and random
    forced blocks (as `block_non_finite` gives them: blocks with a valid key)."""
    layout = token_layout(grid, text_len, text_first, 16)
    generator = torch.Generator().manual_seed(seed)
    batch = 2
    q_c, k_c, v_c = (
        torch.randn(batch, heads, layout.padded_len, 16, generator=generator, dtype=torch.float64) + 0.4
        for _ in range(3)
    )
    valid = torch.rand(batch, heads, layout.seq_len, generator=generator) >= 0.1
    valid_c = reference.canonical_key_valid(valid, layout, batch, heads, q_c.device)
    empty = torch.rand(batch, heads, layout.num_blocks, generator=generator) < empty_share
    valid_c = valid_c & ~empty.repeat_interleave(16, -1)
    stats = reference.pool_statistics(q_c, k_c, v_c, valid_c, layout, 16)
    key_block_count = valid_c.reshape(batch, heads, layout.num_blocks, 16).sum(-1).float()
    forced_blocks = (torch.rand(batch, heads, layout.num_blocks, generator=generator) < forced) & (key_block_count > 0)
    return layout, generator, valid_c, stats, key_block_count, forced_blocks


def _check_gated_plan(plan, expected, stats) -> None:
    """Kept blocks exactly; trusted blocks exactly except where GAPR's test is a near-tie (the kernel's gate multiplies
    float32 statistics, the reference's float64 ones)."""
    for name in ("kv_counts", "kv_indices"):
        assert torch.equal(getattr(plan, name), getattr(expected, name)), name
    assert plan.layout is expected.layout and plan.estimator == expected.estimator
    nb = expected.num_video_blocks
    differs = (plan.trusted_mask() != expected.trusted_mask())[..., :nb, :]
    if differs.any():
        gain = (stats.q_block @ stats.k_block.transpose(-1, -2)).abs()
        error = (stats.q_block_mad @ stats.k_block.transpose(-1, -2)).abs() + (
            stats.q_block @ stats.k_block_mad.transpose(-1, -2)
        ).abs()
        near_tie = (gain - error).abs() <= 1e-4 * (gain + error + 1e-6)
        assert not (differs & ~near_tie).any()


def _plans(scores, stats, valid_c, key_block_count, forced_blocks, layout, config, budget=None):
    """The selection policy's kernel plan (float32 scores and statistics) and its reference plan (float64), through
    `policies.topk.select_top_k`, the entry point a per-head budget policy calls."""
    selection, trust = selection_of(config), trust_of(config)

    def inputs(scores, stats):
        return SelectionInputs(scores, stats, valid_c, key_block_count, forced_blocks, layout, "test")

    with poisoned_allocations():
        plan = select_top_k(inputs(scores.float(), float32_stats(stats)), selection, trust, kind="kernel",
                            budget=budget)  # fmt: skip
    expected = select_top_k(inputs(scores.double(), stats), selection, trust, kind="reference", budget=budget)
    return plan, expected


selection_settings = dict(
    seed=seeds(),
    heads=st.integers(1, 2),
    grid=kernel_grids(),
    text_len=st.sampled_from([0, 7, 37]),
    text_first=st.booleans(),
    empty_share=st.sampled_from([0.0, 0.2]),
    forced=st.sampled_from([0.0, 0.0, 0.15, 0.5]),
    sparsity=st.floats(0.0, 0.95),
    neighbors=st.booleans(),
    gapr=st.booleans(),
    rectify=rectify_modes(),
)


def _dyadic_scores(generator, batch: int, heads: int, nb: int) -> torch.Tensor:
    """Scores with many ties whose every sum is exact in float32 and float64."""
    weights = torch.randint(0, 6, (batch, heads, nb, nb + 1), generator=generator).double()
    weights[..., nb] *= 3
    return weights * 2.0 ** -math.ceil(math.log2(weights.sum(-1).max().item() + 1))


@settings(max_examples=20)
@given(
    **selection_settings,
    mass_threshold=st.sampled_from([None, 0.25, 0.5, 0.75, 0.875, 1.0]),
    max_density=st.sampled_from([0.25, 0.5, 1.0]),
)
def test_selection_matches_reference_exactly_with_ties(
    seed, heads, grid, text_len, text_first, empty_share, forced, sparsity, neighbors, gapr, rectify, mass_threshold,
    max_density,
):  # fmt: skip
    """Dyadic scores with many ties: the threshold search equals the reference, ties in index order, forced and empty
    blocks, neighbours, text, GAPR's gate and the mass threshold included."""
    layout, generator, valid_c, stats, key_block_count, forced_blocks = _selection_case(
        seed, heads=heads, grid=grid, text_len=text_len, text_first=text_first, empty_share=empty_share, forced=forced
    )
    scores = _dyadic_scores(generator, 2, heads, layout.num_video_blocks)
    config = SparseAttentionConfig(
        block_size=16, sparsity=sparsity, mass_threshold=mass_threshold, max_density=max_density, neighbors=neighbors,
        gapr=gapr, rectify=rectify,
    )  # fmt: skip
    _check_gated_plan(*_plans(scores, stats, valid_c, key_block_count, forced_blocks, layout, config), stats)


@settings(max_examples=10)
@given(**selection_settings, gain=st.floats(0.5, 4.0))
def test_selection_matches_reference_on_softmax_scores(
    seed, heads, grid, text_len, text_first, empty_share, forced, sparsity, neighbors, gapr, rectify, gain
):  # fmt: skip
    """Softmax rows of random logits (float32 values, no planted ties): the reference's plan, bit for bit. (With a
    mass threshold, float32 sums against float64 ones could split a row whose mass ties it: the dyadic test covers
    the threshold.)"""
    layout, generator, valid_c, stats, key_block_count, forced_blocks = _selection_case(
        seed, heads=heads, grid=grid, text_len=text_len, text_first=text_first, empty_share=empty_share, forced=forced
    )
    nb = layout.num_video_blocks
    scores = torch.softmax(gain * torch.randn(2, heads, nb, nb + 1, generator=generator, dtype=torch.float64), -1)
    config = SparseAttentionConfig(block_size=16, sparsity=sparsity, neighbors=neighbors, gapr=gapr, rectify=rectify)
    plans = _plans(scores.float().double(), stats, valid_c, key_block_count, forced_blocks, layout, config)
    _check_gated_plan(*plans, stats)


@settings(max_examples=10)
@given(
    seed=seeds(),
    heads=st.integers(1, 3),
    grid=kernel_grids(),
    text_len=st.sampled_from([0, 7]),
    mass_threshold=st.sampled_from([None, 0.5]),
    neighbors=st.booleans(),
)
def test_per_head_budgets_select_each_head_at_its_budget(seed, heads, grid, text_len, mass_threshold, neighbors):
    """An int32 (B, H) budget handed to the selection policy: kernel and reference agree, and every head's plan is
    the reference's at the uniform budget of that head."""
    layout, generator, valid_c, stats, key_block_count, forced_blocks = _selection_case(
        seed, heads=heads, grid=grid, text_len=text_len, text_first=False, empty_share=0.2, forced=0.15
    )
    nb = layout.num_video_blocks
    scores = _dyadic_scores(generator, 2, heads, nb)
    budgets = torch.randint(1, nb + 1, (2, heads), generator=generator, dtype=torch.int32)
    config = SparseAttentionConfig(block_size=16, mass_threshold=mass_threshold, neighbors=neighbors, max_density=0.5)
    plan, expected = _plans(scores, stats, valid_c, key_block_count, forced_blocks, layout, config, budget=budgets)
    _check_gated_plan(plan, expected, stats)
    for b in range(2):
        for h in range(heads):
            one = (slice(b, b + 1), slice(h, h + 1))
            head_stats = PooledStats(tile_size=16, **{n: getattr(stats, n)[one] for n in STAT_FIELDS})
            uniform = reference_plan(
                scores[one], head_stats, valid_c[one], layout, density=int(budgets[b, h]) / nb, config=config,
                estimator="test", forced_blocks=forced_blocks[one],
            )  # fmt: skip
            for name in ("kv_counts", "kv_indices", "trusted_counts", "trusted_indices"):
                assert torch.equal(getattr(expected, name)[one], getattr(uniform, name)), (name, b, h)


# --------------------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------------------


def _valid_launch_args():
    layout = token_layout((1, 3, 5), 0, False, 16)
    x = torch.randn(1, 1, 15, 16)
    return layout, dict(
        query=x,
        key=x.clone(),
        value=x.clone(),
        source_index=layout.source_index,
        key_valid=None,
        num_video_blocks=1,
        block_size=16,
        tile_size=16,
    )


@pytest.mark.parametrize(
    ("change", "error", "names"),
    [
        (dict(query=torch.randn(1, 1, 15, 16).double()), TypeError, "query"),
        (dict(key=torch.randn(1, 1, 15, 16).half()), TypeError, "dtype"),
        (dict(value=torch.randn(1, 1, 15, 32)[..., ::2]), ValueError, "value"),
        (dict(key=torch.randn(1, 15, 16)), ValueError, "key"),
        (
            dict(query=torch.randn(1, 1, 15, 300), key=torch.randn(1, 1, 15, 300), value=torch.randn(1, 1, 15, 300)),
            ValueError,
            r"query: head dim 300 is not supported by the Triton kernels",
        ),
        (
            dict(query=torch.randn(1, 1, 15, 12), key=torch.randn(1, 1, 15, 12), value=torch.randn(1, 1, 15, 12)),
            ValueError,
            r"query: head dim 12 is not supported by the Triton kernels \(they take 16 <= D <= 256 with D % 8",
        ),
        (dict(tile_size=32), ValueError, "tile_size"),
        (dict(tile_size=8), ValueError, "tile_size"),
        (dict(key_valid=torch.ones(1, 1, 14, dtype=torch.bool)), ValueError, "key_valid"),
        (dict(key_valid=torch.ones(1, 1, 15)), ValueError, "key_valid"),
    ],
)
def test_prepare_statistics_rejects_bad_inputs(change, error, names):
    layout, args = _valid_launch_args()
    args.update(change)
    with pytest.raises(error, match=names):
        prepare_statistics(args["query"], args["key"], args["value"], layout, tile_size=args["tile_size"],
                           key_valid=args["key_valid"])  # fmt: skip


def test_select_and_gate_reject_bad_inputs():
    layout, args = _valid_launch_args()
    pooled = prepare_statistics(args["query"], args["key"], args["value"], layout, tile_size=16)
    scores = torch.full((1, 1, 1, 2), 0.5)
    count = pooled.key_block_count
    with pytest.raises(TypeError, match="scores must be float32"):
        select_plan(scores.double(), count, layout, budget=1, estimator="test")
    with pytest.raises(ValueError, match=r"scores must be a tensor of shape \(B, H, 1, 2\)"):
        select_plan(scores[..., :1], count, layout, budget=1, estimator="test")
    with pytest.raises(ValueError, match="key_block_count must be float32"):
        select_plan(scores, count[..., :0], layout, budget=1, estimator="test")
    with pytest.raises(ValueError, match=r"budget must be an int in \[1, 1\]"):
        select_plan(scores, count, layout, budget=2, estimator="test")
    with pytest.raises(ValueError, match=r"budget must be an int or an int32 tensor of shape \(1, 1\)"):
        select_plan(scores, count, layout, budget=torch.ones(1, 2, dtype=torch.int32), estimator="test")
    with pytest.raises(ValueError, match="gate must be an int8 tensor"):
        select_plan(scores, count, layout, budget=1, estimator="test", gate=scores)
    with pytest.raises(ValueError, match="mass_threshold must be None or in"):
        select_plan(scores, count, layout, budget=1, estimator="test", mass_threshold=1.5)
    with pytest.raises(ValueError, match="rows_per_program must be a power of two"):
        select_plan(scores, count, layout, budget=1, estimator="test", rows_per_program=3)
    with pytest.raises(ValueError, match=r"budget must be an int32 tensor of shape \(1, 1\)"):
        check_budget(torch.ones(1, 1), (1, 1), layout)
    with pytest.raises(TypeError, match="stats must be a plan.PooledStats"):
        gapr_gate(object(), count, layout)
    with pytest.raises(ValueError, match="stats.q_block must be float32"):
        gapr_gate(PooledStats(tile_size=16, **{n: getattr(pooled.stats, n).double() for n in STAT_FIELDS}), count,
                  layout)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_prepare_statistics_compiles_for_16_bit_inputs(dtype):
    layout = token_layout((5, 9, 16), 77, False, 128)
    generator = torch.Generator().manual_seed(0)
    query, key, value = (
        t.cuda() for t in make_inputs(generator, batch=1, heads=2, head_dim=128, layout=layout, dtype=dtype)
    )
    key[0, 1, 100, 7] = math.nan
    out = prepare_statistics(query, key, value, layout, tile_size=16, tile_dtype=torch.float32)
    expected = reference_prepared(query, key, value, None, layout, 16, 1.0)
    assert torch.equal(out.block_non_finite, expected.block_non_finite)
    for name in STAT_FIELDS:
        want = getattr(expected.stats, name)
        if want.norm() > 0:
            assert relative_error(getattr(out.stats, name), want) < 1e-5, name


# --------------------------------------------------------------------------------------------------------------------
# Statistics without copies (`prepare_statistics`)
# --------------------------------------------------------------------------------------------------------------------


def _broadcast_inputs(generator, *, batch, heads, head_dim, layout, dtype):
    """Q, K, V `(B, H, S, D)` as stride-0 expanded views (one head, one sample in memory), as a caller that repeats
    keys over heads passes them."""
    query, key, value = make_inputs(generator, batch=1, heads=1, head_dim=head_dim, layout=layout, dtype=dtype)
    return tuple(t.expand(batch, heads, -1, -1) for t in (query, key, value))


@infinities_in_the_interpreter
@settings(max_examples=25)
@given(
    seed=seeds(),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    head_dim=head_dims(),
    grid=kernel_grids(),
    text_len=st.sampled_from([0, 3, 13, 37]),
    text_first=st.booleans(),
    # (block, tile, rows per chunk or None for the launcher's): chunks of whole tiles, of several tiles, and of
    # pieces of a tile (64 / 16: four chunks per tile).
    blocking=st.sampled_from([(16, 16, None), (32, 16, 32), (64, 16, 64), (64, 64, None), (64, 64, 16), (32, 32, 32)]),
    mask_kind=st.sampled_from(["none", "per_batch", "per_head", "empty"]),
    masked_share=st.floats(0.0, 0.6),
    memory=st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    non_finite=st.sampled_from([0, 0, 1, 3]),
    outliers=st.booleans(),
    tile_dtype=st.sampled_from([None, torch.float32]),
    variant=st.sampled_from(["", "reread", "split", "reread split"]),
)
def test_prepare_statistics_matches_reference(
    seed, batch, heads, head_dim, grid, text_len, text_first, blocking, mask_kind, masked_share, memory, dtype,
    non_finite, outliers, tile_dtype, variant,
):  # fmt: skip
    block_size, tile_size, chunk = blocking
    if outliers and chunk is not None and chunk < tile_size:
        chunk = tile_size  # outliers need whole tiles in a chunk
    reread, split = "reread" in variant, "split" in variant
    if variant and chunk is None:
        chunk = max(tile_size, 16) if outliers else 16  # the interpreter's default chunk
    generator = torch.Generator().manual_seed(seed)
    layout = token_layout(grid, text_len, text_first, block_size)
    if memory == "expanded":
        query, key, value = _broadcast_inputs(
            generator, batch=batch, heads=heads, head_dim=head_dim, layout=layout, dtype=dtype
        )
    else:
        query, key, value = make_inputs(
            generator, batch=batch, heads=heads, head_dim=head_dim, layout=layout, dtype=dtype, memory=memory
        )
    if non_finite:
        query, key, value = sprinkle_non_finite(generator, (query, key, value), non_finite)
    mask = make_key_valid(generator, batch=batch, heads=heads, layout=layout, kind=mask_kind, masked_share=masked_share)
    valid = key_padding_valid(mask, batch, heads, layout.seq_len)

    launch = {} if chunk is None else {"config": (chunk, 4, reread, None, split)}
    with poisoned_allocations():
        out = prepare_statistics(
            query, key, value, layout, tile_size=tile_size, key_valid=valid, outliers=outliers, tile_dtype=tile_dtype,
            **launch,
        )  # fmt: skip
    expected = reference_prepared(query, key, value, mask, layout, tile_size, 1.0)

    assert torch.equal(out.key_valid, expected.key_valid)
    assert torch.equal(out.key_usable, expected.key_usable)
    assert torch.equal(out.block_non_finite, expected.block_non_finite)
    assert torch.equal(out.key_block_count, expected.key_block_count.float())
    assert out.source_index.equal(layout.source_index) and out.layout is layout
    means_dtype = tile_dtype or (dtype if dtype != torch.float32 else torch.float32)
    for name in STAT_FIELDS:
        got, want = getattr(out.stats, name), getattr(expected.stats, name)
        tile_mean = name in ("q_tile", "k_tile")
        assert got.dtype == (means_dtype if tile_mean else torch.float32), name
        assert got.shape == want.shape, name
        assert torch.isfinite(got).all(), name  # non-finite rows are left out of every statistic
        if name.endswith("count"):
            assert torch.equal(got.double(), want), name
        elif want.norm() > 0:
            bound = 1e-3 if got.dtype == torch.float16 else 1e-6
            assert relative_error(got, want) < bound, name
        else:
            assert torch.equal(got, torch.zeros_like(got)), name
    if not outliers:
        assert out.outliers is None
        return
    found = out.outliers
    assert found is not None
    # Every usable key is in its tile's rest or is its outlier (the outlier itself: see test_estimators).
    assert torch.equal(found.outlier_count, (out.stats.k_tile_count > 0).float())
    assert torch.equal(found.rest_count + found.outlier_count, out.stats.k_tile_count)
    total = found.rest_mean.double() * found.rest_count[..., None] + found.outlier.double()
    expected_total = expected.stats.k_tile * expected.stats.k_tile_count[..., None]
    bound = 2e-3 if found.rest_mean.dtype == torch.float16 else 1e-6
    if expected_total.norm() > 0:
        assert relative_error(total, expected_total) < bound


def test_prepare_statistics_reads_no_copy_and_rejects_bad_arguments():
    """Its outputs are statistics and validity only (nothing of the inputs' size); arguments are checked by name."""
    layout, args = _valid_launch_args()
    query, key, value = args["query"], args["key"], args["value"]
    out = prepare_statistics(query, key, value, layout, tile_size=16, outliers=True)
    fields = [getattr(out.stats, f) for f in STAT_FIELDS] + [out.key_valid, out.key_usable, out.key_block_count]
    assert all(t.numel() < query.numel() for t in fields)
    with pytest.raises(TypeError, match="tile_dtype must be float16, bfloat16 or float32"):
        prepare_statistics(query, key, value, layout, tile_size=16, tile_dtype=torch.float64)
    with pytest.raises(TypeError, match="outliers must be a bool"):
        prepare_statistics(query, key, value, layout, tile_size=16, outliers=1)
    with pytest.raises(ValueError, match=r"query must have shape \(B, H, 15, D\) for this layout"):
        prepare_statistics(query[..., :14, :], key, value, layout, tile_size=16)
    with pytest.raises(ValueError, match="tile_size=32 must divide block_size=16"):
        prepare_statistics(query, key, value, layout, tile_size=32)
    with pytest.raises(TypeError, match="layout must be a TokenLayout"):
        prepare_statistics(query, key, value, "layout", tile_size=16)


# --------------------------------------------------------------------------------------------------------------------
# Launch variants of the planning kernels (benchmarks/tune_planning.py times them)
# --------------------------------------------------------------------------------------------------------------------


@settings(max_examples=12)
@given(
    seed=seeds(),
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    head_dim=head_dims(),
    grid=kernel_grids(),
    text_len=st.sampled_from([0, 5, 37]),
    text_first=st.booleans(),
    block_size=st.sampled_from([16, 32]),
    mask_kind=st.sampled_from(["none", "per_head", "empty"]),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    launch=st.sampled_from([(16, 16, 4, 1, True), (32, 16, 4, 1, True), (32, 32, 4, 2, True), (16, 16, 4, 1, False)]),
)
def test_pooled_scores_launch_variants_match_reference(
    seed, batch, heads, head_dim, grid, text_len, text_first, block_size, mask_kind, dtype, launch
):  # fmt: skip
    """`pooled_scores` at explicit launch configurations, the fused key sets (one product of both sets per key tile)
    included, equals the float64 reference (the same tolerance as the default launch's test)."""
    from kernel_helpers import score_tolerance

    from spattn_compile.estimators import PooledTiles
    from spattn_compile.estimators.pooled import pooled_scores_reference
    from spattn_compile.kernels.pooled_scores import pooled_scores

    generator = torch.Generator().manual_seed(seed)
    layout = token_layout(grid, text_len, text_first, block_size)
    query, key, value = make_inputs(
        generator, batch=batch, heads=heads, head_dim=head_dim, layout=layout, dtype=dtype, memory="transposed"
    )
    mask = make_key_valid(generator, batch=batch, heads=heads, layout=layout, kind=mask_kind, masked_share=0.3)
    valid = key_padding_valid(mask, batch, heads, layout.seq_len)
    scale = head_dim**-0.5
    tiles_per_block = block_size // 16
    launch = (max(launch[0], tiles_per_block), *launch[1:])
    with poisoned_allocations():
        found = prepare_statistics(query, key, value, layout, tile_size=16, key_valid=valid, outliers=True)
        scores = pooled_scores(found.estimator_inputs(query, key, scale), outliers=True, config=launch)
    estimator = PooledTiles(16, outliers=True)
    reference_inputs = reference_prepared(query, key, value, mask, layout, 16, scale).estimator_inputs()
    expected = pooled_scores_reference(reference_inputs, estimator)
    assert torch.isfinite(scores).all(), "unwritten (poisoned) or non-finite scores"
    assert relative_error(scores, expected) < score_tolerance(estimator, dtype)


@settings(max_examples=10)
@given(
    **selection_settings,
    mass_threshold=st.sampled_from([None, 0.5, 0.875]),
    launch=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 1), (8, 2)]),
)
def test_selection_launch_variants_equal_the_default(
    seed, heads, grid, text_len, text_first, empty_share, forced, sparsity, neighbors, gapr, rectify, mass_threshold,
    launch,
):  # fmt: skip
    """`select_plan` with other rows and warps per program writes the default launch's plan (itself the reference's,
    tests above), bit for bit; `gapr_gate` at another tile the same gate."""
    layout, generator, valid_c, stats, key_block_count, forced_blocks = _selection_case(
        seed, heads=heads, grid=grid, text_len=text_len, text_first=text_first, empty_share=empty_share, forced=forced
    )
    scores = _dyadic_scores(generator, 2, heads, layout.num_video_blocks).float()
    stats32 = float32_stats(stats)
    gate = gapr_gate(stats32, key_block_count, layout) if gapr else None
    if gapr:
        with poisoned_allocations():
            assert torch.equal(gapr_gate(stats32, key_block_count, layout, config=(32, 2)), gate)
    nb = layout.num_video_blocks
    common = dict(
        budget=max(1, round((1 - sparsity) * nb)), estimator="test", mass_threshold=mass_threshold, neighbors=neighbors,
        trusted=rectify != "none", gate=gate, forced_blocks=forced_blocks,
    )  # fmt: skip
    expected = select_plan(scores, key_block_count, layout, **common)
    rows, warps = launch
    with poisoned_allocations():
        plan = select_plan(scores, key_block_count, layout, **common, rows_per_program=rows, num_warps=warps)
    for name in ("kv_counts", "kv_indices", "trusted_counts", "trusted_indices"):
        assert torch.equal(getattr(plan, name), getattr(expected, name)), name


def test_launch_variants_reject_bad_configurations():
    from spattn_compile.kernels.pooled_scores import pooled_scores

    layout = token_layout((2, 3, 4), 0, False, 16)
    query, key, value = make_inputs(torch.Generator().manual_seed(0), batch=1, heads=1, head_dim=16, layout=layout,
                                    dtype=torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="config rows per chunk"):
        prepare_statistics(query, key, value, layout, tile_size=16, config=(24, 1))
    with pytest.raises(TypeError, match="config reread"):
        prepare_statistics(query, key, value, layout, tile_size=16, config=(16, 1, 1))
    with pytest.raises(TypeError, match="config split"):
        prepare_statistics(query, key, value, layout, tile_size=16, config=(16, 1, False, None, "yes"))
    with pytest.raises(ValueError, match="maxnreg"):
        prepare_statistics(query, key, value, layout, tile_size=16, config=(16, 1, True, 300))
    found = prepare_statistics(query, key, value, layout, tile_size=16, outliers=True)
    with pytest.raises(ValueError, match="BLOCK_M, BLOCK_N"):
        pooled_scores(found.estimator_inputs(query, key, 0.25), outliers=True, config=(16, 16))
    with pytest.raises(ValueError, match="num_warps"):
        select_plan(torch.rand(1, 1, layout.num_video_blocks, layout.num_video_blocks + 1),
                    found.key_block_count, layout, budget=1, estimator="x", num_warps=3)  # fmt: skip
    with pytest.raises(ValueError, match="config tile"):
        gapr_gate(found.stats, found.key_block_count, layout, config=(24, 4))
