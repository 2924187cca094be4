"""Score + select: the hierarchical block scores, GAPR's gate and the block selection, as three Triton kernels.

This module owns stages 1.2-1.4 and 2 of ALGORITHMS.md on the device, from the statistics of `reorder_pool`:

- `block_scores`: per (batch, head, group of query blocks), tile logits `scale * q_tile . k_tile + log n_j` against
  every video key tile and every text key (isolated, multiplicity 1, masked keys excluded), two passes over the keys
  (row maximum and normaliser, then the normalised weights), summed per key block and averaged over the query tiles
  of each block with their true row counts: `P_hat (B, H, NB, NB + 1)` in float32, as `reference.block_scores`.
- `gapr_gate`: GAPR's test `|q_i . k_j| > |dq_i . k_j| + |q_i . dk_j|` for every pooled block pair, `(B, H, NB, NB)`.
- `select_plan`: one program per (batch, head, query block) sorts its row of scores (`tl.sort`), finds the budget /
  mass-threshold cut, and writes the kept and the trusted key blocks as ascending int32 lists, as
  `reference.build_plan` does (stable descending order: equal scores are taken in index order).

Nothing here reads a value back to the host, and every shape is a function of the layout: the whole stage can be
captured in a CUDA graph. `score_select` chains the three and returns a `reference.SparsePlan`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..config import SparseAttentionConfig
from ..layout import TokenLayout, neighbor_block_mask
from ..reference import PooledStats, SparsePlan, block_budget

__all__ = ["block_scores", "gapr_gate", "score_select", "select_plan"]

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------------------------
# Hierarchical block scores
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_logits(
    q,
    KTile,
    KTileCount,
    tile_base,
    start,
    num_tiles,
    offs_n,
    offs_d,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Logits in log2 units of the query tiles `q` against key tiles `start + offs_n`: `scale * q . k * log2(e) +
    log2(n_j)`; tiles past the end or with no unmasked key get -inf."""
    tiles = start + offs_n
    in_range = tiles < num_tiles
    k = tl.load(KTile + (tile_base + tiles)[:, None] * HEAD_DIM + offs_d[None, :], mask=in_range[:, None], other=0.0)
    count = tl.load(KTileCount + tile_base + tiles, mask=in_range, other=0.0)
    log_count = tl.where(count > 0, tl.math.log2(tl.maximum(count, 1.0)), float("-inf"))
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + log_count[None, :]


