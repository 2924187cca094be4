"""The Triton sparse-attention pipeline: `reference.sparse_attention_reference`'s stages, run by the device kernels.

This module owns the order of the stages and the tensors passed between them, and nothing numerical of its own:
`reorder_pool` (gather into the canonical layout + pooled statistics, one read of Q, K, V), `score_select` (block
scores, GAPR's gate, the plan), the rectification inputs (block mode's `R`, `c` by `reference.block_rectification`'s
small torch ops on `(B, H, NB, NB)` tensors; query mode's pooled keys), then `block_sparse_attention`, which stores
each canonical row straight into its original position of the output (the inverse reorder fused into the epilogue).
Beyond the three canonical copies of Q, K, V the pipeline allocates O(B * H * (S * D / tile_size + NQ^2)) memory,
never O(S^2); it reads nothing back to the host, so it can be captured in a CUDA graph once the layout is cached. On
the CPU it runs under the Triton interpreter (`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import math

import torch

from ..config import SparseAttentionConfig
from ..layout import TokenLayout, token_layout
from ..reference import SparsePlan, block_rectification, check_plan, key_padding_valid
from .block_sparse_attention import block_sparse_attention
from .reorder_pool import reorder_pool
from .score_select import score_select

__all__ = ["triton_sparse_attention"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _output_buffer(query: torch.Tensor) -> torch.Tensor:
    """`(B, H, S, D)` with query's memory order: a transposed `(B, S, H, D)` query (the usual DiT projection output)
    gets a transposed output, so that the caller's transpose back and reshape are free."""
    batch, heads, seq_len, head_dim = query.shape
    if heads > 1 and query.transpose(1, 2).is_contiguous():
        return query.new_empty(batch, seq_len, heads, head_dim).transpose(1, 2)
    return query.new_empty(batch, heads, seq_len, head_dim)


def _has_padding_rows(layout: TokenLayout) -> bool:
    return layout.padded_len != layout.seq_len


def triton_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    video_grid: tuple[int, int, int],
    text_len: int,
    text_first: bool,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    config: SparseAttentionConfig,
    density: float | None = None,
    return_plan: bool = False,
    plan: SparsePlan | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SparsePlan]:
    """Sparse, rectified self-attention of `(B, H, S, D)` inputs with the Triton kernels; same semantics and output
    as `reference.sparse_attention_reference` (inputs validated by `spattn_compile.api`).

    Inputs are float16, bfloat16 or float32 with `D` in {16, 32, 64, 128}; any strides (a non-contiguous last dim is
    copied). `density` overrides `config.density`. A given `plan` (a cached one) skips scoring and selection, as in
    the reference: its kept blocks, trusted lists and (block mode) its `block_scores` are reused, the pooled
    statistics are fresh, `density` is ignored. Returns the output in query's dtype (and memory order: see
    `_output_buffer`), and with `return_plan` also the `SparsePlan` used.
    """
    if query.dtype not in _TRITON_DTYPES:
        raise TypeError(f"impl='triton' takes float16, bfloat16 or float32 inputs, got query of dtype {query.dtype}")
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    density = config.density if density is None else density
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    batch, heads, seq_len, head_dim = query.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))

    layout = token_layout(tuple(video_grid), text_len, text_first, config.block_size, config.reorder)
    device_layout = layout.to(query.device)
    if plan is not None:
        check_plan(plan, batch, heads, layout)
    valid = key_padding_valid(attn_mask, batch, heads, seq_len)
    pooled = reorder_pool(query, key, value, layout, tile_size=config.tile_size, key_valid=valid)
    if plan is None:
        plan = score_select(
            pooled.stats,
            pooled.k,
            pooled.key_valid,
            pooled.key_block_count,
            layout,
            scale=scale,
            density=density,
            config=config,
        )

    rectification: dict[str, torch.Tensor] = {}
    if config.rectify == "block":
        rescale, correction = block_rectification(plan, pooled.stats, layout.num_blocks)
        rectification = {"rescale": rescale, "correction": correction}
    elif config.rectify == "query":
        rectification = {
            "trusted_counts": plan.trusted_counts,
            "trusted_indices": plan.trusted_indices,
            "k_block": pooled.stats.k_block,
            "v_block": pooled.stats.v_block,
            # Trusted blocks are never empty, so the -inf of an empty block is never read.
            "k_block_log_count": pooled.stats.k_block_count.log(),
        }
    # Padding rows of a partial block are zero keys: they must be masked even when the caller masks nothing.
    needs_key_valid = valid is not None or _has_padding_rows(layout)
    out = block_sparse_attention(
        pooled.q,
        pooled.k,
        pooled.v,
        plan.kv_counts,
        plan.kv_indices,
        scale=scale,
        block_size=layout.block_size,
        key_valid=pooled.key_valid if needs_key_valid else None,
        rectify=config.rectify,
        out_index=device_layout.source_index,
        out=_output_buffer(query),
        # Text query rows attend to every block, so their programs run ~1/density times longer than a video row's:
        # started first, they do not leave a tail at the end of the grid.
        priority_query_blocks=layout.num_text_blocks,
        **rectification,
    )
    return (out, plan) if return_plan else out
