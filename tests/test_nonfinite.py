"""Non-finite values (issue 13 item 2): NaN and infinities in Q, K, V leave the output non-finite exactly where SDPA's
is, for every rectify mode, both implementations, every estimator, at sparsity 0 and 0.5; one bad token does not
spread to its block.

The comparison is with `F.scaled_dot_product_attention` (float32, the math backend on the CPU) on the same inputs,
with one documented difference: SDPA applies a boolean mask by *adding* -inf to the logits, so a NaN or an infinity in a
masked key row still reaches the softmax (NaN + -inf is NaN) and poisons rows or the whole output; this library drops
masked keys before the product (a masked key does not exist). The expected pattern is therefore SDPA's on the same
inputs with the masked key and value rows zeroed, and `test_sdpa_lets_masked_non_finite_keys_through` pins SDPA's own
behaviour so that the difference stays visible. A masked value row has no effect either.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import make_inputs, make_key_valid, triton_prepared
from torch.nn.attention import SDPBackend, sdpa_kernel

from spattn_compile import SparseAttentionConfig, select_plan, sparse_attention
from spattn_compile.estimators import PooledTiles, QueryTiles, SampledRows, estimator_for
from spattn_compile.layout import token_layout
from spattn_compile.testing import relative_error
from spattn_compile.testing.strategies import kernel_grids, seeds

VALUES = (math.nan, math.inf, -math.inf)
ESTIMATORS = (PooledTiles(16), SampledRows(4), QueryTiles(16))


def sdpa_math(query, key, value, attn_mask):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)


def without_masked_rows(tensor: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """`tensor (B, H, S, D)` with the rows of masked keys zeroed (what a masked key is: absent)."""
    if attn_mask is None:
        return tensor
    batch, heads, seq_len, _ = tensor.shape
    keep = attn_mask.expand(batch, heads, 1, seq_len)[:, :, 0, :, None]
    return tensor.masked_fill(~keep, 0.0)


def expected_pattern(query, key, value, attn_mask) -> torch.Tensor:
    """bool `(B, H, S, D)`: where SDPA's output (masked rows absent) is finite."""
    clean_key, clean_value = without_masked_rows(key, attn_mask), without_masked_rows(value, attn_mask)
    return torch.isfinite(sdpa_math(query, clean_key, clean_value, attn_mask))


@st.composite
def non_finite_cases(draw):
    grid = draw(kernel_grids())
    text_len = draw(st.sampled_from([0, 5, 19]))
    layout = token_layout(grid, text_len, draw(st.booleans()), 16)
    generator = torch.Generator().manual_seed(draw(seeds()))
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([16, 24]))
    query, key, value = (
        t.contiguous() for t in make_inputs(generator, batch=batch, heads=heads, head_dim=head_dim, layout=layout,
                                            dtype=torch.float32)
    )  # fmt: skip
    mask = make_key_valid(
        generator, batch=batch, heads=heads, layout=layout, kind=draw(st.sampled_from(["none", "per_batch",
        "per_head"])), masked_share=0.25,
    )  # fmt: skip
    valid = torch.ones(batch, heads, layout.seq_len, dtype=torch.bool)
    if mask is not None:
        valid = mask.expand(batch, heads, 1, layout.seq_len)[:, :, 0]
    for _ in range(draw(st.integers(1, 3))):
        which = draw(st.sampled_from(["query", "key", "value"]))
        b, h = draw(st.integers(0, batch - 1)), draw(st.integers(0, heads - 1))
        row, column = draw(st.integers(0, layout.seq_len - 1)), draw(st.integers(0, head_dim - 1))
        if which == "value" and not valid[b, h, row]:
            which = "key"  # masked value rows: see test_masked_non_finite_values_have_no_effect
        {"query": query, "key": key, "value": value}[which][b, h, row, column] = draw(st.sampled_from(VALUES))
    return {
        "query": query,
        "key": key,
        "value": value,
        "attn_mask": mask,
        "video_grid": grid,
        "text_len": text_len,
        "text_first": layout.text_first,
        "estimator": draw(st.sampled_from(ESTIMATORS)),
    }


def _check_pattern(case, impl: str, rectify: str) -> None:
    query, key, value, mask = case["query"], case["key"], case["value"], case["attn_mask"]
    expected = expected_pattern(query, key, value, mask)
    kwargs = dict(video_grid=case["video_grid"], text_len=case["text_len"], text_first=case["text_first"])
    for sparsity in (0.0, 0.5):
        config = SparseAttentionConfig(
            block_size=16, sparsity=sparsity, rectify=rectify, estimator=case["estimator"], min_seq_len=0
        )
        out = sparse_attention(query, key, value, **kwargs, attn_mask=mask, config=config, impl=impl)
        finite = torch.isfinite(out)
        assert torch.equal(finite, expected), (
            f"sparsity {sparsity}: {int((~finite).sum())} non-finite outputs where SDPA has {int((~expected).sum())}"
        )
        if sparsity == 0.0 and expected.any():
            # Exact attention: the finite outputs are SDPA's (a non-finite token changes nothing else).
            reference = sdpa_math(query.double(), without_masked_rows(key.double(), mask),
                                  without_masked_rows(value.double(), mask), mask)  # fmt: skip
            assert relative_error(out[expected], reference[expected]) < 1e-5


@pytest.mark.parametrize("rectify", ["none", "block", "query"])
@settings(max_examples=20)
@given(case=non_finite_cases())
def test_non_finite_pattern_matches_sdpa_reference(rectify, case):
    _check_pattern(case, "reference", rectify)


@pytest.mark.parametrize("rectify", ["none", "block", "query"])
@settings(max_examples=6)
@given(case=non_finite_cases())
def test_non_finite_pattern_matches_sdpa_triton(rectify, case):
    _check_pattern(case, "triton", rectify)


