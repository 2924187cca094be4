"""Selection on the device: GAPR's gate and the block selection (stage 2 of docs/DESIGN.md), as Triton kernels.

- `gapr_gate`: GAPR's test `|q_i . k_j| > |dq_i . k_j| + |q_i . dk_j|` for every pooled block pair, `(B, H, NB, NB)`.
- `select_plan`: a few query blocks of one (batch, head) per program; bisections over the bit patterns of the scores
  find each row's mass-threshold cut and the budget's k-th largest score (no sort), ties are taken in index order, and
  the kept and trusted key blocks are written as ascending int16 lists (`plan.INDEX_DTYPE`), as
  `policies.topk.select_plan_reference` does (stable descending order). Budgets may differ per (batch, head).

Nothing here reads a value back to the host and every shape is a function of the layout, so the stage can be captured
in a CUDA graph. The scores come from an estimator (`spattn_compile.estimators`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..layout import TokenLayout, neighbor_block_mask
from ..plan import INDEX_DTYPE, PooledStats, SparsePlan, block_budget, check_plan_blocks
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
    listed = (cols[None, :] + position * 0).to(Indices.dtype.element_ty)
    tl.store(row + position, listed, mask=chosen & row_ok[:, None])
    minus_one = tl.full(chosen.shape, -1, Indices.dtype.element_ty)
    rest = in_list[None, :] & (cols[None, :] >= count[:, None]) & row_ok[:, None]
    tl.store(row + cols[None, :], minus_one, mask=rest)
    tl.store(Counts + plan_rows, count, mask=row_ok)


@triton.jit
def _select_kernel(
    Scores,
    Gate,
    Neighbors,
    ForcedBlocks,
    KeyBlockCount,
    Budget,
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
    RECTIFY: tl.constexpr,
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

    trusted = video_entry & ~keep & nonempty[None, :]
    if GAPR:
        gate = tl.load(Gate + (bh * num_video_blocks + rows)[:, None] * num_video_blocks + cols[None, :],
                       mask=video_entry, other=0)  # fmt: skip
        trusted = trusted & (gate != 0)
    if not RECTIFY:
        trusted = trusted & False
    _write_index_rows(TrustedCounts, TrustedIndices, plan_rows, row_ok, num_video_blocks, trusted, cols, video_col)


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


def gapr_gate(
    stats: PooledStats, key_block_count: torch.Tensor, layout: TokenLayout, *, config: tuple[int, int] | None = None
) -> torch.Tensor:
    """int8 `(B, H, NB, NB)`, 1 where GAPR trusts the pooled pair (query block i, key block j) and key block j has an
    unmasked key; equals `reference.gapr_trusted`. `config`: (block pairs per side of a program's square, warps)
    instead of (64, 4) on CUDA, (16, 4) under the interpreter (benchmarks)."""
    batch, heads, head_dim = _check_block_stats(stats, layout)
    device = stats.q_block.device
    _check_key_block_count(key_block_count, batch, heads, layout, device)
    nb = layout.num_video_blocks
    gate = torch.empty(batch, heads, nb, nb, device=device, dtype=torch.int8)
    tile, warps = (16 if INTERPRETED else 64), 4
    if config is not None:
        tile, warps = config
        for name, value, low, high in (("tile", tile, 16, 256), ("warps", warps, 1, 16)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high or value & (value - 1):
                raise ValueError(f"config {name} must be a power of two in [{low}, {high}], got {value!r}")
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
        num_warps=warps,
    )
    return gate


@functools.lru_cache(maxsize=64)
def _neighbor_rows(layout: TokenLayout, device: torch.device) -> torch.Tensor:
    return neighbor_block_mask(layout).to(device=device, dtype=torch.int8).contiguous()


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


def select_plan(
    scores: torch.Tensor,
    key_block_count: torch.Tensor,
    layout: TokenLayout,
    *,
    budget: int | torch.Tensor,
    estimator: str,
    mass_threshold: float | None = None,
    max_density: float = 1.0,
    neighbors: bool = False,
    trusted: bool = False,
    gate: torch.Tensor | None = None,
    forced_blocks: torch.Tensor | None = None,
    rows_per_program: int | None = None,
    num_warps: int | None = None,
) -> SparsePlan:
    """The plan `policies.topk.select_plan_reference` selects from `scores` (module docstring), by threshold search.

    Per row, bisections over the bit patterns of the scores find the mass threshold's cut and the budget's k-th
    largest score (about 32 masked reductions each, against a sort of the whole padded row); ties are taken in index
    order. Scores must be non-negative (NaN ranks as 0), as the estimators' are.

    Args:
        scores: float32 `(B, H, NB, NB + 1)`, the estimator's `P_hat`. key_block_count: float32 `(B, H, NQ)`, valid
            keys per canonical block (blocks without one are never listed). layout: the canonical layout.
        budget: video key blocks per video query block: an int in [1, NB], or an int32 `(B, H)` tensor of per-head
            budgets (each in [1, NB]; not checked on the device, which would synchronise).
        estimator: the label the plan records for the scores' origin.
        mass_threshold: grow each row in descending order while the kept mass (text included) is under it, up to
            `block_budget(max_density, NB)` blocks (never below the budget); None: exactly the budget.
        neighbors: force the blocks of each token's 26 grid neighbours.
        trusted: write the trusted lists (skipped blocks with a valid key, rectification's), restricted to `gate`'s
            pairs when given (`gapr_gate`'s int8 `(B, H, NB, NB)`); False: empty trusted lists.
        forced_blocks: bool `(B, H, NQ)`, kept by every video query block (blocks with a non-finite key).
        rows_per_program: query blocks per program, a power of two (default 4 on CUDA: 0.61 ms at Wan 14B 720p on
            the H200 against 1.26 ms with 16, benchmarks/NOTES_pipeline.md; 16 under the interpreter, whose cost is
            per program).
        num_warps: warps per program, a power of two (default 4 for rows of up to 4096 padded entries, else 8). One
            warp keeps each row's reductions inside a warp (1 or 2 rows: 224 / 255 registers for sm_90, no spill).
    """
    nb, nq = layout.num_video_blocks, layout.num_blocks
    check_plan_blocks(nq)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4 or tuple(scores.shape[2:]) != (nb, nb + 1):
        raise ValueError(f"scores must be a tensor of shape (B, H, {nb}, {nb + 1})")
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    batch, heads = scores.shape[:2]
    device = scores.device
    check_device(device, "scores")
    _check_key_block_count(key_block_count, batch, heads, layout, device)
    budget = _check_budget(budget, batch, heads, nb, device)
    if mass_threshold is not None and not 0 < mass_threshold <= 1:
        raise ValueError(f"mass_threshold must be None or in (0, 1], got {mass_threshold!r}")
    if not 0 < max_density <= 1:
        raise ValueError(f"max_density must be in (0, 1], got {max_density!r}")
    if gate is not None:
        shape = (batch, heads, nb, nb)
        if not isinstance(gate, torch.Tensor) or tuple(gate.shape) != shape or gate.dtype != torch.int8:
            raise ValueError(f"gate must be an int8 tensor of shape {shape}")
        if gate.device != device:
            raise ValueError(f"gate is on {gate.device}, scores on {device}")
    rows = (16 if INTERPRETED else 4) if rows_per_program is None else rows_per_program
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1 or rows & (rows - 1):
        raise ValueError(f"rows_per_program must be a power of two, got {rows_per_program!r}")
    if num_warps is not None and (isinstance(num_warps, bool) or not isinstance(num_warps, int)
                                  or not 1 <= num_warps <= 16 or num_warps & (num_warps - 1)):  # fmt: skip
        raise ValueError(f"num_warps must be None or a power of two in [1, 16], got {num_warps!r}")
    cap = block_budget(max_density, nb)
    kv_counts = torch.empty(batch, heads, nq, device=device, dtype=torch.int32)
    kv_indices = torch.empty(batch, heads, nq, nq, device=device, dtype=INDEX_DTYPE)
    trusted_counts = torch.empty_like(kv_counts)
    trusted_indices = torch.empty(batch, heads, nq, nb, device=device, dtype=INDEX_DTYPE)
    neighbor_rows = _neighbor_rows(layout, device) if neighbors else kv_counts
    cols = max(16, triton.next_power_of_2(nq))
    _select_kernel[(triton.cdiv(nq, rows), batch * heads)](
        scores.contiguous(),
        gate.contiguous() if gate is not None else kv_counts,
        neighbor_rows,
        forced_blocks.contiguous().view(torch.int8) if forced_blocks is not None else kv_counts,
        key_block_count.contiguous(),
        budget if isinstance(budget, torch.Tensor) else kv_counts,
        kv_counts,
        kv_indices,
        trusted_counts,
        trusted_indices,
        nb,
        nq,
        budget if isinstance(budget, int) else 0,
        cap,
        float(mass_threshold) if mass_threshold is not None else 0.0,
        COLS=cols,
        ROWS=rows,
        HAS_NEIGHBORS=neighbors,
        HAS_FORCED_BLOCKS=forced_blocks is not None,
        HAS_MASS_THRESHOLD=mass_threshold is not None,
        PER_HEAD_BUDGET=isinstance(budget, torch.Tensor),
        GAPR=gate is not None,
        RECTIFY=trusted,
        num_warps=num_warps or (4 if cols * rows <= 4096 else 8),
    )
    return SparsePlan(layout, kv_counts, kv_indices, trusted_counts, trusted_indices, scores, estimator)
