"""The sparse plan and the pooled statistics: what selection decides, and what it and the rectification read.

`SparsePlan` is the public result of planning (`spattn_compile.select_plan`) and the input of attending
(`spattn_compile.sparse_attention(..., plan=...)`), like FlexAttention's `BlockMask`: per (batch, head, query block)
of the canonical block layout (`spattn_compile.layout`), the ascending list of key blocks attended to, the skipped
blocks whose pooled summary compensates them (rectification), and the block scores the selection was made from.
Building a plan is separate from attending with it, so a plan can be inspected (`density()`, `to_dense()`, its
`repr`), built by hand (`from_mask`), cached across denoising steps, or reused for several calls of one layout.

`PooledStats` holds the tile and block means of the canonical Q, K, V (and GAPR's deviations) that the pooled
estimator, GAPR's gate and the rectification read. The plain-PyTorch reference (`reference.pool_statistics`) and the
Triton kernel (`kernels.statistics`) both produce it. `block_budget` is the budget rule of selection. See
docs/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .layout import TokenLayout, token_layout

__all__ = [
    "INDEX_DTYPE",
    "MAX_PLAN_BLOCKS",
    "PooledStats",
    "SparsePlan",
    "block_budget",
    "check_plan_blocks",
    "indices_from_mask",
    "mask_from_indices",
]

# The dtype of a plan's block lists. A plan holds two `(B, H, NQ, NQ)`-sized lists, the largest part of planning's
# memory after the block scores (at Wan 2.1 14B 720p, 40 heads and NQ = 591: 56 MB in int16, 112 MB in int32;
# benchmarks/NOTES_pipeline.md, "Memory"); int16 holds every block index of a layout of up to MAX_PLAN_BLOCKS blocks
# (4.2 M tokens at block size 128), and -1.
INDEX_DTYPE = torch.int16
MAX_PLAN_BLOCKS = torch.iinfo(INDEX_DTYPE).max


def block_budget(density: float, num_blocks: int) -> int:
    """The key blocks a query block keeps at `density`: `ceil(density * num_blocks)`, at least 1, robust to float
    noise (0.3 * 10 keeps 3, not 4). The one rule of the budget, shared by the selection policies and their kernels."""
    return max(1, min(num_blocks, math.ceil(density * num_blocks - 1e-9)))


def check_plan_blocks(num_blocks: int) -> None:
    """Raise ValueError when a plan's int16 block lists cannot index `num_blocks` blocks."""
    if num_blocks > MAX_PLAN_BLOCKS:
        raise ValueError(
            f"the layout has {num_blocks} blocks; a plan's block lists ({INDEX_DTYPE}) index at most "
            f"{MAX_PLAN_BLOCKS}: use a larger block_size"
        )


def indices_from_mask(mask: torch.Tensor, dtype: torch.dtype = INDEX_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """bool `(..., N)` -> (counts int32 `(...)`, indices `(..., N)` ascending, padded with -1), the indices in `dtype`
    (default: a plan's, int16; FlexAttention's `BlockMask` takes int32)."""
    n = mask.shape[-1]
    if dtype == torch.int16:
        check_plan_blocks(n)
    position = torch.arange(n, device=mask.device, dtype=torch.int32)
    keyed = torch.where(mask, position, torch.full_like(position, n))
    indices = keyed.sort(dim=-1).values
    indices = torch.where(indices == n, torch.full_like(indices, -1), indices)
    return mask.sum(-1, dtype=torch.int32), indices.to(dtype)


def mask_from_indices(counts: torch.Tensor, indices: torch.Tensor, num: int) -> torch.Tensor:
    """Inverse of `indices_from_mask`: bool `(..., num)` from the first `counts` entries of each index row."""
    slot = torch.arange(indices.shape[-1], device=indices.device)
    used = slot < counts[..., None]
    mask = torch.zeros(*indices.shape[:-1], num + 1, dtype=torch.bool, device=indices.device)
    target = torch.where(used, indices.long(), torch.full_like(indices, num, dtype=torch.long))
    mask.scatter_(-1, target, True)
    return mask[..., :num]


@dataclasses.dataclass(frozen=True, eq=False)
class PooledStats:
    """Pooled summaries of the video part of the canonical layout, `NT = NB * block_size / tile_size` tiles and `NB`
    video blocks. Means use true counts (real rows for queries, unmasked finite keys for keys and values); a tile or
    block with nothing counted has a zero mean.

    q_tile, k_tile: `(B, H, NT, D)`; q_tile_count, k_tile_count: `(B, H, NT)`.
    q_block, q_block_mad, k_block, k_block_mad, v_block: `(B, H, NB, D)`; k_block_count: `(B, H, NB)`.

    The tile means serve the estimators only: a preparation kept after planning holds `block_statistics_only()`.
    """

    tile_size: int
    q_tile: torch.Tensor
    q_tile_count: torch.Tensor
    k_tile: torch.Tensor
    k_tile_count: torch.Tensor
    q_block: torch.Tensor
    q_block_mad: torch.Tensor
    k_block: torch.Tensor
    k_block_mad: torch.Tensor
    v_block: torch.Tensor
    k_block_count: torch.Tensor

    def block_statistics_only(self) -> PooledStats:
        """The same statistics without tile means: `q_tile`, `k_tile` `(B, H, 0, D)` and their counts `(B, H, 0)`
        (new empty tensors, so that the tile means are freed with the estimator's inputs). Selection and attending
        read the block statistics only."""
        no_tiles = self.q_tile.new_empty(*self.q_tile.shape[:2], 0, self.q_tile.shape[-1])
        no_counts = self.q_tile_count.new_empty(*self.q_tile_count.shape[:2], 0)
        return dataclasses.replace(
            self, q_tile=no_tiles, q_tile_count=no_counts, k_tile=no_tiles, k_tile_count=no_counts
        )

    @classmethod
    def concatenate_heads(cls, parts: list[PooledStats]) -> PooledStats:
        """The statistics of head groups `parts` (in head order, one tile size) as one, concatenated over heads."""
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "tile_size"]
        tensors = {name: torch.cat([getattr(part, name) for part in parts], 1) for name in fields}
        return cls(tile_size=parts[0].tile_size, **tensors)


