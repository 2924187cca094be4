"""Helpers shared by the kernel, estimator and pipeline tests (not a test module; the harness-wide helpers are in
helpers.py): poisoned allocations, random inputs in several memory layouts, random key-padding
masks, non-finite sprinkles, the prepared inputs of both implementations, the orchestrator of one call over a given
layout (`sparse_call`, `reference_call`), and the reference plan and attention of a config (`reference_plan`,
`attend_reference`).

Every comparison is against the float64 plain-PyTorch reference, by `spattn_compile.testing.relative_error` (which
refuses an all-zero reference: such a test could not fail). `poisoned_allocations` fills every `torch.empty*`
allocation with NaN (floats), the largest value (integers) or True (bools) while it is active, so an element a kernel
fails to write cannot match the reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from spattn_compile.attention import SparseAttention
from spattn_compile.call_layout import CallLayout
from spattn_compile.config import SparseAttentionConfig
from spattn_compile.estimators import EstimatorConfig, PooledTiles, QueryTiles
from spattn_compile.implementations import Implementation, Prepared, ReferenceImplementation
from spattn_compile.inputs import key_padding_valid
from spattn_compile.plan import SparsePlan
from spattn_compile.policies import TopK, Trust, rectification_settings, rectification_terms
from spattn_compile.policies.topk import select_plan_reference
from spattn_compile.reference import rectified_sparse_attention
from spattn_compile.testing.strategies import GRIDS, HEAD_DIMS  # noqa: F401  (the kernel tests import them here)


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
    memory: str = "contiguous",
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
    token of every other canonical video block (from the second), so that empty tiles and blocks occur; the first video
    token and the first text token are always kept."""
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
    valid[..., layout.source_index[0]] = True
    if layout.num_text:
        text_start = layout.num_video if not layout.text_first else 0
        valid[..., text_start] = True
    return valid


def sprinkle_non_finite(
    generator: torch.Generator, tensors: tuple[torch.Tensor, ...], count: int
) -> tuple[torch.Tensor, ...]:
    """Copies of `tensors` with `count` random entries (over all of them) set to NaN, +inf or -inf."""
    out = [t.clone() for t in tensors]
    values = (math.nan, math.inf, -math.inf)
    for _ in range(count):
        target = out[int(torch.randint(len(out), (), generator=generator))]
        index = tuple(int(torch.randint(n, (), generator=generator)) for n in target.shape)
        target[index] = values[int(torch.randint(3, (), generator=generator))]
    return tuple(out)


def reference_prepared(query, key, value, attn_mask, layout, tile_size: int, scale: float) -> Prepared:
    """Stage 0 of the float64 reference on the inputs as given (converted exactly to float64)."""
    batch, heads, seq_len, _ = query.shape
    valid = key_padding_valid(attn_mask, batch, heads, seq_len)
    return ReferenceImplementation(torch.float64).prepare(query, key, value, layout, valid, tile_size, scale)


def triton_implementation() -> Implementation:
    """The Triton implementation (imports the kernels)."""
    from spattn_compile.implementations.triton import TritonImplementation

    return TritonImplementation()


def triton_prepared(
    query, key, value, attn_mask, layout, tile_size: int, scale: float, outliers: bool = False
) -> Prepared:
    """Stage 0 of the Triton path (`prepare_statistics`: the inputs as given, read in place) with or without the key
    tiles' outliers."""
    batch, heads, seq_len, _ = query.shape
    valid = key_padding_valid(attn_mask, batch, heads, seq_len)
    return triton_implementation().prepare(query, key, value, layout, valid, tile_size, scale, outliers)


def sparse_call(
    query, key, value, attn_mask, layout, config, implementation: Implementation, scale: float | None = None
) -> SparseAttention:
    """The orchestrator of one call over the canonical `layout` (built with `config`'s block size and reorder)."""
    call_layout = CallLayout(layout.video_grid, layout.num_text, layout.text_first)
    return SparseAttention(
        query, key, value, call_layout, attn_mask=attn_mask, scale=scale, config=config, implementation=implementation
    )


def reference_call(query, key, value, attn_mask, layout, config, scale: float | None = None) -> SparseAttention:
    """`sparse_call` with the float64 reference implementation."""
    return sparse_call(query, key, value, attn_mask, layout, config, ReferenceImplementation(torch.float64), scale)


def score_tolerance(estimator: EstimatorConfig, dtype: torch.dtype) -> float:
    """Relative error allowed between an estimator kernel's float32 scores and the float64 reference on the CPU
    interpreter: the pooled and query-tile kernels multiply float16 operands for float16 inputs (tile means rounded
    to the inputs' type), the others float32."""
    if dtype == torch.float16 and isinstance(estimator, (QueryTiles, PooledTiles)):
        return 1e-3
    return 5e-6 if dtype == torch.float32 else 2e-5


def selection_of(config: SparseAttentionConfig, density: float | None = None) -> TopK:
    """The config's top-k selection settings, at `density` when given (exactly: not through `1 - sparsity`)."""
    selection = TopK.from_config(config)
    return selection if density is None else dataclasses.replace(selection, density=density)


def trust_of(config: SparseAttentionConfig) -> Trust:
    """The trusted blocks the config's rectification mode needs in a plan."""
    return rectification_settings(config).trust


def reference_plan(scores, stats, key_valid_c, layout, *, density, config, estimator, forced_blocks=None) -> SparsePlan:
    """The reference plan of `config`'s selection at `density` and its rectification's trusted blocks, from given
    block scores (an estimator's, the true mass of the oracle)."""
    return select_plan_reference(
        scores, stats, key_valid_c, layout, selection=selection_of(config, density), trust=trust_of(config),
        estimator=estimator, forced_blocks=forced_blocks,
    )  # fmt: skip


def attend_reference(q_c, k_c, v_c, key_valid_c, plan, stats, layout, *, scale: float, rectify: str) -> torch.Tensor:
    """`reference.rectified_sparse_attention` with the terms of the rectification mode `rectify`."""
    terms = rectification_terms(rectify, plan, stats)
    return rectified_sparse_attention(q_c, k_c, v_c, key_valid_c, plan, layout, scale=scale, terms=terms)
