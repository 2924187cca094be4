"""Tests of the reorder + pool and score + select kernels (`spattn_compile.kernels.reorder_pool`, `.score_select`) and
their custom ops, against the float64 reference (`reference.gather_canonical`, `pool_statistics`, `block_scores`,
`gapr_trusted`, `build_plan`).

CPU tests run the kernels under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small grids with
prime sides, float16/float32 inputs. Every buffer the launchers allocate is poisoned (NaN for floats, the largest
value for integers, True for bools: `torch.utils.deterministic.fill_uninitialized_memory`), so an element a kernel
fails to write cannot match the reference.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from helpers import relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

from spattn_compile import reference
from spattn_compile.config import SparseAttentionConfig
from spattn_compile.kernels.pooling_ops import reorder_pool_op, score_select_op
from spattn_compile.kernels.reorder_pool import query_tile_count, reorder_pool, reorder_pool_tensors
from spattn_compile.kernels.score_select import block_scores, gapr_gate, select_plan
from spattn_compile.layout import token_layout

GRIDS = [(1, 3, 5), (2, 5, 7), (3, 5, 7), (1, 1, 13), (3, 3, 3)]
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


@contextlib.contextmanager
def poisoned_allocations():
    """Fill every `torch.empty*` allocation with NaN / the dtype's largest value while the block runs."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def make_inputs(
    generator: torch.Generator,
    *,
    batch: int,
    heads: int,
    head_dim: int,
    layout,
    dtype: torch.dtype,
    memory: str,
    gain: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random Q, K, V `(B, H, S, D)` with non-zero means, stored contiguous, as a transposed `(B, S, H, D)` buffer,
    or as a slice of wider rows (strided, last dim contiguous)."""
    seq_len = layout.seq_len

    def one(offset: float, scale: float) -> torch.Tensor:
        width = 2 * head_dim if memory == "sliced" else head_dim
        shape = (batch, seq_len, heads, width) if memory == "transposed" else (batch, heads, seq_len, width)
        x = scale * torch.randn(*shape, generator=generator, dtype=torch.float64) + offset
        x = x.to(dtype)
        if memory == "transposed":
            x = x.transpose(1, 2)
        return x[..., :head_dim]

    return one(0.3, gain), one(-0.2, 1.0), one(0.5, 1.0)


def make_key_valid(
    generator: torch.Generator, *, batch: int, heads: int, layout, kind: str, masked_share: float
) -> torch.Tensor | None:
    """A bool key-padding mask `(B, 1, 1, S)` or `(B, H, 1, S)` in the original order, or None. "empty" masks every
    token of every other canonical video block (from the second), so that empty tiles and blocks occur; the first text
    token is always kept."""
    if kind == "none":
        return None
    seq_len = layout.seq_len
    heads_in_mask = heads if kind == "per_head" else 1
    valid = torch.rand(batch, heads_in_mask, 1, seq_len, generator=generator) >= masked_share
    if kind == "empty":
        source = layout.source_index
        nb, bs = layout.num_video_blocks, layout.block_size
        for block in range(1, nb, 2):
            rows = source[block * bs : (block + 1) * bs]
            valid[..., rows[rows >= 0]] = False
    if layout.num_text:
        text_start = layout.num_video if not layout.text_first else 0
        valid[..., text_start] = True
    return valid


def reference_canonical(query, key, value, attn_mask, layout, tile_size):
    """Float64 canonical inputs, key validity and statistics, from the inputs as given (in their dtype)."""
    batch, heads, seq_len, _ = query.shape
    valid = reference.key_padding_valid(attn_mask, batch, heads, seq_len)
    valid_c = reference.canonical_key_valid(valid, layout, batch, heads, query.device)
    q_c, k_c, v_c = (reference.gather_canonical(t.double(), layout) for t in (query, key, value))
    stats = reference.pool_statistics(q_c, k_c, v_c, valid_c, layout, tile_size)
    return q_c, k_c, v_c, valid_c, stats


def float32_stats(stats: reference.PooledStats) -> reference.PooledStats:
    return reference.PooledStats(
        tile_size=stats.tile_size, **{name: getattr(stats, name).float() for name in STAT_FIELDS}
    )


# --------------------------------------------------------------------------------------------------------------------
# Reorder + pool
# --------------------------------------------------------------------------------------------------------------------


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([16, 32]),
    grid=st.sampled_from(GRIDS),
    text_len=st.sampled_from([0, 3, 13, 37]),
    text_first=st.booleans(),
    # (64, 64): a tile of two 32-row chunks in the kernel.
    blocking=st.sampled_from([(16, 16), (32, 16), (32, 32), (64, 64)]),
    mask_kind=st.sampled_from(["none", "per_batch", "per_head", "empty"]),
    masked_share=st.floats(0.0, 0.6),
    memory=st.sampled_from(["contiguous", "transposed", "sliced"]),
    dtype=st.sampled_from([torch.float16, torch.float32]),
)
def test_reorder_pool_matches_reference(
    seed, batch, heads, head_dim, grid, text_len, text_first, blocking, mask_kind, masked_share, memory, dtype
):
    block_size, tile_size = blocking
    generator = torch.Generator().manual_seed(seed)
    layout = token_layout(grid, text_len, text_first, block_size)
    query, key, value = make_inputs(
        generator, batch=batch, heads=heads, head_dim=head_dim, layout=layout, dtype=dtype, memory=memory
    )
    mask = make_key_valid(generator, batch=batch, heads=heads, layout=layout, kind=mask_kind, masked_share=masked_share)
    valid = reference.key_padding_valid(mask, batch, heads, layout.seq_len)

    with poisoned_allocations():
        out = reorder_pool(query, key, value, layout, tile_size=tile_size, key_valid=valid)
    q_c, k_c, v_c, valid_c, stats = reference_canonical(query, key, value, mask, layout, tile_size)

    # The canonical copies are exact gathers (padding rows zero), in the input dtype.
    for name, got, expected in (("q", out.q, q_c), ("k", out.k, k_c), ("v", out.v, v_c)):
        assert got.dtype == dtype and got.is_contiguous(), name
        assert torch.equal(got.double(), expected), name
    assert torch.equal(out.key_valid, valid_c)
    expected_block_count = valid_c.reshape(batch, heads, layout.num_blocks, block_size).sum(-1)
    assert torch.equal(out.key_block_count, expected_block_count.float())
    for name in STAT_FIELDS:
        got, expected = getattr(out.stats, name), getattr(stats, name)
        assert got.dtype == torch.float32, name
        assert got.shape == expected.shape, name
        assert torch.isfinite(got).all(), name
        if name.endswith("count"):
            assert torch.equal(got.double(), expected), name
        elif expected.norm() > 0:
            assert relative_error(got, expected) < 1e-6, name
        else:
            assert torch.equal(got, torch.zeros_like(got)), name


def test_reorder_pool_partial_and_empty_groups_use_true_counts():
    """Hand-checked: a 1x3x5 grid in blocks of 16 has one partial block of 15 rows, and a masked key is excluded."""
    layout = token_layout((1, 3, 5), 0, False, 16)
    generator = torch.Generator().manual_seed(0)
    query, key, value = make_inputs(
        generator, batch=1, heads=1, head_dim=16, layout=layout, dtype=torch.float32, memory="contiguous"
    )
    valid = torch.ones(1, 1, 15, dtype=torch.bool)
    valid[..., 4] = False
    out = reorder_pool(query, key, value, layout, tile_size=16, key_valid=valid)
    kept = torch.arange(15) != 4
    torch.testing.assert_close(out.stats.q_block[0, 0, 0], query[0, 0].mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.stats.k_block[0, 0, 0], key[0, 0, kept].mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.stats.v_block[0, 0, 0], value[0, 0, kept].mean(0), rtol=1e-6, atol=1e-6)
    mad = (key[0, 0, kept] - key[0, 0, kept].mean(0)).abs().mean(0)
    torch.testing.assert_close(out.stats.k_block_mad[0, 0, 0], mad, rtol=1e-5, atol=1e-6)
    assert out.stats.q_tile_count.tolist() == [15.0]
    assert out.stats.k_block_count.tolist() == [[[14.0]]]


# --------------------------------------------------------------------------------------------------------------------
# Block scores and GAPR's gate
# --------------------------------------------------------------------------------------------------------------------


@settings(max_examples=20)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    grid=st.sampled_from(GRIDS),
    text_len=st.sampled_from([0, 5, 37]),
    text_first=st.booleans(),
    blocking=st.sampled_from([(16, 16), (32, 16), (32, 32)]),
    mask_kind=st.sampled_from(["none", "per_batch", "per_head", "empty"]),
    gain=st.floats(0.5, 3.0),
    scale=st.floats(0.05, 0.5),
    dtype=st.sampled_from([torch.float16, torch.float32]),
)
def test_block_scores_match_reference(
    seed, batch, heads, grid, text_len, text_first, blocking, mask_kind, gain, scale, dtype
):
    block_size, tile_size = blocking
    generator = torch.Generator().manual_seed(seed)
    layout = token_layout(grid, text_len, text_first, block_size)
    query, key, value = make_inputs(
        generator, batch=batch, heads=heads, head_dim=32, layout=layout, dtype=dtype, memory="contiguous", gain=gain
    )
    mask = make_key_valid(generator, batch=batch, heads=heads, layout=layout, kind=mask_kind, masked_share=0.3)
    valid = reference.key_padding_valid(mask, batch, heads, layout.seq_len)
    pooled = reorder_pool(query, key, value, layout, tile_size=tile_size, key_valid=valid)
    with poisoned_allocations():
        scores = block_scores(pooled.stats, pooled.k, pooled.key_valid, layout, scale)
    _, k_c, _, valid_c, stats = reference_canonical(query, key, value, mask, layout, tile_size)
    expected = reference.block_scores(stats, k_c, valid_c, layout, scale)

    assert scores.shape == expected.shape and scores.dtype == torch.float32
    assert relative_error(scores, expected) < 2e-5
    # Each row is a distribution over the key blocks and the text column, or zero when every key is masked.
    has_key = valid_c.any(-1, keepdim=True).expand_as(scores[..., 0]).float()
    torch.testing.assert_close(scores.sum(-1), has_key, rtol=0, atol=1e-5)
    assert (scores >= 0).all()


@settings(max_examples=15)
@given(
    seed=st.integers(0, 2**31 - 1),
    heads=st.integers(1, 3),
    grid=st.sampled_from(GRIDS),
    mask_kind=st.sampled_from(["none", "empty"]),
    bias=st.floats(0.0, 1.5),
)
def test_gapr_gate_matches_reference(seed, heads, grid, mask_kind, bias):
    layout = token_layout(grid, 0, False, 16)
    generator = torch.Generator().manual_seed(seed)
    q_c = torch.randn(1, heads, layout.padded_len, 32, generator=generator, dtype=torch.float64) + bias
    k_c = torch.randn(1, heads, layout.padded_len, 32, generator=generator, dtype=torch.float64) + bias
    mask = make_key_valid(generator, batch=1, heads=heads, layout=layout, kind=mask_kind, masked_share=0.2)
    valid = reference.key_padding_valid(mask, 1, heads, layout.seq_len)
    valid_c = reference.canonical_key_valid(valid, layout, 1, heads, q_c.device)
    stats = reference.pool_statistics(q_c, k_c, k_c, valid_c, layout, 16)
    key_block_count = valid_c.reshape(1, heads, layout.num_blocks, 16).sum(-1).float()
    with poisoned_allocations():
        gate = gapr_gate(float32_stats(stats), key_block_count, layout)
    expected = reference.gapr_trusted(stats)

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


def _selection_case(seed: int, *, heads: int, grid, text_len: int, text_first: bool, empty_share: float):
    """Random float64 statistics (for GAPR) and a canonical key validity with some blocks entirely masked."""
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
    return layout, generator, k_c, valid_c, stats, key_block_count


def _check_plan(plan, expected) -> None:
    for name in ("kv_counts", "kv_indices", "trusted_counts", "trusted_indices"):
        got, want = getattr(plan, name), getattr(expected, name)
        assert got.dtype == torch.int32, name
        assert torch.equal(got, want), name


selection_settings = dict(
    seed=st.integers(0, 2**31 - 1),
    heads=st.integers(1, 2),
    grid=st.sampled_from(GRIDS),
    text_len=st.sampled_from([0, 7, 37]),
    text_first=st.booleans(),
    empty_share=st.sampled_from([0.0, 0.2]),
    sparsity=st.floats(0.0, 0.95),
    neighbors=st.booleans(),
    gapr=st.booleans(),
    rectify=st.sampled_from(["none", "block", "query"]),
)


@settings(max_examples=25)
@given(
    **selection_settings,
    mass_threshold=st.sampled_from([None, 0.25, 0.5, 0.75, 0.875, 1.0]),
    max_density=st.sampled_from([0.25, 0.5, 1.0]),
)
def test_selection_matches_reference_exactly_with_ties(
    seed,
    heads,
    grid,
    text_len,
    text_first,
    empty_share,
    sparsity,
    neighbors,
    gapr,
    rectify,
    mass_threshold,
    max_density,
):
    """Scores on a grid of 2^-k with many equal values: every sum is exact in float32 and float64, so the plans must
    agree exactly, ties (taken in index order) and the mass threshold included."""
    layout, generator, k_c, valid_c, stats, key_block_count = _selection_case(
        seed, heads=heads, grid=grid, text_len=text_len, text_first=text_first, empty_share=empty_share
    )
    nb = layout.num_video_blocks
    weights = torch.randint(0, 6, (2, heads, nb, nb + 1), generator=generator).double()
    weights[..., nb] *= 3
    scale = 2.0 ** -math.ceil(math.log2(weights.sum(-1).max().item() + 1))
    scores = weights * scale
    config = SparseAttentionConfig(
        block_size=16,
        tile_size=16,
        sparsity=sparsity,
        mass_threshold=mass_threshold,
        max_density=max_density,
        neighbors=neighbors,
        gapr=gapr,
        rectify=rectify,
    )
    gate = reference.gapr_trusted(stats).to(torch.int8)
    with poisoned_allocations():
        plan = select_plan(scores.float(), key_block_count, layout, density=config.density, config=config, gate=gate)
    expected = reference.build_plan(
        stats, k_c, valid_c, layout, scale=0.25, density=config.density, config=config, scores=scores
    )
    _check_plan(plan, expected)


@settings(max_examples=20)
@given(**selection_settings, gain=st.floats(0.5, 4.0))
def test_selection_matches_reference_on_continuous_scores(
    seed, heads, grid, text_len, text_first, empty_share, sparsity, neighbors, gapr, rectify, gain
):
    """Softmax rows of random logits (no ties, budget only): the kept blocks are the top of each row, exactly."""
    layout, generator, k_c, valid_c, stats, key_block_count = _selection_case(
        seed, heads=heads, grid=grid, text_len=text_len, text_first=text_first, empty_share=empty_share
    )
    nb = layout.num_video_blocks
    logits = gain * torch.randn(2, heads, nb, nb + 1, generator=generator, dtype=torch.float64)
    scores = torch.softmax(logits, -1).float()
    config = SparseAttentionConfig(
        block_size=16, tile_size=16, sparsity=sparsity, neighbors=neighbors, gapr=gapr, rectify=rectify
    )
    gate = reference.gapr_trusted(stats).to(torch.int8)
    with poisoned_allocations():
        plan = select_plan(scores, key_block_count, layout, density=config.density, config=config, gate=gate)
    expected = reference.build_plan(
        stats, k_c, valid_c, layout, scale=0.25, density=config.density, config=config, scores=scores.double()
    )
    _check_plan(plan, expected)


# --------------------------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------------------------


def _tiny_op_inputs():
    layout = token_layout((1, 3, 5), 3, False, 16)
    generator = torch.Generator().manual_seed(3)
    query, key, value = make_inputs(
        generator, batch=1, heads=1, head_dim=16, layout=layout, dtype=torch.float32, memory="transposed"
    )
    valid = torch.rand(1, 1, layout.seq_len, generator=generator) >= 0.2
    valid[..., layout.num_video] = True
    return layout, query, key, value, valid


def test_reorder_pool_op_opcheck_and_equals_launcher():
    layout, query, key, value, valid = _tiny_op_inputs()
    args = (query, key, value, layout.source_index, valid, layout.num_video_blocks, 16, 16)
    torch.library.opcheck(reorder_pool_op, args)
    got = reorder_pool_op(*args)
    want = reorder_pool_tensors(
        query,
        key,
        value,
        layout.source_index,
        valid,
        num_video_blocks=layout.num_video_blocks,
        block_size=16,
        tile_size=16,
    )
    assert len(got) == len(want) == 13
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_score_select_op_opcheck_and_equals_reference():
    layout, query, key, value, valid = _tiny_op_inputs()
    outputs = reorder_pool_op(query, key, value, layout.source_index, valid, layout.num_video_blocks, 16, 16)
    q_c, k_c, v_c, valid_c, q_tile, k_tile, k_tile_count, q_block, q_mad, k_block, k_mad, v_block, counts = outputs
    args = (
        q_tile,
        query_tile_count(layout, 16, "cpu"),
        k_tile,
        k_tile_count,
        q_block,
        q_mad,
        k_block,
        k_mad,
        counts,
        k_c,
        valid_c,
        [1, 3, 5],
        3,
        False,
        16,
        16,
        "hilbert",
        0.25,
        0.5,
        0.75,
        1.0,
        True,
        True,
        "block",
    )
    torch.library.opcheck(score_select_op, args)
    kv_counts, kv_indices, trusted_counts, trusted_indices, scores = score_select_op(*args)
    config = SparseAttentionConfig(block_size=16, tile_size=16, mass_threshold=0.75, neighbors=True)
    *_, stats = reference_canonical(query, key, value, valid[:, :, None, :], layout, 16)
    expected = reference.build_plan(
        stats, k_c.double(), valid_c, layout, scale=0.25, density=0.5, config=config, scores=scores.double()
    )
    assert torch.equal(kv_counts, expected.kv_counts) and torch.equal(kv_indices, expected.kv_indices)
    assert torch.equal(trusted_counts, expected.trusted_counts)
    assert torch.equal(trusted_indices, expected.trusted_indices)


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
        (dict(query=torch.randn(1, 15, 16)), ValueError, "query"),
        (
            dict(query=torch.randn(1, 1, 15, 24), key=torch.randn(1, 1, 15, 24), value=torch.randn(1, 1, 15, 24)),
            ValueError,
            "head dim",
        ),
        (dict(tile_size=32), ValueError, "tile_size"),
        (dict(block_size=24), ValueError, "block_size"),
        (dict(source_index=torch.zeros(16, dtype=torch.float32)), ValueError, "source_index"),
        (dict(source_index=torch.zeros(20, dtype=torch.int64)), ValueError, "source_index"),
        (dict(key_valid=torch.ones(1, 1, 14, dtype=torch.bool)), ValueError, "key_valid"),
        (dict(key_valid=torch.ones(1, 1, 15)), ValueError, "key_valid"),
        (dict(num_video_blocks=2), ValueError, "num_video_blocks"),
    ],
)
def test_reorder_pool_rejects_bad_inputs(change, error, names):
    _, args = _valid_launch_args()
    args.update(change)
    keywords = {name: args.pop(name) for name in ("num_video_blocks", "block_size", "tile_size")}
    with pytest.raises(error, match=names):
        reorder_pool_tensors(*args.values(), **keywords)


def test_score_select_rejects_bad_inputs():
    layout, args = _valid_launch_args()
    pooled = reorder_pool(args["query"], args["key"], args["value"], layout, tile_size=16)
    config = SparseAttentionConfig(block_size=16, tile_size=16)
    with pytest.raises(ValueError, match="scale"):
        block_scores(pooled.stats, pooled.k, pooled.key_valid, layout, -1.0)
    with pytest.raises(ValueError, match="k_c"):
        block_scores(pooled.stats, pooled.k[..., :8], pooled.key_valid, layout, 0.25)
    scores = block_scores(pooled.stats, pooled.k, pooled.key_valid, layout, 0.25)
    with pytest.raises(ValueError, match="density"):
        select_plan(scores, pooled.key_block_count, layout, density=0.0, config=config)
    with pytest.raises(TypeError, match="scores"):
        select_plan(scores.double(), pooled.key_block_count, layout, density=0.5, config=config)
    with pytest.raises(ValueError, match="gate"):
        select_plan(scores, pooled.key_block_count, layout, density=0.5, config=config, gate=None)
    with pytest.raises(ValueError, match="key_block_count"):
        select_plan(scores, pooled.key_block_count[..., :0], layout, density=0.5, config=config)
    with pytest.raises(TypeError, match="stats"):
        gapr_gate(object(), pooled.key_block_count, layout)
