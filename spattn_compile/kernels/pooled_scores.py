"""The pooled estimator on the device (`estimators.PooledTiles`): tile-mean queries against tile-mean keys.

Kernels:

- `_tile_outliers_kernel` (only with `outliers=True` on canonical copies; `prepare_statistics` computes the same in its
  pass over the keys): per video key tile, the usable key farthest from the tile's mean (the first on ties), the mean
  and count of the tile's other usable keys, and whether the outlier exists; a whole tile per program, in registers.
- `_pooled_scores_kernel` (`pooled_scores`, the copying pipeline's): per (batch, head, group of query blocks), tile
  logits `scale * q_tile . k + log2 n` (log2 units) against every key tile (its mean over the others and, with
  outliers, its outlier key with multiplicity 1) and every text key (isolated, multiplicity 1, masked keys excluded);
  two passes over the keys (row maximum and normaliser, then the normalised weights), summed per key block and
  averaged over the query tiles of each block with their true row counts.
- `_pooled_scores_one_pass_kernel` (`pooled_scores_one_pass`): the same scores with every logit computed and
  exponentiated once. Persistent programs keep each (query tile, key block) sum relative to the running maximum of
  its group of key blocks in a scratch slot of their own and rescale it once at the end; keys go key-block-major (one
  tile of each of BLOCK_N key blocks per step), so the per-block sums are an accumulator, not a reduction. It reads
  canonical copies or, through the layout's index, the caller's text keys. Options: float16-pair exponentials,
  float8 products.

All give `P_hat (B, H, NB, NB + 1)` in float32, as `estimators.pooled.pooled_scores_reference`. For 16-bit inputs the
products take the tile means rounded to the inputs' type (float32 accumulation). Head dims that are not a power of
two are padded to one in registers (masked loads); nothing reads back to the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..estimators.base import EstimatorInputs, KeyTileOutliers
from .common import INTERPRETED, LOG2E, check_device, online_logsumexp, padded_head_dim

__all__ = ["pooled_scores", "pooled_scores_one_pass", "tile_outliers"]


@triton.jit
def _tile_outliers_kernel(
    KC,
    KeyValidC,
    RestMean,
    RestCount,
    Outlier,
    OutlierCount,
    num_tiles,
    padded_len,
    TILE: tl.constexpr,
    TILES: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
):
    # TILES whole key tiles per program, held at once as a (TILES, TILE, HEAD_PAD) block: the keys cross HBM once,
    # and every reduction (mean, distance, farthest row, its vector) runs across registers, not across a loop.
    bh = tl.program_id(1).to(tl.int64)
    tiles = tl.program_id(0) * TILES + tl.arange(0, TILES)
    offs_r = tl.arange(0, TILE)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_DIM
    tile_ok = tiles < num_tiles
    rows = bh * padded_len + tiles[:, None].to(tl.int64) * TILE + offs_r[None, :]
    ok = tl.load(KeyValidC + rows, mask=tile_ok[:, None], other=0) != 0
    k_mask = ok[:, :, None] & d_ok[None, None, :]
    k = tl.load(KC + rows[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=k_mask, other=0.0).to(tl.float32)
    count = tl.sum(ok.to(tl.float32), 1)
    total = tl.sum(k, 1)
    mean = total / tl.maximum(count, 1.0)[:, None]
    deviation = k - mean[:, None, :]
    # Padded lanes and left-out rows load as zeros; a left-out row is never the farthest (-1 < any distance).
    distance = tl.where(ok, tl.sum(deviation * deviation, 2), -1.0)
    farthest = tl.argmax(distance, 1, tie_break_left=True)
    is_outlier = (offs_r[None, :] == farthest[:, None]) & ok
    outlier = tl.sum(tl.where(is_outlier[:, :, None], k, 0.0), 1)
    has = tl.sum(is_outlier.to(tl.float32), 1)
    rest_count = count - has
    rest_mean = (total - outlier) / tl.maximum(rest_count, 1.0)[:, None]
    out_rows = bh * num_tiles + tiles
    out_vectors = out_rows[:, None] * HEAD_DIM + offs_d[None, :]
    vector_mask = tile_ok[:, None] & d_ok[None, :]
    tl.store(RestMean + out_vectors, rest_mean, mask=vector_mask)
    tl.store(RestCount + out_rows, rest_count, mask=tile_ok)
    tl.store(Outlier + out_vectors, outlier, mask=vector_mask)
    tl.store(OutlierCount + out_rows, has, mask=tile_ok)


@triton.jit
def _tile_logits(
    q, Keys, Counts, tile_base, tiles, in_range, offs_d, qk_scale, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr
):  # fmt: skip
    """Logits in log2 units of the query tiles `q` against the key tiles `tiles` of one key set:
    `scale * q . k * log2(e) + log2(n)`; tiles out of range or with no key get -inf."""
    k_mask = in_range[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(Keys + (tile_base + tiles)[:, None] * HEAD_DIM + offs_d[None, :], mask=k_mask, other=0.0)
    count = tl.load(Counts + tile_base + tiles, mask=in_range, other=0.0)
    log_count = tl.where(count > 0, tl.math.log2(tl.maximum(count, 1.0)), float("-inf"))
    return tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale + log_count[None, :]


@triton.jit
def _key_tile_logits(
    q, Keys, Counts, tile_base, start, num_tiles, offs_n, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """`_tile_logits` of the consecutive key tiles `start + offs_n`."""
    tiles = start + offs_n
    return _tile_logits(q, Keys, Counts, tile_base, tiles, tiles < num_tiles, offs_d, qk_scale, HEAD_DIM, DOT_PRECISION)


@triton.jit
def _text_logits(
    q, KC, KeyValidC, text_base, start, text_rows, offs_n, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Logits in log2 units of the query tiles `q` against the isolated text keys `start + offs_n` (canonical rows
    after the video); masked and padding keys get -inf."""
    rows = start + offs_n
    in_range = rows < text_rows
    k_mask = in_range[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(KC + (text_base + rows)[:, None] * HEAD_DIM + offs_d[None, :], mask=k_mask, other=0.0)
    ok = tl.load(KeyValidC + text_base + rows, mask=in_range, other=0) != 0
    logits = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
    return tl.where(ok[None, :], logits, float("-inf"))


@triton.jit
def _pooled_scores_kernel(
    QTile,
    QTileCount,
    KeyMean,
    KeyMeanCount,
    KeyOutlier,
    KeyOutlierCount,
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
    HEAD_PAD: tl.constexpr,
    HAS_OUTLIERS: tl.constexpr,
    HAS_TEXT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INPUT_PRECISION_OPERANDS: tl.constexpr,
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
    offs_d = tl.arange(0, HEAD_PAD)
    query_ok = offs_m < num_tiles
    q_mask = query_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(QTile + (tile_base + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
    if INPUT_PRECISION_OPERANDS:
        # The tile means enter the products in the inputs' 16-bit type (as the keys of the attention kernel's query
        # rectification do): twice the tensor-core rate of tf32 and half the shared memory.
        q = q.to(KC.dtype.element_ty)

    # Pass 1: the row maximum and normaliser of every query tile over all keys (online, in log2 units).
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, num_tiles, BLOCK_N):
        logits = _key_tile_logits(
            q, KeyMean, KeyMeanCount, tile_base, start, num_tiles, offs_n, offs_d, qk_scale, HEAD_DIM, DOT_PRECISION
        )
        m_i, l_i = online_logsumexp(m_i, l_i, logits)
        if HAS_OUTLIERS:
            logits = _key_tile_logits(
                q, KeyOutlier, KeyOutlierCount, tile_base, start, num_tiles, offs_n, offs_d, qk_scale, HEAD_DIM,
                DOT_PRECISION,
            )  # fmt: skip
            m_i, l_i = online_logsumexp(m_i, l_i, logits)
    if HAS_TEXT:
        for start in range(0, text_rows, BLOCK_N):
            logits = _text_logits(
                q, KC, KeyValidC, text_base, start, text_rows, offs_n, offs_d, qk_scale, HEAD_DIM, DOT_PRECISION
            )
            m_i, l_i = online_logsumexp(m_i, l_i, logits)

    # Each query tile's weights enter its block's mean with the tile's real row count; a row whose keys are all
    # masked (l = 0) contributes nothing.
    m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
    query_count = tl.load(QTileCount + tile_base + offs_m, mask=query_ok, other=0.0)
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
        logits = _key_tile_logits(
            q, KeyMean, KeyMeanCount, tile_base, start, num_tiles, offs_n, offs_d, qk_scale, HEAD_DIM, DOT_PRECISION
        )
        weights = tl.math.exp2(logits - m_shift[:, None])
        if HAS_OUTLIERS:
            logits = _key_tile_logits(
                q, KeyOutlier, KeyOutlierCount, tile_base, start, num_tiles, offs_n, offs_d, qk_scale, HEAD_DIM,
                DOT_PRECISION,
            )  # fmt: skip
            weights += tl.math.exp2(logits - m_shift[:, None])
        weights = weights * row_factor[:, None]
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
# One pass
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _exp2(x, FAST_EXP: tl.constexpr):
    """2^x for x <= 0: float32 `ex2.approx` on the SFUs, or with FAST_EXP two at a time in float16
    (`ex2.approx.f16x2`; the argument rounded to float16, results below 2^-24 are zero). On sm_90 ptxas issues the
    pair as two `MUFU.EX2.F16`, so FAST_EXP saves no SFU work there and adds a pack and two unpacks per pair: an
    option kept for measurement (benchmarks/NOTES_pipeline.md)."""
    if FAST_EXP:
        half = x.to(tl.float16)
        y = tl.inline_asm_elementwise(
            "ex2.approx.f16x2 $0, $1;", "=r,r", [half], dtype=tl.float16, is_pure=True, pack=2
        )
        return y.to(tl.float32)
    else:
        return tl.math.exp2(x)


@triton.jit
def _accumulate(m_i, acc, logits, FAST_EXP: tl.constexpr):
    """Fold a tile of logits (log2 units, one column per key block) into the per-column sums `acc`, kept relative to
    the running row maximum `m_i`; returns the new maximum and sums. A row that saw only -inf keeps m = -inf, no NaN."""
    m_new = tl.maximum(m_i, tl.max(logits, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    acc = acc * tl.math.exp2(m_i - m_shift)[:, None] + _exp2(logits - m_shift[:, None], FAST_EXP)
    return m_new, acc


@triton.jit
def _text_logits_indexed(
    q, K, SourceIndex, KeyUsable, key_base, usable_base, text_offset, start, text_rows, offs_n, offs_d, stride_ks,
    qk_scale, HEAD_DIM: tl.constexpr, SOURCE_ORDER: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Logits in log2 units of the query tiles `q` against the text keys `start + offs_n` (canonical rows from
    `text_offset`), read from the caller's keys through `SourceIndex` (SOURCE_ORDER) or from canonical copies;
    keys that are not usable (masked, padding, not finite) get -inf."""
    rows = start + offs_n
    in_range = rows < text_rows
    canonical = text_offset + rows
    ok = tl.load(KeyUsable + usable_base + canonical, mask=in_range, other=0) != 0
    if SOURCE_ORDER:
        source = tl.maximum(tl.load(SourceIndex + canonical, mask=in_range, other=0).to(tl.int64), 0)
    else:
        source = canonical.to(tl.int64)
    k_mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(key_base + source[:, None] * stride_ks + offs_d[None, :], mask=k_mask, other=0.0)
    logits = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
    return tl.where(ok[None, :], logits, float("-inf"))


@triton.jit
def _pooled_scores_one_pass_kernel(
    QTile,
    QTileCount,
    KeyMean,
    KeyMeanCount,
    KeyOutlier,
    KeyOutlierCount,
    K,
    SourceIndex,
    KeyUsable,
    Scores,
    Partial,
    RowMax,
    num_heads,
    num_video_blocks,
    num_pairs,
    text_offset,
    text_rows,
    padded_len,
    stride_kb,
    stride_kh,
    stride_ks,
    scratch_rows,
    scratch_cols,
    scratch_steps,
    qk_scale,
    TILES_PER_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    HAS_OUTLIERS: tl.constexpr,
    HAS_TEXT: tl.constexpr,
    SOURCE_ORDER: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_EXP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Persistent programs: each takes work items (one (batch, head) and BLOCK_M query tiles, whole query blocks) in
    # turn and owns one slot of the scratch. The keys go by groups of BLOCK_N key blocks, one tile of each block per
    # step (TILES_PER_BLOCK steps a group), so each column of the logits is one key block and the weights add up per
    # key block in an accumulator (rescaled when the running maximum grows), with no reduction across columns. At
    # the end of a group the accumulator goes to the slot (Partial) with the maximum it is relative to (RowMax); the
    # slot is rescaled to the final maximum and normaliser at the end of the item, so every logit is computed and
    # exponentiated once.
    BLOCK_Q: tl.constexpr = BLOCK_M // TILES_PER_BLOCK
    pid = tl.program_id(0)
    num_tiles = num_video_blocks * TILES_PER_BLOCK
    groups = tl.cdiv(num_tiles, BLOCK_M)
    num_items = num_pairs * groups
    key_groups = tl.cdiv(num_video_blocks, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_PAD)
    slot = pid.to(tl.int64) * scratch_rows
    partial_rows = Partial + (slot + offs_m)[:, None] * scratch_cols
    max_rows = RowMax + (slot + offs_m) * scratch_steps
    # The same slot rows as (query blocks, their tiles), for the epilogue.
    rows3 = tl.arange(0, BLOCK_Q)[:, None] * TILES_PER_BLOCK + tl.arange(0, TILES_PER_BLOCK)[None, :]
    partial_rows3 = Partial + (slot + rows3)[:, :, None] * scratch_cols
    max_rows3 = RowMax + (slot + rows3) * scratch_steps

    for item in range(pid, num_items, tl.num_programs(0)):
        bh = (item // groups).to(tl.int64)
        group = item % groups
        off_b = bh // num_heads
        off_h = bh % num_heads
        tile_base = bh * num_tiles
        tiles_m = group * BLOCK_M + offs_m
        query_ok = tiles_m < num_tiles
        q_mask = query_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(QTile + (tile_base + tiles_m)[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
        q = q.to(OPERAND_DTYPE)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for key_group in range(0, key_groups):
            key_blocks = key_group * BLOCK_N + offs_n
            block_ok = key_blocks < num_video_blocks
            m_start = m_i
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for part in range(0, TILES_PER_BLOCK):
                tiles = key_blocks * TILES_PER_BLOCK + part
                logits = _tile_logits(
                    q, KeyMean, KeyMeanCount, tile_base, tiles, block_ok, offs_d, qk_scale, HEAD_DIM, DOT_PRECISION
                )
                m_i, acc = _accumulate(m_i, acc, logits, FAST_EXP)
                if HAS_OUTLIERS:
                    # The second key set after the first: one tile of logits in registers at a time.
                    logits = _tile_logits(
                        q, KeyOutlier, KeyOutlierCount, tile_base, tiles, block_ok, offs_d, qk_scale, HEAD_DIM,
                        DOT_PRECISION,
                    )  # fmt: skip
                    m_i, acc = _accumulate(m_i, acc, logits, FAST_EXP)
            m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
            l_i = l_i * tl.math.exp2(m_start - m_shift) + tl.sum(acc, 1)
            tl.store(partial_rows + key_blocks[None, :], acc, mask=block_ok[None, :])
            tl.store(max_rows + key_group, m_i)
        # The text keys, last: their sum is relative to the final maximum as it stands.
        text_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_TEXT:
            key_base = K + off_b * stride_kb + off_h * stride_kh
            for start in range(0, text_rows, BLOCK_N):
                logits = _text_logits_indexed(
                    q, K, SourceIndex, KeyUsable, key_base, bh * padded_len, text_offset, start, text_rows, offs_n,
                    offs_d, stride_ks, qk_scale, HEAD_DIM, SOURCE_ORDER, DOT_PRECISION,
                )  # fmt: skip
                m_new = tl.maximum(m_i, tl.max(logits, 1))
                m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_shift)
                text_weights = tl.sum(_exp2(logits - m_shift[:, None], FAST_EXP), 1)
                l_i = l_i * alpha + text_weights
                text_sum = text_sum * alpha + text_weights
                m_i = m_new

        # Epilogue: each query tile's weights enter its block's mean with the tile's real row count; a tile whose keys
        # are all masked (l = 0) contributes nothing. The slot is read back as (query blocks, their tiles, key blocks),
        # so the sum over a block's tiles is a reduction over the middle axis, one group of key blocks at a time.
        m_final = tl.where(m_i == float("-inf"), 0.0, m_i)
        query_count = tl.load(QTileCount + tile_base + tiles_m, mask=query_ok, other=0.0)
        block_count = tl.sum(tl.reshape(query_count, (BLOCK_Q, TILES_PER_BLOCK)), 1)
        block_of_tile = tl.reshape(
            tl.broadcast_to(tl.maximum(block_count, 1.0)[:, None], (BLOCK_Q, TILES_PER_BLOCK)), (BLOCK_M,)
        )
        row_factor = tl.where(l_i > 0.0, query_count / (tl.where(l_i > 0.0, l_i, 1.0) * block_of_tile), 0.0)
        m_final3 = tl.reshape(m_final, (BLOCK_Q, TILES_PER_BLOCK))
        row_factor3 = tl.reshape(row_factor, (BLOCK_Q, TILES_PER_BLOCK))
        q_blocks = group * BLOCK_Q + tl.arange(0, BLOCK_Q)
        score_rows = Scores + (bh * num_video_blocks + q_blocks)[:, None] * (num_video_blocks + 1)
        tl.debug_barrier()  # the slot was written by other threads of this program
        for key_group in range(0, key_groups):
            key_blocks = key_group * BLOCK_N + offs_n
            block_ok = key_blocks < num_video_blocks
            partial = tl.load(partial_rows3 + key_blocks[None, None, :], mask=block_ok[None, None, :], other=0.0)
            # The maximum the group's sums are relative to (-inf for a group that saw no key: its sums are 0).
            factor = tl.math.exp2(tl.load(max_rows3 + key_group) - m_final3) * row_factor3
            per_block = tl.sum(partial * factor[:, :, None], 1)
            store_ok = (q_blocks < num_video_blocks)[:, None] & block_ok[None, :]
            tl.store(score_rows + key_blocks[None, :], per_block, mask=store_ok)
        text_mass = tl.sum(tl.reshape(text_sum * row_factor, (BLOCK_Q, TILES_PER_BLOCK)), 1)
        tl.store(score_rows + num_video_blocks, text_mass[:, None], mask=(q_blocks < num_video_blocks)[:, None])
        tl.debug_barrier()  # the slot is read before the next item writes it

# (BLOCK_M query tiles, BLOCK_N key tiles, warps, stages). The fp32 operands of tf32x3 products take shared memory
# for their high and low halves: these all fit Hopper's 227 KiB (128x64 only with one stage).
_SCORE_CANDIDATES = ((64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 1), (64, 32, 4, 2), (128, 32, 8, 2), (32, 64, 4, 2))


def _prune_score_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Both tile counts must hold whole blocks."""
    tiles_per_block = {**named_args, **kwargs}["TILES_PER_BLOCK"]
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] >= tiles_per_block and c.kwargs["BLOCK_N"] >= tiles_per_block]
    return fitting or [triton.Config({"BLOCK_M": tiles_per_block, "BLOCK_N": tiles_per_block}, num_warps=8)]


_autotuned_scores = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in _SCORE_CANDIDATES
    ],
    key=[
        "TILES_PER_BLOCK",
        "HEAD_PAD",
        "HAS_OUTLIERS",
        "HAS_TEXT",
        "DOT_PRECISION",
        "INPUT_PRECISION_OPERANDS",
        "num_video_blocks",
    ],
    prune_configs_by={"early_config_prune": _prune_score_configs},
)(_pooled_scores_kernel)


def tile_outliers(
    k_c: torch.Tensor, key_valid_c: torch.Tensor, num_tiles: int, tile_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 `(rest_mean (B, H, NT, D), rest_count (B, H, NT), outlier (B, H, NT, D), outlier_count (B, H, NT))` of
    the first `num_tiles` key tiles of the canonical keys; equals `estimators.pooled.tile_outliers_reference`."""
    batch, heads, padded_len, head_dim = k_c.shape
    check_device(k_c.device, "k_c")
    device = k_c.device
    rest_mean = torch.empty(batch, heads, num_tiles, head_dim, device=device, dtype=torch.float32)
    rest_count = torch.empty(batch, heads, num_tiles, device=device, dtype=torch.float32)
    outlier = torch.empty_like(rest_mean)
    outlier_count = torch.empty_like(rest_count)
    # One tile per program and one warp per 32 rows: the reductions stay inside a warp, and many small programs keep
    # enough loads in flight (on an H200 at tile 16, 0.30 ms for Wan 14B 720p's keys against 1.8 ms for four tiles
    # over eight warps).
    tiles_per_program = 1
    warps = max(1, min(4, tile_size // 32))
    _tile_outliers_kernel[(triton.cdiv(num_tiles, tiles_per_program), batch * heads)](
        k_c.contiguous(),
        key_valid_c.contiguous().view(torch.int8),
        rest_mean,
        rest_count,
        outlier,
        outlier_count,
        num_tiles,
        padded_len,
        TILE=tile_size,
        TILES=tiles_per_program,
        HEAD_DIM=head_dim,
        HEAD_PAD=padded_head_dim(head_dim),
        num_warps=warps,
    )
    return rest_mean, rest_count, outlier, outlier_count


def pooled_scores(
    inputs: EstimatorInputs, *, outliers: bool, input_precision_operands: bool | None = None
) -> torch.Tensor:
    """`P_hat` float32 `(B, H, NB, NB + 1)` of the pooled estimator from the canonical keys and float32 tile statistics
    of `inputs` (the Triton path's `reorder_pool`).

    `input_precision_operands`: the products take the tile means rounded to the inputs' dtype when it is 16-bit
    (float32 inputs: tf32 on the GPU). None: on the GPU for 16-bit inputs, and under the interpreter for float16 (it
    cannot multiply bfloat16)."""
    stats, layout, k_c = inputs.stats, inputs.layout, inputs.k
    if inputs.in_source_order:
        raise ValueError("pooled_scores reads canonical copies; inputs in source order go to pooled_scores_one_pass")
    batch, heads, num_tiles, head_dim = stats.q_tile.shape
    device = stats.q_tile.device
    check_device(device, "stats")
    if stats.q_tile.dtype != torch.float32 or stats.k_tile.dtype != torch.float32:
        raise TypeError(f"the tile statistics must be float32, got {stats.q_tile.dtype} and {stats.k_tile.dtype}")
    nb = layout.num_video_blocks
    tiles_per_block = layout.block_size // stats.tile_size
    if outliers:
        key_mean, key_mean_count, key_outlier, key_outlier_count = tile_outliers(
            k_c, inputs.key_valid, num_tiles, stats.tile_size
        )
    else:
        key_mean, key_mean_count = stats.k_tile.contiguous(), stats.k_tile_count.contiguous()
        key_outlier, key_outlier_count = key_mean, key_mean_count  # not read
    sixteen_bit = k_c.dtype in (torch.float16, torch.bfloat16)
    if input_precision_operands is None:
        input_precision_operands = sixteen_bit and not (INTERPRETED and k_c.dtype == torch.bfloat16)
    elif input_precision_operands and INTERPRETED and k_c.dtype == torch.bfloat16:
        raise ValueError(
            "input_precision_operands=True with bfloat16 keys needs CUDA: the Triton interpreter cannot multiply "
            "bfloat16 (pass None or False)"
        )
    scores = torch.empty(batch, heads, nb, nb + 1, device=device, dtype=torch.float32)
    args = (
        stats.q_tile.contiguous(),
        stats.q_tile_count.contiguous(),
        key_mean,
        key_mean_count,
        key_outlier,
        key_outlier_count,
        k_c.contiguous(),
        inputs.key_valid.contiguous().view(torch.int8),
        scores,
        nb,
        layout.text_offset,
        layout.num_text_blocks * layout.block_size,
        layout.padded_len,
        float(inputs.scale) * LOG2E,
    )
    constants = {
        "TILES_PER_BLOCK": tiles_per_block,
        "HEAD_DIM": head_dim,
        "HEAD_PAD": padded_head_dim(head_dim),
        "HAS_OUTLIERS": outliers,
        "HAS_TEXT": layout.num_text > 0,
        # float32 operands (float32 inputs, or products in float32 asked for): one tf32 product per dot on the GPU.
        # The scores rank blocks, and tf32's 10-bit mantissa is as fine as the 16-bit operands of the default;
        # three (tf32x3) would cost 3x for digits nobody reads.
        "DOT_PRECISION": "ieee" if INTERPRETED else "tf32",
        "INPUT_PRECISION_OPERANDS": bool(input_precision_operands) and sixteen_bit,
    }

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(nb * tiles_per_block, meta["BLOCK_M"]), batch * heads)

    if INTERPRETED:
        block = max(16, tiles_per_block)
        _pooled_scores_kernel[grid](*args, **constants, BLOCK_M=block, BLOCK_N=block)
    else:
        _autotuned_scores[grid](*args, **constants)
    return scores


# (BLOCK_M query tiles, BLOCK_N key blocks, warps, stages) of the one-pass kernel. Compiled for sm_90 with triton 3.6
# (no GPU needed), these fit the registers: 128 x 32 at 255 per thread with 0-8 bytes of spill, 128 x 16 at 128 (two
# programs per SM); 128 x 64 spilled ~500 bytes and 64-tile programs of 4 warps 0.5-1 KB.
_ONE_PASS_CANDIDATES = ((128, 32, 8, 3), (128, 16, 8, 2), (128, 32, 8, 2))
# Persistent programs per SM, and the scratch slot each owns.
_PROGRAMS_PER_SM = 2
_OPERANDS = ("input", "float32", "float8")


def _prune_one_pass_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """The query tiles must hold whole blocks."""
    tiles_per_block = {**named_args, **kwargs}["TILES_PER_BLOCK"]
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] >= tiles_per_block]
    return fitting or [triton.Config({"BLOCK_M": tiles_per_block, "BLOCK_N": 32}, num_warps=8)]


_autotuned_one_pass = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in _ONE_PASS_CANDIDATES
    ],
    key=[
        "TILES_PER_BLOCK",
        "HEAD_PAD",
        "HAS_OUTLIERS",
        "HAS_TEXT",
        "SOURCE_ORDER",
        "OPERAND_DTYPE",
        "DOT_PRECISION",
        "FAST_EXP",
        "num_video_blocks",
    ],
    prune_configs_by={"early_config_prune": _prune_one_pass_configs},
)(_pooled_scores_one_pass_kernel)


def _operand_dtype(operands: str, key_dtype: torch.dtype):
    """The Triton dtype the tile means are rounded to for the products (see `pooled_scores_one_pass`)."""
    if operands not in _OPERANDS:
        raise ValueError(f"operands must be one of {_OPERANDS}, got {operands!r}")
    if operands == "float8":
        if INTERPRETED:
            raise ValueError("operands='float8' needs CUDA (a Hopper GPU): the interpreter has no float8 products")
        return tl.float8e4nv
    if operands == "float32" or key_dtype == torch.float32 or (INTERPRETED and key_dtype == torch.bfloat16):
        return tl.float32
    return tl.float16 if key_dtype == torch.float16 else tl.bfloat16


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def pooled_scores_one_pass(
    inputs: EstimatorInputs,
    *,
    outliers: bool,
    fast_exp: bool = False,
    operands: str = "input",
    config: tuple[int, int, int, int] | None = None,
    programs_per_sm: int = _PROGRAMS_PER_SM,
) -> torch.Tensor:
    """`P_hat` float32 `(B, H, NB, NB + 1)` of the pooled estimator in one pass over the key tiles, as
    `estimators.pooled.pooled_scores_reference`.

    Every (query tile, key tile) logit is computed and exponentiated once (the two-pass `pooled_scores` does both
    twice): persistent programs keep per (query tile, key block) the weights' sum relative to the running maximum of
    its step, with that maximum, in a scratch slot of their own (`programs * BLOCK_M * (NB + NT / BLOCK_N)` float32,
    about 2 * SMs * 128 * NB * 4 bytes), and rescale it to the final maximum and normaliser at the end of the item.

    `inputs` may hold canonical copies or the caller's tensors (`inputs.in_source_order`: the text keys are read
    through `inputs.source_index`). With `outliers`, the key tiles' outliers come from `inputs.outliers`
    (`prepare_statistics(outliers=True)`), or from `tile_outliers` on canonical copies.

    Options (the defaults give the two-pass kernel's products): `fast_exp` exponentiates in float16 pairs
    (`ex2.approx.f16x2`, CUDA only; its error is measured by `benchmarks/gpu_planning_explore.py`); `operands` is
    what the tile means are rounded to for the products: "input" (the inputs' 16-bit dtype, float32 for float32
    inputs and bfloat16 under the interpreter), "float32" (tf32 on the GPU) or "float8" (e4m3, CUDA only).
    `config`: (BLOCK_M, BLOCK_N, warps, stages) instead of the autotuned choice; `programs_per_sm`: persistent
    programs (and scratch slots) per multiprocessor.
    """
    stats, layout = inputs.stats, inputs.layout
    batch, heads, num_tiles, head_dim = stats.q_tile.shape
    device = stats.q_tile.device
    check_device(device, "stats")
    nb = layout.num_video_blocks
    tiles_per_block = layout.block_size // stats.tile_size
    if num_tiles != nb * tiles_per_block:
        raise ValueError(
            f"stats.q_tile has {num_tiles} tiles; the layout has {nb * tiles_per_block} of {stats.tile_size}"
        )
    if outliers:
        found = inputs.outliers
        if found is None:
            if inputs.in_source_order:
                raise ValueError(
                    "outliers=True on inputs in source order needs inputs.outliers "
                    "(prepare_statistics(..., outliers=True) computes them in its pass over the keys)"
                )
            found = KeyTileOutliers(*tile_outliers(inputs.k, inputs.key_valid, num_tiles, stats.tile_size))
        key_sets = (found.rest_mean, found.rest_count, found.outlier, found.outlier_count)
    else:
        key_sets = (stats.k_tile, stats.k_tile_count, stats.k_tile, stats.k_tile_count)  # the second set is not read
    if fast_exp and INTERPRETED:
        raise ValueError("fast_exp=True needs CUDA: the Triton interpreter runs no inline PTX")
    operand_dtype = _operand_dtype(operands, inputs.k.dtype)
    key = inputs.k
    if not inputs.in_source_order:
        key = key.contiguous()
    scores = torch.empty(batch, heads, nb, nb + 1, device=device, dtype=torch.float32)
    candidates = [config] if config is not None else list(_ONE_PASS_CANDIDATES)
    if INTERPRETED:
        candidates = [(max(16, tiles_per_block), 16, 4, 1)]
    max_m = max(max(c[0] for c in candidates), tiles_per_block)
    steps = triton.cdiv(nb, min(c[1] for c in candidates))
    items = batch * heads * triton.cdiv(num_tiles, min(c[0] for c in candidates))
    programs = max(1, min(items, programs_per_sm * _multiprocessors(device)))
    partial = torch.empty(programs, max_m, nb, device=device, dtype=torch.float32)
    row_max = torch.empty(programs, max_m, steps, device=device, dtype=torch.float32)
    args = (
        stats.q_tile.contiguous(),
        stats.q_tile_count.contiguous(),
        *(t.contiguous() for t in key_sets),
        key,
        inputs.source_index if inputs.source_index is not None else scores,
        inputs.key_valid.contiguous().view(torch.int8),
        scores,
        partial,
        row_max,
        heads,
        nb,
        batch * heads,
        layout.text_offset,
        layout.num_text_blocks * layout.block_size,
        layout.padded_len,
        *key.stride()[:3],
        max_m,
        nb,
        steps,
        float(inputs.scale) * LOG2E,
    )
    constants = {
        "TILES_PER_BLOCK": tiles_per_block,
        "HEAD_DIM": head_dim,
        "HEAD_PAD": padded_head_dim(head_dim),
        "HAS_OUTLIERS": outliers,
        "HAS_TEXT": layout.num_text > 0,
        "SOURCE_ORDER": inputs.in_source_order,
        "OPERAND_DTYPE": operand_dtype,
        "DOT_PRECISION": "ieee" if INTERPRETED else "tf32",
        "FAST_EXP": fast_exp,
    }

    def grid(meta: dict) -> tuple[int]:
        return (min(batch * heads * triton.cdiv(num_tiles, meta["BLOCK_M"]), programs),)

    if INTERPRETED or config is not None:
        m, n, warps, stages = candidates[0]
        meta = {"BLOCK_M": m, "BLOCK_N": n}
        _pooled_scores_one_pass_kernel[grid(meta)](*args, **constants, **meta, num_warps=warps, num_stages=stages)
    else:
        _autotuned_one_pass[grid](*args, **constants)
    return scores
