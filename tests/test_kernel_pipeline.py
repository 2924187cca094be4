"""Tests of the Triton pipeline `kernels.pipeline.triton_sparse_attention` (impl="triton") against the float64
reference pipeline `reference.sparse_attention_reference` and against dense SDPA.

CPU tests run every kernel under the Triton interpreter on small prime-sided grids, float16/float32. The plan is
compared with the reference's: exactly, or, where two blocks' scores agree to float32 rounding and the selections
differ, by the selected mass. The output is compared with the reference attention evaluated on the kernel's own plan,
so that a near-tie in the selection cannot hide an error of the attention. `gpu` tests run bfloat16 at real video
sizes on CUDA, with the reference in float64 on the GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kernel_pooling import GRIDS, make_inputs, make_key_valid, poisoned_allocations, relative_error

import spattn_compile
from spattn_compile import reference
from spattn_compile.config import SparseAttentionConfig
from spattn_compile.kernels.pipeline import triton_sparse_attention
from spattn_compile.layout import token_layout

_TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def _reference_on_plan(query, key, value, attn_mask, layout, plan, config, scale):
    """Float64 reference attention (with rectification) of the inputs as given, on a given plan."""
    batch, heads, seq_len, head_dim = query.shape
    valid = reference.key_padding_valid(attn_mask, batch, heads, seq_len)
    valid_c = reference.canonical_key_valid(valid, layout, batch, heads, query.device)
    q_c, k_c, v_c = (reference.gather_canonical(t.double(), layout) for t in (query, key, value))
    stats = reference.pool_statistics(q_c, k_c, v_c, valid_c, layout, config.tile_size)
    out_c = reference.rectified_sparse_attention(
        q_c, k_c, v_c, valid_c, plan, stats, layout, scale=scale, rectify=config.rectify
    )
    return reference.scatter_canonical(out_c, layout), stats


def _check_plan_agrees(plan, expected, stats, config) -> None:
    """Equal plans, or plans whose differences are near-ties: equal kept mass under the reference scores, and trusted
    blocks that differ only where the kept blocks differ or GAPR's test is a near-tie."""
    nb = expected.num_video_blocks
    keep, keep_expected = plan.keep_mask(), expected.keep_mask()
    scores = expected.block_scores.double()
    mass = (scores[..., :nb] * keep[..., :nb, :nb]).sum(-1)
    mass_expected = (scores[..., :nb] * keep_expected[..., :nb, :nb]).sum(-1)
    assert (mass - mass_expected).abs().max() <= 1e-5
    assert torch.equal(keep[..., nb:, :], keep_expected[..., nb:, :])  # text query rows keep every non-empty block
    trusted_differs = plan.trusted_mask() != expected.trusted_mask()
    if trusted_differs.any():
        q, dq, k, dk = stats.q_block, stats.q_block_mad, stats.k_block, stats.k_block_mad
        gain = (q @ k.transpose(-1, -2)).abs()
        error = (dq @ k.transpose(-1, -2)).abs() + (q @ dk.transpose(-1, -2)).abs()
        near_tie = (gain - error).abs() <= 1e-4 * (gain + error)
        explained = (keep != keep_expected)[..., :nb, :nb] | near_tie
        assert not (trusted_differs[..., :nb, :] & ~explained).any()


def _run_case(query, key, value, attn_mask, *, grid, text_len, text_first, config, scale=None):
    with poisoned_allocations():
        out, plan = triton_sparse_attention(
            query,
            key,
            value,
            video_grid=grid,
            text_len=text_len,
            text_first=text_first,
            attn_mask=attn_mask,
            scale=scale,
            config=config,
            return_plan=True,
        )
    assert out.shape == query.shape and out.dtype == query.dtype
    assert torch.isfinite(out).all(), "an output row was not written (poisoned with NaN)"
    return out, plan


# --------------------------------------------------------------------------------------------------------------------
# CPU (Triton interpreter)
# --------------------------------------------------------------------------------------------------------------------