@triton.jit
def _text_logits(
    q,
    KC,
    KeyValidC,
    text_base,
    start,
    text_rows,
    offs_n,
    offs_d,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Logits in log2 units of the query tiles `q` against the isolated text keys `start + offs_n` (canonical rows
    after the video); masked and padding keys get -inf."""
    rows = start + offs_n
    in_range = rows < text_rows
    k = tl.load(KC + (text_base + rows)[:, None] * HEAD_DIM + offs_d[None, :], mask=in_range[:, None], other=0.0)
    ok = tl.load(KeyValidC + text_base + rows, mask=in_range, other=0) != 0
    logits = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION) * qk_scale
    return tl.where(ok[None, :], logits, float("-inf"))


@triton.jit
def _block_scores_kernel(
    QTile,
    QTileCount,
    KTile,
    KTileCount,
    KC,
    KeyValidC,
    Scores,
    num_video_blocks,
    text_offset,
    text_rows,
    padded_len,
    qk_scale,
    TILES_PER_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_TEXT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # BLOCK_M query tiles (BLOCK_Q whole query blocks) per program; BLOCK_N key tiles (whole key blocks) per step.
    BLOCK_Q: tl.constexpr = BLOCK_M // TILES_PER_BLOCK
    KEY_BLOCKS: tl.constexpr = BLOCK_N // TILES_PER_BLOCK
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    num_tiles = num_video_blocks * TILES_PER_BLOCK
    tile_base = bh * num_tiles
    text_base = bh * padded_len + text_offset

    offs_m = pid_q * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    query_ok = offs_m < num_tiles
    q = tl.load(QTile + (tile_base + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], mask=query_ok[:, None], other=0.0)

    # Pass 1: the row maximum and normaliser of every query tile over all keys (online, in log2 units).
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, num_tiles, BLOCK_N):
        logits = _tile_logits(
            q, KTile, KTileCount, tile_base, start, num_tiles, offs_n, offs_d, qk_scale, HEAD_DIM, DOT_PRECISION
        )
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_shift) + tl.sum(tl.math.exp2(logits - m_shift[:, None]), 1)
        m_i = m_new
    if HAS_TEXT:
        for start in range(0, text_rows, BLOCK_N):
            logits = _text_logits(
                q, KC, KeyValidC, text_base, start, text_rows, offs_n, offs_d, qk_scale, HEAD_DIM, DOT_PRECISION
            )
            m_new = tl.maximum(m_i, tl.max(logits, 1))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.math.exp2(m_i - m_shift) + tl.sum(tl.math.exp2(logits - m_shift[:, None]), 1)
            m_i = m_new

    # Each query tile's weights enter its block's mean with the tile's real row count; a row whose keys are all
    # masked (l = 0) contributes nothing.
    m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
    query_count = tl.load(QTileCount + offs_m, mask=query_ok, other=0.0)
    block_count = tl.sum(tl.reshape(query_count, (BLOCK_Q, TILES_PER_BLOCK)), 1)
    block_of_tile = tl.reshape(
        tl.broadcast_to(tl.maximum(block_count, 1.0)[:, None], (BLOCK_Q, TILES_PER_BLOCK)), (BLOCK_M,)
    )
    row_factor = tl.where(l_i > 0.0, query_count / (tl.where(l_i > 0.0, l_i, 1.0) * block_of_tile), 0.0)

    q_blocks = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    score_rows = Scores + (bh * num_video_blocks + q_blocks)[:, None] * (num_video_blocks + 1)
    offs_kb = tl.arange(0, KEY_BLOCKS)
    # Pass 2: normalised weights, summed over the key tiles of each key block and the query tiles of each block.
    for start in range(0, num_tiles, BLOCK_N):
        logits = _tile_logits(
            q, KTile, KTileCount, tile_base, start, num_tiles, offs_n, offs_d, qk_scale, HEAD_DIM, DOT_PRECISION
        )
        weights = tl.math.exp2(logits - m_shift[:, None]) * row_factor[:, None]
        per_key_block = tl.sum(tl.reshape(weights, (BLOCK_M, KEY_BLOCKS, TILES_PER_BLOCK)), 2)
        per_block = tl.sum(tl.reshape(per_key_block, (BLOCK_Q, TILES_PER_BLOCK, KEY_BLOCKS)), 1)
        k_blocks = start // TILES_PER_BLOCK + offs_kb
        ok = (q_blocks < num_video_blocks)[:, None] & (k_blocks < num_video_blocks)[None, :]
        tl.store(score_rows + k_blocks[None, :], per_block, mask=ok)
    text_mass = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_TEXT:
        for start in range(0, text_rows, BLOCK_N):
            logits = _text_logits(
                q, KC, KeyValidC, text_base, start, text_rows, offs_n, offs_d, qk_scale, HEAD_DIM, DOT_PRECISION
            )
            text_mass += tl.sum(tl.math.exp2(logits - m_shift[:, None]), 1)
    text_mass = tl.sum(tl.reshape(text_mass * row_factor, (BLOCK_Q, TILES_PER_BLOCK)), 1)
    tl.store(
        Scores + (bh * num_video_blocks + q_blocks) * (num_video_blocks + 1) + num_video_blocks,
        text_mass,
        mask=q_blocks < num_video_blocks,
    )


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
    DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    bh = tl.program_id(2).to(tl.int64)
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, HEAD_DIM)
    ok_i = offs_i < num_video_blocks
    ok_j = offs_j < num_video_blocks
    rows_i = (bh * num_video_blocks + offs_i)[:, None] * HEAD_DIM + offs_d[None, :]
    rows_j = (bh * num_video_blocks + offs_j)[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(QBlock + rows_i, mask=ok_i[:, None], other=0.0)
    dq = tl.load(QBlockMad + rows_i, mask=ok_i[:, None], other=0.0)
    k = tl.trans(tl.load(KBlock + rows_j, mask=ok_j[:, None], other=0.0))
    dk = tl.trans(tl.load(KBlockMad + rows_j, mask=ok_j[:, None], other=0.0))
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
# Launchers
# --------------------------------------------------------------------------------------------------------------------

_INTERPRETED = not isinstance(_block_scores_kernel, triton.runtime.jit.JITFunction)
# fp32 statistics: exact fp32 products under the interpreter; on the GPU three tf32 products per dot (tf32x3) give
# about fp32 accuracy on the tensor cores, where plain fp32 ("ieee") would run the O(NT^2 D) products on the FMA units.
_DOT_PRECISION = "ieee" if _INTERPRETED else "tf32x3"


# (BLOCK_M query tiles, BLOCK_N key tiles, warps, stages). The fp32 operands of tf32x3 products take shared memory
# for their high and low halves: these all fit Hopper's 227 KiB (128x64 only with one stage).
_SCORE_CANDIDATES = ((64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 1), (64, 32, 4, 2), (128, 32, 8, 2), (32, 64, 4, 2))


def _score_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in _SCORE_CANDIDATES
    ]


def _prune_score_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Both tile counts must hold whole blocks."""
    tiles_per_block = {**named_args, **kwargs}["TILES_PER_BLOCK"]
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] >= tiles_per_block and c.kwargs["BLOCK_N"] >= tiles_per_block]
    return fitting or [triton.Config({"BLOCK_M": tiles_per_block, "BLOCK_N": tiles_per_block}, num_warps=8)]


