"""Plain-PyTorch reference of every stage in docs/DESIGN.md: the specification and the CPU execution path.

Each stage is a function on SDPA-layout tensors `(B, H, S, D)` (or on the canonical block layout of
`spattn_compile.layout`), of any float dtype, computing in `compute_dtype` (float64 for tests; by default float32 or
wider). The stages are:

0. `gather_canonical` / `scatter_canonical`: the Hilbert reorder into, and back out of, the canonical layout.
1. `pool_statistics`: tile and block means and mean absolute deviations (`plan.PooledStats`). The block scores
   `P_hat` are the estimators' (`spattn_compile.estimators`, each with its own reference function).
2. `select_blocks`: budget, mass threshold, max density, forced diagonal / neighbour / text blocks.
   `gapr_trusted`: GAPR's gate. `select_plan_reference` packs both into a `plan.SparsePlan` of int32 index lists.
3. `rectified_sparse_attention`: exact attention over the kept blocks, with block- or query-mode rectification.

`spattn_compile.pipeline` runs them in order. `dense_attention` and `attention_block_mass` give the float64 ground
truth (they cost O(S^2) memory in query chunks and are meant for tests, benchmarks and the oracle).
"""

from __future__ import annotations

import math

import torch

from .config import SparseAttentionConfig
from .layout import TokenLayout, neighbor_block_mask
from .plan import PooledStats, SparsePlan, indices_from_mask