@settings(max_examples=15)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    grid=st.sampled_from(GRIDS),
    text_len=st.sampled_from([0, 5, 37]),
    text_first=st.booleans(),
    block_size=st.sampled_from([16, 32]),
    rectify=st.sampled_from(["none", "block", "query"]),
    mask_kind=st.sampled_from(["none", "per_batch", "per_head"]),
    memory=st.sampled_from(["contiguous", "transposed"]),
    dtype=st.sampled_from([torch.float16, torch.float32]),
)
def test_sparsity_zero_equals_dense_sdpa(
    seed, batch, heads, grid, text_len, text_first, block_size, rectify, mask_kind, memory, dtype
):
    generator = torch.Generator().manual_seed(seed)
    layout = token_layout(grid, text_len, text_first, block_size)
    query, key, value = make_inputs(
        generator, batch=batch, heads=heads, head_dim=32, layout=layout, dtype=dtype, memory=memory
    )
    mask = make_key_valid(generator, batch=batch, heads=heads, layout=layout, kind=mask_kind, masked_share=0.3)
    config = SparseAttentionConfig(block_size=block_size, tile_size=16, sparsity=0.0, rectify=rectify)
    out, plan = _run_case(query, key, value, mask, grid=grid, text_len=text_len, text_first=text_first, config=config)
    expected = F.scaled_dot_product_attention(
        query.double(), key.double(), value.double(), attn_mask=None if mask is None else mask
    )
    assert relative_error(out, expected) < _TOLERANCE[dtype]
    assert int(plan.trusted_counts.sum()) == 0
    if memory == "transposed" and heads > 1:
        assert out.transpose(1, 2).is_contiguous()  # the output follows the (B, S, H, D) memory order of the input


@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    grid=st.sampled_from(GRIDS),
    text_len=st.sampled_from([0, 5, 37]),
    text_first=st.booleans(),
    blocking=st.sampled_from([(16, 16), (32, 16), (32, 32)]),
    sparsity=st.floats(0.0, 0.95),
    mass_threshold=st.sampled_from([None, 0.5, 0.9]),
    neighbors=st.booleans(),
    gapr=st.booleans(),
    rectify=st.sampled_from(["none", "block", "query"]),
    mask_kind=st.sampled_from(["none", "per_batch", "per_head", "empty"]),
    gain=st.floats(0.5, 3.0),
    dtype=st.sampled_from([torch.float16, torch.float32]),
)
def test_sparse_pipeline_matches_reference(
    seed,
    batch,
    heads,
    grid,
    text_len,
    text_first,
    blocking,
    sparsity,
    mass_threshold,
    neighbors,
    gapr,
    rectify,
    mask_kind,
    gain,
    dtype,
):
    block_size, tile_size = blocking
    generator = torch.Generator().manual_seed(seed)
    layout = token_layout(grid, text_len, text_first, block_size)
    query, key, value = make_inputs(
        generator, batch=batch, heads=heads, head_dim=32, layout=layout, dtype=dtype, memory="transposed", gain=gain
    )
    mask = make_key_valid(generator, batch=batch, heads=heads, layout=layout, kind=mask_kind, masked_share=0.3)
    config = SparseAttentionConfig(
        block_size=block_size,
        tile_size=tile_size,
        sparsity=sparsity,
        mass_threshold=mass_threshold,
        neighbors=neighbors,
        gapr=gapr,
        rectify=rectify,
    )
    kwargs = dict(grid=grid, text_len=text_len, text_first=text_first, config=config)
    out, plan = _run_case(query, key, value, mask, **kwargs)
    expected, expected_plan = reference.sparse_attention_reference(
        query,
        key,
        value,
        video_grid=grid,
        text_len=text_len,
        text_first=text_first,
        attn_mask=mask,
        config=config,
        compute_dtype=torch.float64,
        return_plan=True,
    )
    assert relative_error(plan.block_scores, expected_plan.block_scores) < 2e-5
    on_plan, stats = _reference_on_plan(query, key, value, mask, layout, plan, config, 1.0 / math.sqrt(32))
    _check_plan_agrees(plan, expected_plan, stats, config)
    assert relative_error(out, on_plan) < _TOLERANCE[dtype]
    same_plan = torch.equal(plan.kv_indices, expected_plan.kv_indices) and torch.equal(
        plan.trusted_indices, expected_plan.trusted_indices
    )
    if same_plan:
        assert relative_error(out, expected) < _TOLERANCE[dtype]


