"""Probe estimators: a few query vectors per block, each scored exactly against every key.

A block's true attention mass on key block j is the mean over its query rows of the softmax probability that falls
on j. Pooled scoring replaces both the rows and the keys by means and so misses what a mean hides: a sink or any
key far from its tile's mean, and queries that differ inside a block. Probe estimators keep the keys exact and
summarise only the queries: each query block's real rows are split into `R` consecutive strata (consecutive in the
Hilbert order, so each stratum is a compact piece of the brick), each stratum gives one *probe* vector with a weight
(the stratum's row count), and

    P_hat[i, j] = sum_p w_p * softmax_p(j) / sum_p w_p,     softmax_p(j) = sum_{k in j} exp(s q_p . k) / Z_p,

where `Z_p` runs over every unmasked key of the sequence (video and text). The kernel computes each probe's
log-mass per key block, `log sum_{k in j} exp(s q_p . k)` (one max and one sum per block, the keys streamed once),
and combines them through the probe's log-sum-exp, so every probe's mass is exact, sinks and text included.

- `SampledRows(rows=r)`: the probe of a stratum is its middle row, a real query. Its scores are the exact mass of
  those rows (an unbiased estimate of the block's mass), and with `rows == block_size` every row is a probe: the
  scores are the true block mass.
- `QueryTiles(tile_size=t)`: the probe of a tile of `t` rows is the tile's mean query. A mean query is shorter than its
  rows, so its softmax is flatter: it spreads over the keys that any row of the tile prefers, which covers the union
  of the rows' targets better than the same number of single rows on inputs whose tokens differ inside a block.

Cost: `R / block_size` of the dense `Q K^T` products and exponentials (no `P V`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import torch

from ..layout import TokenLayout
from .base import EstimatorConfig, EstimatorInputs, probe_weights, register_estimator

__all__ = ["QueryTiles", "SampledRows", "probe_scores_reference", "probe_weights", "sampled_row_probes"]


@dataclasses.dataclass(frozen=True)
class SampledRows(EstimatorConfig):
    """`rows` real query rows per block, one from the middle of each of `rows` consecutive strata, scored exactly
    against every key. `rows` in [1, block_size]; `rows == block_size` gives the true block mass."""

    name = "sampled_rows"
    measures_mass = True
    rows: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.rows, numbers.Integral) and not isinstance(self.rows, bool):
            object.__setattr__(self, "rows", int(self.rows))  # NumPy integers too
        if isinstance(self.rows, bool) or not isinstance(self.rows, int):
            raise TypeError(f"SampledRows.rows={self.rows!r} has type {type(self.rows).__name__}: expected an int")
        if self.rows < 1:
            raise ValueError(f"SampledRows.rows={self.rows} is invalid: expected an int >= 1")

    def check_block_size(self, block_size: int) -> None:
        if self.rows > block_size:
            raise ValueError(
                f"SparseAttentionConfig.estimator=SampledRows(rows={self.rows}) is invalid with "
                f"block_size={block_size}: expected rows <= block_size"
            )

    def query_probes_per_block(self, block_size: int) -> int:
        return self.rows


@dataclasses.dataclass(frozen=True)
class QueryTiles(EstimatorConfig):
    """The mean query of every tile of `tile_size` rows (a power of two from 16, dividing the block size) scored
    exactly against every key."""

    name = "query_tiles"
    tile_size: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.tile_size, numbers.Integral) and not isinstance(self.tile_size, bool):
            object.__setattr__(self, "tile_size", int(self.tile_size))  # NumPy integers too
        value = self.tile_size
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"QueryTiles.tile_size={value!r} has type {type(value).__name__}: expected an int")
        if value < 16 or value > 256 or value & (value - 1):
            raise ValueError(f"QueryTiles.tile_size={value} is invalid: expected a power of two from 16 to 256")

    def pool_tile_size(self, block_size: int) -> int:
        return self.tile_size

    def check_block_size(self, block_size: int) -> None:
        if block_size % self.tile_size:
            raise ValueError(
                f"SparseAttentionConfig.estimator=QueryTiles(tile_size={self.tile_size}) is invalid with "
                f"block_size={block_size}: the tile size must divide the block size"
            )

    def query_probes_per_block(self, block_size: int) -> int:
        return block_size // self.tile_size


@functools.lru_cache(maxsize=64)
def _sampled_rows_cpu(layout: TokenLayout, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    nb, bs = layout.num_video_blocks, layout.block_size
    counts = layout.row_count[:nb].tolist()
    positions, weights = [], []
    for block, real in enumerate(counts):
        # The real rows of a block are its first `real` canonical rows (padding only ends the last video block).
        for stratum in range(rows):
            low, high = stratum * real // rows, (stratum + 1) * real // rows
            positions.append(block * bs + (low + high - 1) // 2 if high > low else block * bs)
            weights.append(float(high - low))
    return torch.tensor(positions, dtype=torch.int64), torch.tensor(weights, dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def _sampled_rows_on(layout: TokenLayout, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    positions, weights = _sampled_rows_cpu(layout, rows)
    return positions.to(device), weights.to(device)


def sampled_row_probes(layout: TokenLayout, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 `(NB * rows,)` canonical rows of the probes and float32 `(NB * rows,)` their weights (stratum sizes; 0
    for an empty stratum of a short last block). Probes of block i are entries `i * rows ... (i + 1) * rows - 1`.
    Cached per device: the copy to the device happens once, so a call can be captured in a CUDA graph."""
    return _sampled_rows_on(layout, rows, torch.device(device))