def _grid_case(seed: int = 0, batch: int = 1):
    grid, text_len = (2, 5, 7), 13
    layout = token_layout(grid, text_len, False, 16)
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (t.contiguous() for t in make_inputs(generator, batch=batch, heads=2, head_dim=16, layout=layout,
                                                    dtype=torch.float32))  # fmt: skip
    return layout, q, k, v, dict(video_grid=grid, text_len=text_len)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("rectify", ["none", "block", "query"])
def test_one_bad_query_token_does_not_poison_its_block(impl, rectify):
    """Issue 13's measurement: with block rectification one NaN query token turned its whole block of outputs to NaN
    at sparsity 0 (512 NaN outputs where SDPA has 32). Now exactly that token's row is non-finite, as in SDPA."""
    layout, q, k, v, kwargs = _grid_case()
    q[0, 1, 17, 3] = math.nan
    q[0, 0, 40, 0] = math.inf
    for sparsity in (0.0, 0.5):
        config = SparseAttentionConfig(block_size=16, sparsity=sparsity, rectify=rectify, min_seq_len=0)
        out = sparse_attention(q, k, v, **kwargs, config=config, impl=impl)
        bad = ~torch.isfinite(out)
        assert int(bad.sum()) == 2 * 16 and bad[0, 1, 17].all() and bad[0, 0, 40].all()


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("value", VALUES)
def test_a_non_finite_key_keeps_its_block_for_every_query_block(impl, value):
    """Dense attention sees a bad key from every query, so every video query block keeps its block (and only the
    rows SDPA makes non-finite are), even at sparsity 0.9."""
    layout, q, k, v, kwargs = _grid_case(seed=1)
    k[0, 0, 50, 2] = value
    config = SparseAttentionConfig(block_size=16, sparsity=0.9, rectify="block", min_seq_len=0)
    plan = select_plan(q, k, v, **kwargs, config=config, impl=impl)
    position = (layout.source_index == 50).nonzero().item()
    block = position // layout.block_size
    nb = layout.num_video_blocks
    assert plan.to_dense()[0, 0, :, block].all()
    assert plan.to_dense()[0, 1, :nb, :nb].sum(-1).eq(1).all()  # the other head keeps its budget of one block
    out = sparse_attention(q, k, v, **kwargs, config=config, impl=impl)
    assert torch.equal(torch.isfinite(out), expected_pattern(q, k, v, None))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_sdpa_lets_masked_non_finite_keys_through(impl):
    """Pinned difference from SDPA (math backend, torch 2.13): a NaN in a masked key row makes SDPA's whole output NaN
    and an infinity makes every row whose query has the matching sign NaN, because the mask is added to the logits.
    The library drops masked keys: its output is SDPA's with the masked rows absent, all finite."""
    layout, q, k, v, kwargs = _grid_case(seed=2)
    mask = torch.ones(1, 1, 1, layout.seq_len, dtype=torch.bool)
    mask[..., [8, 60]] = False
    k[0, 0, 8, 1] = math.nan
    k[0, 1, 60, 0] = math.inf
    raw = sdpa_math(q, k, v, mask)
    assert torch.isnan(raw[0, 0]).all()
    assert torch.isnan(raw[0, 1]).any() and not torch.isnan(raw[0, 1]).all()
    clean = sdpa_math(q, without_masked_rows(k, mask), v, mask)
    assert torch.isfinite(clean).all()
    config = SparseAttentionConfig(block_size=16, sparsity=0.5, rectify="query", min_seq_len=0)
    out = sparse_attention(q, k, v, **kwargs, attn_mask=mask, config=config, impl=impl)
    assert torch.isfinite(out).all()
    same = sparse_attention(q, without_masked_rows(k, mask), v, **kwargs, attn_mask=mask, config=config, impl=impl)
    assert torch.equal(out, same)  # the masked keys' contents have no effect at all


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("value", VALUES)
def test_masked_non_finite_values_have_no_effect(impl, value):
    layout, q, k, v, kwargs = _grid_case(seed=3)
    mask = torch.ones(1, 1, 1, layout.seq_len, dtype=torch.bool)
    mask[..., 30] = False  # a video key whose block holds valid keys too
    v[0, 0, 30, 5] = value
    config = SparseAttentionConfig(block_size=16, sparsity=0.5, rectify="none", min_seq_len=0)
    out = sparse_attention(q, k, v, **kwargs, attn_mask=mask, config=config, impl=impl)
    clean = sparse_attention(q, k, without_masked_rows(v, mask), **kwargs, attn_mask=mask, config=config, impl=impl)
    assert torch.equal(out, clean)


@pytest.mark.parametrize("estimator", [SampledRows(4), QueryTiles(16)], ids=lambda e: e.name)
@pytest.mark.parametrize("where", ["key", "value"])
def test_probe_kernels_ignore_non_finite_keys_without_a_mask(estimator, where):
    from kernel_helpers import reference_prepared

    layout = token_layout((2, 4, 4), 0, False, 16)  # 32 video tokens: two whole blocks, no padding row
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 32, 16, generator=generator) for _ in range(3))
    (k if where == "key" else v)[0, 0, 5, 3] = math.nan
    kernel_inputs = triton_prepared(q, k, v, None, layout, 16, 0.25).estimator_inputs()
    reference_inputs = reference_prepared(q, k, v, None, layout, 16, 0.25).estimator_inputs()
    scores = estimator_for(estimator).kernel(kernel_inputs, estimator)
    expected = estimator_for(estimator).reference(reference_inputs, estimator)
    assert relative_error(scores, expected) < 1e-5
