"""The pooled estimator: tile-mean queries against tile-mean keys, with each key tile's outlier kept apart.

Hierarchical scoring (DFSAttn) with isolated text keys and multiplicity weights (Rectified SpaAttn's IPAR): query
tile a (the mean of `tile_size` canonical queries) scores key tile j by `scale * q_a . k_j + log n_j`, every text key
by its own logit, a softmax over all of them, and the block score is the mean over the query tiles of a block of the
summed weights of the key tiles of each key block. It costs about `1 / tile_size^2` of the dense `Q K^T`.

A tile's mean stands for its keys only when they are alike. Attention sinks and other outlier keys are not: averaged
into their tile they vanish, and with them the block that holds most of every query's mass. With `outliers=True` the
key of each tile farthest from the tile's mean (the one the mean misrepresents most, whatever direction the queries
come from) is scored on its own, with multiplicity 1, and the tile's mean is taken over the other keys. The cost stays
`~2 / tile_size^2` of `Q K^T`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from .base import EstimatorConfig, EstimatorInputs, register_estimator

__all__ = ["PooledTiles", "pooled_scores_reference", "tile_outliers_reference"]


def _check_tile(owner: str, tile_size: object) -> None:
    if isinstance(tile_size, bool) or not isinstance(tile_size, int):
        raise TypeError(f"{owner}.tile_size={tile_size!r} has type {type(tile_size).__name__}: expected an int")
    if tile_size < 1 or tile_size > 256 or tile_size & (tile_size - 1):
        raise ValueError(f"{owner}.tile_size={tile_size!r} is invalid: expected a power of two from 1 to 256")


@dataclasses.dataclass(frozen=True)
class PooledTiles(EstimatorConfig):
    """Tile-mean queries and keys (`tile_size` rows, a power of two dividing the block size, >= 16), each key tile's
    outlier key (the farthest from its mean) scored apart when `outliers`."""

    name = "pooled"
    tile_size: int = 16
    outliers: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tile_size, numbers.Integral) and not isinstance(self.tile_size, bool):
            object.__setattr__(self, "tile_size", int(self.tile_size))  # NumPy integers too
        _check_tile("PooledTiles", self.tile_size)
        if self.tile_size < 16:
            raise ValueError(f"PooledTiles.tile_size={self.tile_size} is invalid: expected a power of two >= 16")
        if not isinstance(self.outliers, bool):
            raise TypeError(f"PooledTiles.outliers={self.outliers!r} must be a bool")

    def pool_tile_size(self, block_size: int) -> int:
        return self.tile_size

    @property
    def reads_tile_outliers(self) -> bool:
        return self.outliers

    def check_block_size(self, block_size: int) -> None:
        if block_size % self.tile_size:
            raise ValueError(
                f"SparseAttentionConfig.estimator=PooledTiles(tile_size={self.tile_size}) is invalid with "
                f"block_size={block_size}: the tile size must divide the block size"
            )


def tile_outliers_reference(
    k: torch.Tensor, key_valid: torch.Tensor, num_tiles: int, tile_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per video key tile: the mean of its valid keys but the one farthest from their mean, their count, that key and
    whether it exists. Returns `(rest_mean (B, H, NT, D), rest_count (B, H, NT), outlier (B, H, NT, D), outlier_count
    (B, H, NT))` in the dtype of `k` (counts too); ties go to the first row of the tile."""
    b, h = k.shape[:2]
    rows = num_tiles * tile_size
    keys = k[..., :rows, :].reshape(b, h, num_tiles, tile_size, -1)
    valid = key_valid[..., :rows].reshape(b, h, num_tiles, tile_size)
    counted = valid.to(k.dtype)
    mean = (keys.masked_fill(~valid[..., None], 0).sum(-2) / counted.sum(-1).clamp(min=1)[..., None])[..., None, :]
    distance = (keys - mean).pow(2).sum(-1).masked_fill(~valid, -1.0)
    first = distance.argmax(-1, keepdim=True)  # argmax returns the first maximum
    is_outlier = torch.zeros_like(valid).scatter(-1, first, True) & valid
    rest = valid & ~is_outlier
    rest_count = rest.to(k.dtype).sum(-1)
    # masked_fill, not a product with the mask: a left-out key may hold an infinity, and 0 * inf is NaN.
    rest_mean = keys.masked_fill(~rest[..., None], 0).sum(-2) / rest_count.clamp(min=1)[..., None]
    outlier = keys.gather(-2, first[..., None].expand(-1, -1, -1, -1, keys.shape[-1])).squeeze(-2)
    has_outlier = is_outlier.any(-1)
    return rest_mean, rest_count, outlier.masked_fill(~has_outlier[..., None], 0), has_outlier.to(k.dtype)


def pooled_scores_reference(inputs: EstimatorInputs, config: PooledTiles) -> torch.Tensor:
    """`P_hat (B, H, NB, NB + 1)` of the pooled estimator in at least float32 (module docstring)."""
    stats, layout = inputs.stats, inputs.layout
    dtype = torch.promote_types(stats.q_tile.dtype, torch.float32)
    nb, tile = layout.num_video_blocks, stats.tile_size
    n_tiles = stats.q_tile.shape[-2]
    q_tile = stats.q_tile.to(dtype)
    key_sets: list[tuple[torch.Tensor, torch.Tensor]]
    if config.outliers:
        rest, rest_count, outlier, outlier_count = tile_outliers_reference(
            inputs.canonical_k().to(dtype), inputs.key_valid, n_tiles, tile
        )
        key_sets = [(rest, rest_count), (outlier, outlier_count)]
    else:
        key_sets = [(stats.k_tile.to(dtype), stats.k_tile_count.to(dtype))]
    columns = [inputs.scale * q_tile @ keys.transpose(-1, -2) + counts.log()[..., None, :] for keys, counts in key_sets]
    text = inputs.canonical_k()[..., layout.text_offset :, :].to(dtype)
    if text.shape[-2]:
        text_logits = inputs.scale * q_tile @ text.transpose(-1, -2)
        columns.append(text_logits.masked_fill(~inputs.key_valid[..., None, layout.text_offset :], -math.inf))
    logits = torch.cat(columns, dim=-1)
    # A query tile whose keys are all masked has no finite logit: its weights are zero, never NaN.
    row_max = logits.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(dtype).min)
    weights = torch.exp(logits - row_max)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)

    b, h = weights.shape[:2]
    tiles_per_block = layout.block_size // tile
    per_block = sum(
        weights[..., index * n_tiles : (index + 1) * n_tiles].reshape(b, h, n_tiles, nb, tiles_per_block).sum(-1)
        for index in range(len(key_sets))
    )
    assert isinstance(per_block, torch.Tensor)
    text_col = weights[..., len(key_sets) * n_tiles :].sum(-1, keepdim=True)
    tile_scores = torch.cat([per_block, text_col], dim=-1)  # (B, H, NT, NB + 1)
    q_count = stats.q_tile_count.to(dtype)[..., None]  # (B, H, NT, 1): finite real query rows per tile
    summed = (tile_scores * q_count).reshape(b, h, nb, tiles_per_block, -1).sum(-2)
    block_count = q_count.reshape(b, h, nb, tiles_per_block, 1).sum(-2)
    return summed / block_count.clamp(min=1)


def _pooled_scores_kernel(inputs: EstimatorInputs, config: PooledTiles) -> torch.Tensor:
    from ..kernels.pooled_scores import pooled_scores

    return pooled_scores(inputs, outliers=config.outliers)


register_estimator(PooledTiles, reference=pooled_scores_reference, kernel=_pooled_scores_kernel)
