"""`SparsePlan` (spattn_compile/plan.py): building one from a block mask and back, density, the estimated recall, its
repr (on real, meta and fake tensors), the compatibility check and its errors, batch-1 plans applied to a batch, and
planning separately from attending: `sparse_attention(..., plan=select_plan(...))` equals `sparse_attention(...)`."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spattn_compile import SparseAttentionConfig, SparsePlan, reference, select_plan, sparse_attention
from spattn_compile.estimators import PooledTiles, QueryTiles, SampledRows
from spattn_compile.layout import token_layout
from spattn_compile.plan import INDEX_DTYPE, MAX_PLAN_BLOCKS, indices_from_mask
from spattn_compile.testing import dit_attention_inputs, relative_error

F64 = torch.float64


def _described(layout) -> tuple:
    fields = ("video_grid", "num_text", "text_first", "block_size", "reorder")
    return tuple(getattr(layout, name) for name in fields) + (layout.source_index.tolist(),)


def _random_keep(generator, batch, heads, layout, share):
    nq = layout.num_blocks
    return torch.rand(batch, heads, nq, nq, generator=generator) < share


@settings(max_examples=60)
@given(
    grid=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 7)),
    text_len=st.integers(0, 40),
    text_first=st.booleans(),
    block_size=st.sampled_from([16, 32]),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    share=st.floats(0.0, 1.0),
    with_trusted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_from_mask_round_trip(grid, text_len, text_first, block_size, batch, heads, share, with_trusted, seed):
    generator = torch.Generator().manual_seed(seed)
    layout = token_layout(grid, text_len, text_first, block_size)
    nq, nb = layout.num_blocks, layout.num_video_blocks
    keep = _random_keep(generator, batch, heads, layout, share)
    trusted = torch.rand(batch, heads, nq, nb, generator=generator) < 0.5 if with_trusted else None
    plan = SparsePlan.from_mask(
        keep, video_grid=grid, text_len=text_len, text_first=text_first, block_size=block_size, trusted=trusted
    )
    assert plan.estimator == "mask" and (plan.batch, plan.heads) == (batch, heads)
    assert _described(plan.layout) == _described(layout)
    assert torch.equal(plan.to_dense(), keep)
    counts, indices = plan.kv_counts, plan.kv_indices
    assert counts.dtype == torch.int32 and indices.dtype == INDEX_DTYPE == torch.int16
    assert plan.trusted_indices.dtype == INDEX_DTYPE
    used = torch.arange(nq) < counts[..., None]
    assert (indices[~used] == -1).all() and (indices[..., 1:] > indices[..., :-1])[used[..., 1:]].all()
    # Trusted blocks: skipped video blocks of video query rows only.
    expected_trusted = torch.zeros(batch, heads, nq, nb, dtype=torch.bool)
    if trusted is not None:
        expected_trusted[..., :nb, :] = trusted[..., :nb, :] & ~keep[..., :nb, :nb]
    assert torch.equal(plan.trusted_mask(), expected_trusted)
    # Default scores: each video row's kept video blocks share the row uniformly, nothing on text.
    kept = keep[..., :nb, :nb].to(torch.float32)
    expected_scores = torch.cat([kept / kept.sum(-1, keepdim=True).clamp(min=1), torch.zeros_like(kept[..., :1])], -1)
    assert torch.equal(plan.block_scores, expected_scores)


def test_density_and_estimated_recall_by_hand():
    layout = token_layout((1, 4, 16), 16, False, 16)  # 4 video blocks, 1 text block
    keep = torch.zeros(1, 2, 5, 5, dtype=torch.bool)
    keep[0, 0, :4, :4] = torch.eye(4, dtype=torch.bool)  # head 0: the diagonal only
    keep[0, 1, :4, :4] = True  # head 1: every video block
    keep[0, 1, 0, 3] = False
    keep[..., 4] = True
    keep[..., 4, :] = True
    scores = torch.zeros(1, 2, 4, 5, dtype=F64)
    scores[..., :4] = 0.2
    scores[..., 4] = 0.2  # text column
    plan = SparsePlan.from_mask(keep, video_grid=(1, 4, 16), text_len=16, block_size=16, block_scores=scores)
    assert _described(plan.layout) == _described(layout)
    torch.testing.assert_close(plan.density(), torch.tensor([[0.25, 15 / 16]]))
    assert plan.density().dtype == torch.float32
    # Kept video blocks' scores plus the text column, averaged over the video query rows.
    torch.testing.assert_close(plan.estimated_recall(), torch.tensor([[0.4, (0.8 * 3 + 0.6 + 4 * 0.2) / 4]]))
    assert plan.block_scores is scores


def test_repr_is_readable_and_works_on_meta_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = dit_attention_inputs((2, 5, 7), heads=3, head_dim=16, text_len=9, seed=1)
    config = SparseAttentionConfig(block_size=16, sparsity=0.5, estimator="sampled_rows", min_seq_len=0)
    plan = select_plan(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config)
    text = repr(plan)
    density = f"density={plan.density().mean().item():.3f}"
    for part in ("SparsePlan(batch=1, heads=3, grid=(2, 5, 7)", "blocks=5 video + 1 text of 16", "reorder='hilbert'",
                 density, "estimator='sampled_rows'"):  # fmt: skip
        assert part in text, (part, text)
    tensors = ("kv_counts", "kv_indices", "trusted_counts", "trusted_indices", "block_scores")
    meta = dataclasses.replace(plan, **{name: getattr(plan, name).to("meta") for name in tensors})
    assert "density=?" in repr(meta) and "trusted per row=?" in repr(meta)
    with FakeTensorMode() as mode:
        fake = dataclasses.replace(plan, **{name: mode.from_tensor(getattr(plan, name)) for name in tensors})
        assert "density=?" in repr(fake) and "heads=3" in repr(fake)


def test_check_compatible_names_both_sides():
    plan = SparsePlan.from_mask(
        torch.ones(2, 3, 3, 3, dtype=torch.bool), video_grid=(2, 3, 5), text_len=7, block_size=16
    )
    layout = plan.layout
    plan.check_compatible(2, 3, layout, torch.device("cpu"))
    other = token_layout((2, 3, 5), 7, True, 16, "none")
    both = r"text_first=False \(plan\) vs True \(call\); reorder='hilbert' \(plan\) vs 'none' \(call\)"
    with pytest.raises(ValueError, match=both):
        plan.check_compatible(2, 3, other, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"video_grid=\(2, 3, 5\) \(plan\) vs \(1, 5, 6\) \(call\)"):
        plan.check_compatible(2, 3, token_layout((1, 5, 6), 7, False, 16), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"num_text=7 \(plan\) vs 6 \(call\)"):
        plan.check_compatible(2, 3, token_layout((2, 3, 5), 6, False, 16), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"block_size=16 \(plan\) vs 32 \(call\)"):
        plan.check_compatible(2, 3, token_layout((2, 3, 5), 7, False, 32), torch.device("cpu"))
    with pytest.raises(ValueError, match="plan is for batch=2, heads=3; this call has batch=2, heads=4"):
        plan.check_compatible(2, 4, layout, torch.device("cpu"))
    with pytest.raises(ValueError, match="plan is for batch=2, heads=3; this call has batch=1, heads=3"):
        plan.check_compatible(1, 3, layout, torch.device("cpu"))
    with pytest.raises(ValueError, match="plan is on cpu, the inputs on meta"):
        plan.check_compatible(2, 3, layout, torch.device("meta"))
    # A batch-1 plan fits any batch with the same heads.
    single = SparsePlan.from_mask(
        torch.ones(1, 3, 3, 3, dtype=torch.bool), video_grid=(2, 3, 5), text_len=7, block_size=16
    )
    single.check_compatible(5, 3, layout, torch.device("cpu"))


def test_from_mask_rejects_bad_masks():
    kwargs = dict(video_grid=(2, 3, 5), text_len=7, block_size=16)
    with pytest.raises(TypeError, match=r"keep must be a bool tensor of shape \(B, H, 3, 3\)"):
        SparsePlan.from_mask(torch.ones(1, 1, 3, 3), **kwargs)
    with pytest.raises(TypeError, match="keep must be a bool tensor"):
        SparsePlan.from_mask(torch.ones(3, 3, dtype=torch.bool), **kwargs)
    with pytest.raises(ValueError, match=r"keep has shape \(1, 1, 4, 4\), but this layout has 3 blocks \(2 video\)"):
        SparsePlan.from_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), **kwargs)
    keep = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"trusted must be a bool tensor of shape \(1, 1, 3, 2\)"):
        SparsePlan.from_mask(keep, trusted=torch.ones(1, 1, 3, 3, dtype=torch.bool), **kwargs)
    with pytest.raises(ValueError, match=r"block_scores must have shape \(1, 1, 2, 3\)"):
        SparsePlan.from_mask(keep, block_scores=torch.ones(1, 1, 3, 3), **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Planning separately from attending
# --------------------------------------------------------------------------------------------------------------------


def _inputs(dtype, batch=2):
    return dit_attention_inputs(
        (3, 5, 7), batch=batch, heads=2, head_dim=24, text_len=13, text_padding=4, dtype=dtype, seed=6
    )


@pytest.mark.parametrize("estimator", [PooledTiles(16), SampledRows(4), QueryTiles(16)], ids=lambda e: e.name)
@pytest.mark.parametrize("rectify", ["none", "block", "query"])
def test_attending_with_select_plan_equals_a_fresh_plan_reference(estimator, rectify):
    inputs = _inputs(F64)
    config = SparseAttentionConfig(block_size=32, sparsity=0.6, estimator=estimator, rectify=rectify, min_seq_len=0)
    args = (inputs.query, inputs.key, inputs.value)
    fresh = sparse_attention(*args, **inputs.kwargs(), config=config, impl="reference")
    plan = select_plan(*args, **inputs.kwargs(), config=config, impl="reference")
    planned = sparse_attention(*args, **inputs.kwargs(), config=config, impl="reference", plan=plan)
    # Stage 0 runs again at the block size instead of the estimator's tile size: the same block means up to the
    # order of the float64 sums.
    assert relative_error(planned, fresh) < 1e-14
    dense = reference.dense_attention(*args, inputs.attn_mask)
    assert relative_error(planned, dense) > 1e-4  # a sparse plan: the comparison above is not dense == dense


@pytest.mark.parametrize("rectify", ["none", "block", "query"])
def test_attending_with_select_plan_equals_a_fresh_plan_triton(rectify):
    inputs = _inputs(torch.float32, batch=1)
    config = SparseAttentionConfig(block_size=32, sparsity=0.6, rectify=rectify, min_seq_len=0)
    args = (inputs.query, inputs.key, inputs.value)
    fresh = sparse_attention(*args, **inputs.kwargs(), config=config, impl="triton")
    plan = select_plan(*args, **inputs.kwargs(), config=config, impl="triton")
    planned = sparse_attention(*args, **inputs.kwargs(), config=config, impl="triton", plan=plan)
    assert relative_error(planned, fresh) < 1e-6  # float32 block means summed per tile or per block


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_a_batch_one_plan_applies_to_every_sample(impl):
    dtype = F64 if impl == "reference" else torch.float32
    inputs = _inputs(dtype, batch=3)
    config = SparseAttentionConfig(block_size=32, sparsity=0.6, rectify="query", min_seq_len=0)
    args = (inputs.query, inputs.key, inputs.value)
    plan = select_plan(*(t[:1] for t in args), **{**inputs.kwargs(), "attn_mask": inputs.attn_mask[:1]}, config=config)
    assert plan.batch == 1
    expanded = plan.expand_batch(3)
    assert expanded.batch == 3 and expanded.kv_indices.data_ptr() == plan.kv_indices.data_ptr()  # a view
    assert expanded.kv_indices.stride(0) == 0 and plan.expand_batch(1) is plan
    out = sparse_attention(*args, **inputs.kwargs(), config=config, impl=impl, plan=plan)
    for sample in range(3):
        one = sparse_attention(
            *(t[sample : sample + 1] for t in args), **{**inputs.kwargs(), "attn_mask": inputs.attn_mask[:1]},
            config=config, impl=impl, plan=plan,
        )  # fmt: skip
        assert relative_error(out[sample : sample + 1], one) < 1e-6


def test_a_hand_built_dense_plan_is_exact_attention():
    inputs = _inputs(F64)
    layout = token_layout((3, 5, 7), 13, False, 16)
    keep = torch.ones(1, 2, layout.num_blocks, layout.num_blocks, dtype=torch.bool)
    plan = SparsePlan.from_mask(keep, video_grid=(3, 5, 7), text_len=13, block_size=16)
    for rectify in ("none", "block", "query"):
        config = SparseAttentionConfig(block_size=16, rectify=rectify, min_seq_len=0)
        out = sparse_attention(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config, plan=plan)
        expected = F.scaled_dot_product_attention(inputs.query, inputs.key, inputs.value, attn_mask=inputs.attn_mask)
        assert relative_error(out, expected) < 1e-12, rectify


def test_a_hand_built_plan_attends_only_to_its_blocks():
    """A plan keeping one key block per query block: each video query's output is softmax attention over that block
    (plus text), computed here by hand."""
    inputs = _inputs(F64, batch=1)
    layout = token_layout((3, 5, 7), 13, False, 16)
    nq, nb = layout.num_blocks, layout.num_video_blocks
    keep = torch.zeros(1, 2, nq, nq, dtype=torch.bool)
    keep[..., :nb, 0] = True  # every video query block attends to video block 0 ...
    keep[..., :, nb:] = True  # ... and the text; text query rows attend to everything
    keep[..., nb:, :] = True
    plan = SparsePlan.from_mask(keep, video_grid=(3, 5, 7), text_len=13, block_size=16)
    config = SparseAttentionConfig(block_size=16, rectify="none", min_seq_len=0)
    out = sparse_attention(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config, plan=plan)
    allowed = torch.zeros(inputs.seq_len, dtype=torch.bool)
    source = layout.source_index
    allowed[source[:16][source[:16] >= 0]] = True
    allowed[inputs.num_video :] = True
    allowed &= inputs.attn_mask[0, 0, 0]
    video = torch.arange(inputs.num_video)
    logits = inputs.query[..., video, :] @ inputs.key.transpose(-1, -2) / math.sqrt(24)
    expected = torch.softmax(logits.masked_fill(~allowed, -math.inf), -1) @ inputs.value
    assert relative_error(out[..., video, :], expected) < 1e-12


def test_plan_mismatch_errors():
    inputs = _inputs(F64)
    config = SparseAttentionConfig(block_size=16, sparsity=0.5, min_seq_len=0)
    args = (inputs.query, inputs.key, inputs.value)
    plan = select_plan(*args, **inputs.kwargs(), config=config)
    with pytest.raises(ValueError, match=r"plan does not match this call's layout: block_size=16 \(plan\) vs 32"):
        sparse_attention(*args, **inputs.kwargs(), config=dataclasses.replace(config, block_size=32), plan=plan)
    with pytest.raises(ValueError, match=r"plan does not match this call's layout: reorder='hilbert' \(plan\)"):
        sparse_attention(*args, **inputs.kwargs(), config=dataclasses.replace(config, reorder="none"), plan=plan)
    other = dit_attention_inputs((3, 7, 5), batch=2, heads=2, head_dim=24, text_len=13, dtype=F64, seed=6)
    with pytest.raises(ValueError, match=r"video_grid=\(3, 5, 7\) \(plan\) vs \(3, 7, 5\) \(call\)"):
        sparse_attention(other.query, other.key, other.value, **other.kwargs(), config=config, plan=plan)
    with pytest.raises(ValueError, match="plan is for batch=2, heads=2; this call has batch=2, heads=1"):
        sparse_attention(*(t[:, :1] for t in args), **inputs.kwargs(), config=config, plan=plan)
    with pytest.raises(ValueError, match="plan is on meta, the inputs on cpu"):
        meta = dataclasses.replace(plan, kv_counts=plan.kv_counts.to("meta"))
        sparse_attention(*args, **inputs.kwargs(), config=config, plan=meta)


def test_indices_of_a_plan_are_those_of_its_mask():
    """`indices_from_mask` is what `select_plan` stores: a plan and the lists of its own dense mask agree."""
    inputs = _inputs(F64)
    config = SparseAttentionConfig(block_size=16, sparsity=0.7, neighbors=True, min_seq_len=0)
    plan = select_plan(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config)
    counts, indices = indices_from_mask(plan.to_dense())
    assert torch.equal(counts, plan.kv_counts) and torch.equal(indices, plan.kv_indices)
    assert (plan.density() < 1).all() and (plan.density() >= 0.3).all()


def test_index_lists_are_int16_up_to_the_plan_limit_and_int32_on_request():
    """A plan's block lists are int16 (half the memory of int32); `dtype=torch.int32` gives FlexAttention's lists
    with the same entries; a layout with more blocks than int16 indexes is refused with the limit named."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 40, generator=generator) < 0.3
    counts, indices = indices_from_mask(mask)
    counts32, indices32 = indices_from_mask(mask, torch.int32)
    assert indices.dtype == torch.int16 and indices32.dtype == torch.int32
    assert torch.equal(counts, counts32) and torch.equal(indices.int(), indices32)
    wide = torch.zeros(1, MAX_PLAN_BLOCKS, dtype=torch.bool)
    wide[0, -1] = True
    _, last = indices_from_mask(wide)
    assert int(last[0, 0]) == MAX_PLAN_BLOCKS - 1 and int(last[0, 1]) == -1
    with pytest.raises(ValueError, match=f"index at most {MAX_PLAN_BLOCKS}: use a larger block_size"):
        indices_from_mask(torch.zeros(1, MAX_PLAN_BLOCKS + 1, dtype=torch.bool))
    assert indices_from_mask(torch.zeros(1, MAX_PLAN_BLOCKS + 1, dtype=torch.bool), torch.int32)[1].dtype == torch.int32