_autotuned_scores = triton.autotune(
    configs=_score_configs(),
    key=["TILES_PER_BLOCK", "HEAD_DIM", "HAS_TEXT", "num_video_blocks"],
    prune_configs_by={"early_config_prune": _prune_score_configs},
)(_block_scores_kernel)


def _check_device(device: torch.device, name: str) -> None:
    if device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"{name} is on {device}: the kernels run on CUDA, or on the CPU under the Triton interpreter "
            "(TRITON_INTERPRET=1 set before triton is first imported)"
        )


def _check_stats(stats: object, layout: TokenLayout) -> tuple[int, int, int]:
    if not isinstance(stats, PooledStats):
        raise TypeError(f"stats must be a reference.PooledStats, got {type(stats).__name__}")
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    if stats.q_tile.dim() != 4:
        raise ValueError(f"stats.q_tile must have shape (B, H, NT, D), got {tuple(stats.q_tile.shape)}")
    batch, heads, num_tiles, head_dim = stats.q_tile.shape
    _check_device(stats.q_tile.device, "stats")
    expected_tiles = layout.num_video_blocks * layout.block_size // stats.tile_size
    if num_tiles != expected_tiles or layout.block_size % stats.tile_size:
        raise ValueError(
            f"stats hold {num_tiles} tiles of {stats.tile_size} rows; the layout needs {expected_tiles} "
            f"(block_size={layout.block_size})"
        )
    nb = layout.num_video_blocks
    shapes = {
        "q_tile": (batch, heads, num_tiles, head_dim),
        "k_tile": (batch, heads, num_tiles, head_dim),
        "q_tile_count": (num_tiles,),
        "k_tile_count": (batch, heads, num_tiles),
        "q_block": (batch, heads, nb, head_dim),
        "q_block_mad": (batch, heads, nb, head_dim),
        "k_block": (batch, heads, nb, head_dim),
        "k_block_mad": (batch, heads, nb, head_dim),
    }
    for name, shape in shapes.items():
        tensor = getattr(stats, name)
        if tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
            raise ValueError(
                f"stats.{name} must be float32 of shape {shape}, got {tensor.dtype} of shape {tuple(tensor.shape)}"
            )
        if tensor.device != stats.q_tile.device:
            raise ValueError(f"stats.{name} is on {tensor.device}, stats.q_tile on {stats.q_tile.device}")
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


