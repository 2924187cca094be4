"""Plain-PyTorch reference of every stage in ALGORITHMS.md: the specification and the CPU execution path.

Each stage is a function on SDPA-layout tensors `(B, H, S, D)` (or on the canonical block layout of
`spattn_compile.layout`), of any float dtype, computing in `compute_dtype` (float64 for tests; by default float32 or
wider). The stages are:

0. `gather_canonical` / `scatter_canonical`: the Hilbert reorder into, and back out of, the canonical layout.
1. `pool_statistics`, `block_scores`: tile and block means, mean absolute deviations, and the hierarchical block
   score `P_hat` with isolated text keys and multiplicity weights.
2. `select_blocks`: budget, mass threshold, max density, forced diagonal / neighbour / text blocks.
   `gapr_trusted`: GAPR's gate. `build_plan` packs both into a `SparsePlan` of int32 index lists.
3. `rectified_sparse_attention`: exact attention over the kept blocks, with block- or query-mode rectification.

`sparse_attention_reference` runs them in order. `dense_attention` and `attention_block_mass` give the float64 ground
truth (they cost O(S^2) memory in query chunks and are meant for tests, benchmarks and the oracle).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .config import SparseAttentionConfig
from .layout import TokenLayout, neighbor_block_mask, token_layout

__all__ = [
    "PooledStats",
    "SparsePlan",
    "attention_block_mass",
    "block_budget",
    "block_rectification",
    "block_scores",
    "build_plan",
    "canonical_key_valid",
    "check_plan",
    "dense_attention",
    "gapr_trusted",
    "gather_canonical",
    "indices_from_mask",
    "key_padding_valid",
    "mask_from_indices",
    "pool_statistics",
    "rectified_sparse_attention",
    "scatter_canonical",
    "select_blocks",
    "sparse_attention_reference",
]

# Bytes of logits one chunk of query rows may materialise in the O(S^2) reference attention.
_CHUNK_BYTES = 1 << 28


def _compute_dtype(dtype: torch.dtype, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# Stage 0: reorder and masks
# --------------------------------------------------------------------------------------------------------------------


def gather_canonical(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """`(B, H, S, D)` in the original order -> `(B, H, layout.padded_len, D)` in the canonical layout; padding rows
    are zero."""
    source = layout.to(x.device).source_index
    gathered = x.index_select(-2, source.clamp(min=0))
    return gathered.masked_fill((source < 0)[:, None], 0)


def scatter_canonical(y: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Inverse of `gather_canonical`: `(B, H, padded_len, D)` -> `(B, H, S, D)`; padding rows are dropped."""
    source = layout.to(y.device).source_index
    real = (source >= 0).nonzero().squeeze(-1)
    out = y.new_empty(*y.shape[:-2], layout.seq_len, y.shape[-1])
    out[..., source[real], :] = y[..., real, :]
    return out


def key_padding_valid(attn_mask: torch.Tensor | None, batch: int, heads: int, seq_len: int) -> torch.Tensor | None:
    """Validate a boolean key-padding mask in SDPA's broadcastable form and return it as bool `(B, H, S)` (a view).

    Accepted shapes broadcast to `(B, H, 1, S)`: `(S,)`, `(1, S)`, `(B|1, 1, S)`, `(B|1, H|1, 1, S)`. True keeps a
    key, as in SDPA. Masks that vary over queries, or float masks, are not key-padding masks and raise ValueError.
    """
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be a boolean key-padding mask (True = attend), got dtype {attn_mask.dtype}")
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() < 1 or attn_mask.dim() > 4 or shape[-1] != seq_len:
        raise ValueError(f"attn_mask of shape {shape} is not a key-padding mask: expected (..., 1, {seq_len})")
    full = (1,) * (4 - attn_mask.dim()) + shape
    if full[2] != 1 or full[0] not in (1, batch) or full[1] not in (1, heads):
        raise ValueError(
            f"attn_mask of shape {shape} is not a key-padding mask: expected a shape broadcastable to "
            f"({batch}, {heads}, 1, {seq_len}) with a query dimension of 1"
        )
    return attn_mask.reshape(full)[:, :, 0, :].expand(batch, heads, seq_len)


