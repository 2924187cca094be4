"""Tests of the rectified block-sparse attention kernel (`spattn_compile.kernels.block_sparse_attention`) against the
float64 reference `reference.rectified_sparse_attention` (+ `scatter_canonical` for outputs in the original order).

Both read modes are covered: canonical copies `(B, H, P, D)`, and gathered reads (`row_index`) straight from the
original `(B, H, S, D)` tensors in any memory layout (contiguous, a transposed `(B, S, H, D)` buffer, a slice of wider
rows, an expanded batch or head dim). CPU tests run the kernel under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are tiny and dtypes are float16/float32 (the interpreter cannot multiply bfloat16);
head dims that are not a power of two are padded in the kernel's registers. `gpu` tests run bfloat16 at a real video
size on CUDA. Every output buffer is poisoned with NaN before the launch, so an unwritten element fails the test and a
row the kernel must not write is checked to still be NaN.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import attend_reference, poisoned_allocations, selection_of, sparse_call, sprinkle_non_finite

from spattn_compile import reference
from spattn_compile.config import SparseAttentionConfig
from spattn_compile.estimators import PooledTiles
from spattn_compile.implementations import ReferenceImplementation
from spattn_compile.kernels.block_sparse_attention import (
    AttentionLaunch,
    KernelVariant,
    QueryRectify,
    TileConfig,
    autotune_configs,
    block_sparse_attention,
    lane_groups,
    launch_attention,
    prune_tile_configs,
)
from spattn_compile.layout import token_layout
from spattn_compile.plan import PooledStats, SparsePlan, indices_from_mask
from spattn_compile.policies.rectification import block_rectification
from spattn_compile.testing import relative_error
from spattn_compile.testing.strategies import rectify_modes, seeds

# ||out - ref|| / ||ref|| bounds: fp32 products are exact fp32 ("ieee"); fp16 and bf16 round P (and the pooled keys of
# query mode) to 16 bits before the products.
_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
MEMORY_LAYOUTS = ("contiguous", "transposed", "sliced", "expand_batch", "expand_heads")


@dataclasses.dataclass
class AttentionCase:
    """One kernel call: Q, K, V in the original order (`original`, in the drawn memory layout) and as canonical
    copies (`canonical`), the canonical key validity, the launcher's plan/statistics arguments, the layout and the
    float64 reference output in the canonical layout."""

    original: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    canonical: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    key_valid: torch.Tensor
    plan_args: dict
    layout: object
    scale: float
    expected: torch.Tensor

    @property
    def q(self) -> torch.Tensor:
        return self.canonical[0]


def _rectify_args(rectify: str, plan: SparsePlan, stats: PooledStats, num_blocks: int) -> dict[str, torch.Tensor]:
    """The launcher's rectification arguments from a reference plan and reference statistics."""
    if rectify == "block":
        rescale, correction = block_rectification(plan, stats, num_blocks)
        return {"rescale": rescale.float(), "correction": correction.float()}
    if rectify == "query":
        return {
            "trusted_counts": plan.trusted_counts,
            "trusted_indices": plan.trusted_indices,
            "k_block": stats.k_block.float(),
            "v_block": stats.v_block.float(),
            "k_block_log_count": stats.k_block_count.double().log().float(),
        }
    return {}


def _stored(x: torch.Tensor, memory: str) -> torch.Tensor:
    """`x (B, H, S, D)` with the same values in another memory layout (last dim contiguous)."""
    if memory == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if memory == "sliced":
        wide = torch.full((*x.shape[:3], 2 * x.shape[-1]), 1e4, dtype=x.dtype)
        wide[..., : x.shape[-1]] = x
        return wide[..., : x.shape[-1]]
    return x


