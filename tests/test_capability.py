"""One capability rule (`spattn_compile.capability`) for the pass, the op and the API: which dtypes, head dims and
devices the sparse attention runs on, and the reason when it does not; calls that are not capable stay dense with
that reason in explain()."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from helpers import SETTINGS, TinyVideoAttention, compile_spattn, tiny_inputs
from torch._subclasses.fake_tensor import FakeTensorMode

import spattn_compile
from spattn_compile import capability
from spattn_compile.passes import analyze_attention
from spattn_compile.passes.token_axes import Factor, GridSpan, TokenAxis
from spattn_compile.testing import relative_error

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (8, 15, 16, 24, 32, 48, 64, 72, 80, 96, 100, 128, 160, 256, 264, 512)


def _kernels_take(head_dim: int) -> bool:
    return 16 <= head_dim <= 256 and head_dim % 8 == 0


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [*KERNEL_DTYPES, torch.float64])
def test_cuda_rule(dtype, head_dim):
    result = capability.check_capability(dtype, head_dim, "cuda")
    expected = dtype in KERNEL_DTYPES and _kernels_take(head_dim) and capability.triton_available()
    assert bool(result) == expected and result.implementation == "triton"
    if not expected:
        assert result.reason, result
        if dtype == torch.float64:
            assert "CPU" in result.reason
        elif not _kernels_take(head_dim):
            assert f"head dim {head_dim}" in result.reason and "D % 8 == 0" in result.reason
    assert (capability.kernel_limits(dtype, head_dim) is None) == (dtype in KERNEL_DTYPES and _kernels_take(head_dim))


@pytest.mark.parametrize("head_dim", [1, 8, 80, 1000])
@pytest.mark.parametrize("dtype", [*KERNEL_DTYPES, torch.float64])
def test_cpu_runs_the_reference_for_every_float_dtype_and_head_dim(dtype, head_dim):
    result = capability.check_capability(dtype, head_dim, torch.device("cpu"))
    assert result and result.implementation == "reference" and result.reason == ""


@pytest.mark.parametrize(
    "dtype, head_dim, device, words",
    [
        (torch.int32, 64, "cpu", "not a float dtype"),
        (torch.float16, 64, "mps", "device 'mps'"),
        (torch.float16, 64, "meta", "device 'meta'"),
    ],
)
def test_other_inputs_are_not_capable_and_say_why(dtype, head_dim, device, words):
    result = capability.check_capability(dtype, head_dim, device)
    assert not result and words in result.reason


def test_missing_triton_is_the_reason_on_cuda(monkeypatch):
    monkeypatch.setattr(capability, "triton_available", lambda: False)
    result = capability.check_capability(torch.float16, 64, "cuda")
    assert not result and "Triton is not installed" in result.reason


@pytest.mark.parametrize(
    "arguments, error, words",
    [
        (("float16", 64, "cuda"), TypeError, "dtype"),
        ((torch.float16, 0, "cuda"), ValueError, "head_dim"),
        ((torch.float16, 64.0, "cuda"), ValueError, "head_dim"),
        ((torch.float16, True, "cuda"), ValueError, "head_dim"),
    ],
)
def test_bad_arguments_raise_naming_them(arguments, error, words):
    with pytest.raises(error, match=words):
        capability.check_capability(*arguments)


@pytest.mark.parametrize("head_dim, padded", [(16, 16), (24, 32), (64, 64), (80, 128), (96, 128), (136, 256)])
def test_padded_head_dim_is_the_next_power_of_two(head_dim, padded):
    assert capability.padded_head_dim(head_dim) == padded


def _fake_attention_graph(dtype: torch.dtype, head_dim: int, device: str) -> tuple[fx.Graph, dict]:
    """An SDPA over fake (B, H, S, D) tensors of `dtype` on `device` (no GPU needed), with a (3, 4, 6) video grid
    seeded on the sequence dim."""
    graph = fx.Graph()
    with FakeTensorMode(allow_non_fake_inputs=True):
        value = torch.empty(1, 2, 72, head_dim, dtype=dtype, device=device)
    nodes = []
    for name in ("q", "k", "v"):
        node = graph.placeholder(name)
        node.meta["example_value"] = value
        nodes.append(node)
    out = graph.call_function(F.scaled_dot_product_attention, tuple(nodes))
    out.meta["example_value"] = value
    graph.output(out)
    grid = TokenAxis((GridSpan(tuple(Factor(size) for size in (3, 4, 6))),))
    return graph, {node: {2: grid} for node in nodes}


@pytest.mark.parametrize("head_dim", [48, 64, 80, 96, 100, 128, 264])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_the_pass_keeps_calls_the_kernels_cannot_run_dense_with_the_reason(dtype, head_dim):
    graph, seeds = _fake_attention_graph(dtype, head_dim, "cuda")
    [decision] = analyze_attention(graph, spattn_compile.SparseAttentionConfig(**SETTINGS), seeds=seeds)
    expected = capability.check_capability(dtype, head_dim, "cuda")
    assert decision.sparse == bool(expected), decision
    if not expected:
        assert decision.rule == "capability" and decision.reason == expected.reason
    graph, seeds = _fake_attention_graph(dtype, head_dim, "cpu")
    [decision] = analyze_attention(graph, spattn_compile.SparseAttentionConfig(**SETTINGS), seeds=seeds)
    assert decision.sparse, "the CPU reference takes every float dtype and head dim"


def test_explain_and_the_op_use_the_same_rule(monkeypatch):
    # Pretend the CPU could not run the sparse attention: the pass leaves the call dense with the reason, and a
    # compiled call of an already rewritten graph runs dense, recorded as "capability".
    model = TinyVideoAttention()
    inputs = tiny_inputs(3, 8, 12, 5)
    compiled = compile_spattn(model, sparsity=0.75)
    with torch.no_grad():
        compiled(*inputs)

    def nothing_runs(dtype, head_dim, device):
        return capability.Capability(False, "reference", f"no sparse attention for head dim {head_dim} here")

    from spattn_compile.passes import attention
    from spattn_compile.runtime import op

    monkeypatch.setattr(op, "check_capability", nothing_runs)
    with torch.no_grad():
        out = compiled(*inputs)
    monkeypatch.setattr(attention, "check_capability", nothing_runs)
    with torch.no_grad(), spattn_compile.config(**SETTINGS):
        [decision] = spattn_compile.explain(model, *inputs).decisions
    assert not decision.sparse and decision.rule == "capability" and "head dim 16" in decision.reason
    torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-5)
    assert [r.kind for r in spattn_compile.report().records] == ["sparse", "capability"]
    assert math.isclose(spattn_compile.report().records[1].density, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# On a GPU: the head dims the rule allows run through the Triton kernels
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_kernels_run_every_head_dim_the_rule_allows_at_a_real_shape_in_bf16(head_dim):
    assert capability.check_capability(torch.bfloat16, head_dim, "cuda")
    grid, text_len = (8, 30, 52), 64  # 12,480 video tokens: Wan 2.1 1.3B's 480p grid, 8 of its 21 frames
    seq_len = math.prod(grid) + text_len
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, seq_len, head_dim, generator=g, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
    arguments = dict(video_grid=grid, text_len=text_len)
    with spattn_compile.config(sparsity=0.0):
        exact = spattn_compile.sparse_attention(q, k, v, impl="triton", **arguments)
    assert relative_error(exact, F.scaled_dot_product_attention(q, k, v)) < 2e-2
    with spattn_compile.config(sparsity=0.75):
        plan = spattn_compile.select_plan(q, k, v, impl="triton", **arguments)
        sparse = spattn_compile.sparse_attention(q, k, v, impl="triton", plan=plan, **arguments)
        # The reference on the kernels' plan: on random inputs many blocks score alike, and bfloat16 products may
        # break those ties otherwise than float64 (selection against the reference is tested on video-like inputs
        # in test_kernel_pipeline.py).
        expected = spattn_compile.sparse_attention(
            q.float(), k.float(), v.float(), impl="reference", plan=plan, **arguments
        )
    assert float(plan.density().mean()) < 0.5
    assert sparse.dtype == torch.bfloat16 and torch.isfinite(sparse).all()
    assert relative_error(sparse, expected) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [80, 96])
def test_a_compiled_model_with_head_dim_80_or_96_runs_sparse_on_cuda(head_dim):
    model = TinyVideoAttention(heads=2, head_dim=head_dim).cuda().to(torch.bfloat16)
    video, text = (t.cuda().to(torch.bfloat16) for t in tiny_inputs(3, 8, 12, 5))
    with torch.no_grad(), spattn_compile.config(**SETTINGS):
        [decision] = spattn_compile.explain(model, video, text).decisions
        out = compile_spattn(model, compiler="inductor", sparsity=0.5)(video, text)
    assert decision.sparse, decision
    assert torch.isfinite(out).all()
    assert [r.kind for r in spattn_compile.report().records] == ["sparse"]
