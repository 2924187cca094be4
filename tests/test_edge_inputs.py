"""Edge inputs as SDPA treats them (issue 13 items 1 and 8): NumPy scalars wherever Python numbers are accepted, masks
by SDPA's broadcasting rules, an empty batch, and the output's memory order (the query's) for both implementations
and for `torch.ops.spattn.sparse_attention` (real and fake), which passes `torch.library.opcheck`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spattn_compile
from spattn_compile import SparseAttentionConfig, select_plan, sparse_attention
from spattn_compile.testing import dit_attention_inputs, relative_error

GRID, TEXT = (2, 3, 5), 7
SEQ = 37
IMPLS = ["reference", "triton"]


def qkv(batch=2, heads=2, dim=16, dtype=torch.float32, seed=0, layout="bhsd"):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, SEQ, heads, dim) if layout == "bshd" else (batch, heads, SEQ, dim)
    tensors = tuple(torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3))
    return tuple(t.transpose(1, 2) for t in tensors) if layout == "bshd" else tensors


# --------------------------------------------------------------------------------------------------------------------
# NumPy scalars
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_numpy_scalars_are_accepted_like_python_numbers(impl):
    q, k, v = qkv(seed=1)
    plain = SparseAttentionConfig(block_size=16, sparsity=0.5, mass_threshold=0.8, max_density=0.75, min_seq_len=0)
    numpy_config = SparseAttentionConfig(
        block_size=np.int64(16),
        sparsity=np.float32(0.5),
        mass_threshold=np.float64(0.8),
        max_density=np.float32(0.75),
        min_seq_len=np.int32(0),
    )
    assert numpy_config == plain
    expected = sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, scale=0.3, config=plain, impl=impl)
    numpy_grid = (np.int64(2), np.int32(3), np.int16(5))
    for scale in (np.float32(0.3), np.float64(0.3)):
        out = sparse_attention(
            q, k, v, video_grid=numpy_grid, text_len=np.int64(TEXT), scale=scale, config=numpy_config, impl=impl
        )
        # np.float32(0.3) is not 0.3: compare at the scale's own precision.
        assert relative_error(out, expected) < 1e-6
    plan = select_plan(q, k, v, video_grid=numpy_grid, text_len=np.uint8(TEXT), config=numpy_config, impl=impl)
    assert plan.layout.video_grid == GRID and all(type(n) is int for n in plan.layout.video_grid)
    assert plan.layout.num_text == TEXT and type(plan.layout.num_text) is int
    with spattn_compile.config(sparsity=np.float32(0.5), block_size=np.int64(16), min_seq_len=np.int64(0)) as scoped:
        assert type(scoped.sparsity) is float and type(scoped.block_size) is int


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"video_grid": (np.float64(2.0), 3, 5)}, TypeError, "video_grid entry=.* has type float64: expected an int"),
        ({"video_grid": (np.bool_(True), 3, 5)}, TypeError, "video_grid entry=.* has type bool"),
        ({"text_len": np.float32(7.0)}, TypeError, "text_len=.* has type float32: expected an int"),
        ({"text_len": np.int64(-1)}, ValueError, "text_len must be an int >= 0"),
        ({"scale": np.float32(np.nan)}, ValueError, "scale must be None or a positive finite number"),
        ({"scale": np.float64(-0.5)}, ValueError, "scale must be None or a positive finite number"),
        ({"scale": np.array([0.5])}, ValueError, "scale must be None or a positive finite number"),
    ],
)
def test_numpy_values_that_python_numbers_would_not_pass_are_rejected(arguments, error, message):
    q, k, v = qkv()
    arguments = {"video_grid": GRID, "text_len": TEXT, **arguments}
    with pytest.raises(error, match=message):
        sparse_attention(q, k, v, **arguments, config=SparseAttentionConfig(min_seq_len=0))


# --------------------------------------------------------------------------------------------------------------------
# Masks by SDPA's rules
# --------------------------------------------------------------------------------------------------------------------

ACCEPTED_MASKS = [(1, SEQ), (2, 1, SEQ), (1, 1, SEQ), (2, 1, 1, SEQ), (1, 2, 1, SEQ), (2, 2, 1, SEQ), (1, 1, 1, SEQ)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", ACCEPTED_MASKS, ids=str)
def test_key_padding_masks_sdpa_accepts(impl, shape):
    q, k, v = qkv(seed=2)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) > 0.3
    mask[..., 0] = True
    config = SparseAttentionConfig(block_size=16, sparsity=0.0, min_seq_len=0)
    out = sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, attn_mask=mask, config=config, impl=impl)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize(
    ("mask", "error", "message"),
    [
        (
            torch.ones(SEQ, dtype=torch.bool),
            ValueError,
            r"attn_mask of shape \(37,\) is not a key-padding mask: "
            r"expected 2 to 4 dims broadcastable to \(2, 2, 1, 37\)",
        ),
        (
            torch.ones(2, 2, SEQ, SEQ, dtype=torch.bool),
            ValueError,
            r"attn_mask of shape \(2, 2, 37, 37\) is not a "
            r"key-padding mask: expected a shape broadcastable to \(2, 2, 1, 37\) with a query dimension of 1",
        ),
        (torch.ones(SEQ, SEQ, dtype=torch.bool).tril(), ValueError, r"\(37, 37\) is not a key-padding mask"),
        (torch.ones(3, 1, 1, SEQ, dtype=torch.bool), ValueError, r"\(3, 1, 1, 37\) is not a key-padding mask"),
        (torch.ones(2, 1, 1, SEQ), TypeError, r"boolean key-padding mask \(True = attend\), got dtype torch.float32"),
        (torch.zeros(2, 1, 1, SEQ, dtype=torch.float16), TypeError, "got dtype torch.float16"),
        (torch.ones(2, 1, 1, SEQ, dtype=torch.uint8), TypeError, "got dtype torch.uint8"),
    ],
)
@pytest.mark.parametrize("function", ["sparse_attention", "select_plan"])
def test_masks_that_are_not_key_padding_masks_are_rejected(mask, error, message, function):
    q, k, v = qkv()
    call = sparse_attention if function == "sparse_attention" else select_plan
    with pytest.raises(error, match=message):
        call(q, k, v, video_grid=GRID, text_len=TEXT, attn_mask=mask, config=SparseAttentionConfig(min_seq_len=0))


# --------------------------------------------------------------------------------------------------------------------
# An empty batch
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_empty_batch_returns_sdpa_empty_output(impl, with_mask):
    q, k, v = (t[:0] for t in qkv())
    mask = torch.ones(0, 1, 1, SEQ, dtype=torch.bool) if with_mask else None
    config = SparseAttentionConfig(block_size=16, sparsity=0.5, min_seq_len=0)
    out = sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, attn_mask=mask, config=config, impl=impl)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.shape == expected.shape == (0, 2, SEQ, 16) and out.dtype == expected.dtype == torch.float32
    # A batch-1 plan applies to any batch, the empty one included.
    plan = select_plan(*(t[:1] for t in qkv()), video_grid=GRID, text_len=TEXT, config=config, impl=impl)
    planned = sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, config=config, impl=impl, plan=plan)
    assert planned.shape == (0, 2, SEQ, 16)


def test_empty_batch_through_the_op():
    q, k, v = (t[:0] for t in qkv())
    with spattn_compile.config(block_size=16, min_seq_len=0):
        out = torch.ops.spattn.sparse_attention(q, k, v, list(GRID), TEXT, False, None, None, -1)
    assert out.shape == (0, 2, SEQ, 16)


# --------------------------------------------------------------------------------------------------------------------
# The output's memory order (issue 13 item 1) and the op
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dense", [False, True])
def test_output_has_the_query_strides(impl, layout, dense):
    """A (B, S, H, D) projection viewed as (B, H, S, D) gets an output with the same strides (the caller's transpose
    back is free); a contiguous query gets a contiguous output. Also on the dense path of short sequences."""
    q, k, v = qkv(batch=2, heads=3, dim=24, seed=3, layout=layout)
    config = SparseAttentionConfig(block_size=16, sparsity=0.5, min_seq_len=10_000 if dense else 0)
    out = sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, config=config, impl=impl)
    assert out.stride() == q.stride()
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    if dense:
        assert relative_error(out, expected) < 1e-6
    else:
        contiguous = sparse_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), video_grid=GRID, text_len=TEXT, config=config, impl=impl
        )
        assert torch.equal(out, contiguous) or relative_error(out, contiguous) < 1e-6


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dense", [False, True])
def test_op_real_and_fake_have_the_query_strides(layout, dense):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = qkv(batch=2, heads=3, dim=24, seed=4, layout=layout)
    mask = torch.ones(2, 1, 1, SEQ, dtype=torch.bool)
    mask[0, ..., -1] = False
    config = SparseAttentionConfig(block_size=16, sparsity=0.5, min_seq_len=10_000 if dense else 0)
    with spattn_compile.config(config):
        out = torch.ops.spattn.sparse_attention(q, k, v, list(GRID), TEXT, False, mask, None, 3)
        with FakeTensorMode() as mode:
            fakes = [mode.from_tensor(t) for t in (q, k, v, mask)]
            fake = torch.ops.spattn.sparse_attention(*fakes[:3], list(GRID), TEXT, False, fakes[3], None, 3)
    assert out.stride() == q.stride() and fake.stride() == q.stride()
    assert fake.shape == out.shape and fake.dtype == out.dtype
    if dense:
        expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
        assert relative_error(out, expected) < 1e-6
    else:  # outside a step context every call plans afresh, as the public function does
        expected = sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, attn_mask=mask, config=config)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("text_first", [False, True])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_op_passes_opcheck(text_first, layout):
    """Schema, fake tensor (strides included) and AOT dispatch agree with the real op, on a small CPU call without a
    step context (a fresh plan per call)."""
    q, k, v = qkv(batch=1, heads=2, dim=16, seed=5, layout=layout)
    mask = torch.ones(1, 1, 1, SEQ, dtype=torch.bool)
    mask[..., 3 if text_first else SEQ - 2] = False
    with spattn_compile.config(block_size=16, sparsity=0.5, min_seq_len=0, rectify="block"):
        torch.library.opcheck(
            torch.ops.spattn.sparse_attention.default, (q, k, v, list(GRID), TEXT, text_first, mask, 0.3, 1)
        )


def test_hard_inputs_through_the_op_equal_the_public_function():
    inputs = dit_attention_inputs(GRID, heads=2, head_dim=16, text_len=TEXT, text_padding=2, seed=2)
    config = SparseAttentionConfig(block_size=16, sparsity=0.5, min_seq_len=0)
    with spattn_compile.config(config):
        out = torch.ops.spattn.sparse_attention(
            inputs.query, inputs.key, inputs.value, list(GRID), TEXT, False, inputs.attn_mask, None, -1
        )
    expected = sparse_attention(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config)
    assert torch.equal(out, expected)
