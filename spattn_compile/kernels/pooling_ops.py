"""The custom ops `torch.ops.spattn.reorder_pool` and `torch.ops.spattn.score_select`: stages 0-2 as graph nodes.

This module owns the two ops' schemas and their fake (meta) implementations, so that Dynamo, AOTAutograd and Inductor
can trace a call without running Triton; the fake implementations compute every output shape from the input shapes
and integer arguments alone. Both ops are functional (they allocate their outputs). The real implementations are the
launchers of `reorder_pool` and `score_select` (CUDA, or the CPU under the Triton interpreter); validation is theirs.
`score_select` takes the layout as its describing integers and rebuilds the (cached) `TokenLayout` on the host.
"""

from __future__ import annotations

import math

import torch

from ..config import SparseAttentionConfig
from ..layout import token_layout
from ..reference import PooledStats
from .reorder_pool import reorder_pool_tensors
from .score_select import score_select

__all__ = ["reorder_pool_op", "score_select_op"]

_PoolOutputs = tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]


@torch.library.custom_op("spattn::reorder_pool", mutates_args=())
def reorder_pool_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    source_index: torch.Tensor,
    key_valid: torch.Tensor | None,
    num_video_blocks: int,
    block_size: int,
    tile_size: int,
) -> _PoolOutputs:
    """Gather into the canonical layout and pool; returns, in order, q_c, k_c, v_c, key_valid_c, q_tile, k_tile,
    k_tile_count, q_block, q_block_mad, k_block, k_block_mad, v_block, key_block_count (see
    `reorder_pool.reorder_pool_tensors` for shapes and dtypes)."""
    return reorder_pool_tensors(
        query,
        key,
        value,
        source_index,
        key_valid,
        num_video_blocks=num_video_blocks,
        block_size=block_size,
        tile_size=tile_size,
    )


@reorder_pool_op.register_fake
def _(query, key, value, source_index, key_valid, num_video_blocks, block_size, tile_size):
    batch, heads, _, head_dim = query.shape
    padded_len = source_index.shape[0]
    num_blocks = padded_len // block_size
    num_tiles = num_video_blocks * (block_size // tile_size)
    canonical = [query.new_empty(batch, heads, padded_len, head_dim) for _ in range(3)]
    key_valid_c = query.new_empty(batch, heads, padded_len, dtype=torch.bool)

    def stats(*shape):
        return query.new_empty(*shape, dtype=torch.float32)

    return (
        *canonical,
        key_valid_c,
        stats(batch, heads, num_tiles, head_dim),
        stats(batch, heads, num_tiles, head_dim),
        stats(batch, heads, num_tiles),
        *(stats(batch, heads, num_video_blocks, head_dim) for _ in range(5)),
        stats(batch, heads, num_blocks),
    )


@torch.library.custom_op("spattn::score_select", mutates_args=())
def score_select_op(
    q_tile: torch.Tensor,
    q_tile_count: torch.Tensor,
    k_tile: torch.Tensor,
    k_tile_count: torch.Tensor,
    q_block: torch.Tensor,
    q_block_mad: torch.Tensor,
    k_block: torch.Tensor,
    k_block_mad: torch.Tensor,
    key_block_count: torch.Tensor,
    k_c: torch.Tensor,
    key_valid_c: torch.Tensor,
    video_grid: list[int],
    text_len: int,
    text_first: bool,
    block_size: int,
    tile_size: int,
    reorder: str,
    scale: float,
    density: float,
    mass_threshold: float | None,
    max_density: float,
    neighbors: bool,
    gapr: bool,
    rectify: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block scores, GAPR's gate and the selection; returns kv_counts, kv_indices, trusted_counts, trusted_indices
    and block_scores of the `SparsePlan` (see `score_select.select_plan`). The statistics are `reorder_pool`'s
    outputs; the layout is rebuilt from (video_grid, text_len, text_first, block_size, reorder)."""
    layout = token_layout(tuple(video_grid), text_len, text_first, block_size, reorder)
    config = SparseAttentionConfig(
        block_size=block_size,
        tile_size=tile_size,
        reorder=reorder,
        mass_threshold=mass_threshold,
        max_density=max_density,
        neighbors=neighbors,
        gapr=gapr,
        rectify=rectify,
    )
    stats = PooledStats(
        tile_size=tile_size,
        q_tile=q_tile,
        q_tile_count=q_tile_count,
        k_tile=k_tile,
        k_tile_count=k_tile_count,
        q_block=q_block,
        q_block_mad=q_block_mad,
        k_block=k_block,
        k_block_mad=k_block_mad,
        v_block=k_block,  # not read by scoring or selection
        k_block_count=key_block_count[..., : layout.num_video_blocks],
    )
    plan = score_select(stats, k_c, key_valid_c, key_block_count, layout, scale=scale, density=density, config=config)
    return plan.kv_counts, plan.kv_indices, plan.trusted_counts, plan.trusted_indices, plan.block_scores


@score_select_op.register_fake
def _(
    q_tile,
    q_tile_count,
    k_tile,
    k_tile_count,
    q_block,
    q_block_mad,
    k_block,
    k_block_mad,
    key_block_count,
    k_c,
    key_valid_c,
    video_grid,
    text_len,
    text_first,
    block_size,
    tile_size,
    reorder,
    scale,
    density,
    mass_threshold,
    max_density,
    neighbors,
    gapr,
    rectify,
):
    # Shapes only: building the layout here would create (fake) tensors inside the layout cache.
    batch, heads = q_tile.shape[:2]
    num_video_blocks = -(-math.prod(video_grid) // block_size)
    num_blocks = num_video_blocks + -(-text_len // block_size)
    counts = q_tile.new_empty(batch, heads, num_blocks, dtype=torch.int32)
    return (
        counts,
        q_tile.new_empty(batch, heads, num_blocks, num_blocks, dtype=torch.int32),
        q_tile.new_empty(batch, heads, num_blocks, dtype=torch.int32),
        q_tile.new_empty(batch, heads, num_blocks, num_video_blocks, dtype=torch.int32),
        q_tile.new_empty(batch, heads, num_video_blocks, num_video_blocks + 1, dtype=torch.float32),
    )