def block_scores(
    stats: PooledStats,
    k_c: torch.Tensor,
    key_valid_c: torch.Tensor,
    layout: TokenLayout,
    scale: float,
) -> torch.Tensor:
    """`P_hat` float32 `(B, H, NB, NB + 1)` from float32 `stats` (`reorder_pool`), the canonical keys `k_c (B, H, P,
    D)` (read for the text keys only) and `key_valid_c` bool `(B, H, P)`; equals `reference.block_scores`."""
    batch, heads, head_dim = _check_stats(stats, layout)
    device = stats.q_tile.device
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    padded = (batch, heads, layout.padded_len)
    if not isinstance(k_c, torch.Tensor) or tuple(k_c.shape) != (*padded, head_dim):
        raise ValueError(f"k_c must be a tensor of shape {(*padded, head_dim)}")
    if (
        not isinstance(key_valid_c, torch.Tensor)
        or tuple(key_valid_c.shape) != padded
        or key_valid_c.dtype != torch.bool
    ):
        raise ValueError(f"key_valid_c must be a bool tensor of shape {padded}")
    for name, tensor in (("k_c", k_c), ("key_valid_c", key_valid_c)):
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, the statistics on {device}")
    nb = layout.num_video_blocks
    tiles_per_block = layout.block_size // stats.tile_size
    scores = torch.empty(batch, heads, nb, nb + 1, device=device, dtype=torch.float32)
    args = (
        stats.q_tile.contiguous(),
        stats.q_tile_count.contiguous(),
        stats.k_tile.contiguous(),
        stats.k_tile_count.contiguous(),
        k_c.contiguous(),
        key_valid_c.contiguous().view(torch.int8),
        scores,
        nb,
        layout.text_offset,
        layout.num_text_blocks * layout.block_size,
        layout.padded_len,
        float(scale) * _LOG2E,
    )
    constants = {
        "TILES_PER_BLOCK": tiles_per_block,
        "HEAD_DIM": head_dim,
        "HAS_TEXT": layout.num_text > 0,
        "DOT_PRECISION": _DOT_PRECISION,
    }

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(nb * tiles_per_block, meta["BLOCK_M"]), batch * heads)

    if _INTERPRETED:
        block_m = max(16, tiles_per_block)
        _block_scores_kernel[grid](*args, **constants, BLOCK_M=block_m, BLOCK_N=max(16, tiles_per_block))
    else:
        _autotuned_scores[grid](*args, **constants)
    return scores


def gapr_gate(stats: PooledStats, key_block_count: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """int8 `(B, H, NB, NB)`, 1 where GAPR trusts the pooled pair (query block i, key block j) and key block j has an
    unmasked key; equals `reference.gapr_trusted`."""
    batch, heads, head_dim = _check_stats(stats, layout)
    device = stats.q_tile.device
    _check_key_block_count(key_block_count, batch, heads, layout, device)
    nb = layout.num_video_blocks
    gate = torch.empty(batch, heads, nb, nb, device=device, dtype=torch.int8)
    tile = 16 if _INTERPRETED else 64
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
        DOT_PRECISION=_DOT_PRECISION,
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
    gate: torch.Tensor | None = None,
) -> SparsePlan:
    """Selection (stage 2) and the trusted lists from float32 `scores (B, H, NB, NB + 1)`, as `reference.build_plan`.

    `key_block_count` float32 `(B, H, NQ)`: unmasked keys per canonical block (empty blocks are never listed).
    `gate` int8 `(B, H, NB, NB)` from `gapr_gate`, needed when `config.gapr` and `config.rectify != "none"`.
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
    _check_device(device, "scores")
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
        gate.contiguous() if use_gate else kv_counts,
        neighbors,
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
        HAS_MASS_THRESHOLD=config.mass_threshold is not None,
        GAPR=use_gate,
        RECTIFY=config.rectify != "none",
        num_warps=4 if cols <= 512 else 8,
    )
    return SparsePlan(kv_counts, kv_indices, trusted_counts, trusted_indices, scores, nb)


def score_select(
    stats: PooledStats,
    k_c: torch.Tensor,
    key_valid_c: torch.Tensor,
    key_block_count: torch.Tensor,
    layout: TokenLayout,
    *,
    scale: float,
    density: float,
    config: SparseAttentionConfig,
) -> SparsePlan:
    """Stages 1.2-2 on the device: `block_scores`, `gapr_gate` (when the plan needs it) and `select_plan`."""
    scores = block_scores(stats, k_c, key_valid_c, layout, scale)
    gate = gapr_gate(stats, key_block_count, layout) if config.gapr and config.rectify != "none" else None
    return select_plan(scores, key_block_count, layout, density=density, config=config, gate=gate)