def probe_scores_reference(
    probes: torch.Tensor, weights: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor, layout: TokenLayout,
    scale: float,
) -> torch.Tensor:  # fmt: skip
    """`P_hat (B, H, NB, NB + 1)` from `probes (B, H, NB * R, D)` with `weights (NB * R,)` or `(B, H, NB * R)`
    (module docstring; non-finite probes weigh nothing), in at least float32, queries chunked so that no more than
    ~256 MiB of logits exist at once. `key_valid` (bool `(B, H, P)`) are the keys to score against."""
    dtype = torch.promote_types(probes.dtype, torch.float32)
    b, h, num_probes, _ = probes.shape
    nb = layout.num_video_blocks
    per_block = num_probes // nb
    keys = k.to(dtype)
    column = (torch.arange(layout.padded_len, device=k.device) // layout.block_size).clamp(max=nb)
    mass = torch.zeros(b, h, num_probes, nb + 1, dtype=dtype, device=k.device)
    chunk = max(1, (256 << 20) // max(1, b * h * layout.padded_len * keys.element_size()))
    for start in range(0, num_probes, chunk):
        rows = slice(start, start + chunk)
        logits = scale * probes[..., rows, :].to(dtype) @ keys.transpose(-1, -2)
        logits = logits.masked_fill(~key_valid[..., None, :], -math.inf)
        probabilities = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no valid key has no mass
        mass[..., rows, :].index_add_(-1, column, probabilities)
    weight = probe_weights(probes, weights).to(dtype).reshape(b, h, nb, per_block)
    summed = (mass.reshape(b, h, nb, per_block, nb + 1) * weight[..., None]).sum(-2)
    return summed / weight.sum(-1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)


def _sampled_rows_reference(inputs: EstimatorInputs, config: SampledRows) -> torch.Tensor:
    positions, weights = sampled_row_probes(inputs.layout, config.rows, inputs.q.device)
    probes = inputs.canonical_q().index_select(-2, positions)
    return probe_scores_reference(probes, weights, inputs.canonical_k(), inputs.key_valid, inputs.layout, inputs.scale)


def _query_tiles_reference(inputs: EstimatorInputs, config: QueryTiles) -> torch.Tensor:
    stats = inputs.stats
    return probe_scores_reference(
        stats.q_tile, stats.q_tile_count, inputs.canonical_k(), inputs.key_valid, inputs.layout, inputs.scale
    )


def _probe_rows(inputs: EstimatorInputs, positions: torch.Tensor) -> torch.Tensor:
    """`(B, H, len(positions), D)`: the query rows at canonical `positions` (real rows), a small gathered copy."""
    if inputs.source_index is None:
        return inputs.q.index_select(-2, positions)
    return inputs.q.index_select(-2, inputs.source_index.index_select(0, positions))


def _sampled_rows_kernel(inputs: EstimatorInputs, config: SampledRows) -> torch.Tensor:
    from ..kernels.probe_scores import probe_scores

    positions, weights = sampled_row_probes(inputs.layout, config.rows, inputs.q.device)
    return probe_scores(
        _probe_rows(inputs, positions), weights, inputs.k, inputs.key_valid, inputs.layout, inputs.scale,
        source_index=inputs.source_index,
    )  # fmt: skip


def _query_tiles_kernel(inputs: EstimatorInputs, config: QueryTiles) -> torch.Tensor:
    from ..kernels.probe_scores import probe_scores

    stats = inputs.stats
    return probe_scores(
        stats.q_tile, stats.q_tile_count, inputs.k, inputs.key_valid, inputs.layout, inputs.scale,
        source_index=inputs.source_index,
    )  # fmt: skip


register_estimator(SampledRows, reference=_sampled_rows_reference, kernel=_sampled_rows_kernel)
register_estimator(QueryTiles, reference=_query_tiles_reference, kernel=_query_tiles_kernel)
