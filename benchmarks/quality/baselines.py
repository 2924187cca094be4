"""The peers' block masks at equal density, written here from their papers' descriptions, as registered estimators.

Each is an `EstimatorConfig` registered with `spattn_compile.estimators.register_estimator`, so the library's own
selection (the budget `ceil(density * NB)` per query block, the diagonal first) and kernels run them, through the
compiled backend exactly like the built-in estimators, at exactly the same number of kept blocks. Their score
function is plain PyTorch and serves as both the reference and the kernel. None of them rectifies in its paper, so the
benchmark runs them with `rectify="none"`.

- `SlidingTileWindow` (STA, Zhang et al. 2025, "Fast Video Generation with Sliding Tile Attention"): tokens are grouped
  into 3-D tiles and each query tile attends to the key tiles inside a box window of tiles around it, the same size
  for every query (at the border the window stays inside the video). Here the tiles are the layout's blocks (with the
  Hilbert reorder, compact bricks of about 4 x 4 x 8 tokens) and the window is sized to the budget: each query block
  keeps the key blocks nearest in (t, y, x), by the Chebyshev (box) distance between block centres measured in tiles
  (per axis, the mean extent of a block), ties by the Euclidean distance, then by index. Thresholding the box distance
  is a box window; at the border the nearest blocks lie inwards, which is STA's shifted window.
- `RadialDecay` (Radial Attention, Li et al. 2025): a static mask from spatiotemporal energy decay: each token attends
  to spatially nearby tokens with a window that halves each time the temporal distance doubles (temporal band
  `r = floor(log2(max(dt, 1)))`, `dt` in frames), so compute density decays exponentially with temporal distance.
  Here, per block pair, the ranking key is `(d + 1) * 2^r` with `d` the spatial (y, x) distance of the block centres
  in tiles; keeping the blocks with the smallest keys is keeping `d <= w / 2^r - 1` for the window `w` that meets the
  budget, which is the radial mask at block granularity (far frames drop out once their window is under one tile).
  Ties by `dt`, then index.
- `RasterMeanPool` (the first stage of SpargeAttn and MInference-style block selection): mean-pool the queries and
  keys of each block, score the pooled query against the pooled keys (a softmax over key blocks), keep the top
  blocks. Run with `reorder="none"`: blocks are runs of 128 tokens in raster order (one or two image rows), as these
  methods use them; no outlier handling, no multiplicity weights. (SpargeAttn also offers a Hilbert permutation for
  video; that variant is the library's `PooledTiles(tile_size=block_size, outliers=False)` with the default reorder.)

The static masks' scores are a ranking (`NB - rank`, normalised), not a mass estimate: their `report()` recall means
nothing; the benchmark measures recall on captured attention instead. `register_baselines()` registers the three
(idempotent; the evaluation calls it): importing this module changes no registry, so a process that only imports it
(the test suite, `fidelity.py` for `block_geometry`) keeps the library's own estimators alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from spattn_compile.estimators import EstimatorConfig, EstimatorInputs, register_estimator
from spattn_compile.layout import token_layout

__all__ = [
    "RadialDecay",
    "register_baselines",
    "RasterMeanPool",
    "SlidingTileWindow",
    "block_geometry",
    "radial_keys",
    "raster_mean_scores",
    "sliding_tile_keys",
    "static_scores",
]


@dataclasses.dataclass(frozen=True)
class SlidingTileWindow(EstimatorConfig):
    """STA: the key blocks nearest in a box window of tiles around each query block (module docstring)."""

    name = "sta_window"


@dataclasses.dataclass(frozen=True)
class RadialDecay(EstimatorConfig):
    """Radial Attention: a spatial window that halves with each doubling of the temporal distance (docstring)."""

    name = "radial_decay"


@dataclasses.dataclass(frozen=True)
class RasterMeanPool(EstimatorConfig):
    """SpargeAttn / MInference first stage: block-mean queries against block-mean keys, top blocks (docstring)."""

    name = "raster_mean_pool"


@functools.lru_cache(maxsize=32)
def block_geometry(
    video_grid: tuple[int, int, int], block_size: int, reorder: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre `(NB, 3)` of each video block in (t, y, x) token coordinates, and the tile size `(3,)`: per axis, the
    mean over blocks of the block's extent (max - min + 1). float64, on the CPU."""
    layout = token_layout(tuple(video_grid), 0, False, block_size, reorder)
    _, height, width = layout.video_grid
    raster = layout.video_perm.cpu()  # canonical video row -> raster index
    coords = torch.stack([raster // (height * width), (raster // width) % height, raster % width], -1).double()
    block = torch.arange(raster.numel()) // block_size
    nb = layout.num_video_blocks
    counts = torch.zeros(nb, dtype=torch.float64).index_add_(0, block, torch.ones(raster.numel(), dtype=torch.float64))
    centres = torch.zeros(nb, 3, dtype=torch.float64).index_add_(0, block, coords) / counts[:, None]
    low = torch.full((nb, 3), math.inf, dtype=torch.float64).scatter_reduce(
        0, block[:, None].expand(-1, 3), coords, "amin"
    )
    high = torch.full((nb, 3), -math.inf, dtype=torch.float64).scatter_reduce(
        0, block[:, None].expand(-1, 3), coords, "amax"
    )
    return centres, (high - low + 1).mean(0)


def _rounded(key: torch.Tensor) -> torch.Tensor:
    # Keys equal up to float noise must tie (symmetric offsets, lattice-aligned centres).
    return torch.round(key * 1e6) / 1e6


def sliding_tile_keys(video_grid, block_size: int, reorder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """STA's ranking keys `(NB, NB)` (query block, key block), primary and secondary: box distance and Euclidean
    distance between block centres, in tiles. Symmetric."""
    centres, tile = block_geometry(tuple(video_grid), block_size, reorder)
    offset = (centres[:, None, :] - centres[None, :, :]) / tile
    return _rounded(offset.abs().amax(-1)), _rounded(offset.norm(dim=-1))


def radial_keys(video_grid, block_size: int, reorder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Radial Attention's ranking keys `(NB, NB)`: `(d + 1) * 2^floor(log2(max(dt, 1)))` (d: spatial distance of the
    block centres in tiles, dt: temporal distance in frames) and `dt`. Symmetric."""
    centres, tile = block_geometry(tuple(video_grid), block_size, reorder)
    offset = centres[:, None, :] - centres[None, :, :]
    dt = _rounded(offset[..., 0].abs())
    spatial = (offset[..., 1:] / tile[1:]).norm(dim=-1)
    band = torch.floor(torch.log2(dt.clamp(min=1.0)))
    return _rounded((spatial + 1) * torch.exp2(band)), dt


def _rank_scores(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Row-wise scores `(NB - rank) / sum` of the lexicographic order (primary, secondary, index), ascending."""
    nb = primary.shape[-1]
    order = torch.argsort(secondary, dim=-1, stable=True)
    order = order.gather(-1, torch.argsort(primary.gather(-1, order), dim=-1, stable=True))
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nb).expand_as(order).contiguous())
    scores = (nb - rank).double()
    return scores / scores.sum(-1, keepdim=True)


@functools.lru_cache(maxsize=32)
def _static_scores_cpu(kind: str, video_grid, block_size: int, reorder: str) -> torch.Tensor:
    keys = sliding_tile_keys if kind == "sta" else radial_keys
    return _rank_scores(*keys(video_grid, block_size, reorder))


def static_scores(kind: str, inputs: EstimatorInputs) -> torch.Tensor:
    """`P_hat (B, H, NB, NB + 1)` float32 of a static mask (`kind` "sta" or "radial"); the text column is 0 (text
    blocks are always kept by selection)."""
    layout = inputs.layout
    b, h = inputs.q.shape[:2]
    ranks = _static_scores_cpu(kind, layout.video_grid, layout.block_size, layout.reorder)
    nb = layout.num_video_blocks
    scores = torch.zeros(nb, nb + 1, dtype=torch.float32)
    scores[:, :nb] = ranks.float()
    return scores.to(inputs.q.device).expand(b, h, nb, nb + 1).contiguous()


def _sliding_tile_scores(inputs: EstimatorInputs, config: SlidingTileWindow) -> torch.Tensor:
    return static_scores("sta", inputs)


def _radial_scores(inputs: EstimatorInputs, config: RadialDecay) -> torch.Tensor:
    return static_scores("radial", inputs)


def raster_mean_scores(inputs: EstimatorInputs, config: RasterMeanPool) -> torch.Tensor:
    """`P_hat (B, H, NB, NB + 1)`: softmax over key blocks (text blocks pooled the same way, summed into the last
    column) of `scale * mean(q_i) . mean(k_j)`, means over real queries and usable keys; at least float32."""
    layout = inputs.layout.to(inputs.q.device)
    dtype = torch.promote_types(inputs.q.dtype, torch.float32)
    b, h, p, d = inputs.q.shape
    nq, nb, bs = layout.num_blocks, layout.num_video_blocks, layout.block_size
    real = (layout.source_index >= 0).to(dtype)
    q = inputs.q.to(dtype).masked_fill(~(real > 0)[:, None], 0).reshape(b, h, nq, bs, d)
    q_mean = q.sum(-2)[..., :nb, :] / layout.row_count[:nb].to(dtype).clamp(min=1)[:, None]
    valid = inputs.key_valid.reshape(b, h, nq, bs)
    k = inputs.k.to(dtype).reshape(b, h, nq, bs, d).masked_fill(~valid[..., None], 0)
    k_count = valid.sum(-1)
    k_mean = k.sum(-2) / k_count.clamp(min=1)[..., None].to(dtype)
    logits = inputs.scale * q_mean @ k_mean.transpose(-1, -2)  # (B, H, NB, NQ)
    logits = logits.masked_fill((k_count == 0)[..., None, :], -math.inf)
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.cat([weights[..., :nb], weights[..., nb:].sum(-1, keepdim=True)], dim=-1)


def register_baselines() -> None:
    """Register the three masks with the library's estimator registry (again: a no-op)."""
    register_estimator(SlidingTileWindow, reference=_sliding_tile_scores, kernel=_sliding_tile_scores)
    register_estimator(RadialDecay, reference=_radial_scores, kernel=_radial_scores)
    register_estimator(RasterMeanPool, reference=raster_mean_scores, kernel=raster_mean_scores)
