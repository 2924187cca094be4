"""Plain-PyTorch reference of the stages in docs/DESIGN.md that every policy shares: the specification of the Triton
kernels, the CPU implementation's arithmetic (`implementations.reference`) and the ground truth of the tests.

Each function works on SDPA-layout tensors `(B, H, S, D)` (or on the canonical block layout of
`spattn_compile.layout`), of any float dtype, computing in the dtype it is given (float64 for tests):

0. prepare: `gather_canonical` / `scatter_canonical` (the Hilbert reorder into, and back out of, the canonical
   layout), `canonical_key_valid`, `key_usable`, `block_non_finite`, and `pool_statistics` (tile and block means and
   mean absolute deviations, `plan.PooledStats`).
1. estimate and 2. select: the estimators' and the selection policies' own reference functions
   (`spattn_compile.estimators`, `spattn_compile.policies`).
3. attend: `rectified_sparse_attention`, exact attention over the kept blocks with a rectification's terms
   (`policies.RectificationTerms`: virtual keys, an affine epilogue).

`dense_attention` and `attention_block_mass` give the float64 ground truth (they cost O(S^2) memory in query chunks and
are meant for tests, benchmarks and the oracle). Only the tests, the test toolkit and the CPU implementation import
this module.
"""

from __future__ import annotations

import math

import torch

from .inputs import key_padding_valid
from .layout import TokenLayout
from .plan import PooledStats, SparsePlan
from .policies.base import RectificationTerms

__all__ = [
    "attention_block_mass",
    "block_non_finite",
    "canonical_key_valid",
    "dense_attention",
    "finite_rows",
    "gather_canonical",
    "key_usable",
    "pool_statistics",
    "rectified_sparse_attention",
    "scatter_canonical",
]

# Bytes of logits one chunk of query rows may materialise in the O(S^2) reference attention.
_CHUNK_BYTES = 1 << 28




# --------------------------------------------------------------------------------------------------------------------
# Stage 0 (prepare): the reorder and the valid keys
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
# Stage 0 (prepare): pooled statistics
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
    """The pooled statistics (estimators, GAPR, rectification) from canonical Q, K, V `(B, H, padded_len, D)`
    (computed in their dtype), over the usable rows: real queries with finite entries, and `key_usable` keys (values
    over the same rows)."""
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




# --------------------------------------------------------------------------------------------------------------------
# Stage 3 (attend): rectified block-sparse attention
# --------------------------------------------------------------------------------------------------------------------




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
    layout: TokenLayout,
    *,
    scale: float,
    terms: RectificationTerms,
) -> torch.Tensor:
    """Stage 3 on the canonical layout, in the dtype of `q_c`: exact softmax attention of each query over the keys of
    its kept blocks (masked keys excluded), with a rectification's `terms`: the virtual keys allowed for the query's
    block join its softmax (logit `scale * q . k_bar_j + log_weight_j`, value `v_bar_j`), then the block's affine
    epilogue `rescale * out + correction` applies (`policies.rectification` gives each mode's terms).

    Returns `(B, H, padded_len, D)`; padding rows are zero-filled garbage to be dropped by `scatter_canonical`.
    """
    bs = layout.block_size
    keep = plan.to_dense()
    b, h, n, _ = q_c.shape
    # A masked key has no effect, whatever its value row holds (a zero weight times NaN would be NaN).
    v_c = v_c.masked_fill(~key_valid_c[..., None], 0)
    nq = layout.num_blocks
    dtype = q_c.dtype
    virtual = 0
    if terms.has_virtual_keys:
        assert terms.virtual_keys is not None and terms.virtual_values is not None
        assert terms.virtual_log_weights is not None and terms.virtual_allowed is not None
        k_bar, v_bar = terms.virtual_keys.to(dtype), terms.virtual_values.to(dtype)
        log_weight, allowed_virtual = terms.virtual_log_weights.to(dtype), terms.virtual_allowed
        virtual = k_bar.shape[-2]
    out = torch.empty_like(q_c)
    blocks_per_chunk = max(1, _CHUNK_BYTES // max(1, b * h * bs * (n + virtual) * q_c.element_size()))
    for start in range(0, nq, blocks_per_chunk):
        stop = min(nq, start + blocks_per_chunk)
        rows = slice(start * bs, stop * bs)
        q = q_c[..., rows, :]
        allowed = keep[..., start:stop, :].repeat_interleave(bs, -2).repeat_interleave(bs, -1)
        allowed = allowed & key_valid_c[..., None, :]
        logits = scale * q @ k_c.transpose(-1, -2)
        values = v_c
        if terms.has_virtual_keys:
            virtual_logits = scale * q @ k_bar.transpose(-1, -2) + log_weight[..., None, :]
            logits = torch.cat([logits, virtual_logits], dim=-1)
            allowed = torch.cat([allowed, allowed_virtual[..., start:stop, :].repeat_interleave(bs, -2)], dim=-1)
            values = torch.cat([v_c, v_bar], dim=-2)
        block_out = _masked_softmax_attention(logits, allowed, values)
        if terms.has_epilogue:
            assert terms.rescale is not None and terms.correction is not None
            r = terms.rescale[..., start:stop].repeat_interleave(bs, -1)[..., None].to(dtype)
            c = terms.correction[..., start:stop, :].repeat_interleave(bs, -2).to(dtype)
            block_out = r * block_out + c
        out[..., rows, :] = block_out
    return out


# --------------------------------------------------------------------------------------------------------------------
# The ground truth
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
