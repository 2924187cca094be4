"""The Triton implementation (`implementations.triton.TritonImplementation` through `attention.SparseAttention`,
`sparse_attention(..., impl="triton")`) against the float64 reference (`ReferenceImplementation(torch.float64)`) and
dense SDPA.

CPU tests run every kernel under the Triton interpreter on small prime-sided grids, float16/float32, every estimator.
The plan is compared with the reference's: exactly, or, where two blocks' scores agree to the scores' rounding and the
selections differ, by the selected mass. The output is compared with the reference attention evaluated on the kernel's
own plan, so that a near-tie in the selection cannot hide an error of the attention. `gpu` tests run bfloat16 at real
video sizes on CUDA, with the reference in float64 on the GPU.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import (
    make_inputs,
    make_key_valid,
    poisoned_allocations,
    reference_call,
    score_tolerance,
    sparse_call,
    triton_implementation,
)

import spattn_compile
from spattn_compile import reference, select_plan, sparse_attention
from spattn_compile.config import SparseAttentionConfig
from spattn_compile.estimators import PooledTiles, QueryTiles, SampledRows
from spattn_compile.layout import token_layout
from spattn_compile.plan import block_budget
from spattn_compile.testing import relative_error
from spattn_compile.testing.strategies import head_dims, kernel_grids, rectify_modes, seeds

_TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
ESTIMATORS = (PooledTiles(16, outliers=True), PooledTiles(16, outliers=False), SampledRows(4), QueryTiles(16))


def _reference_on_plan(query, key, value, attn_mask, plan, config, scale=None):
    """Float64 reference attention (with rectification) of the inputs as given, on a given plan."""
    return reference_call(query, key, value, attn_mask, plan.layout, config, scale).run(plan)


def _reference_plan(query, key, value, attn_mask, layout, config, scale=None):
    call = reference_call(query, key, value, attn_mask, layout, config, scale)
    plan = call.plan()
    assert call.prepared is not None
    return plan, call.prepared.stats


def _check_plan_agrees(plan, expected, stats, score_error: float) -> None:
    """Equal plans, or plans whose differences are near-ties: equal kept mass under the reference scores (up to the
    scores' own error), and trusted blocks that differ only where the kept blocks differ or GAPR's test is a
    near-tie."""
    nb = expected.num_video_blocks
    keep, keep_expected = plan.to_dense(), expected.to_dense()
    scores = expected.block_scores.double()
    mass = (scores[..., :nb] * keep[..., :nb, :nb]).sum(-1)
    mass_expected = (scores[..., :nb] * keep_expected[..., :nb, :nb]).sum(-1)
    assert (mass - mass_expected).abs().max() <= 4 * score_error + 1e-6
    assert torch.equal(keep[..., nb:, :], keep_expected[..., nb:, :])  # text query rows keep every non-empty block
    trusted_differs = plan.trusted_mask() != expected.trusted_mask()
    if trusted_differs.any():
        q, dq, k, dk = stats.q_block, stats.q_block_mad, stats.k_block, stats.k_block_mad
        gain = (q @ k.transpose(-1, -2)).abs()
        error = (dq @ k.transpose(-1, -2)).abs() + (q @ dk.transpose(-1, -2)).abs()
        near_tie = (gain - error).abs() <= 1e-4 * (gain + error)
        explained = (keep != keep_expected)[..., :nb, :nb] | near_tie
        assert not (trusted_differs[..., :nb, :] & ~explained).any()


def _run_triton(query, key, value, attn_mask, *, grid, text_len, text_first, config, scale=None):
    layout = token_layout(grid, text_len, text_first, config.block_size, config.reorder)
    with poisoned_allocations():
        call = sparse_call(query, key, value, attn_mask, layout, config, triton_implementation(), scale)
        plan = call.plan()
        out = call.run(plan)
    assert out.shape == query.shape and out.dtype == query.dtype
    assert torch.isfinite(out).all(), "an output row was not written (poisoned with NaN)"
    return out, plan


# --------------------------------------------------------------------------------------------------------------------
# CPU (Triton interpreter)
# --------------------------------------------------------------------------------------------------------------------


@settings(max_examples=8)
@given(
    seed=seeds(),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    head_dim=head_dims(),
    grid=kernel_grids(),
    text_len=st.sampled_from([0, 5, 37]),
    text_first=st.booleans(),
    block_size=st.sampled_from([16, 32]),
    estimator=st.sampled_from(ESTIMATORS),
    rectify=rectify_modes(),
    mask_kind=st.sampled_from(["none", "per_batch", "per_head"]),
    memory=st.sampled_from(["contiguous", "transposed"]),
    dtype=st.sampled_from([torch.float16, torch.float32]),
)
def test_sparsity_zero_equals_dense_sdpa(
    seed, batch, heads, head_dim, grid, text_len, text_first, block_size, estimator, rectify, mask_kind, memory, dtype
):
    generator = torch.Generator().manual_seed(seed)
    layout = token_layout(grid, text_len, text_first, block_size)
    query, key, value = make_inputs(
        generator, batch=batch, heads=heads, head_dim=head_dim, layout=layout, dtype=dtype, memory=memory
    )
    mask = make_key_valid(generator, batch=batch, heads=heads, layout=layout, kind=mask_kind, masked_share=0.3)
    config = SparseAttentionConfig(block_size=block_size, estimator=estimator, sparsity=0.0, rectify=rectify)
    out, plan = _run_triton(query, key, value, mask, grid=grid, text_len=text_len, text_first=text_first, config=config)
    expected = F.scaled_dot_product_attention(query.double(), key.double(), value.double(), attn_mask=mask)
    assert relative_error(out, expected) < _TOLERANCE[dtype]
    assert int(plan.trusted_counts.sum()) == 0
    assert out.stride() == query.stride()  # the query's memory order


@settings(max_examples=20)
@given(
    seed=seeds(),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    head_dim=head_dims(),
    grid=kernel_grids(),
    text_len=st.sampled_from([0, 5, 37]),
    text_first=st.booleans(),
    block_size=st.sampled_from([16, 32]),
    estimator=st.sampled_from(ESTIMATORS),
    sparsity=st.floats(0.0, 0.95),
    mass_threshold=st.sampled_from([None, 0.5, 0.9]),
    neighbors=st.booleans(),
    gapr=st.booleans(),
    rectify=rectify_modes(),
    mask_kind=st.sampled_from(["none", "per_batch", "per_head", "empty"]),
    gain=st.floats(0.5, 3.0),
    dtype=st.sampled_from([torch.float16, torch.float32]),
)
def test_sparse_pipeline_matches_reference(
    seed, batch, heads, head_dim, grid, text_len, text_first, block_size, estimator, sparsity, mass_threshold,
    neighbors, gapr, rectify, mask_kind, gain, dtype,
):  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    layout = token_layout(grid, text_len, text_first, block_size)
    query, key, value = make_inputs(
        generator, batch=batch, heads=heads, head_dim=head_dim, layout=layout, dtype=dtype, memory="transposed",
        gain=gain,
    )  # fmt: skip
    mask = make_key_valid(generator, batch=batch, heads=heads, layout=layout, kind=mask_kind, masked_share=0.3)
    config = SparseAttentionConfig(
        block_size=block_size,
        estimator=estimator,
        sparsity=sparsity,
        mass_threshold=mass_threshold,
        neighbors=neighbors,
        gapr=gapr,
        rectify=rectify,
    )
    out, plan = _run_triton(query, key, value, mask, grid=grid, text_len=text_len, text_first=text_first, config=config)
    expected_plan, stats = _reference_plan(query, key, value, mask, layout, config)
    assert plan.estimator == expected_plan.estimator == estimator.name
    tolerance = score_tolerance(estimator, dtype)
    assert relative_error(plan.block_scores, expected_plan.block_scores) < tolerance
    score_error = float((plan.block_scores.double() - expected_plan.block_scores).abs().max())
    _check_plan_agrees(plan, expected_plan, stats, score_error)
    on_plan = _reference_on_plan(query, key, value, mask, plan, config)
    assert relative_error(out, on_plan) < _TOLERANCE[dtype]
    same_plan = torch.equal(plan.kv_indices, expected_plan.kv_indices) and torch.equal(
        plan.trusted_indices, expected_plan.trusted_indices
    )
    if same_plan:
        expected = _reference_on_plan(query, key, value, mask, expected_plan, config)
        assert relative_error(out, expected) < _TOLERANCE[dtype]


def test_api_impl_triton_runs_the_pipeline():
    grid, text_len = (2, 5, 7), 5
    layout = token_layout(grid, text_len, False, 16)
    generator = torch.Generator().manual_seed(11)
    query, key, value = make_inputs(generator, batch=1, heads=2, head_dim=24, layout=layout, dtype=torch.float32)
    config = SparseAttentionConfig(block_size=16, sparsity=0.6, rectify="query", min_seq_len=0)
    out = sparse_attention(query, key, value, video_grid=grid, text_len=text_len, config=config, impl="triton")
    call = sparse_call(query, key, value, None, layout, config, triton_implementation())
    plan = call.plan()
    direct = call.run(plan)
    assert torch.equal(out, direct)
    expected_plan, _ = _reference_plan(query, key, value, None, layout, config)
    assert torch.equal(plan.kv_indices, expected_plan.kv_indices)
    expected = _reference_on_plan(query, key, value, None, expected_plan, config)
    assert relative_error(out, expected) < 1e-5
    # The float32 reference path agrees to float32 rounding.
    ref = sparse_attention(query, key, value, video_grid=grid, text_len=text_len, config=config, impl="reference")
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("rectify", ["block", "query"])
def test_cached_plan_is_reused_with_fresh_statistics(rectify):
    """A plan from one call, reused on new inputs: the same blocks, the plan's scores for R and c (block mode), and
    statistics of the new inputs, as in the reference."""
    grid, text_len = (3, 5, 7), 13
    layout = token_layout(grid, text_len, True, 16)
    generator = torch.Generator().manual_seed(21)
    config = SparseAttentionConfig(block_size=16, sparsity=0.7, rectify=rectify, min_seq_len=0)
    kwargs = dict(video_grid=grid, text_len=text_len, text_first=True, config=config, impl="triton")
    first = make_inputs(generator, batch=1, heads=2, head_dim=32, layout=layout, dtype=torch.float32, memory="sliced")
    second = make_inputs(generator, batch=1, heads=2, head_dim=32, layout=layout, dtype=torch.float32, memory="sliced")
    plan = select_plan(*first, **kwargs)
    with poisoned_allocations():
        out = sparse_attention(*second, **kwargs, plan=plan)
    expected = _reference_on_plan(*second, None, plan, config)
    assert relative_error(out, expected) < 1e-5
    fresh = sparse_attention(*second, **kwargs)
    assert relative_error(out, fresh) > 1e-4  # the reused plan, not a new one, was used
    wrong = dataclasses.replace(plan, **{n: getattr(plan, n)[:, :1] for n in ("kv_counts", "kv_indices")})
    with pytest.raises(ValueError, match="plan is for batch=1, heads=1; this call has batch=1, heads=2"):
        sparse_attention(*second, **kwargs, plan=wrong)


def test_density_override_changes_the_plan():
    grid = (3, 5, 7)
    layout = token_layout(grid, 0, False, 16)
    generator = torch.Generator().manual_seed(5)
    query, key, value = make_inputs(generator, batch=1, heads=1, head_dim=16, layout=layout, dtype=torch.float32)
    config = SparseAttentionConfig(block_size=16, sparsity=0.0, rectify="none")
    call = sparse_call(query, key, value, None, layout, config, triton_implementation())
    dense_plan = call.plan()
    at_density = dataclasses.replace(call.selection, density=0.3)
    sparse_plan = call.plan(selection=at_density)
    nb = layout.num_video_blocks
    assert dense_plan.kv_counts.tolist() == [[[nb] * nb]]
    budget = block_budget(0.3, nb)
    assert sparse_plan.kv_counts.tolist() == [[[budget] * nb]]
    # The estimator override (the op's exact plan of the last dense step) names its origin.
    exact = call.plan(selection=at_density, estimator=SampledRows(rows=16), label="exact")
    assert exact.estimator == "exact"
    truth = reference.attention_block_mass(query, key, layout)
    assert relative_error(exact.block_scores, truth) < 2e-6


@pytest.mark.parametrize("memory", ["contiguous", "transposed", "sliced"])
def test_output_has_the_query_memory_order(memory):
    grid = (2, 3, 5)
    layout = token_layout(grid, 7, False, 16)
    generator = torch.Generator().manual_seed(2)
    query, key, value = make_inputs(
        generator, batch=2, heads=3, head_dim=24, layout=layout, dtype=torch.float32, memory=memory
    )
    config = SparseAttentionConfig(block_size=16, sparsity=0.5, min_seq_len=0)
    out = sparse_attention(query, key, value, video_grid=grid, text_len=7, config=config, impl="triton")
    expected_strides = {
        "contiguous": query.stride(),
        "transposed": query.stride(),
        # A slice of wider rows: the output is dense, in the same dimension order.
        "sliced": torch.empty(2, 3, layout.seq_len, 24).stride(),
    }[memory]
    assert out.stride() == expected_strides
    ref = sparse_attention(query, key, value, video_grid=grid, text_len=7, config=config, impl="reference")
    assert ref.stride() == expected_strides
    assert relative_error(out, ref) < 1e-5


def test_pipeline_rejects_bad_inputs():
    x = torch.randn(1, 1, 15, 16, dtype=torch.float64)
    config = SparseAttentionConfig(block_size=16, min_seq_len=0)
    with pytest.raises(ValueError, match="impl='triton' cannot run this call: dtype torch.float64 is not supported"):
        sparse_attention(x, x, x, video_grid=(1, 3, 5), config=config, impl="triton")
    with pytest.raises(TypeError, match="query must be float16, bfloat16 or float32, got torch.float64"):
        triton_implementation().prepare(x, x, x, token_layout((1, 3, 5), 0, False, 16), None, 16, 0.25)
    z = torch.randn(1, 1, 15, 12)
    with pytest.raises(ValueError, match="impl='triton' cannot run this call: head dim 12 is not supported"):
        sparse_attention(z, z, z, video_grid=(1, 3, 5), config=config, impl="triton")
    y = x.float()
    layout = token_layout((1, 3, 5), 0, False, 16)
    with pytest.raises(ValueError, match="density must be a number in"):
        call = sparse_call(y, y, y, None, layout, config, triton_implementation())
        call.plan(selection=dataclasses.replace(call.selection, density=1.5))


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


def _gpu_inputs(case: dict, seed: int = 0, heads: int = 2, head_dim: int = 128):
    from spattn_compile.testing import video_attention_inputs

    return video_attention_inputs(
        case["grid"],
        heads=heads,
        head_dim=head_dim,
        text_len=case["text_len"],
        text_first=case["text_first"],
        text_padding=case["text_padding"],
        dtype=torch.bfloat16,
        device="cuda",
        seed=seed,
    )


def _block_agreement(plan, expected) -> float:
    """Share of the reference's kept video blocks that the kernel's plan keeps too."""
    nb = expected.num_video_blocks
    keep, keep_expected = plan.to_dense()[..., :nb, :nb], expected.to_dense()[..., :nb, :nb]
    return float((keep & keep_expected).sum() / keep_expected.sum())


@pytest.mark.gpu
@pytest.mark.parametrize("estimator", [PooledTiles(), SampledRows(), QueryTiles()], ids=lambda e: e.name)
def test_gpu_bf16_hard_inputs_every_estimator(estimator):
    """The hard generator at a real shape (9 x 30 x 52 + 256 text tokens, 128 of them padding, 4 heads, D=128),
    bfloat16: the kernel's scores and plan against the float64 reference, and its attention on its own plan."""
    from spattn_compile.testing import dit_attention_inputs

    grid, text_len = (9, 30, 52), 256
    inputs = dit_attention_inputs(
        grid, heads=4, head_dim=128, text_len=text_len, text_padding=128, dtype=torch.bfloat16, device="cuda", seed=0
    )
    config = SparseAttentionConfig(estimator=estimator, sparsity=0.8, rectify="query")
    layout = token_layout(grid, text_len, False, config.block_size)
    q, k, v = inputs.query, inputs.key, inputs.value
    out, plan = _run_triton(q, k, v, inputs.attn_mask, grid=grid, text_len=text_len, text_first=False, config=config)
    expected_plan, _ = _reference_plan(q, k, v, inputs.attn_mask, layout, config)
    score_error = relative_error(plan.block_scores, expected_plan.block_scores)
    agreement = _block_agreement(plan, expected_plan)
    on_plan = _reference_on_plan(q, k, v, inputs.attn_mask, plan, config)
    error = relative_error(out, on_plan)
    print(f"{estimator}: scores {score_error:.2e}, block agreement {agreement:.4f}, attention {error:.2e}")
    assert score_error < 2e-2
    assert agreement > 0.99
    assert error < 3e-3


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("case", "rectify"), [("wan480p", "block"), ("wan480p", "query"), ("text_first", "block"), ("hunyuan", "query")]
)
def test_gpu_bf16_real_size_matches_float64_reference(case, rectify):
    spec = _GPU_CASES[case]
    inputs = _gpu_inputs(spec)
    config = SparseAttentionConfig(sparsity=0.8, mass_threshold=0.6, max_density=0.4, rectify=rectify)
    grid, text_len, text_first = spec["grid"], spec["text_len"], spec["text_first"]
    q, k, v, mask = inputs.query, inputs.key, inputs.value, inputs.attn_mask
    out, plan = _run_triton(q, k, v, mask, grid=grid, text_len=text_len, text_first=text_first, config=config)
    layout = token_layout(grid, text_len, text_first, config.block_size)
    expected_plan, stats = _reference_plan(q, k, v, mask, layout, config)
    # The pooled estimator multiplies tile means rounded to bfloat16 (2^-8 relative): a few 1e-3 at most.
    assert relative_error(plan.block_scores, expected_plan.block_scores) < 1e-2
    score_error = float((plan.block_scores.double() - expected_plan.block_scores).abs().max())
    _check_plan_agrees(plan, expected_plan, stats, score_error)
    on_plan = _reference_on_plan(q, k, v, mask, plan, config)
    assert relative_error(out, on_plan) < _TOLERANCE[torch.bfloat16]
    dense = reference.dense_attention(q, k, v, mask)
    expected = _reference_on_plan(q, k, v, mask, expected_plan, config)
    # Sanity of the plan itself: sparse, and about as close to dense as the reference's float64 output.
    assert float(plan.density().mean()) < 0.5
    assert relative_error(out, dense) < relative_error(expected, dense) + 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [80, 96])