def test_api_impl_triton_runs_the_pipeline():
    grid, text_len = (2, 5, 7), 5
    layout = token_layout(grid, text_len, False, 16)
    generator = torch.Generator().manual_seed(11)
    query, key, value = make_inputs(
        generator, batch=1, heads=2, head_dim=32, layout=layout, dtype=torch.float32, memory="contiguous"
    )
    config = SparseAttentionConfig(block_size=16, tile_size=16, sparsity=0.6, rectify="query", min_seq_len=0)
    out = spattn_compile.sparse_attention(
        query, key, value, video_grid=grid, text_len=text_len, config=config, impl="triton"
    )
    direct = triton_sparse_attention(
        query,
        key,
        value,
        video_grid=grid,
        text_len=text_len,
        text_first=False,
        attn_mask=None,
        scale=None,
        config=config,
    )
    assert torch.equal(out, direct)
    expected = reference.sparse_attention_reference(
        query, key, value, video_grid=grid, text_len=text_len, config=config, compute_dtype=torch.float64
    )
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("rectify", ["block", "query"])
def test_cached_plan_is_reused_with_fresh_statistics(rectify):
    """A plan from one call, reused on new inputs: the same blocks, the plan's scores for R and c (block mode), and
    statistics of the new inputs, as in the reference."""
    grid, text_len = (3, 5, 7), 13
    layout = token_layout(grid, text_len, True, 16)
    generator = torch.Generator().manual_seed(21)
    config = SparseAttentionConfig(block_size=16, tile_size=16, sparsity=0.7, rectify=rectify)
    kwargs = dict(video_grid=grid, text_len=text_len, text_first=True, attn_mask=None, scale=None, config=config)
    first = make_inputs(generator, batch=1, heads=2, head_dim=32, layout=layout, dtype=torch.float32, memory="sliced")
    second = make_inputs(generator, batch=1, heads=2, head_dim=32, layout=layout, dtype=torch.float32, memory="sliced")
    _, plan = triton_sparse_attention(*first, **kwargs, return_plan=True)
    with poisoned_allocations():
        out, used = triton_sparse_attention(*second, **kwargs, plan=plan, return_plan=True)
    assert used is plan
    expected = reference.sparse_attention_reference(
        *second,
        video_grid=grid,
        text_len=text_len,
        text_first=True,
        config=config,
        compute_dtype=torch.float64,
        plan=plan,
    )
    assert relative_error(out, expected) < 1e-5
    fresh = triton_sparse_attention(*second, **kwargs)
    assert relative_error(out, fresh) > 1e-4  # the reused plan, not a new one, was used
    wrong = reference.SparsePlan(
        plan.kv_counts[:, :1],
        plan.kv_indices[:, :1],
        plan.trusted_counts[:, :1],
        plan.trusted_indices[:, :1],
        plan.block_scores[:, :1],
        plan.num_video_blocks,
    )
    with pytest.raises(ValueError, match="plan"):
        triton_sparse_attention(*second, **kwargs, plan=wrong)


def test_density_override_changes_the_plan():
    grid = (3, 5, 7)
    layout = token_layout(grid, 0, False, 16)
    generator = torch.Generator().manual_seed(5)
    query, key, value = make_inputs(
        generator, batch=1, heads=1, head_dim=16, layout=layout, dtype=torch.float32, memory="contiguous"
    )
    config = SparseAttentionConfig(block_size=16, tile_size=16, sparsity=0.0, rectify="none")
    kwargs = dict(video_grid=grid, text_len=0, text_first=False, attn_mask=None, scale=None, config=config)
    _, dense_plan = triton_sparse_attention(query, key, value, **kwargs, return_plan=True)
    _, sparse_plan = triton_sparse_attention(query, key, value, **kwargs, density=0.3, return_plan=True)
    nb = layout.num_video_blocks
    assert dense_plan.kv_counts.tolist() == [[[nb] * nb]]
    budget = reference.block_budget(0.3, nb)
    assert sparse_plan.kv_counts.tolist() == [[[budget] * nb]]


def test_pipeline_rejects_bad_inputs():
    x = torch.randn(1, 1, 15, 16, dtype=torch.float64)
    config = SparseAttentionConfig(block_size=16, tile_size=16)
    kwargs = dict(video_grid=(1, 3, 5), text_len=0, text_first=False, attn_mask=None, scale=None, config=config)
    with pytest.raises(TypeError, match="float64"):
        triton_sparse_attention(x, x, x, **kwargs)
    y = x.float()
    with pytest.raises(ValueError, match="density"):
        triton_sparse_attention(y, y, y, **kwargs, density=1.5)
    with pytest.raises(TypeError, match="config"):
        triton_sparse_attention(y, y, y, **{**kwargs, "config": {"sparsity": 0.5}})


# --------------------------------------------------------------------------------------------------------------------
# GPU, real sizes, bfloat16
# --------------------------------------------------------------------------------------------------------------------

