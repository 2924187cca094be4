"""Selection on the device: GAPR's gate and the block selection (stage 2 of docs/DESIGN.md), as two Triton kernels.

- `gapr_gate`: GAPR's test `|q_i . k_j| > |dq_i . k_j| + |q_i . dk_j|` for every pooled block pair, `(B, H, NB, NB)`.
- `select_plan`: one program per (batch, head, query block) sorts its row of scores (`tl.sort`), finds the budget /
  mass-threshold cut, and writes the kept and the trusted key blocks as ascending int32 lists, as
  `reference.select_plan_reference` does (stable descending order: equal scores are taken in index order).

Nothing here reads a value back to the host and every shape is a function of the layout, so the stage can be captured
in a CUDA graph. The scores come from an estimator (`spattn_compile.estimators`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..config import SparseAttentionConfig
from ..layout import TokenLayout, neighbor_block_mask
from ..plan import PooledStats, SparsePlan, block_budget
from .common import INTERPRETED, STATS_DOT_PRECISION, check_device, padded_head_dim

__all__ = ["gapr_gate", "select_plan"]


# --------------------------------------------------------------------------------------------------------------------
# GAPR's gate
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _gapr_gate_kernel(
    QBlock,
    QBlockMad,
    KBlock,
    KBlockMad,
    KeyBlockCount,
    Gate,
    num_video_blocks,
    num_blocks,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    bh = tl.program_id(2).to(tl.int64)
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = (offs_d < HEAD_DIM)[None, :]
    ok_i = offs_i < num_video_blocks
    ok_j = offs_j < num_video_blocks
    rows_i = (bh * num_video_blocks + offs_i)[:, None] * HEAD_DIM + offs_d[None, :]
    rows_j = (bh * num_video_blocks + offs_j)[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(QBlock + rows_i, mask=ok_i[:, None] & d_ok, other=0.0)
    dq = tl.load(QBlockMad + rows_i, mask=ok_i[:, None] & d_ok, other=0.0)
    k = tl.trans(tl.load(KBlock + rows_j, mask=ok_j[:, None] & d_ok, other=0.0))
    dk = tl.trans(tl.load(KBlockMad + rows_j, mask=ok_j[:, None] & d_ok, other=0.0))
    gain = tl.abs(tl.dot(q, k, input_precision=DOT_PRECISION))
    error = tl.abs(tl.dot(dq, k, input_precision=DOT_PRECISION)) + tl.abs(tl.dot(q, dk, input_precision=DOT_PRECISION))
    nonempty = tl.load(KeyBlockCount + bh * num_blocks + offs_j, mask=ok_j, other=0.0) > 0
    trusted = (gain > error) & nonempty[None, :]
    tl.store(
        Gate + (bh * num_video_blocks + offs_i)[:, None] * num_video_blocks + offs_j[None, :],
        trusted.to(tl.int8),
        mask=ok_i[:, None] & ok_j[None, :],
    )


# --------------------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _write_index_list(Counts, Indices, plan_row, list_len, chosen, cols, in_list):
    """Store the column numbers of `chosen` ascending at the front of row `plan_row` of `Indices (.., list_len)`, -1
    in the rest of the row (columns `in_list`), and their number in `Counts`."""
    chosen_int = chosen.to(tl.int32)
    count = tl.sum(chosen_int, 0)
    position = tl.cumsum(chosen_int, 0) - 1
    row = Indices + plan_row * list_len
    tl.store(row + position, cols.to(tl.int32), mask=chosen)
    tl.store(row + cols, tl.full(cols.shape, -1, tl.int32), mask=in_list & (cols >= count))
    tl.store(Counts + plan_row, count)


@triton.jit
def _select_kernel(
    Scores,
    Gate,
    Neighbors,
    ForcedBlocks,
    KeyBlockCount,
    KvCounts,
    KvIndices,
    TrustedCounts,
    TrustedIndices,
    num_video_blocks,
    num_blocks,
    budget,
    cap,
    mass_threshold,
    COLS: tl.constexpr,
    HAS_NEIGHBORS: tl.constexpr,
    HAS_FORCED_BLOCKS: tl.constexpr,
    HAS_MASS_THRESHOLD: tl.constexpr,
    GAPR: tl.constexpr,
    RECTIFY: tl.constexpr,
):
    row = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    plan_row = bh * num_blocks + row
    cols = tl.arange(0, COLS)
    in_range = cols < num_blocks
    video_col = cols < num_video_blocks
    # The row test as a vector: the interpreter cannot mask or select with a scalar-and-vector mix.
    video_row = (cols * 0 + row) < num_video_blocks
    nonempty = tl.load(KeyBlockCount + bh * num_blocks + cols, mask=in_range, other=0.0) > 0

    score_row = Scores + (bh * num_video_blocks + row) * (num_video_blocks + 1)
    video_entry = video_col & video_row
    score = tl.load(score_row + cols, mask=video_entry, other=0.0)
    text_mass = tl.load(score_row + num_video_blocks, mask=row < num_video_blocks, other=0.0)
    forced = video_col & (cols == row)
    if HAS_NEIGHBORS:
        neighbor = tl.load(Neighbors + row.to(tl.int64) * num_video_blocks + cols, mask=video_entry, other=0)
        forced = forced | (neighbor != 0)
    if HAS_FORCED_BLOCKS:
        forced = forced | (tl.load(ForcedBlocks + bh * num_blocks + cols, mask=video_col, other=0) != 0)
    n_forced = tl.sum(forced.to(tl.int32), 0)
    n_free = num_video_blocks - n_forced
    # Forced blocks rank first in the reference; the others follow by descending score. Scores are >= 0, so -1
    # sends forced and out-of-range columns below every free block.
    ranked = tl.where(video_col & ~forced, score, -1.0)
    ordered = tl.sort(ranked, descending=True)

    keep_free = budget - n_forced
    if HAS_MASS_THRESHOLD:
        # Mass kept before the r-th free block in descending order; the blocks whose preceding mass is still under
        # the threshold are added, up to `cap` blocks in all (forced ones included), never fewer than the budget.
        free_mass = tl.maximum(ordered, 0.0)
        forced_mass = tl.sum(tl.where(forced, score, 0.0), 0)
        mass_before = forced_mass + text_mass + tl.cumsum(free_mass, 0) - free_mass
        grown = tl.sum(((mass_before < mass_threshold) & (cols < n_free)).to(tl.int32), 0)
        keep_free = tl.maximum(budget, tl.minimum(n_forced + grown, cap)) - n_forced
    keep_free = tl.minimum(tl.maximum(keep_free, 0), n_free)

    # The keep_free-th largest free score; every larger one is kept, equal ones in index order (a stable sort).
    threshold = tl.sum(tl.where(cols == keep_free - 1, ordered, 0.0), 0)
    above = ranked > threshold
    tied = (ranked == threshold) & video_col & ~forced
    tie_rank = tl.cumsum(tied.to(tl.int32), 0)
    needed = keep_free - tl.sum(above.to(tl.int32), 0)
    chosen = (above | (tied & (tie_rank <= needed))) & ((cols * 0 + keep_free) > 0)
    keep_video = (forced | chosen) & nonempty
    keep_video_row = tl.where(video_col, keep_video, nonempty & in_range)
    keep = tl.where(video_row, keep_video_row, nonempty & in_range)
    _write_index_list(KvCounts, KvIndices, plan_row, num_blocks, keep, cols, in_range)

    trusted = video_entry & ~keep & nonempty
    if GAPR:
        gate = tl.load(Gate + (bh * num_video_blocks + row) * num_video_blocks + cols, mask=video_entry, other=0)
        trusted = trusted & (gate != 0)
    if not RECTIFY:
        trusted = trusted & (cols < 0)
    _write_index_list(TrustedCounts, TrustedIndices, plan_row, num_video_blocks, trusted, cols, video_col)


def _check_block_stats(stats: object, layout: TokenLayout) -> tuple[int, int, int]:
    if not isinstance(stats, PooledStats):
        raise TypeError(f"stats must be a plan.PooledStats, got {type(stats).__name__}")
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    if stats.q_block.dim() != 4:
        raise ValueError(f"stats.q_block must have shape (B, H, NB, D), got {tuple(stats.q_block.shape)}")
    batch, heads, _, head_dim = stats.q_block.shape
    check_device(stats.q_block.device, "stats")
    shape = (batch, heads, layout.num_video_blocks, head_dim)
    for name in ("q_block", "q_block_mad", "k_block", "k_block_mad"):
        tensor = getattr(stats, name)
        if tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
            raise ValueError(
                f"stats.{name} must be float32 of shape {shape}, got {tensor.dtype} of shape {tuple(tensor.shape)}"
            )
        if tensor.device != stats.q_block.device:
            raise ValueError(f"stats.{name} is on {tensor.device}, stats.q_block on {stats.q_block.device}")
    return batch, heads, head_dim


def _check_key_block_count(key_block_count: object, batch: int, heads: int, layout: TokenLayout, device) -> None:
    shape = (batch, heads, layout.num_blocks)
    if not isinstance(key_block_count, torch.Tensor):
        raise TypeError(f"key_block_count must be a torch.Tensor, got {type(key_block_count).__name__}")
    if tuple(key_block_count.shape) != shape or key_block_count.dtype != torch.float32:
        raise ValueError(
            f"key_block_count must be float32 of shape {shape}, got {key_block_count.dtype} of shape "
            f"{tuple(key_block_count.shape)}"
        )
    if key_block_count.device != device:
        raise ValueError(f"key_block_count is on {key_block_count.device}, expected {device}")


def gapr_gate(stats: PooledStats, key_block_count: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """int8 `(B, H, NB, NB)`, 1 where GAPR trusts the pooled pair (query block i, key block j) and key block j has an
    unmasked key; equals `reference.gapr_trusted`."""
    batch, heads, head_dim = _check_block_stats(stats, layout)
    device = stats.q_block.device
    _check_key_block_count(key_block_count, batch, heads, layout, device)
    nb = layout.num_video_blocks
    gate = torch.empty(batch, heads, nb, nb, device=device, dtype=torch.int8)
    tile = 16 if INTERPRETED else 64
    _gapr_gate_kernel[(triton.cdiv(nb, tile), triton.cdiv(nb, tile), batch * heads)](
        stats.q_block.contiguous(),
        stats.q_block_mad.contiguous(),
        stats.k_block.contiguous(),
        stats.k_block_mad.contiguous(),
        key_block_count.contiguous(),
        gate,
        nb,
        layout.num_blocks,
        HEAD_DIM=head_dim,
        HEAD_PAD=padded_head_dim(head_dim),
        DOT_PRECISION=STATS_DOT_PRECISION,
        BLOCK_I=tile,
        BLOCK_J=tile,
        num_warps=4,
    )
    return gate


@functools.lru_cache(maxsize=64)
def _neighbor_rows(layout: TokenLayout, device: torch.device) -> torch.Tensor:
    return neighbor_block_mask(layout).to(device=device, dtype=torch.int8).contiguous()


def select_plan(
    scores: torch.Tensor,
    key_block_count: torch.Tensor,
    layout: TokenLayout,
    *,
    density: float,
    config: SparseAttentionConfig,
    estimator: str,
    gate: torch.Tensor | None = None,
    forced_blocks: torch.Tensor | None = None,
) -> SparsePlan:
    """Selection (stage 2) and the trusted lists from float32 `scores (B, H, NB, NB + 1)` (made by `estimator`), as
    `reference.select_plan_reference`.

    `key_block_count` float32 `(B, H, NQ)`: unmasked keys per canonical block (empty blocks are never listed).
    `gate` int8 `(B, H, NB, NB)` from `gapr_gate`, needed when `config.gapr` and `config.rectify != "none"`.
    `forced_blocks` bool `(B, H, NQ)`: video key blocks kept for every query block (those holding a non-finite key).
    Density, mass threshold, max density and neighbours come from `density` and `config`, as in the reference.
    """
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    nb, nq = layout.num_video_blocks, layout.num_blocks
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4 or tuple(scores.shape[2:]) != (nb, nb + 1):
        raise ValueError(f"scores must be a tensor of shape (B, H, {nb}, {nb + 1})")
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    batch, heads = scores.shape[:2]
    device = scores.device
    check_device(device, "scores")
    _check_key_block_count(key_block_count, batch, heads, layout, device)
    use_gate = config.gapr and config.rectify != "none"
    if use_gate:
        if (
            not isinstance(gate, torch.Tensor)
            or tuple(gate.shape) != (batch, heads, nb, nb)
            or gate.dtype != torch.int8
        ):
            raise ValueError(f"config.gapr needs gate, an int8 tensor of shape {(batch, heads, nb, nb)}")
        if gate.device != device:
            raise ValueError(f"gate is on {gate.device}, scores on {device}")

    budget = block_budget(density, nb)
    cap = max(budget, block_budget(config.max_density, nb))
    kv_counts = torch.empty(batch, heads, nq, device=device, dtype=torch.int32)
    kv_indices = torch.empty(batch, heads, nq, nq, device=device, dtype=torch.int32)
    trusted_counts = torch.empty_like(kv_counts)
    trusted_indices = torch.empty(batch, heads, nq, nb, device=device, dtype=torch.int32)
    neighbors = _neighbor_rows(layout, device) if config.neighbors else kv_counts
    cols = max(16, triton.next_power_of_2(nq))
    _select_kernel[(nq, batch * heads)](
        scores.contiguous(),
        gate.contiguous() if gate is not None and use_gate else kv_counts,
        neighbors,
        forced_blocks.contiguous().view(torch.int8) if forced_blocks is not None else kv_counts,
        key_block_count.contiguous(),
        kv_counts,
        kv_indices,
        trusted_counts,
        trusted_indices,
        nb,
        nq,
        budget,
        cap,
        float(config.mass_threshold) if config.mass_threshold is not None else 0.0,
        COLS=cols,
        HAS_NEIGHBORS=config.neighbors,
        HAS_FORCED_BLOCKS=forced_blocks is not None,
        HAS_MASS_THRESHOLD=config.mass_threshold is not None,
        GAPR=use_gate,
        RECTIFY=config.rectify != "none",
        num_warps=4 if cols <= 512 else 8,
    )
    return SparsePlan(layout, kv_counts, kv_indices, trusted_counts, trusted_indices, scores, estimator)