def _random_case(
    *,
    seed: int,
    batch: int,
    heads: int,
    head_dim: int,
    grid: tuple[int, int, int],
    text_len: int,
    text_first: bool,
    text_padding: int,
    masked_video_share: float,
    block_size: int,
    sparsity: float,
    rectify: str,
    dtype: torch.dtype,
    logit_gain: float,
    trusted_share: float = 0.7,
    memory: str = "contiguous",
    shared_plan: bool = False,
    non_finite: int = 0,
) -> AttentionCase:
    """Random Q/K/V (`non_finite` entries set to NaN or +-inf), a per-batch key-padding mask, a random plan at the
    given sparsity (empty rows allowed; one plan for the whole batch when `shared_plan`, passed expanded) and a random
    trusted set among the skipped non-empty video blocks."""
    generator = torch.Generator().manual_seed(seed)
    layout = token_layout(grid, text_len, text_first, block_size)
    seq_len, nq, nb = layout.seq_len, layout.num_blocks, layout.num_video_blocks

    def sample(gain: float, offset: float) -> torch.Tensor:
        shape = [batch, heads, seq_len, head_dim]
        if memory == "expand_batch":
            shape[0] = 1
        if memory == "expand_heads":
            shape[1] = 1
        x = gain * torch.randn(*shape, generator=generator, dtype=torch.float64) + offset
        return x.to(dtype).expand(batch, heads, seq_len, head_dim)

    q, k, v = sample(logit_gain, 0.0), sample(1.0, 0.0), sample(1.0, 0.5)
    if non_finite:
        q, k, v = (t.contiguous() for t in sprinkle_non_finite(generator, (q, k, v), non_finite))
    original = tuple(_stored(t, memory) for t in (q, k, v))
    valid = torch.rand(batch, seq_len, generator=generator) >= masked_video_share
    text_start = 0 if text_first else layout.num_video
    valid[:, text_start : text_start + text_len] = True
    if text_padding:
        valid[:, text_start + text_len - text_padding : text_start + text_len] = False
    source = layout.source_index
    # A per-batch mask, passed as a view with stride 0 over heads as the pipeline does.
    key_valid = ((source >= 0) & valid[:, source.clamp(min=0)])[:, None, :].expand(batch, heads, -1)

    plan_batch = 1 if shared_plan else batch
    canonical = tuple(reference.gather_canonical(t, layout) for t in (q, k, v))
    keep = torch.rand(plan_batch, heads, nq, nq, generator=generator) >= sparsity
    # As the selection does: a key block holding a non-finite key or value is kept by every query block (the
    # reference's products see every value row, so a NaN in a skipped block would reach them as 0 * NaN).
    forced = reference.block_non_finite(canonical[1], canonical[2], key_valid, layout).any(0, keepdim=True)
    keep |= forced[:, :, None, :]
    kv_counts, kv_indices = indices_from_mask(keep)
    nonempty = key_valid[:plan_batch].reshape(plan_batch, heads, nq, block_size).any(-1)[..., :nb]
    trusted = torch.zeros(plan_batch, heads, nq, nb, dtype=torch.bool)
    trusted[..., :nb, :] = ~keep[..., :nb, :nb] & nonempty[..., None, :]
    trusted &= torch.rand(plan_batch, heads, nq, nb, generator=generator) < trusted_share
    trusted_counts, trusted_indices = indices_from_mask(trusted)
    scores = torch.rand(plan_batch, heads, nb, nb + 1, generator=generator, dtype=torch.float64) + 0.05
    scores = scores / scores.sum(-1, keepdim=True)
    plan = SparsePlan(layout, kv_counts, kv_indices, trusted_counts, trusted_indices, scores, "mask")
    plan = plan.expand_batch(batch)

    q64, k64, v64 = (t.double() for t in canonical)
    stats = reference.pool_statistics(q64, k64, v64, key_valid, layout, block_size)
    scale = 1.0 / math.sqrt(head_dim)
    expected = attend_reference(q64, k64, v64, key_valid, plan, stats, layout, scale=scale, rectify=rectify)
    plan_args = {
        "kv_counts": plan.kv_counts,
        "kv_indices": plan.kv_indices,
        "rectify": rectify,
        **_rectify_args(rectify, plan, stats, nq),
    }
    return AttentionCase(original, canonical, key_valid, plan_args, layout, scale, expected)  # type: ignore[arg-type]


def _check_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """Non-finite exactly where the reference is (so an unwritten, NaN-poisoned element fails), finite elements within
    the dtype's tolerance."""
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(out), finite), "non-finite elements differ from the reference's"
    error = relative_error(out[finite], expected[finite], zero_reference=True)
    assert error < _TOLERANCE[dtype], f"relative error {error:.3g} >= {_TOLERANCE[dtype]:g}"
    return error