__all__ = [
    "attention_block_mass",
    "block_budget",
    "block_non_finite",
    "block_rectification",
    "canonical_key_valid",
    "dense_attention",
    "finite_rows",
    "gapr_trusted",
    "gather_canonical",
    "key_padding_valid",
    "key_usable",
    "pool_statistics",
    "rectified_sparse_attention",
    "scatter_canonical",
    "select_blocks",
    "select_plan_reference",
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
    """Validate a boolean key-padding mask by SDPA's broadcasting rules and return it as bool `(B, H, S)` (a view).

    SDPA broadcasts a mask of 2 to 4 dims, aligned right, to `(B, H, L, S)`; a key-padding mask is one whose query
    dimension is 1: `(1, S)`, `(H|1, 1, S)`, `(B|1, H|1, 1, S)`. True keeps a key, as in SDPA. A 1-D mask (SDPA rejects
    it), masks that vary over queries and float masks raise.
    """
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be a boolean key-padding mask (True = attend), got dtype {attn_mask.dtype}")
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() < 2 or attn_mask.dim() > 4 or shape[-1] != seq_len:
        raise ValueError(
            f"attn_mask of shape {shape} is not a key-padding mask: expected 2 to 4 dims broadcastable to "
            f"({batch}, {heads}, 1, {seq_len}) (SDPA's rules: aligned right)"
        )
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


def _group_mean(x: torch.Tensor, weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over consecutive groups of `group` rows of the rows where `weight` is True: x `(B, H, N, D)`, weight bool
    `(B|1, H|1, N)`. Rows left out never reach the sum (a NaN times zero would)."""
    b, h, n, d = x.shape
    w = weight.expand(b, h, n)
    total = x.masked_fill(~w[..., None], 0).reshape(b, h, n // group, group, d).sum(-2)
    count = w.to(x.dtype).reshape(b, h, n // group, group).sum(-1)
    return total / count.clamp(min=1)[..., None], count


def _group_mad(x: torch.Tensor, mean: torch.Tensor, weight: torch.Tensor, group: int) -> torch.Tensor:
    b, h, n, d = x.shape
    w = weight.expand(b, h, n)
    dev = (x - mean.repeat_interleave(group, dim=-2)).abs().masked_fill(~w[..., None], 0)
    count = w.to(x.dtype).reshape(b, h, n // group, group).sum(-1)
    return dev.reshape(b, h, n // group, group, d).sum(-2) / count.clamp(min=1)[..., None]


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """bool `x.shape[:-1]`: the row holds no NaN and no infinity."""
    return torch.isfinite(x).all(-1)


def key_usable(k_c: torch.Tensor, v_c: torch.Tensor, key_valid_c: torch.Tensor) -> torch.Tensor:
    """bool `(B, H, P)`: a real, unmasked key whose key and value rows are finite. Statistics and estimators read only
    these; attention reads every valid key (a non-finite one spreads exactly as in dense attention)."""
    return key_valid_c & finite_rows(k_c) & finite_rows(v_c)


def block_non_finite(k_c: torch.Tensor, v_c: torch.Tensor, key_valid_c: torch.Tensor, layout: TokenLayout):
    """bool `(B, H, NQ)`: the block holds a valid key whose key or value row is not finite. Dense attention sees such
    a key from every query, so selection keeps its block for every query block."""
    bad = key_valid_c & ~(finite_rows(k_c) & finite_rows(v_c))
    return bad.reshape(*bad.shape[:2], layout.num_blocks, layout.block_size).any(-1)


def pool_statistics(
    q_c: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    key_valid_c: torch.Tensor,
    layout: TokenLayout,
    tile_size: int,
) -> PooledStats:
    """Stage 1.1 and GAPR's statistics from canonical Q, K, V `(B, H, padded_len, D)` (compute in their dtype), over
    the usable rows: real queries with finite entries, and `key_usable` keys (values over the same rows)."""
    bs = layout.block_size
    if bs % tile_size:
        raise ValueError(f"tile_size={tile_size} must divide block_size={bs}")
    n_video_rows = layout.num_video_blocks * bs
    q, k, v = q_c[..., :n_video_rows, :], k_c[..., :n_video_rows, :], v_c[..., :n_video_rows, :]
    q_real = (layout.to(q_c.device).source_index[:n_video_rows] >= 0)[None, None]
    q_ok = q_real & finite_rows(q)
    k_ok = key_usable(k, v, key_valid_c[..., :n_video_rows])

    q_tile, q_tile_count = _group_mean(q, q_ok, tile_size)
    k_tile, k_tile_count = _group_mean(k, k_ok, tile_size)
    q_block, _ = _group_mean(q, q_ok, bs)
    k_block, k_block_count = _group_mean(k, k_ok, bs)
    v_block, _ = _group_mean(v, k_ok, bs)
    return PooledStats(
        tile_size=tile_size,
        q_tile=q_tile,
        q_tile_count=q_tile_count,
        k_tile=k_tile,
        k_tile_count=k_tile_count,
        q_block=q_block,
        q_block_mad=_group_mad(q, q_block, q_ok, bs),
        k_block=k_block,
        k_block_mad=_group_mad(k, k_block, k_ok, bs),
        v_block=v_block,
        k_block_count=k_block_count,
    )


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


def select_blocks(
    scores: torch.Tensor,
    layout: TokenLayout,
    *,
    density: float,
    key_block_nonempty: torch.Tensor,
    mass_threshold: float | None = None,
    max_density: float = 1.0,
    neighbors: bool = False,
    forced_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 2: bool keep mask `(B, H, num_blocks, num_blocks)` over (query block, key block) of the canonical layout.

    Video query rows keep: the diagonal, the neighbour blocks if asked, the key blocks `forced_blocks` (bool
    `(B, H, num_blocks)`: blocks holding a non-finite key) for every row, every text block, and the highest-scoring
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
    if forced_blocks is not None:
        forced = forced | forced_blocks[..., None, :nb]
    # Forced blocks rank first; scores are in [0, 1], so adding 2 orders them ahead without changing the rest.
    priority = video_scores.nan_to_num(0.0) + 2.0 * forced
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


def select_plan_reference(
    scores: torch.Tensor,
    stats: PooledStats,
    key_valid_c: torch.Tensor,
    layout: TokenLayout,
    *,
    density: float,
    config: SparseAttentionConfig,
    estimator: str,
    forced_blocks: torch.Tensor | None = None,
) -> SparsePlan:
    """Stage 2 and GAPR: select from the block scores `P_hat (B, H, NB, NB + 1)` (`estimator` names their origin) and
    list the trusted skipped blocks (none with `rectify="none"`). `key_valid_c` (bool `(B, H, P)`) says which keys
    exist; `forced_blocks` (bool `(B, H, NQ)`) are kept for every query block (`block_non_finite`)."""
    nb = layout.num_video_blocks
    nonempty = key_valid_c.reshape(*key_valid_c.shape[:2], layout.num_blocks, layout.block_size).any(-1)
    keep = select_blocks(
        scores,
        layout,
        density=density,
        key_block_nonempty=nonempty,
        mass_threshold=config.mass_threshold,
        max_density=config.max_density,
        neighbors=config.neighbors,
        forced_blocks=forced_blocks,
    )
    kv_counts, kv_indices = indices_from_mask(keep)
    # Only blocks with a usable key can stand in for their keys.
    skipped = ~keep[..., :nb, :nb] & (stats.k_block_count > 0)[..., None, :]
    trusted = skipped & gapr_trusted(stats) if config.gapr else skipped
    if config.rectify == "none":
        trusted = torch.zeros_like(trusted)
    b, h = keep.shape[:2]
    trusted_rows = torch.zeros(b, h, layout.num_blocks, nb, dtype=torch.bool, device=keep.device)
    trusted_rows[..., :nb, :] = trusted
    trusted_counts, trusted_indices = indices_from_mask(trusted_rows)
    return SparsePlan(layout, kv_counts, kv_indices, trusted_counts, trusted_indices, scores, estimator)


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
    keep = plan.to_dense()
    b, h, n, _ = q_c.shape
    # A masked key has no effect, whatever its value row holds (a zero weight times NaN would be NaN).
    v_c = v_c.masked_fill(~key_valid_c[..., None], 0)
    nq = layout.num_blocks
    nb = layout.num_video_blocks
    out = torch.empty_like(q_c)
    if rectify == "block":
        assert stats is not None
        rescale, correction = block_rectification(plan, stats, nq)
    if rectify == "query":
        assert stats is not None
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