def test_gpu_bf16_pipeline_head_dims_80_and_96(head_dim):
    spec = _GPU_CASES["text_first"]
    inputs = _gpu_inputs(spec, seed=3, heads=4, head_dim=head_dim)
    config = SparseAttentionConfig(sparsity=0.75)
    q, k, v = inputs.query, inputs.key, inputs.value
    out, plan = _run_triton(q, k, v, None, grid=spec["grid"], text_len=77, text_first=True, config=config)
    on_plan = _reference_on_plan(q, k, v, None, plan, config)
    error = relative_error(out, on_plan)
    print(f"bf16 D={head_dim}: relative error {error:.2e}")
    assert error < 3e-3


@pytest.mark.gpu
def test_gpu_output_strides_follow_a_transposed_query():
    """A (B, S, H, D) projection viewed as (B, H, S, D): the output of `sparse_attention` and of the op (real and
    fake) has the query's strides, so the caller's transpose back is free."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    grid, text_len = (9, 16, 16), 77
    seq_len = math.prod(grid) + text_len
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, seq_len, 4, 128, generator=generator, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        for _ in range(3)
    )
    config = SparseAttentionConfig(sparsity=0.75, min_seq_len=0)
    out = sparse_attention(q, k, v, video_grid=grid, text_len=text_len, config=config, impl="triton")
    assert out.stride() == q.stride()
    with spattn_compile.config(config):
        op_out = torch.ops.spattn.sparse_attention(q, k, v, list(grid), text_len, False, None, None, -1)
        with FakeTensorMode() as mode:
            fake = torch.ops.spattn.sparse_attention(
                mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(v), list(grid), text_len, False, None,
                None, -1,
            )  # fmt: skip
    assert op_out.stride() == q.stride() and fake.stride() == q.stride()
    assert torch.equal(op_out, out)


@pytest.mark.gpu
def test_gpu_sparsity_zero_equals_dense():
    spec = _GPU_CASES["hunyuan"]
    inputs = _gpu_inputs(spec, seed=1)
    config = SparseAttentionConfig(sparsity=0.0)
    out, _ = _run_triton(
        inputs.query, inputs.key, inputs.value, inputs.attn_mask, grid=spec["grid"], text_len=spec["text_len"],
        text_first=spec["text_first"], config=config,
    )  # fmt: skip
    dense = reference.dense_attention(inputs.query, inputs.key, inputs.value, inputs.attn_mask)
    assert relative_error(out, dense) < _TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "estimator",
    [PooledTiles(), SampledRows(), QueryTiles()],
    ids=lambda e: e.name,
)
def test_gpu_pipeline_captures_in_a_cuda_graph_and_stays_small(estimator):
    """No host synchronisation: the whole pipeline records into a CUDA graph, and its replay on new inputs equals an
    eager run. Its peak extra memory is far below one S x S score matrix."""
    spec = _GPU_CASES["wan480p"]
    first, second = _gpu_inputs(spec, seed=2), _gpu_inputs(spec, seed=3)
    config = SparseAttentionConfig(sparsity=0.8, rectify="block", estimator=estimator, min_seq_len=0)
    kwargs = dict(video_grid=spec["grid"], config=config, impl="triton")
    static = [t.clone() for t in (first.query, first.key, first.value)]
    sparse_attention(*static, **kwargs)  # warm-up: compiles, autotunes and caches the layout
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = sparse_attention(*static, **kwargs)
    for buffer, new in zip(static, (second.query, second.key, second.value)):
        buffer.copy_(new)
    graph.replay()
    eager = sparse_attention(second.query, second.key, second.value, **kwargs)
    torch.cuda.synchronize()
    assert torch.equal(graph_out, eager)

    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = sparse_attention(second.query, second.key, second.value, **kwargs)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    batch, heads, seq_len, head_dim = out.shape
    one_score_matrix = batch * heads * seq_len * seq_len * 2
    assert extra < one_score_matrix / 8


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(_GPU_CASES))
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=str)
def test_gpu_bf16_planning_in_the_callers_layout_matches_float64_reference(case, estimator):
    """Planning in bfloat16 at real sizes, Q/K/V as (B, S, H, D)-strided views read in place: the reference's plan up
    to near-ties of the scores."""
    spec = _GPU_CASES[case]
    inputs = _gpu_inputs(spec)
    q, k, v, mask = (inputs.query, inputs.key, inputs.value, inputs.attn_mask)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    config = SparseAttentionConfig(sparsity=0.8, estimator=estimator, mass_threshold=0.6, max_density=0.4)
    layout = token_layout(spec["grid"], spec["text_len"], spec["text_first"], config.block_size)
    plan = sparse_call(q, k, v, mask, layout, config, triton_implementation()).plan()
    expected_plan, stats = _reference_plan(q, k, v, mask, layout, config)
    assert relative_error(plan.block_scores, expected_plan.block_scores) < 1e-2
    score_error = float((plan.block_scores.double() - expected_plan.block_scores).abs().max())
    _check_plan_agrees(plan, expected_plan, stats, score_error)