def _run_and_check(
    case: AttentionCase,
    *,
    reads: str = "canonical",
    output: str = "canonical",
    drop_share: float = 0.0,
    index_dtype=torch.int64,
    list_dtype=torch.int16,
    tile_config: TileConfig | None = None,
    variant: KernelVariant | None = None,
    seed: int = 0,
    priority: int = 0,
) -> float:
    """Launch on NaN-poisoned output and check: written rows match the reference, rows no canonical row maps to are
    still NaN. reads: "canonical" (copies) or "gathered" (original tensors through `row_index`). output: "canonical"
    (canonical reads only: `(B, H, P, D)`, no index), "default" (gathered reads only: `out` and `out_index` left to
    the launcher), "scatter" (`(B, H, S, D)` through `out_index`) or "transposed" (a `(B, S, H, D)` buffer).
    list_dtype: the block lists' dtype (a plan's int16, or int32)."""
    layout = case.layout
    lists = {
        name: case.plan_args[name].to(list_dtype)
        for name in ("kv_indices", "trusted_indices")
        if name in case.plan_args
    }
    q, k, v = case.canonical if reads == "canonical" else case.original
    batch, heads, _, head_dim = q.shape
    dtype, device = q.dtype, q.device
    source_index = layout.source_index.to(device)  # layouts are built on the CPU; the launcher wants q's device
    common = {
        "scale": case.scale,
        "block_size": layout.block_size,
        "key_valid": case.key_valid,
        "priority_query_blocks": min(priority, layout.num_blocks),
        "row_index": source_index.to(index_dtype) if reads == "gathered" else None,
        "tile_config": tile_config,
        "variant": variant,
        **case.plan_args,
        **lists,
    }
    if output == "canonical":
        out = torch.full_like(case.canonical[0], math.nan)
        assert block_sparse_attention(q, k, v, out=out, **common) is out
        return _check_close(out, case.expected, dtype)
    if output == "default":
        with poisoned_allocations():
            out = block_sparse_attention(q, k, v, **common)
        out_index = source_index
    else:
        generator = torch.Generator().manual_seed(seed + 1)
        out_index = source_index.clone()
        dropped = (torch.rand(out_index.shape, generator=generator).to(device) < drop_share) & (out_index >= 0)
        out_index[dropped] = -1
        shape = (
            (batch, layout.seq_len, heads, head_dim)
            if output == "transposed"
            else (batch, heads, layout.seq_len, head_dim)
        )
        buffer = torch.full(shape, math.nan, dtype=dtype, device=device)
        out = buffer.transpose(1, 2) if output == "transposed" else buffer
        assert block_sparse_attention(q, k, v, out=out, out_index=out_index.to(index_dtype), **common) is out
    written = out_index[out_index >= 0]
    untouched = torch.ones(layout.seq_len, dtype=torch.bool, device=device)
    untouched[written] = False
    assert out[:, :, untouched].isnan().all(), "the kernel wrote rows that out_index does not map to"
    return _check_close(out[:, :, written], case.expected[:, :, out_index >= 0], dtype)


# --------------------------------------------------------------------------------------------------------------------
# Property tests: both read modes against the float64 reference
# --------------------------------------------------------------------------------------------------------------------

# Small prime sides (partial blocks everywhere); the interpreter runs every program in numpy, so shapes stay tiny.
_PRIME_SIDES = st.sampled_from([2, 3, 5])


@st.composite
def _case_params(draw, *, non_finite: bool = False) -> dict:
    block_size = draw(st.sampled_from([16, 32]))
    text_len = draw(st.sampled_from([0, 0, 5, 23]))
    batch = draw(st.integers(1, 2))
    return {
        "seed": draw(seeds()),
        "batch": batch,
        "heads": draw(st.integers(1, 2)),
        "head_dim": draw(st.sampled_from([16, 24, 32, 40, 64])),
        "grid": (draw(_PRIME_SIDES), draw(_PRIME_SIDES), draw(_PRIME_SIDES)),
        "text_len": text_len,
        "text_first": draw(st.booleans()),
        "text_padding": draw(st.integers(0, text_len)),
        "masked_video_share": draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])),
        "block_size": block_size,
        "sparsity": draw(st.floats(0.0, 0.95)),
        "rectify": draw(rectify_modes()),
        "dtype": draw(st.sampled_from([torch.float32, torch.float16])),
        "logit_gain": draw(st.sampled_from([0.5, 1.0, 4.0])),
        "memory": draw(st.sampled_from(MEMORY_LAYOUTS)),
        "shared_plan": batch > 1 and draw(st.booleans()),
        "non_finite": draw(st.integers(1, 4)) if non_finite else 0,
    }


@st.composite
def _launch_params(draw, reads: str) -> dict:
    block_size = draw(st.sampled_from([16, 32]))
    tiles = [t for t in (16, 32) if t <= block_size]
    outputs = ["canonical", "scatter", "transposed"] if reads == "canonical" else ["default", "scatter", "transposed"]
    return {
        "block_size": block_size,
        "reads": reads,
        "output": draw(st.sampled_from(outputs)),
        "drop_share": draw(st.sampled_from([0.0, 0.2])),
        "index_dtype": draw(st.sampled_from([torch.int32, torch.int64])),
        "list_dtype": draw(st.sampled_from([torch.int16, torch.int32])),
        "tile_config": draw(st.none() | st.builds(TileConfig, st.sampled_from(tiles), st.sampled_from(tiles))),
        "variant": draw(
            st.builds(
                KernelVariant,
                key_mask=st.sampled_from(["load", "select"]),
                pooled_dtype=st.sampled_from(["input", "float32"]),
                trusted_chunk=st.sampled_from([None, 16, 32]),
                head_lanes=st.sampled_from(["pad", "split"]),
                row_offsets=st.sampled_from(["separate", "shared"]),
            )
        ),
        "priority": draw(st.sampled_from([0, 1, 2, 1000])),
    }


def _check_drawn(data, reads: str, non_finite: bool = False) -> None:
    launch = data.draw(_launch_params(reads))
    case = _random_case(**{**data.draw(_case_params(non_finite=non_finite)), "block_size": launch.pop("block_size")})
    _run_and_check(case, seed=case.layout.seq_len, **launch)