_GPU_CASES = {
    # Wan 2.1 1.3B 480p latent grid, two heads; no text.
    "wan480p": dict(grid=(21, 30, 52), text_len=0, text_first=False, text_padding=0),
    # CogVideoX-like: text first.
    "text_first": dict(grid=(9, 16, 16), text_len=77, text_first=True, text_padding=0),
    # HunyuanVideo-like: text last, padded (masked).
    "hunyuan": dict(grid=(8, 30, 40), text_len=256, text_first=False, text_padding=200),
}


def _gpu_inputs(case: dict, seed: int = 0):
    from spattn_compile.testing import video_attention_inputs

    return video_attention_inputs(
        case["grid"],
        heads=2,
        head_dim=128,
        text_len=case["text_len"],
        text_first=case["text_first"],
        text_padding=case["text_padding"],
        dtype=torch.bfloat16,
        device="cuda",
        seed=seed,
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("case", "rectify"), [("wan480p", "block"), ("wan480p", "query"), ("text_first", "block"), ("hunyuan", "query")]
)
def test_gpu_bf16_real_size_matches_float64_reference(case, rectify):
    spec = _GPU_CASES[case]
    inputs = _gpu_inputs(spec)
    config = SparseAttentionConfig(sparsity=0.8, mass_threshold=0.6, max_density=0.4, rectify=rectify)
    out, plan = _run_case(
        inputs.query,
        inputs.key,
        inputs.value,
        inputs.attn_mask,
        grid=spec["grid"],
        text_len=spec["text_len"],
        text_first=spec["text_first"],
        config=config,
    )
    expected, expected_plan = reference.sparse_attention_reference(
        inputs.query,
        inputs.key,
        inputs.value,
        **inputs.kwargs(),
        config=config,
        compute_dtype=torch.float64,
        return_plan=True,
    )
    layout = token_layout(spec["grid"], spec["text_len"], spec["text_first"], config.block_size)
    # tf32x3 products: about float32 accuracy.
    assert relative_error(plan.block_scores, expected_plan.block_scores) < 1e-4
    on_plan, stats = _reference_on_plan(
        inputs.query, inputs.key, inputs.value, inputs.attn_mask, layout, plan, config, 1.0 / math.sqrt(128)
    )
    _check_plan_agrees(plan, expected_plan, stats, config)
    assert relative_error(out, on_plan) < _TOLERANCE[torch.bfloat16]
    dense = reference.dense_attention(inputs.query, inputs.key, inputs.value, inputs.attn_mask)
    # Sanity of the plan itself: sparse, and closer to dense than the reference's float64 output is off by far.
    assert float(plan.density().mean()) < 0.5
    assert relative_error(out, dense) < relative_error(expected.double(), dense) + 2e-2


@pytest.mark.gpu
def test_gpu_sparsity_zero_equals_dense():
    spec = _GPU_CASES["hunyuan"]
    inputs = _gpu_inputs(spec, seed=1)
    config = SparseAttentionConfig(sparsity=0.0)
    out, _ = _run_case(
        inputs.query,
        inputs.key,
        inputs.value,
        inputs.attn_mask,
        grid=spec["grid"],
        text_len=spec["text_len"],
        text_first=spec["text_first"],
        config=config,
    )
    dense = reference.dense_attention(inputs.query, inputs.key, inputs.value, inputs.attn_mask)
    assert relative_error(out, dense) < _TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_pipeline_captures_in_a_cuda_graph_and_stays_small():
    """No host synchronisation: the whole pipeline records into a CUDA graph, and its replay on new inputs equals an
    eager run. Its peak extra memory is far below one S x S score matrix."""
    spec = _GPU_CASES["wan480p"]
    first, second = _gpu_inputs(spec, seed=2), _gpu_inputs(spec, seed=3)
    config = SparseAttentionConfig(sparsity=0.8, rectify="block")
    kwargs = dict(video_grid=spec["grid"], text_len=0, text_first=False, attn_mask=None, scale=None, config=config)
    static = [t.clone() for t in (first.query, first.key, first.value)]
    triton_sparse_attention(*static, **kwargs)  # warm-up: compiles, autotunes and caches the layout
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = triton_sparse_attention(*static, **kwargs)
    for buffer, new in zip(static, (second.query, second.key, second.value)):
        buffer.copy_(new)
    graph.replay()
    eager = triton_sparse_attention(second.query, second.key, second.value, **kwargs)
    torch.cuda.synchronize()
    assert torch.equal(graph_out, eager)

    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = triton_sparse_attention(second.query, second.key, second.value, **kwargs)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    batch, heads, seq_len, head_dim = out.shape
    one_score_matrix = batch * heads * seq_len * seq_len * 2
    assert extra < one_score_matrix / 8
