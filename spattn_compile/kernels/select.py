"""Selection on the device: GAPR's gate and the block selection (stage 2 of docs/DESIGN.md), as Triton kernels.

- `gapr_gate`: GAPR's test `|q_i . k_j| > |dq_i . k_j| + |q_i . dk_j|` for every pooled block pair, `(B, H, NB, NB)`.
- `select_plan`: one program per (batch, head, query block) sorts its row of scores (`tl.sort`), finds the budget /
  mass-threshold cut, and writes the kept and the trusted key blocks as ascending int32 lists, as
  `reference.select_plan_reference` does (stable descending order: equal scores are taken in index order).
- `select_plan_threshold`: the same plans without a sort. A program holds a few rows; bisections over the bit patterns
  of the scores find each row's mass-threshold cut and the budget's k-th largest score, and ties are taken in index
  order. Budgets may differ per (batch, head); GAPR's gate may be computed inside it from the block statistics.

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

__all__ = ["gapr_gate", "select_plan", "select_plan_threshold"]


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



# --------------------------------------------------------------------------------------------------------------------
# Selection by threshold search
# --------------------------------------------------------------------------------------------------------------------

# Bit patterns of float32: for x >= 0 they order as the values do (0.0 is 0; +inf is 0x7F800000).
_INF_BITS = tl.constexpr(0x7F800000)


@triton.jit
def _smallest_mass_cut(bits, score, base, mass_threshold, ROWS: tl.constexpr):
    """Per row, the smallest bit pattern t >= -1 such that `base + sum(score where bits > t) < mass_threshold`
    (bisection; rows where `base` alone reaches the threshold get 0x7F800000, which no score exceeds)."""
    lo = tl.full([ROWS], -1, tl.int32)
    hi = tl.full([ROWS], _INF_BITS, tl.int32)
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        below = base + tl.sum(tl.where(bits > mid[:, None], score, 0.0), 1) < mass_threshold
        active = hi - lo > 1
        hi = tl.where(active & below, mid, hi)
        lo = tl.where(active & ~below, mid, lo)
    all_below = base + tl.sum(tl.where(bits >= 0, score, 0.0), 1) < mass_threshold
    return tl.where(all_below, -1, hi)


@triton.jit
def _kth_largest(bits, keep, ROWS: tl.constexpr):
    """Per row, the `keep`-th largest of `bits` (the largest t with at least `keep` entries >= t), by bisection; rows
    with keep = 0 get 0x7F800000 (nothing is kept)."""
    lo = tl.zeros([ROWS], dtype=tl.int32)
    hi = tl.full([ROWS], _INF_BITS + 1, tl.int32)
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        enough = tl.sum((bits >= mid[:, None]).to(tl.int32), 1) >= keep
        active = hi - lo > 1
        lo = tl.where(active & enough, mid, lo)
        hi = tl.where(active & ~enough, mid, hi)
    return lo


@triton.jit
def _chosen(bits, threshold, needed, keep_free, ties_before):
    """The free blocks kept: every one above the threshold, and the first `needed` equal to it in index order
    (`ties_before`: equal ones in earlier columns, for a row processed in column chunks)."""
    tied = bits == threshold[:, None]
    tie_rank = ties_before[:, None] + tl.cumsum(tied.to(tl.int32), 1)
    chosen = (bits > threshold[:, None]) | (tied & (tie_rank <= needed[:, None]))
    return chosen & (keep_free > 0)[:, None], tl.sum(tied.to(tl.int32), 1)


@triton.jit
def _write_index_rows(Counts, Indices, plan_rows, row_ok, list_len, chosen, cols, in_list):
    """Per row (`plan_rows`, where `row_ok`): the columns of `chosen` ascending at the front of the row of `Indices
    (.., list_len)`, -1 in the rest of the row (columns `in_list`), and their number in `Counts`."""
    chosen_int = chosen.to(tl.int32)
    count = tl.sum(chosen_int, 1)
    position = tl.cumsum(chosen_int, 1) - 1
    row = Indices + plan_rows[:, None] * list_len
    tl.store(row + position, cols[None, :] + position * 0, mask=chosen & row_ok[:, None])
    minus_one = tl.full(chosen.shape, -1, tl.int32)
    rest = in_list[None, :] & (cols[None, :] >= count[:, None]) & row_ok[:, None]
    tl.store(row + cols[None, :], minus_one, mask=rest)
    tl.store(Counts + plan_rows, count, mask=row_ok)


@triton.jit
def _select_threshold_kernel(
    Scores,
    Gate,
    Neighbors,
    ForcedBlocks,
    KeyBlockCount,
    Budget,
    QBlock,
    QBlockMad,
    KBlock,
    KBlockMad,
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
    ROWS: tl.constexpr,
    HAS_NEIGHBORS: tl.constexpr,
    HAS_FORCED_BLOCKS: tl.constexpr,
    HAS_MASS_THRESHOLD: tl.constexpr,
    PER_HEAD_BUDGET: tl.constexpr,
    GAPR: tl.constexpr,
    FUSED_GATE: tl.constexpr,
    RECTIFY: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GATE_N: tl.constexpr,
):
    # ROWS query blocks of one (batch, head) per program, each row of COLS key blocks in registers. The free (not
    # forced) video blocks are ranked by score through the bit patterns of their scores (non-negative floats order as
    # their bits do): bisections find the mass threshold's cut and the keep-th largest score, and equal scores are
    # taken in index order, as the reference's stable sort takes them.
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_blocks
    video_row = rows < num_video_blocks
    plan_rows = bh * num_blocks + rows
    cols = tl.arange(0, COLS)
    in_range = cols < num_blocks
    video_col = cols < num_video_blocks
    nonempty = tl.load(KeyBlockCount + bh * num_blocks + cols, mask=in_range, other=0.0) > 0
    video_entry = video_row[:, None] & video_col[None, :]
    score_rows = Scores + (bh * num_video_blocks + rows)[:, None] * (num_video_blocks + 1)
    score = tl.load(score_rows + cols[None, :], mask=video_entry, other=0.0)
    score = tl.where(score > 0.0, score, 0.0)  # NaN (and -0.0) rank as 0, as the reference's nan_to_num
    text_mass = tl.load(Scores + (bh * num_video_blocks + rows) * (num_video_blocks + 1) + num_video_blocks,
                        mask=video_row, other=0.0)  # fmt: skip
    forced = video_entry & (cols[None, :] == rows[:, None])
    if HAS_NEIGHBORS:
        neighbor = tl.load(Neighbors + rows[:, None].to(tl.int64) * num_video_blocks + cols[None, :],
                           mask=video_entry, other=0)  # fmt: skip
        forced = forced | (neighbor != 0)
    if HAS_FORCED_BLOCKS:
        forced_cols = tl.load(ForcedBlocks + bh * num_blocks + cols, mask=video_col, other=0) != 0
        forced = forced | (video_entry & forced_cols[None, :])
    free = video_entry & ~forced
    bits = tl.where(free, score.to(tl.int32, bitcast=True), -1)
    n_forced = tl.sum(forced.to(tl.int32), 1)
    n_free = num_video_blocks - n_forced
    if PER_HEAD_BUDGET:
        row_budget = tl.load(Budget + bh + rows * 0)
    else:
        row_budget = budget + rows * 0
    keep_free = row_budget - n_forced
    if HAS_MASS_THRESHOLD:
        # Blocks are added in descending order while the mass kept before them (forced blocks and text included)
        # is under the threshold, up to `cap` blocks in all, never fewer than the budget.
        base = tl.sum(tl.where(forced, score, 0.0), 1) + text_mass
        cut = _smallest_mass_cut(bits, score, base, mass_threshold, ROWS)
        above = bits > cut[:, None]
        before = base + tl.sum(tl.where(above, score, 0.0), 1)
        value = tl.maximum(cut, 0).to(tl.float32, bitcast=True)
        tied = bits == cut[:, None]
        tie_rank = tl.cumsum(tied.to(tl.int32), 1) - 1
        extra = tl.sum((tied & (before[:, None] + tie_rank.to(tl.float32) * value[:, None] < mass_threshold)).to(
            tl.int32), 1)  # fmt: skip
        grown = tl.where(cut < 0, n_free, tl.sum(above.to(tl.int32), 1) + extra)
        grown = tl.where(base < mass_threshold, grown, 0)
        keep_free = tl.maximum(row_budget, tl.minimum(n_forced + grown, tl.maximum(row_budget, cap))) - n_forced
    keep_free = tl.minimum(tl.maximum(keep_free, 0), n_free)
    threshold = _kth_largest(bits, keep_free, ROWS)
    needed = keep_free - tl.sum((bits > threshold[:, None]).to(tl.int32), 1)
    chosen, _ = _chosen(bits, threshold, needed, keep_free, keep_free * 0)
    keep_video = (forced | chosen) & nonempty[None, :]
    keep_any = nonempty & in_range
    keep = tl.where(video_entry, keep_video, keep_any[None, :] & row_ok[:, None])
    _write_index_rows(KvCounts, KvIndices, plan_rows, row_ok, num_blocks, keep, cols, in_range)

    if not FUSED_GATE:
        trusted = video_entry & ~keep & nonempty[None, :]
        if GAPR:
            gate = tl.load(Gate + (bh * num_video_blocks + rows)[:, None] * num_video_blocks + cols[None, :],
                           mask=video_entry, other=0)  # fmt: skip
            trusted = trusted & (gate != 0)
        if not RECTIFY:
            trusted = trusted & False
        _write_index_rows(TrustedCounts, TrustedIndices, plan_rows, row_ok, num_video_blocks, trusted, cols, video_col)
    else:
        # GAPR's gate computed here, GATE_N key blocks at a time, from the block statistics (no (NB, NB) gate tensor).
        # The kept set is a register tensor of whole rows, so each chunk's share of it is decided again from the
        # row's threshold, counting the ties of earlier chunks.
        offs_d = tl.arange(0, HEAD_PAD)
        d_ok = (offs_d < HEAD_DIM)[None, :]
        stat_rows = (bh * num_video_blocks + rows)[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(QBlock + stat_rows, mask=video_row[:, None] & d_ok, other=0.0)
        dq = tl.load(QBlockMad + stat_rows, mask=video_row[:, None] & d_ok, other=0.0)
        offs_g = tl.arange(0, GATE_N)
        written = tl.zeros([ROWS], dtype=tl.int32)
        ties_before = tl.zeros([ROWS], dtype=tl.int32)
        trusted_rows = TrustedIndices + plan_rows[:, None] * num_video_blocks
        for first in range(0, num_video_blocks, GATE_N):
            g_cols = first + offs_g
            g_video = g_cols < num_video_blocks
            g_entry = video_row[:, None] & g_video[None, :]
            g_stats = (bh * num_video_blocks + g_cols)[:, None] * HEAD_DIM + offs_d[None, :]
            k = tl.load(KBlock + g_stats, mask=g_video[:, None] & d_ok, other=0.0)
            dk = tl.load(KBlockMad + g_stats, mask=g_video[:, None] & d_ok, other=0.0)
            gain = tl.abs(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION))
            error = tl.abs(tl.dot(dq, tl.trans(k), input_precision=DOT_PRECISION))
            error += tl.abs(tl.dot(q, tl.trans(dk), input_precision=DOT_PRECISION))
            g_score = tl.load(score_rows + g_cols[None, :], mask=g_entry, other=0.0)
            g_score = tl.where(g_score > 0.0, g_score, 0.0)
            g_forced = g_entry & (g_cols[None, :] == rows[:, None])
            if HAS_NEIGHBORS:
                g_neighbor = tl.load(Neighbors + rows[:, None].to(tl.int64) * num_video_blocks + g_cols[None, :],
                                     mask=g_entry, other=0)  # fmt: skip
                g_forced = g_forced | (g_neighbor != 0)
            if HAS_FORCED_BLOCKS:
                g_forced_cols = tl.load(ForcedBlocks + bh * num_blocks + g_cols, mask=g_video, other=0) != 0
                g_forced = g_forced | (g_entry & g_forced_cols[None, :])
            g_bits = tl.where(g_entry & ~g_forced, g_score.to(tl.int32, bitcast=True), -1)
            g_chosen, g_ties = _chosen(g_bits, threshold, needed, keep_free, ties_before)
            ties_before += g_ties
            g_nonempty = tl.load(KeyBlockCount + bh * num_blocks + g_cols, mask=g_video, other=0.0) > 0
            g_keep = (g_forced | g_chosen) & g_nonempty[None, :]
            g_trusted = g_entry & ~g_keep & g_nonempty[None, :] & (gain > error)
            if not RECTIFY:
                g_trusted = g_trusted & False
            position = written[:, None] + tl.cumsum(g_trusted.to(tl.int32), 1) - 1
            tl.store(trusted_rows + position, g_cols[None, :] + position * 0, mask=g_trusted & row_ok[:, None])
            written += tl.sum(g_trusted.to(tl.int32), 1)
        # The rest of each list: -1 (positions the loop above did not write).
        minus_one = tl.full([ROWS, COLS], -1, tl.int32)
        tl.store(trusted_rows + cols[None, :], minus_one,
                 mask=video_col[None, :] & (cols[None, :] >= written[:, None]) & row_ok[:, None])  # fmt: skip
        tl.store(TrustedCounts + plan_rows, written, mask=row_ok)


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


def _check_budget(budget: object, batch: int, heads: int, nb: int, device: torch.device) -> torch.Tensor | int:
    if isinstance(budget, torch.Tensor):
        if budget.dtype != torch.int32 or tuple(budget.shape) != (batch, heads):
            raise ValueError(
                f"budget must be an int or an int32 tensor of shape {(batch, heads)}, got {budget.dtype} of shape "
                f"{tuple(budget.shape)}"
            )
        if budget.device != device:
            raise ValueError(f"budget is on {budget.device}, scores on {device}")
        return budget.contiguous()
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= nb:
        raise ValueError(f"budget must be an int in [1, {nb}] (video blocks) or an int32 tensor, got {budget!r}")
    return budget


def select_plan_threshold(
    scores: torch.Tensor,
    key_block_count: torch.Tensor,
    layout: TokenLayout,
    *,
    config: SparseAttentionConfig,
    estimator: str,
    density: float | None = None,
    budget: int | torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    stats: PooledStats | None = None,
    forced_blocks: torch.Tensor | None = None,
    rows_per_program: int | None = None,
) -> SparsePlan:
    """`select_plan`'s plan (equal to `reference.select_plan_reference`) found by threshold search instead of a sort.

    Per row, bisections over the bit patterns of the scores find the mass threshold's cut and the budget's k-th
    largest score (about 32 masked reductions each, against a sort of the whole padded row); ties are taken in index
    order. Scores must be non-negative (NaN ranks as 0), as the estimators' are.

    The budget of video blocks per query block is `block_budget(density, NB)` (give `density`), or `budget`: an int, or
    an int32 `(B, H)` tensor of per-head budgets (each in [1, NB]; not checked on the device). With GAPR
    (`config.gapr` and `config.rectify != "none"`), give `gate` (`gapr_gate`'s int8 `(B, H, NB, NB)`) or `stats`
    (float32 block statistics): with `stats` the gate is computed inside the selection, 64 key blocks at a time, and
    no `(B, H, NB, NB)` gate is written. `rows_per_program`: query blocks per program (default 16 with the fused gate,
    else 4).
    """
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    nb, nq = layout.num_video_blocks, layout.num_blocks
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4 or tuple(scores.shape[2:]) != (nb, nb + 1):
        raise ValueError(f"scores must be a tensor of shape (B, H, {nb}, {nb + 1})")
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    batch, heads = scores.shape[:2]
    device = scores.device
    check_device(device, "scores")
    _check_key_block_count(key_block_count, batch, heads, layout, device)
    if (density is None) == (budget is None):
        raise ValueError("give exactly one of density and budget")
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"density must be a number in (0, 1], got {density!r}")
        budget = block_budget(density, nb)
    budget = _check_budget(budget, batch, heads, nb, device)
    use_gate = config.gapr and config.rectify != "none"
    fused = use_gate and gate is None
    if use_gate:
        if gate is not None:
            shape = (batch, heads, nb, nb)
            if not isinstance(gate, torch.Tensor) or tuple(gate.shape) != shape or gate.dtype != torch.int8:
                raise ValueError(f"gate must be an int8 tensor of shape {(batch, heads, nb, nb)}")
            if gate.device != device:
                raise ValueError(f"gate is on {gate.device}, scores on {device}")
        elif stats is None:
            raise ValueError("config.gapr needs gate (from gapr_gate) or stats (the block statistics)")
        else:
            _check_block_stats(stats, layout)
    head_dim = stats.q_block.shape[-1] if fused and stats is not None else 16
    # Under the interpreter, fewer and larger programs (its cost is per program).
    rows = rows_per_program or (16 if fused or INTERPRETED else 4)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1 or rows & (rows - 1) or (fused and rows < 16):
        raise ValueError(
            f"rows_per_program must be a power of two (at least 16 with the fused gate: its products take 16 rows), "
            f"got {rows_per_program!r}"
        )
    cap = block_budget(config.max_density, nb)
    kv_counts = torch.empty(batch, heads, nq, device=device, dtype=torch.int32)
    kv_indices = torch.empty(batch, heads, nq, nq, device=device, dtype=torch.int32)
    trusted_counts = torch.empty_like(kv_counts)
    trusted_indices = torch.empty(batch, heads, nq, nb, device=device, dtype=torch.int32)
    neighbors = _neighbor_rows(layout, device) if config.neighbors else kv_counts
    block_stats = (
        [stats.q_block.contiguous(), stats.q_block_mad.contiguous(), stats.k_block.contiguous(),
         stats.k_block_mad.contiguous()]
        if fused and stats is not None else [scores] * 4
    )  # fmt: skip
    cols = max(16, triton.next_power_of_2(nq))
    _select_threshold_kernel[(triton.cdiv(nq, rows), batch * heads)](
        scores.contiguous(),
        gate.contiguous() if gate is not None and use_gate else kv_counts,
        neighbors,
        forced_blocks.contiguous().view(torch.int8) if forced_blocks is not None else kv_counts,
        key_block_count.contiguous(),
        budget if isinstance(budget, torch.Tensor) else kv_counts,
        *block_stats,
        kv_counts,
        kv_indices,
        trusted_counts,
        trusted_indices,
        nb,
        nq,
        budget if isinstance(budget, int) else 0,
        cap,
        float(config.mass_threshold) if config.mass_threshold is not None else 0.0,
        COLS=cols,
        ROWS=rows,
        HAS_NEIGHBORS=config.neighbors,
        HAS_FORCED_BLOCKS=forced_blocks is not None,
        HAS_MASS_THRESHOLD=config.mass_threshold is not None,
        PER_HEAD_BUDGET=isinstance(budget, torch.Tensor),
        GAPR=use_gate,
        FUSED_GATE=fused,
        RECTIFY=config.rectify != "none",
        HEAD_DIM=head_dim,
        HEAD_PAD=padded_head_dim(head_dim),
        DOT_PRECISION=STATS_DOT_PRECISION,
        GATE_N=16 if INTERPRETED else 64,
        num_warps=4 if cols * rows <= 4096 else 8,
    )
    return SparsePlan(layout, kv_counts, kv_indices, trusted_counts, trusted_indices, scores, estimator)