@settings(max_examples=20, deadline=None)
@given(st.data())
def test_canonical_reads_match_reference(data):
    _check_drawn(data, "canonical")


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_gathered_reads_match_reference(data):
    """Q, K, V read through `row_index` from the original tensors in every memory layout (transposed buffers,
    slices of wider rows, expanded batch or head dims), padding rows and masked keys never read."""
    _check_drawn(data, "gathered")


# numpy (the interpreter's arithmetic) warns about the NaN and infinities this test feeds it on purpose.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=10, deadline=None)
@given(st.data(), st.sampled_from(["canonical", "gathered"]))
def test_non_finite_values_where_the_reference_has_them(data, reads):
    """NaN and +-inf in Q, K, V (masked key rows included): the output is non-finite exactly where the float64
    reference's is (a masked key has no effect, whatever its rows hold), finite elsewhere and close."""
    _check_drawn(data, reads, non_finite=True)


def _small_case(rectify: str = "none", dtype=torch.float32, **overrides) -> AttentionCase:
    params = {
        "seed": 7,
        "batch": 1,
        "heads": 2,
        "head_dim": 32,
        "grid": (3, 5, 7),
        "text_len": 11,
        "text_first": False,
        "text_padding": 4,
        "masked_video_share": 0.0,
        "block_size": 16,
        "sparsity": 0.5,
        "rectify": rectify,
        "dtype": dtype,
        "logit_gain": 1.0,
    }
    params.update(overrides)
    return _random_case(**params)


@pytest.mark.parametrize("reads", ["canonical", "gathered"])
@pytest.mark.parametrize("rectify", ["none", "block", "query"])
def test_rows_without_allowed_keys(rectify, reads):
    """Query blocks with no listed key block, or whose listed keys are all masked, output 0 (block mode: c_i)."""
    case = _small_case(rectify)
    block_size = case.layout.block_size
    kv_counts = case.plan_args["kv_counts"].clone()
    kv_indices = case.plan_args["kv_indices"].clone()
    key_valid = case.key_valid.clone()
    kv_counts[:, :, 0] = 0
    key_valid[:, :, :block_size] = False
    kv_indices[:, :, 1, 0] = 0  # query block 1 sees only the fully masked key block 0
    kv_counts[:, :, 1] = 1
    args = {**case.plan_args, "kv_counts": kv_counts, "kv_indices": kv_indices}
    if rectify == "query":
        args["trusted_counts"] = args["trusted_counts"].clone()
        args["trusted_counts"][:, :, :2] = 0
    out = torch.full_like(case.q, math.nan)
    q, k, v = case.canonical if reads == "canonical" else case.original
    row_index = case.layout.source_index if reads == "gathered" else None
    out_index = torch.arange(case.layout.padded_len) if reads == "gathered" else None
    block_sparse_attention(
        q,
        k,
        v,
        scale=case.scale,
        block_size=block_size,
        key_valid=key_valid,
        out=out,
        row_index=row_index,
        out_index=out_index,
        **args,
    )
    rows = out[:, :, : 2 * block_size]
    assert not rows.isnan().any()
    if rectify == "block":
        expected = case.plan_args["correction"][:, :, :2].repeat_interleave(block_size, dim=2)
        torch.testing.assert_close(rows, expected.to(rows.dtype), rtol=0, atol=0)
    else:
        assert (rows == 0).all()


@pytest.mark.parametrize("reads", ["canonical", "gathered"])
def test_large_logits_stay_finite(reads):
    """Logits of a few hundred (peaked softmax) must not overflow the fp32 online softmax."""
    case = _small_case("query", logit_gain=60.0, head_dim=64)
    _run_and_check(case, reads=reads, output="transposed")


def test_query_mode_spans_several_trusted_chunks():
    """Trusted lists longer than one virtual-key chunk (16 under the interpreter) are processed chunk by chunk."""
    case = _small_case("query", grid=(7, 7, 7), text_len=0, text_padding=0, sparsity=0.95, trusted_share=1.0)
    assert int(case.plan_args["trusted_counts"].max()) > 16
    _run_and_check(case, reads="gathered", output="scatter", drop_share=0.1)


@pytest.mark.parametrize("reads", ["canonical", "gathered"])
def test_dense_plan_equals_dense_attention(reads):
    """With every block kept and no rectification the kernel is exact attention: compare with the float64 SDPA
    ground truth in the original token order (the kernel's store undoes the reorder)."""
    case = _small_case("none", sparsity=0.0, text_padding=0, memory="transposed")
    layout = case.layout
    q, k, v = case.canonical if reads == "canonical" else case.original
    out = torch.full((1, 2, layout.seq_len, 32), math.nan)
    row_index = layout.source_index if reads == "gathered" else None
    block_sparse_attention(
        q,
        k,
        v,
        scale=case.scale,
        block_size=layout.block_size,
        key_valid=case.key_valid,
        out=out,
        out_index=layout.source_index,
        row_index=row_index,
        **case.plan_args,
    )
    truth = reference.dense_attention(*case.original, scale=case.scale)
    assert relative_error(out, truth, zero_reference=True) < _TOLERANCE[torch.float32]