@dataclasses.dataclass(frozen=True, eq=False)
class SparsePlan:
    """Which key blocks each query block attends to, over the canonical layout of one call.

    The layout has `NQ = num_video_blocks + num_text_blocks` blocks of `block_size` tokens, video blocks first (in the
    order `reorder` gives), text blocks after (see `spattn_compile.layout.TokenLayout`).

    Attributes:
        layout: the canonical layout the plan indexes (grid, text span, block size, reorder).
        kv_counts: int32 `(B, H, NQ)`: how many key blocks each query block attends to.
        kv_indices: int16 (`INDEX_DTYPE`) `(B, H, NQ, NQ)`: those blocks, ascending, -1 after the count (int16 halves
            the plan's memory; a layout has at most `MAX_PLAN_BLOCKS` blocks).
        trusted_counts: int32 `(B, H, NQ)`, trusted_indices: int16 `(B, H, NQ, NB)`: skipped video key blocks whose
            pooled summary compensates them (`rectify="block"` or `"query"`); none for text query rows.
        block_scores: float `(B, H, NB, NB + 1)`: the estimate of each video query block's attention mass per video
            key block (columns 0..NB-1) and on all text keys together (column NB), each row summing to 1.
        estimator: what produced `block_scores`: an estimator's name ("query_tiles", "sampled_rows", "pooled"),
            "exact" (the true mass of every row), "oracle", or "mask" (`from_mask`, no scores).
        selected_with: the `SparseAttentionConfig` settings the plan was selected with, as (field, value) pairs
            (`select_plan` records them, so that `sparse_attention(..., plan=)` can refuse a run that contradicts
            them); empty for a plan built by hand.
    """

    layout: TokenLayout
    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    trusted_counts: torch.Tensor
    trusted_indices: torch.Tensor
    block_scores: torch.Tensor
    estimator: str
    selected_with: tuple[tuple[str, object], ...] = ()

    @property
    def num_video_blocks(self) -> int:
        return self.layout.num_video_blocks

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    @property
    def batch(self) -> int:
        return self.kv_counts.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_counts.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_counts.device

    @classmethod
    def from_mask(
        cls,
        keep: torch.Tensor,
        *,
        video_grid: tuple[int, int, int],
        text_len: int = 0,
        text_first: bool = False,
        block_size: int = 128,
        reorder: str = "hilbert",
        trusted: torch.Tensor | None = None,
        block_scores: torch.Tensor | None = None,
    ) -> SparsePlan:
        """A plan from a boolean block mask `keep (B, H, NQ, NQ)` (True: query block i attends to key block j) over
        the canonical layout of (`video_grid`, `text_len`, `text_first`, `block_size`, `reorder`).

        `trusted` (bool `(B, H, NQ, NB)`, optional) lists skipped video blocks to compensate; entries that are kept
        or in text rows are ignored. `block_scores` (optional, `(B, H, NB, NB + 1)`) is stored for block
        rectification and the report; by default the kept share of each row, uniformly.
        """
        layout = token_layout(tuple(video_grid), text_len, text_first, block_size, reorder)
        nq, nb = layout.num_blocks, layout.num_video_blocks
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 4:
            raise TypeError(f"keep must be a bool tensor of shape (B, H, {nq}, {nq}), got {keep!r:.80}")
        if tuple(keep.shape[2:]) != (nq, nq):
            raise ValueError(
                f"keep has shape {tuple(keep.shape)}, but this layout has {nq} blocks ({nb} video): expected "
                f"(B, H, {nq}, {nq})"
            )
        batch, heads = keep.shape[:2]
        kv_counts, kv_indices = indices_from_mask(keep)
        trusted_rows = torch.zeros(batch, heads, nq, nb, dtype=torch.bool, device=keep.device)
        if trusted is not None:
            if not isinstance(trusted, torch.Tensor) or tuple(trusted.shape) != (batch, heads, nq, nb):
                raise ValueError(f"trusted must be a bool tensor of shape {(batch, heads, nq, nb)}")
            trusted_rows[..., :nb, :] = trusted.to(torch.bool)[..., :nb, :] & ~keep[..., :nb, :nb]
        trusted_counts, trusted_indices = indices_from_mask(trusted_rows)
        if block_scores is None:
            video = keep[..., :nb, :nb].float()
            block_scores = torch.cat([video, torch.zeros_like(video[..., :1])], -1)
            block_scores = block_scores / block_scores.sum(-1, keepdim=True).clamp(min=1)
        elif tuple(block_scores.shape) != (batch, heads, nb, nb + 1):
            raise ValueError(f"block_scores must have shape {(batch, heads, nb, nb + 1)}")
        return cls(layout, kv_counts, kv_indices, trusted_counts, trusted_indices, block_scores, "mask")

    def to_dense(self) -> torch.Tensor:
        """bool `(B, H, NQ, NQ)`: query block i attends to key block j."""
        return mask_from_indices(self.kv_counts, self.kv_indices, self.num_blocks)

    def trusted_mask(self) -> torch.Tensor:
        """bool `(B, H, NQ, NB)`: skipped video key block j is compensated for query block i."""
        return mask_from_indices(self.trusted_counts, self.trusted_indices, self.num_video_blocks)

    def density(self) -> torch.Tensor:
        """float32 `(B, H)`: the share of video key blocks kept, averaged over the video query blocks (on device)."""
        nb = self.num_video_blocks
        kept = self.to_dense()[..., :nb, :nb].sum(-1, dtype=torch.float32)
        return kept.mean(-1) / nb

    def estimated_recall(self) -> torch.Tensor:
        """float32 `(B, H)`: the share of `block_scores` held by the kept video blocks plus the text column, averaged
        over video query blocks. A measurement of the true recall when `estimator` measures true mass."""
        nb = self.num_video_blocks
        keep = self.to_dense()[..., :nb, :nb]
        scores = self.block_scores.float()
        return ((scores[..., :nb] * keep).sum(-1) + scores[..., nb]).mean(-1)

    def check_compatible(self, batch: int, heads: int, layout: TokenLayout, device: torch.device) -> None:
        """Raise ValueError unless this plan indexes `layout` for `(batch, heads)` on `device`."""
        mine, theirs = self.layout, layout
        described = ("video_grid", "num_text", "text_first", "block_size", "reorder")
        differences = [
            f"{name}={getattr(mine, name)!r} (plan) vs {getattr(theirs, name)!r} (call)"
            for name in described
            if getattr(mine, name) != getattr(theirs, name)
        ]
        if differences:
            raise ValueError("plan does not match this call's layout: " + "; ".join(differences))
        if (self.batch, self.heads) != (batch, heads) and not (self.batch == 1 and self.heads == heads):
            raise ValueError(
                f"plan is for batch={self.batch}, heads={self.heads}; this call has batch={batch}, heads={heads}"
            )
        if self.device != device:
            raise ValueError(f"plan is on {self.device}, the inputs on {device}")

    def expand_batch(self, batch: int) -> SparsePlan:
        """The plan for `batch` samples (a batch-1 plan shared by every sample; a view, no copy)."""
        if self.batch == batch:
            return self
        expand = lambda t: t.expand(batch, *t.shape[1:])  # noqa: E731
        return dataclasses.replace(
            self,
            kv_counts=expand(self.kv_counts),
            kv_indices=expand(self.kv_indices),
            trusted_counts=expand(self.trusted_counts),
            trusted_indices=expand(self.trusted_indices),
            block_scores=expand(self.block_scores),
        )

    def __repr__(self) -> str:
        layout = self.layout
        text = f" + {layout.num_text_blocks} text" if layout.num_text_blocks else ""
        try:
            density = f"{self.density().mean().item():.3f}"
            trusted = f"{self.trusted_counts[..., : layout.num_video_blocks].float().mean().item():.1f}"
        except RuntimeError:  # fake or meta tensors carry no values
            density = trusted = "?"
        return (
            f"SparsePlan(batch={self.batch}, heads={self.heads}, grid={layout.video_grid}, "
            f"blocks={layout.num_video_blocks} video{text} of {layout.block_size}, reorder={layout.reorder!r}, "
            f"density={density}, trusted per row={trusted}, estimator={self.estimator!r})"
        )