def canonical_key_valid(
    valid: torch.Tensor | None, layout: TokenLayout, batch: int, heads: int, device: torch.device
) -> torch.Tensor:
    """bool `(B, H, padded_len)`: the canonical row is a real token and its key is not masked out."""
    source = layout.to(device).source_index
    real = (source >= 0).expand(batch, heads, -1)
    if valid is None:
        return real
    return real & valid.index_select(-1, source.clamp(min=0))


# --------------------------------------------------------------------------------------------------------------------
# Stage 1: pooling and hierarchical scoring
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PooledStats:
    """Pooled summaries of the video part of the canonical layout. `NT = num_video_blocks * block_size / tile_size`
    tiles, `NB` video blocks. Means use true counts (real rows for queries, unmasked keys for keys and values); a
    tile or block with no counted row has a zero mean.

    q_tile, k_tile: `(B, H, NT, D)`; q_tile_count: `(NT,)`; k_tile_count: `(B, H, NT)`.
    q_block, q_block_mad, k_block, k_block_mad, v_block: `(B, H, NB, D)`; k_block_count: `(B, H, NB)`.
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


def _group_mean(x: torch.Tensor, weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean over consecutive groups of `group` rows: x `(B, H, N, D)`, weight `(B|1, H|1, N)`."""
    b, h, n, d = x.shape
    w = weight.to(x.dtype)
    total = (x * w[..., None]).reshape(b, h, n // group, group, d).sum(-2)
    count = w.expand(b, h, n).reshape(b, h, n // group, group).sum(-1)
    return total / count.clamp(min=1)[..., None], count


def _group_mad(x: torch.Tensor, mean: torch.Tensor, weight: torch.Tensor, group: int) -> torch.Tensor:
    b, h, n, d = x.shape
    w = weight.to(x.dtype)
    dev = (x - mean.repeat_interleave(group, dim=-2)).abs() * w[..., None]
    count = w.expand(b, h, n).reshape(b, h, n // group, group).sum(-1)
    return dev.reshape(b, h, n // group, group, d).sum(-2) / count.clamp(min=1)[..., None]


def pool_statistics(
    q_c: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    key_valid_c: torch.Tensor,
    layout: TokenLayout,
    tile_size: int,
) -> PooledStats:
    """Stage 1.1 and GAPR's statistics from canonical Q, K, V `(B, H, padded_len, D)` (compute in their dtype)."""
    bs = layout.block_size
    if bs % tile_size:
        raise ValueError(f"tile_size={tile_size} must divide block_size={bs}")
    n_video_rows = layout.num_video_blocks * bs
    q, k, v = q_c[..., :n_video_rows, :], k_c[..., :n_video_rows, :], v_c[..., :n_video_rows, :]
    q_real = (layout.to(q_c.device).source_index[:n_video_rows] >= 0)[None, None]
    k_valid = key_valid_c[..., :n_video_rows]

    q_tile, q_tile_count = _group_mean(q, q_real, tile_size)
    k_tile, k_tile_count = _group_mean(k, k_valid, tile_size)
    q_block, _ = _group_mean(q, q_real, bs)
    k_block, k_block_count = _group_mean(k, k_valid, bs)
    v_block, _ = _group_mean(v, k_valid, bs)
    return PooledStats(
        tile_size=tile_size,
        q_tile=q_tile,
        q_tile_count=q_tile_count[0, 0],
        k_tile=k_tile,
        k_tile_count=k_tile_count,
        q_block=q_block,
        q_block_mad=_group_mad(q, q_block, q_real, bs),
        k_block=k_block,
        k_block_mad=_group_mad(k, k_block, k_valid, bs),
        v_block=v_block,
        k_block_count=k_block_count,
    )


def block_scores(
    stats: PooledStats,
    k_c: torch.Tensor,
    key_valid_c: torch.Tensor,
    layout: TokenLayout,
    scale: float,
) -> torch.Tensor:
    """Stage 1.2-1.4: `P_hat (B, H, NB, NB + 1)`: estimated share of query block i's attention mass on video key block
    j (columns 0..NB-1) and on all text keys together (column NB). Each row sums to 1 (rows of blocks with no real
    query are uniform over nothing and set to 0). Computed in at least float32."""
    dtype = torch.promote_types(stats.q_tile.dtype, torch.float32)
    q_tile = stats.q_tile.to(dtype)
    logits = scale * q_tile @ stats.k_tile.to(dtype).transpose(-1, -2)  # (B, H, NT, NT)
    log_mult = torch.log(stats.k_tile_count.to(dtype))[..., None, :]  # -inf for empty tiles
    logits = logits + log_mult
    text = k_c[..., layout.text_offset :, :].to(dtype)
    if text.shape[-2]:
        text_logits = scale * q_tile @ text.transpose(-1, -2)
        text_logits = text_logits.masked_fill(~key_valid_c[..., None, layout.text_offset :], -math.inf)
        logits = torch.cat([logits, text_logits], dim=-1)
    # Every valid query tile has at least one finite logit unless all keys are masked; guard that row to zeros.
    row_max = logits.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(dtype).min)
    weights = torch.exp(logits - row_max)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)

    n_tiles = stats.q_tile.shape[-2]
    tiles_per_block = layout.block_size // stats.tile_size
    video = weights[..., :n_tiles]
    b, h = video.shape[:2]
    per_block = video.reshape(b, h, n_tiles, layout.num_video_blocks, tiles_per_block).sum(-1)
    text_col = weights[..., n_tiles:].sum(-1, keepdim=True)
    tile_scores = torch.cat([per_block, text_col], dim=-1)  # (B, H, NT, NB + 1)
    q_count = stats.q_tile_count.to(dtype)[:, None]
    summed = (tile_scores * q_count).reshape(b, h, layout.num_video_blocks, tiles_per_block, -1).sum(-2)
    block_count = q_count.reshape(layout.num_video_blocks, tiles_per_block, 1).sum(-2)
    return summed / block_count.clamp(min=1)


def gapr_trusted(stats: PooledStats) -> torch.Tensor:
    """GAPR's gate, bool `(B, H, NB, NB)`: pooled block pair (i, j) approximates its attention better than its
    first-order pooling error, `|q_i . k_j| > |dq_i . k_j| + |q_i . dk_j|`, and key block j has an unmasked key."""
    dtype = torch.promote_types(stats.q_block.dtype, torch.float32)
    q, dq = stats.q_block.to(dtype), stats.q_block_mad.to(dtype)
    k, dk = stats.k_block.to(dtype), stats.k_block_mad.to(dtype)
    gain = (q @ k.transpose(-1, -2)).abs()
    error = (dq @ k.transpose(-1, -2)).abs() + (q @ dk.transpose(-1, -2)).abs()
    return (gain > error) & (stats.k_block_count > 0)[..., None, :]


# --------------------------------------------------------------------------------------------------------------------
# Stage 2: selection and the plan
# --------------------------------------------------------------------------------------------------------------------


def block_budget(density: float, num_blocks: int) -> int:
    """`ceil(density * num_blocks)`, at least 1, robust to float noise (0.3 * 10 keeps 3, not 4)."""
    return max(1, min(num_blocks, math.ceil(density * num_blocks - 1e-9)))


def indices_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool `(..., N)` -> (counts int32 `(...)`, indices int32 `(..., N)` ascending, padded with -1)."""
    n = mask.shape[-1]
    position = torch.arange(n, device=mask.device, dtype=torch.int32)
    keyed = torch.where(mask, position, torch.full_like(position, n))
    indices = keyed.sort(dim=-1).values
    indices = torch.where(indices == n, torch.full_like(indices, -1), indices)
    return mask.sum(-1, dtype=torch.int32), indices


def mask_from_indices(counts: torch.Tensor, indices: torch.Tensor, num: int) -> torch.Tensor:
    """Inverse of `indices_from_mask`: bool `(..., num)` from the first `counts` entries of each index row."""
    slot = torch.arange(indices.shape[-1], device=indices.device)
    used = slot < counts[..., None]
    mask = torch.zeros(*indices.shape[:-1], num + 1, dtype=torch.bool, device=indices.device)
    target = torch.where(used, indices.long(), torch.full_like(indices, num, dtype=torch.long))
    mask.scatter_(-1, target, True)
    return mask[..., :num]


def select_blocks(
    scores: torch.Tensor,
    layout: TokenLayout,
    *,
    density: float,
    key_block_nonempty: torch.Tensor,
    mass_threshold: float | None = None,
    max_density: float = 1.0,
    neighbors: bool = False,
) -> torch.Tensor:
    """Stage 2: bool keep mask `(B, H, num_blocks, num_blocks)` over (query block, key block) of the canonical layout.

    Video query rows keep: the diagonal, the neighbour blocks if asked, every text block, and the highest-scoring
    video blocks up to `block_budget(density, NB)` video blocks in all; with `mass_threshold`, more blocks in
    descending score until the kept video blocks plus text hold that share of the row, up to
    `block_budget(max_density, NB)` (never below the budget). Text query rows keep every block. Blocks without an
    unmasked key (`key_block_nonempty` False, `(B, H, num_blocks)`) are never kept.
    """
    nb, nt = layout.num_video_blocks, layout.num_text_blocks
    b, h = scores.shape[:2]
    device = scores.device
    video_scores = scores[..., :nb]
    forced = torch.eye(nb, dtype=torch.bool, device=device)
    if neighbors:
        forced = forced | neighbor_block_mask(layout).to(device)
    # Forced blocks rank first; scores are in [0, 1], so adding 2 orders them ahead without changing the rest.
    priority = video_scores + 2.0 * forced
    order = priority.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)
    budget = block_budget(density, nb)
    keep_video = forced | (rank < budget)
    if mass_threshold is not None:
        cap = max(budget, block_budget(max_density, nb))
        sorted_mass = video_scores.gather(-1, order)
        mass_before = sorted_mass.cumsum(-1) - sorted_mass + scores[..., nb:]
        grow_sorted = mass_before < mass_threshold
        grow = torch.zeros_like(grow_sorted).scatter(-1, order, grow_sorted)
        keep_video = keep_video | (grow & (rank < cap))

    keep = torch.ones(b, h, nb + nt, nb + nt, dtype=torch.bool, device=device)
    keep[..., :nb, :nb] = keep_video
    return keep & key_block_nonempty[..., None, :]


@dataclasses.dataclass(frozen=True, eq=False)
class SparsePlan:
    """The block plan of one attention call, over the canonical layout's `NQ = NK = num_blocks` blocks.

    kv_counts: int32 `(B, H, NQ)`, kv_indices: int32 `(B, H, NQ, NK)` ascending, -1 after the count.
    trusted_counts: int32 `(B, H, NQ)`, trusted_indices: int32 `(B, H, NQ, NB)`: skipped video key blocks whose pooled
        summary compensates them (rectification); empty for text query rows.
    block_scores: `(B, H, NB, NB + 1)`, the estimate `P_hat` the plan was selected from.
    """

    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    trusted_counts: torch.Tensor
    trusted_indices: torch.Tensor
    block_scores: torch.Tensor
    num_video_blocks: int

    def keep_mask(self) -> torch.Tensor:
        """bool `(B, H, NQ, NK)`."""
        return mask_from_indices(self.kv_counts, self.kv_indices, self.kv_indices.shape[-1])

    def trusted_mask(self) -> torch.Tensor:
        """bool `(B, H, NQ, NB)`."""
        return mask_from_indices(self.trusted_counts, self.trusted_indices, self.num_video_blocks)

    def density(self) -> torch.Tensor:
        """Share of video key blocks kept, averaged over video query blocks, per (B, H) (a device tensor)."""
        nb = self.num_video_blocks
        kept = self.keep_mask()[..., :nb, :nb].sum(-1, dtype=torch.float32)
        return kept.mean(-1) / nb


def build_plan(
    stats: PooledStats,
    k_c: torch.Tensor,
    key_valid_c: torch.Tensor,
    layout: TokenLayout,
    *,
    scale: float,
    density: float,
    config: SparseAttentionConfig,
    scores: torch.Tensor | None = None,
) -> SparsePlan:
    """Stages 1-2 and GAPR: score, select, and list the trusted skipped blocks. `scores` overrides `P_hat` (the
    oracle passes the true block mass)."""
    nb = layout.num_video_blocks
    if scores is None:
        scores = block_scores(stats, k_c, key_valid_c, layout, scale)
    nonempty = key_valid_c.reshape(*key_valid_c.shape[:2], layout.num_blocks, layout.block_size).any(-1)
    keep = select_blocks(
        scores,
        layout,
        density=density,
        key_block_nonempty=nonempty,
        mass_threshold=config.mass_threshold,
        max_density=config.max_density,
        neighbors=config.neighbors,
    )
    kv_counts, kv_indices = indices_from_mask(keep)
    skipped = ~keep[..., :nb, :nb] & nonempty[..., None, :nb]
    trusted = skipped & gapr_trusted(stats) if config.gapr else skipped
    if config.rectify == "none":
        trusted = torch.zeros_like(trusted)
    b, h = keep.shape[:2]
    trusted_rows = torch.zeros(b, h, layout.num_blocks, nb, dtype=torch.bool, device=keep.device)
    trusted_rows[..., :nb, :] = trusted
    trusted_counts, trusted_indices = indices_from_mask(trusted_rows)
    return SparsePlan(kv_counts, kv_indices, trusted_counts, trusted_indices, scores, nb)


# --------------------------------------------------------------------------------------------------------------------
# Stage 3: rectified block-sparse attention
# --------------------------------------------------------------------------------------------------------------------


def block_rectification(plan: SparsePlan, stats: PooledStats, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block mode's `R (B, H, NQ)` and `c (B, H, NQ, D)`: `R_i = 1 - sum_{j in T_i} P_hat[i, j]`,
    `c_i = sum_{j in T_i} P_hat[i, j] v_bar_j`; text query rows get R = 1, c = 0."""
    nb = plan.num_video_blocks
    trusted = plan.trusted_mask()[..., :nb, :]
    dtype = stats.v_block.dtype
    weight = plan.block_scores[..., :nb].to(dtype) * trusted
    b, h = weight.shape[:2]
    rescale = torch.ones(b, h, num_blocks, dtype=dtype, device=weight.device)
    rescale[..., :nb] = 1 - weight.sum(-1)
    correction = torch.zeros(b, h, num_blocks, stats.v_block.shape[-1], dtype=dtype, device=weight.device)
    correction[..., :nb, :] = weight @ stats.v_block
    return rescale, correction


def _masked_softmax_attention(logits: torch.Tensor, allowed: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Softmax over allowed columns; rows with nothing allowed give zeros (never NaN)."""
    logits = logits.masked_fill(~allowed, -math.inf)
    row_max = logits.amax(-1, keepdim=True).clamp(min=torch.finfo(logits.dtype).min)
    weights = torch.exp(logits - row_max)
    denom = weights.sum(-1, keepdim=True)
    return (weights @ values) / denom.clamp(min=torch.finfo(logits.dtype).tiny)


def rectified_sparse_attention(
    q_c: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    key_valid_c: torch.Tensor,
    plan: SparsePlan,
    stats: PooledStats | None,
    layout: TokenLayout,
    *,
    scale: float,
    rectify: str,
) -> torch.Tensor:
    """Stage 3 on the canonical layout, in the dtype of `q_c`: exact softmax attention of each query over the keys of
    its kept blocks (masked keys excluded), then

    - rectify "none": that is the output;
    - "block": `R_i * O + c_i` per query block (see `block_rectification`);
    - "query": each trusted block j of the query's block joins the softmax as one virtual key `k_bar_j` with logit
      `scale * q . k_bar_j + log n_j` and value `v_bar_j`.

    Returns `(B, H, padded_len, D)`; padding rows are zero-filled garbage to be dropped by `scatter_canonical`.
    """
    if rectify not in ("none", "block", "query"):
        raise ValueError(f"rectify={rectify!r}: expected 'none', 'block' or 'query'")
    if rectify != "none" and stats is None:
        raise ValueError(f"rectify={rectify!r} needs the pooled statistics")
    bs = layout.block_size
    keep = plan.keep_mask()
    b, h, n, _ = q_c.shape
    nq = layout.num_blocks
    nb = layout.num_video_blocks
    out = torch.empty_like(q_c)
    if rectify == "block":
        rescale, correction = block_rectification(plan, stats, nq)
    if rectify == "query":
        trusted = plan.trusted_mask()
        k_bar = stats.k_block.to(q_c.dtype)
        v_bar = stats.v_block.to(q_c.dtype)
        log_mult = torch.log(stats.k_block_count.to(q_c.dtype))

    blocks_per_chunk = max(1, _CHUNK_BYTES // max(1, b * h * bs * (n + nb) * q_c.element_size()))
    for start in range(0, nq, blocks_per_chunk):
        stop = min(nq, start + blocks_per_chunk)
        rows = slice(start * bs, stop * bs)
        q = q_c[..., rows, :]
        allowed = keep[..., start:stop, :].repeat_interleave(bs, -2).repeat_interleave(bs, -1)
        allowed = allowed & key_valid_c[..., None, :]
        logits = scale * q @ k_c.transpose(-1, -2)
        values = v_c
        if rectify == "query":
            virtual_logits = scale * q @ k_bar.transpose(-1, -2) + log_mult[..., None, :]
            logits = torch.cat([logits, virtual_logits], dim=-1)
            allowed = torch.cat([allowed, trusted[..., start:stop, :].repeat_interleave(bs, -2)], dim=-1)
            values = torch.cat([v_c, v_bar], dim=-2)
        block_out = _masked_softmax_attention(logits, allowed, values)
        if rectify == "block":
            r = rescale[..., start:stop].repeat_interleave(bs, -1)[..., None].to(q_c.dtype)
            c = correction[..., start:stop, :].repeat_interleave(bs, -2).to(q_c.dtype)
            block_out = r * block_out + c
        out[..., rows, :] = block_out
    return out


# --------------------------------------------------------------------------------------------------------------------
# The whole pipeline and the ground truth
# --------------------------------------------------------------------------------------------------------------------


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Exact SDPA (no dropout, not causal) in `compute_dtype`, chunked over queries; returns `compute_dtype`.
    `attn_mask` is a boolean key-padding mask as in `key_padding_valid`."""
    b, h, s, d = query.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    valid = key_padding_valid(attn_mask, b, h, key.shape[-2])
    q, k, v = (t.to(compute_dtype) for t in (query, key, value))
    out = torch.empty(b, h, s, v.shape[-1], dtype=compute_dtype, device=query.device)
    rows_per_chunk = max(1, _CHUNK_BYTES // max(1, b * h * key.shape[-2] * q.element_size()))
    for start in range(0, s, rows_per_chunk):
        rows = slice(start, min(s, start + rows_per_chunk))
        logits = scale * q[..., rows, :] @ k.transpose(-1, -2)
        allowed = torch.ones_like(logits, dtype=torch.bool) if valid is None else valid[..., None, :].expand_as(logits)
        out[..., rows, :] = _masked_softmax_attention(logits, allowed, v)
    return out


def attention_block_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    layout: TokenLayout,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The true block mass, `(B, H, NB, NB + 1)` like `P_hat`: the mean over the real queries of video block i of
    the full-attention probability falling on video key block j (or on all text keys, last column)."""
    b, h, s, d = query.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    valid = key_padding_valid(attn_mask, b, h, s)
    valid_c = canonical_key_valid(valid, layout, b, h, query.device)
    q_c = gather_canonical(query.to(compute_dtype), layout)
    k_c = gather_canonical(key.to(compute_dtype), layout)
    nb, bs = layout.num_video_blocks, layout.block_size
    column_block = torch.arange(layout.padded_len, device=query.device) // bs
    column_block = column_block.clamp(max=nb)  # all text keys collapse into column NB
    mass = torch.zeros(b, h, nb, nb + 1, dtype=compute_dtype, device=query.device)
    # Padding rows of a partial last block are zero queries with a uniform softmax; they must not add to its mass.
    real_query = (layout.to(query.device).source_index >= 0)[:, None]
    blocks_per_chunk = max(1, _CHUNK_BYTES // max(1, b * h * bs * layout.padded_len * q_c.element_size()))
    for start in range(0, nb, blocks_per_chunk):
        stop = min(nb, start + blocks_per_chunk)
        logits = scale * q_c[..., start * bs : stop * bs, :] @ k_c.transpose(-1, -2)
        logits = logits.masked_fill(~valid_c[..., None, :], -math.inf)
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0) * real_query[start * bs : stop * bs]
        per_block = torch.zeros(*probs.shape[:-1], nb + 1, dtype=compute_dtype, device=query.device)
        per_block.index_add_(-1, column_block, probs)
        mass[..., start:stop, :] = per_block.reshape(b, h, stop - start, bs, nb + 1).sum(-2)
    real_rows = layout.row_count[:nb].to(query.device, compute_dtype)
    return mass / real_rows.clamp(min=1)[:, None]


def check_plan(plan: object, batch: int, heads: int, layout: TokenLayout) -> None:
    """Raise TypeError / ValueError unless `plan` is a `SparsePlan` for `(batch, heads)` over `layout`'s blocks."""
    if not isinstance(plan, SparsePlan):
        raise TypeError(f"plan must be a SparsePlan or None, got {type(plan).__name__}")
    nq, nb = layout.num_blocks, layout.num_video_blocks
    expected = {
        "kv_counts": (batch, heads, nq),
        "kv_indices": (batch, heads, nq, nq),
        "trusted_counts": (batch, heads, nq),
        "trusted_indices": (batch, heads, nq, nb),
        "block_scores": (batch, heads, nb, nb + 1),
    }
    for name, shape in expected.items():
        actual = tuple(getattr(plan, name).shape)
        if actual != shape:
            raise ValueError(
                f"plan.{name} has shape {actual}, but this call (batch={batch}, heads={heads}, {nq} blocks of which "
                f"{nb} video) needs {shape}"
            )
    if plan.num_video_blocks != nb:
        raise ValueError(f"plan.num_video_blocks={plan.num_video_blocks}, but this call has {nb} video blocks")


def sparse_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    video_grid: tuple[int, int, int],
    text_len: int = 0,
    text_first: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    config: SparseAttentionConfig | None = None,
    density: float | None = None,
    compute_dtype: torch.dtype | None = None,
    return_plan: bool = False,
    plan: SparsePlan | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SparsePlan]:
    """The whole pipeline in plain PyTorch (inputs assumed validated; see `spattn_compile.sparse_attention`).

    `density` overrides `1 - config.sparsity` (the schedule's adaptive ratio). The output has the dtype of `query`;
    with `return_plan` the `SparsePlan` used is returned too. A given `plan` (a cached one, see
    `spattn_compile.schedule`) skips scoring and selection: its kept blocks, trusted lists and (block mode) its
    `block_scores` are reused, while the pooled statistics (`k_bar`, `v_bar`) are computed fresh from these inputs;
    `density` is then ignored.
    """
    config = SparseAttentionConfig() if config is None else config
    b, h, s, d = query.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    density = config.density if density is None else density
    dtype = _compute_dtype(query.dtype, compute_dtype)
    layout = token_layout(tuple(video_grid), text_len, text_first, config.block_size, config.reorder)
    valid = key_padding_valid(attn_mask, b, h, s)
    valid_c = canonical_key_valid(valid, layout, b, h, query.device)
    q_c, k_c, v_c = (gather_canonical(t.to(dtype), layout) for t in (query, key, value))
    stats = pool_statistics(q_c, k_c, v_c, valid_c, layout, config.tile_size)
    if plan is None:
        plan = build_plan(stats, k_c, valid_c, layout, scale=scale, density=density, config=config)
    else:
        check_plan(plan, b, h, layout)
    out_c = rectified_sparse_attention(q_c, k_c, v_c, valid_c, plan, stats, layout, scale=scale, rectify=config.rectify)
    out = scatter_canonical(out_c, layout).to(query.dtype)
    return (out, plan) if return_plan else out