def test_gathered_reads_without_a_key_mask_mask_the_padding_rows():
    """No key_valid: the padding rows of the layout (-1 in row_index) still act as masked keys."""
    case = _small_case("query", text_len=0, text_padding=0, grid=(3, 5, 7))
    assert case.layout.padded_len > case.layout.seq_len
    out = torch.full((1, 2, case.layout.seq_len, 32), math.nan)
    launch_attention(
        AttentionLaunch(
            *case.original,
            case.plan_args["kv_counts"],
            case.plan_args["kv_indices"],
            case.scale,
            case.layout.block_size,
            rectify=QueryRectify(
                **{
                    n: case.plan_args[n]
                    for n in ("trusted_counts", "trusted_indices", "k_block", "v_block", "k_block_log_count")
                }
            ),
            row_index=case.layout.source_index,
            out=out,
        )
    )
    expected = reference.scatter_canonical(case.expected, case.layout)
    assert relative_error(out, expected, zero_reference=True) < _TOLERANCE[torch.float32]


# --------------------------------------------------------------------------------------------------------------------
# Input validation: the kernel's own invariants
# --------------------------------------------------------------------------------------------------------------------


def _valid_kwargs(rectify: str = "none") -> dict:
    case = _small_case(rectify)
    q, k, v = case.canonical
    return {
        "q": q,
        "k": k,
        "v": v,
        "scale": case.scale,
        "block_size": case.layout.block_size,
        "key_valid": case.key_valid,
        **case.plan_args,
    }


def _replace(kwargs: dict, **changes) -> dict:
    return {**kwargs, **changes}


_BAD_INPUTS = [
    ("kv_indices must be int16 or int32", lambda a: _replace(a, kv_indices=a["kv_indices"].long()), TypeError),
    ("kv_counts must have shape", lambda a: _replace(a, kv_counts=a["kv_counts"][..., :-1]), ValueError),
    ("q must be float16", lambda a: _replace(a, q=a["q"].double()), TypeError),
    ("k must be float32", lambda a: _replace(a, k=a["k"].half()), TypeError),
    ("v must have shape", lambda a: _replace(a, v=a["v"][:, :1]), ValueError),
    ("q must have a contiguous last", lambda a: _replace(a, q=a["q"].transpose(-1, -2).contiguous().mT), ValueError),
    (
        "head dim 300 is not supported",
        lambda a: _replace(a, **{n: torch.zeros(*a[n].shape[:3], 300) for n in ("q", "k", "v")}),
        ValueError,
    ),
    ("block_size must be a power of two", lambda a: _replace(a, block_size=24), ValueError),
    ("block_size must be a power of two", lambda a: _replace(a, block_size=512), ValueError),
    ("priority_query_blocks", lambda a: _replace(a, priority_query_blocks=a["kv_counts"].shape[-1] + 1), ValueError),
    ("rectify must be one of", lambda a: _replace(a, rectify="rows"), ValueError),
    ("rectify='block' needs rescale", lambda a: _replace(a, rectify="block"), ValueError),
    ("key_valid must be bool", lambda a: _replace(a, key_valid=a["key_valid"].int()), TypeError),
    ("out_index must have shape", lambda a: _replace(a, out_index=a["kv_counts"][0, 0], out=a["q"]), ValueError),
    ("out must be given", lambda a: _replace(a, out_index=torch.zeros(a["q"].shape[2], dtype=torch.int32)), ValueError),
    ("out must have shape", lambda a: _replace(a, out=torch.empty_like(a["q"])[:, :, :-1]), ValueError),
    ("row_index must be int32 or int64", lambda a: _replace(a, row_index=a["key_valid"][0, 0].float()), TypeError),
    ("dividing the 7 canonical rows", lambda a: _replace(a, row_index=torch.zeros(7, dtype=torch.int32)), ValueError),
    ("does not divide block_size", lambda a: _replace(a, tile_config=TileConfig(32, 16)), ValueError),
    ("TileConfig.block_n=24", lambda a: _replace(a, tile_config=TileConfig(16, 24)), ValueError),
    ("KernelVariant.key_mask", lambda a: _replace(a, variant=KernelVariant(key_mask="where")), ValueError),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    ("message", "corrupt", "error"), _BAD_INPUTS, ids=[f"{i}-{b[0]}" for i, b in enumerate(_BAD_INPUTS)]
)
def test_bad_inputs_raise_clear_errors(message, corrupt, error):
    with pytest.raises(error, match=message):
        block_sparse_attention(**corrupt(_valid_kwargs()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="only the interpreter refuses bfloat16")
def test_interpreter_refuses_bfloat16():
    kwargs = _valid_kwargs()
    with pytest.raises(TypeError, match="bfloat16"):
        block_sparse_attention(**_replace(kwargs, **{n: kwargs[n].bfloat16() for n in ("q", "k", "v")}))


def test_query_mode_inputs_are_checked():
    kwargs = _valid_kwargs("query")
    with pytest.raises(ValueError, match="k_block_log_count must have shape"):
        block_sparse_attention(**_replace(kwargs, k_block_log_count=kwargs["k_block_log_count"][..., :-1]))
    with pytest.raises(TypeError, match="trusted_indices must be int16 or int32"):
        block_sparse_attention(**_replace(kwargs, trusted_indices=kwargs["trusted_indices"].long()))
    with pytest.raises(ValueError, match="rectify='query' needs v_block"):
        block_sparse_attention(**_replace(kwargs, v_block=None))
    with pytest.raises(ValueError, match="rescale is only used by rectify='block'"):
        block_sparse_attention(**_replace(kwargs, rescale=kwargs["k_block_log_count"]))


@pytest.mark.parametrize("gather", [False, True])
def test_prune_keeps_tiles_that_divide_the_block(gather):
    configs = autotune_configs()
    for block_size in (16, 32, 64, 128, 256):
        for head_pad in (16, 64, 128, 256):
            kept = prune_tile_configs(configs, {"BLOCK_SIZE": block_size}, HEAD_PAD=head_pad, GATHER=gather)
            assert kept
            for config in kept:
                assert block_size % config.kwargs["BLOCK_M"] == 0
                assert block_size % config.kwargs["BLOCK_N"] == 0
                if head_pad > 128:
                    # A 256-wide accumulator of 128 rows does not fit in registers next to the tiles.
                    assert config.kwargs["BLOCK_M"] <= 64


@pytest.mark.parametrize("head_dim", [16, 24, 40, 72, 96, 136, 256])
@pytest.mark.parametrize("rectify", ["none", "block", "query"])
@pytest.mark.parametrize("reads", ["canonical", "gathered"])
@pytest.mark.parametrize("head_lanes", ["pad", "split"])
def test_head_dims_the_kernels_take(head_dim, rectify, reads, head_lanes):
    """Head dims 16 to 256 that are multiples of 8 (`capability.kernel_limits`), padded to a power of two in
    registers, or split into two lane groups (96 = 64 + 32, 72 = 64 + 16): the padding lanes add nothing to q . k,
    are never stored (the output rows are exactly `head_dim` wide, NaN-poisoned around) and never read (the gathered
    inputs are slices of wider rows holding 1e4)."""
    case = _small_case(rectify, grid=(2, 3, 5), text_len=5, text_padding=2, head_dim=head_dim, memory="sliced")
    _run_and_check(case, reads=reads, output="transposed", variant=KernelVariant(head_lanes=head_lanes))


@pytest.mark.parametrize(
    "head_dim, pad, split",
    [(16, (0, 0), (0, 0)), (24, (0, 0), (0, 0)), (40, (0, 0), (32, 16)), (64, (0, 0), (0, 0)),
     (72, (0, 0), (64, 16)), (80, (0, 0), (64, 16)), (96, (0, 0), (64, 32)), (112, (0, 0), (0, 0)),
     (128, (0, 0), (0, 0)), (136, (0, 0), (128, 16)), (192, (0, 0), (128, 64)), (256, (0, 0), (0, 0))],
)  # fmt: skip
def test_lane_groups(head_dim, pad, split):
    """Split only where two power-of-two groups need fewer lanes than the padded width (112 = 64 + 64 does not)."""
    assert lane_groups(head_dim, "pad") == pad
    assert lane_groups(head_dim, "split") == split


@pytest.mark.parametrize("row_offsets", ["separate", "shared"])
def test_gathered_keys_and_values_with_different_row_strides(row_offsets):
    """K from a transposed `(B, S, H, D)` buffer, V a slice of wider rows (another row stride): "shared" row offsets
    apply only where the strides agree, so both read their own rows."""
    case = _small_case("query", heads=3, head_dim=24, masked_video_share=0.1)
    q, k, v = case.original
    k, v = _stored(k, "transposed"), _stored(v, "sliced")
    assert k.stride(2) != v.stride(2)
    case = dataclasses.replace(case, original=(q, k, v))
    _run_and_check(case, reads="gathered", output="scatter", variant=KernelVariant(row_offsets=row_offsets))


def test_tile_config_register_cap():
    """A register cap travels to the launch options and through the autotuner's configs (and back)."""
    tile = TileConfig(128, 64, 8, 3, 128)
    assert tile.launch_options()["maxnreg"] == 128 and "maxnreg" not in TileConfig(64, 64).launch_options()
    assert TileConfig.of(tile.to_triton()) == tile
    for bad in (16, 300, True, 128.0):
        with pytest.raises(ValueError, match="TileConfig.max_registers"):
            TileConfig(128, 64, 8, 3, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("head_dim", [8, 12, 20, 264])
def test_head_dims_outside_the_rule_are_rejected(head_dim):
    kwargs = _valid_kwargs()
    shape = (*kwargs["q"].shape[:3], head_dim)
    tensors = {name: torch.zeros(shape) for name in ("q", "k", "v")}
    message = rf"q: head dim {head_dim} is not supported by the Triton kernels \(they take 16 <= D <= 256 with D % 8"
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(**_replace(kwargs, **tensors))


def test_head_dim_padding_does_not_read_past_the_row():
    """Canonical Q, K, V as the first 24 of 48 columns (a slice): the 8 padding lanes of the 32-wide registers must be
    masked, not read from the next 24 columns (filled with huge values here)."""
    case = _small_case("none", head_dim=24)
    wide = [_stored(t, "sliced") for t in case.canonical]
    out = torch.full_like(case.q, math.nan)
    block_sparse_attention(
        *wide, scale=case.scale, block_size=case.layout.block_size, key_valid=case.key_valid, out=out, **case.plan_args
    )
    assert relative_error(out, case.expected, zero_reference=True) < _TOLERANCE[torch.float32]


def _run_benchmark_smoke(name: str, out: Path) -> tuple[list[str], int]:
    """Run `benchmarks/<name> --smoke` on the CPU with $OUT set: its output lines and the index of its table's
    header (the table is printed last)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    env = {**os.environ, "OUT": str(out), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(script), "--smoke"], env=env, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    return lines, lines.index(next(line for line in lines if line.startswith("| shape | sparsity |")))


def test_bench_attention_runs_at_a_toy_size(tmp_path):
    """benchmarks/bench_attention.py (the GPU table of issue 17) runs end to end on the CPU with --smoke: the
    correctness checks pass, the markdown report is written under $OUT, the table is printed last."""
    lines, table = _run_benchmark_smoke("bench_attention.py", tmp_path)
    assert lines[table - 1] == "correctness: passed" and all(line.startswith("|") for line in lines[table:])
    assert len(lines) - table == 2 + 2  # header, rule, one timing row, one head-dim row
    report = (tmp_path / "bench_attention.md").read_text()
    assert "## Correctness" in report and "## Timing" in report and "FAILED" not in report


def test_tune_attention_runs_at_a_toy_size(tmp_path):
    """benchmarks/tune_attention.py (every kernel variant against cuDNN) runs end to end on the CPU with --smoke:
    every variant passes its float64 check, the report is written under $OUT, the table is printed last."""
    lines, table = _run_benchmark_smoke("tune_attention.py", tmp_path)
    assert lines[table - 1].startswith("correctness: passed") and all(line.startswith("|") for line in lines[table:])
    assert any("split" in line and "[lanes 32+16]" in line for line in lines[table:])
    report = (tmp_path / "tune_attention.md").read_text()
    assert "## Correctness" in report and "## Timing" in report and "FAILED" not in report


# --------------------------------------------------------------------------------------------------------------------
# GPU: bfloat16 at a real size (Wan 2.1 1.3B's 21 x 30 x 52 grid), plan from the reference pipeline
# --------------------------------------------------------------------------------------------------------------------


def _pipeline_case(*, grid, text_len, head_dim, rectify, dtype, heads=2, density=0.1, seed=0) -> AttentionCase:
    """Random inputs with a smooth per-block component (so pooled blocks differ) stored as `(B, S, H, D)` buffers, a
    plan from the reference stages 1-2 (GAPR off: every skipped block is trusted, the most virtual keys), the float64
    reference on the GPU."""
    device = torch.device("cuda")
    layout = token_layout(grid, text_len, False, 128)
    generator = torch.Generator(device=device).manual_seed(seed)
    seq_len = layout.seq_len

    def sample() -> torch.Tensor:
        smooth = torch.randn(1, heads, seq_len // 64 + 1, 1, head_dim, generator=generator, device=device)
        smooth = smooth.expand(-1, -1, -1, 64, -1).reshape(1, heads, -1, head_dim)[:, :, :seq_len]
        noise = torch.randn(1, heads, seq_len, head_dim, generator=generator, device=device)
        return (noise + smooth).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)

    q, k, v = sample(), sample(), sample()
    valid = torch.ones(1, 1, 1, seq_len, dtype=torch.bool, device=device)
    if text_len:
        valid[..., -text_len // 3 :] = False
    scale = 1.0 / math.sqrt(head_dim)
    estimator = PooledTiles(tile_size=32, outliers=True)
    config = SparseAttentionConfig(
        rectify=rectify, gapr=False, block_size=128, sparsity=1 - density, estimator=estimator
    )
    call = sparse_call(q, k, v, valid, layout, config, ReferenceImplementation(torch.float64), scale)
    plan = call.plan(selection=selection_of(config, density))
    assert call.prepared is not None
    stats, key_valid = call.prepared.stats, call.prepared.key_valid
    expected = attend_reference(
        call.prepared.q, call.prepared.k, call.prepared.v, key_valid, plan, stats, layout, scale=scale, rectify=rectify
    )
    plan_args = {
        "kv_counts": plan.kv_counts,
        "kv_indices": plan.kv_indices,
        "rectify": rectify,
        **_rectify_args(rectify, plan, stats, layout.num_blocks),
    }
    canonical = tuple(reference.gather_canonical(t, layout) for t in (q, k, v))
    return AttentionCase((q, k, v), canonical, key_valid, plan_args, layout, scale, expected)  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.parametrize("reads", ["canonical", "gathered"])
@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize("rectify", ["none", "block", "query"])
def test_gpu_bf16_real_size(head_dim, rectify, reads):
    case = _pipeline_case(grid=(21, 30, 52), text_len=0, head_dim=head_dim, rectify=rectify, dtype=torch.bfloat16)
    error = _run_and_check(case, reads=reads, output="transposed")
    print(f"bf16 21x30x52 D={head_dim} rectify={rectify} {reads}: relative error {error:.2e}")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [80, 96])
@pytest.mark.parametrize("rectify", ["block", "query"])
@pytest.mark.parametrize("head_lanes", ["pad", "split"])
def test_gpu_bf16_head_dims_that_are_not_powers_of_two(head_dim, rectify, head_lanes):
    """CogVideoX-like head dims, padded to 128 in registers or split into 64 + 32 / 64 + 16 lanes."""
    case = _pipeline_case(grid=(9, 30, 45), text_len=226, head_dim=head_dim, rectify=rectify, dtype=torch.bfloat16)
    variant = KernelVariant(head_lanes=head_lanes)
    error = _run_and_check(case, reads="gathered", output="transposed", variant=variant)
    print(f"bf16 9x30x45 D={head_dim} rectify={rectify} {head_lanes}: relative error {error:.2e}")


@pytest.mark.gpu
@pytest.mark.parametrize("reads", ["canonical", "gathered"])
@pytest.mark.parametrize("rectify", ["none", "query"])
def test_gpu_bf16_text_padding(rectify, reads):
    """Hunyuan-like: text last with padded text keys, output scattered with rows dropped."""
    case = _pipeline_case(grid=(5, 9, 16), text_len=256, head_dim=128, rectify=rectify, dtype=torch.bfloat16)
    _run_and_check(
        case,
        reads=reads,
        output="scatter",
        drop_share=0.2,
        index_dtype=torch.int32,
        priority=case.layout.num_text_blocks,
    )


def _tile_candidates() -> list:
    """(head dim, read mode, config): every candidate the autotuner's pruning hook offers a call of 128-token blocks
    with that head dim and read mode (a candidate of another head dim may not fit in shared memory: the hook never
    offers it there)."""
    cases = []
    for head_dim in (64, 128, 256):
        for reads in ("canonical", "gathered"):
            kept = prune_tile_configs(
                autotune_configs(), {"BLOCK_SIZE": 128}, HEAD_PAD=head_dim, GATHER=reads == "gathered"
            )
            cases += [pytest.param(head_dim, reads, config, id=f"D{head_dim}-{reads}-{config}") for config in kept]
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, reads, config", _tile_candidates())
def test_gpu_every_tile_config(head_dim, reads, config):
    """Each autotuning candidate computes the same function (the autotuner may pick any of them)."""
    case = _pipeline_case(grid=(7, 11, 13), text_len=77, head_dim=head_dim, rectify="query", dtype=torch.float16)
    _run_and_check(case, reads=reads, output="scatter", tile_config=TileConfig.of(config))


@pytest.mark.parametrize("entries", [6, 7])
def test_int16_block_lists_are_read_as_int32_words_or_widened(entries):
    """Why the words: a 2-byte load keeps Triton from pipelining the key loads that depend on it (the kernel's
    `_list_entries`). An odd number of entries cannot be viewed as words: the lists are widened instead."""
    from spattn_compile.kernels.block_sparse_attention import _block_lists

    lists = [torch.arange(entries, dtype=torch.int16).flip(0), torch.full((entries,), 3, dtype=torch.int16)]
    got, packed = _block_lists(lists)
    assert packed == (entries % 2 == 0)
    for words, original in zip(got, lists):
        assert words.dtype == torch.int32
        if packed:
            low, high = words & 0xFFFF, words >> 16
            assert torch.equal(torch.stack([low, high], 1).reshape(-1), original.to(torch.int32))
        else:
            assert torch.equal(words, original.to(torch.int32))


def test_autotuned_choice_is_keyed_by_shape():
    """The tile choice depends on the call's shape (query blocks and heads), not only on its constexprs: keyed by
    constexprs alone, a small first call (a warm-up, a short clip) chose the tile of every later call, which cost the
    Wan 14B 720p call 25% on the H200 (benchmarks/NOTES_attention.md)."""
    from spattn_compile.kernels import block_sparse_attention as kernel_module

    keys = kernel_module._autotuned_kernel.keys
    assert "num_q_blocks" in keys and "num_heads" in keys, keys
