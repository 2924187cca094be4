"""Stage 0 on the device: the canonical layout's statistics from one pass over Q, K, V, with or without copies.

Two kernels, one program per (batch, head, canonical block), reading the block's rows from the caller's tensors through
`layout.source_index` (any input strides, the last dim contiguous, so a transposed `(B, S, H, D)` buffer is read in
place):

- `reorder_pool` (`_reorder_pool_kernel`, the pipeline's today): writes contiguous canonical copies of Q, K, V
  (padding rows as zeros) and pools them in the same pass: tile means of Q and K, block means of Q, K, V, the
  per-dimension mean absolute deviations of Q and K about their block means (GAPR), the unmasked key counts per tile
  and per block. The deviations need the block means first, so the program reads its just-written canonical Q and K
  rows back (from L2: Q, K and V still cross HBM once in and once out).
- `prepare_statistics` (`_prepare_stats_kernel`, the planning path without copies): the same statistics, the canonical
  key validity and the pooled estimator's key-tile outliers (`estimators.KeyTileOutliers`, from the keys already in
  registers), and nothing of the size of Q, K or V: Q, K and V cross HBM once, in. A chunk holds several whole tiles
  (their sums and outliers are reductions inside the chunk) or a piece of a larger tile; the deviations read Q and K
  again, from L2. Heads vary fastest over the grid, so programs running together read neighbouring heads of the same
  tokens, which a `(B, S, H, D)` buffer stores side by side.

Means divide by true counts of the usable rows (real queries with finite entries; unmasked keys whose key and value
rows are finite, for keys and values), as `reference.pool_statistics` does; a group with nothing to count has a zero
mean. Block statistics are float32; tile means float32, or with `prepare_statistics` the inputs' 16-bit dtype by
default (the estimators round them to it for their products anyway).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ..estimators.base import EstimatorInputs, KeyTileOutliers
from ..layout import TokenLayout
from ..plan import PooledStats
from .common import INTERPRETED, check_device, check_kernel_inputs, padded_head_dim

__all__ = ["PreparedStatistics", "ReorderPoolOutput", "prepare_statistics", "reorder_pool", "reorder_pool_tensors"]

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _gather_rows(X, stride_b, stride_h, stride_s, off_b, off_h, source, real, offs_d, HEAD_DIM: tl.constexpr):
    """Rows `source` (int64, `real` False for padding) of one (batch, head) of `X`, padding rows and lanes as zeros."""
    base = X + off_b * stride_b + off_h * stride_h
    mask = real[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(base + source[:, None] * stride_s + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _row_finite(x):
    """Per row: every element is finite (x - x is 0 for finite x, NaN for NaN and +-inf)."""
    return tl.sum(((x - x) != 0.0).to(tl.int32), 1) == 0


@triton.jit
def _vector_not_finite(x):
    """A NaN or an infinity in the vector (x - x is 0 for finite x, NaN otherwise)."""
    return tl.sum(((x - x) != 0.0).to(tl.int32), 0) > 0


@triton.jit
def _reorder_pool_kernel(
    Q,
    K,
    V,
    SourceIndex,
    KeyValid,
    QC,
    KC,
    VC,
    KeyValidC,
    KeyUsableC,
    QTile,
    QTileCount,
    KTile,
    KTileCount,
    QBlock,
    QBlockMad,
    KBlock,
    KBlockMad,
    VBlock,
    KeyBlockCount,
    BlockNonFinite,
    num_heads,
    num_video_blocks,
    num_blocks,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_valid_b,
    stride_valid_h,
    stride_valid_s,
    BLOCK_SIZE: tl.constexpr,
    TILE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # The block is processed in chunks of CHUNK rows (CHUNK divides TILE_SIZE): a whole 128 x 128 block of three
    # tensors held in registers spills to the stack.
    CHUNKS: tl.constexpr = BLOCK_SIZE // CHUNK
    CHUNKS_PER_TILE: tl.constexpr = TILE_SIZE // CHUNK
    TILES_PER_BLOCK: tl.constexpr = BLOCK_SIZE // TILE_SIZE
    block = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    is_video = block < num_video_blocks
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_DIM
    offs_c = tl.arange(0, CHUNK)
    # Canonical copies are contiguous (B, H, P, D); P = num_blocks * BLOCK_SIZE.
    block_rows = bh * num_blocks * BLOCK_SIZE + block.to(tl.int64) * BLOCK_SIZE
    tile_base = (bh * num_video_blocks + block) * TILES_PER_BLOCK
    block_row = (bh * num_video_blocks + block) * HEAD_DIM + offs_d

    # Pass 1: gather, store the canonical rows, and sum them per tile and per block. Rows with a NaN or an infinity
    # are left out of every statistic (so one bad token cannot spread to its block's summaries); a key whose key or
    # value row is not finite flags its block, which selection then keeps for every query (as dense attention sees
    # that key from every query). Checking every row costs a reduction across the head dim per row, so the sums run
    # unchecked and only a tile whose sums came out non-finite is summed again row by row (`_tile_rows_again`). A
    # loop, not unrolled: unrolling lets the compiler hoist every chunk's loads and run out of registers.
    q_sum = tl.zeros([HEAD_PAD], dtype=tl.float32)
    k_sum = tl.zeros([HEAD_PAD], dtype=tl.float32)
    v_sum = tl.zeros([HEAD_PAD], dtype=tl.float32)
    q_count = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), 0)
    k_count = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), 0)
    valid_count = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), 0)
    non_finite = tl.sum(tl.zeros([CHUNK], dtype=tl.int32), 0)
    block_clean = non_finite == 0
    for tile in range(TILES_PER_BLOCK):
        q_tile_sum = tl.zeros([HEAD_PAD], dtype=tl.float32)
        k_tile_sum = tl.zeros([HEAD_PAD], dtype=tl.float32)
        v_tile_sum = tl.zeros([HEAD_PAD], dtype=tl.float32)
        q_tile_count = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), 0)
        k_tile_count = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), 0)
        for part in tl.static_range(CHUNKS_PER_TILE):
            offset = tile * TILE_SIZE + part * CHUNK
            source = tl.load(SourceIndex + block.to(tl.int64) * BLOCK_SIZE + offset + offs_c).to(tl.int64)
            real = source >= 0
            source = tl.where(real, source, 0)
            if HAS_KEY_VALID:
                unmasked = tl.load(
                    KeyValid + off_b * stride_valid_b + off_h * stride_valid_h + source * stride_valid_s,
                    mask=real,
                    other=0,
                )
                key_ok = real & (unmasked != 0)
            else:
                key_ok = real
            canonical = (block_rows + offset + offs_c)[:, None] * HEAD_DIM + offs_d[None, :]
            store_mask = (offs_c >= 0)[:, None] & d_ok[None, :]
            q = _gather_rows(Q, stride_qb, stride_qh, stride_qs, off_b, off_h, source, real, offs_d, HEAD_DIM)
            tl.store(QC + canonical, q, mask=store_mask)
            k = _gather_rows(K, stride_kb, stride_kh, stride_ks, off_b, off_h, source, real, offs_d, HEAD_DIM)
            tl.store(KC + canonical, k, mask=store_mask)
            v = _gather_rows(V, stride_vb, stride_vh, stride_vs, off_b, off_h, source, real, offs_d, HEAD_DIM)
            tl.store(VC + canonical, v, mask=store_mask)
            tl.store(KeyValidC + block_rows + offset + offs_c, key_ok.to(tl.int8))
            tl.store(KeyUsableC + block_rows + offset + offs_c, key_ok.to(tl.int8))
            # Padding rows load as zeros, so they add nothing to the query sums. Masked keys are left out by a
            # select, not a product: 0 * inf is NaN.
            q_tile_sum += tl.sum(q.to(tl.float32), 0)
            k_tile_sum += tl.sum(tl.where(key_ok[:, None], k.to(tl.float32), 0.0), 0)
            v_tile_sum += tl.sum(tl.where(key_ok[:, None], v.to(tl.float32), 0.0), 0)
            q_tile_count += tl.sum(real.to(tl.float32), 0)
            k_tile_count += tl.sum(key_ok.to(tl.float32), 0)
            valid_count += tl.sum(key_ok.to(tl.float32), 0)
        tile_dirty = _vector_not_finite(q_tile_sum) | _vector_not_finite(k_tile_sum) | _vector_not_finite(v_tile_sum)
        if tile_dirty:
            # Rare: a NaN or an infinity in the tile. Sum it again from the canonical rows, row by row.
            tl.debug_barrier()
            q_tile_sum = tl.zeros([HEAD_PAD], dtype=tl.float32)
            k_tile_sum = tl.zeros([HEAD_PAD], dtype=tl.float32)
            v_tile_sum = tl.zeros([HEAD_PAD], dtype=tl.float32)
            q_tile_count = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), 0)
            k_tile_count = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), 0)
            # (New names: compiled Triton rejects a variable whose type changes inside an `if`.)
            for part in tl.static_range(CHUNKS_PER_TILE):
                offset = tile * TILE_SIZE + part * CHUNK
                rows = block_rows + offset + offs_c
                row_real = tl.load(SourceIndex + block.to(tl.int64) * BLOCK_SIZE + offset + offs_c) >= 0
                row_valid = tl.load(KeyValidC + rows) != 0
                load_mask = (offs_c >= 0)[:, None] & d_ok[None, :]
                q_rows = tl.load(QC + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=load_mask, other=0.0)
                k_rows = tl.load(KC + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=load_mask, other=0.0)
                v_rows = tl.load(VC + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=load_mask, other=0.0)
                q_rows = q_rows.to(tl.float32)
                k_rows = k_rows.to(tl.float32)
                v_rows = v_rows.to(tl.float32)
                query_ok = row_real & _row_finite(q_rows)
                kv_finite = _row_finite(k_rows) & _row_finite(v_rows)
                key_usable = row_valid & kv_finite
                tl.store(KeyUsableC + rows, key_usable.to(tl.int8))
                non_finite += tl.sum((row_valid & ~kv_finite).to(tl.int32), 0)
                q_tile_sum += tl.sum(tl.where(query_ok[:, None], q_rows, 0.0), 0)
                k_tile_sum += tl.sum(tl.where(key_usable[:, None], k_rows, 0.0), 0)
                v_tile_sum += tl.sum(tl.where(key_usable[:, None], v_rows, 0.0), 0)
                q_tile_count += tl.sum(query_ok.to(tl.float32), 0)
                k_tile_count += tl.sum(key_usable.to(tl.float32), 0)
            block_clean = block_clean & False
        tile_row = tile_base + tile
        # (A vector mask: the interpreter cannot mask a vector store with a scalar.)
        tile_mask = ((offs_d * 0 + block) < num_video_blocks) & d_ok
        tl.store(QTile + tile_row * HEAD_DIM + offs_d, q_tile_sum / tl.maximum(q_tile_count, 1.0), mask=tile_mask)
        tl.store(KTile + tile_row * HEAD_DIM + offs_d, k_tile_sum / tl.maximum(k_tile_count, 1.0), mask=tile_mask)
        tl.store(QTileCount + tile_row, q_tile_count, mask=is_video)
        tl.store(KTileCount + tile_row, k_tile_count, mask=is_video)
        q_sum += q_tile_sum
        k_sum += k_tile_sum
        v_sum += v_tile_sum
        q_count += q_tile_count
        k_count += k_tile_count
    tl.store(KeyBlockCount + bh * num_blocks + block, valid_count)
    tl.store(BlockNonFinite + bh * num_blocks + block, (non_finite > 0).to(tl.int8))

    if is_video:
        q_mean = q_sum / tl.maximum(q_count, 1.0)
        k_mean = k_sum / tl.maximum(k_count, 1.0)
        tl.store(QBlock + block_row, q_mean, mask=d_ok)
        tl.store(KBlock + block_row, k_mean, mask=d_ok)
        tl.store(VBlock + block_row, v_sum / tl.maximum(k_count, 1.0), mask=d_ok)
        # Pass 2: deviations about the block means, read back from the canonical rows this program just wrote (they
        # are in L2; the barrier makes every thread's stores visible to the others).
        tl.debug_barrier()
        q_dev = tl.zeros([HEAD_PAD], dtype=tl.float32)
        k_dev = tl.zeros([HEAD_PAD], dtype=tl.float32)
        for chunk in range(CHUNKS):
            written = block_rows + chunk * CHUNK + offs_c
            row_real = tl.load(SourceIndex + block.to(tl.int64) * BLOCK_SIZE + chunk * CHUNK + offs_c) >= 0
            row_key_ok = tl.load(KeyUsableC + written) != 0
            load_mask = (offs_c >= 0)[:, None] & d_ok[None, :]
            q_back = tl.load(QC + written[:, None] * HEAD_DIM + offs_d[None, :], mask=load_mask, other=0.0)
            k_back = tl.load(KC + written[:, None] * HEAD_DIM + offs_d[None, :], mask=load_mask, other=0.0)
            q_back = q_back.to(tl.float32)
            q_deviation = tl.where(row_real[:, None], tl.abs(q_back - q_mean[None, :]), 0.0)
            if not block_clean:
                q_deviation = tl.where(_row_finite(q_back)[:, None], q_deviation, 0.0)
            q_dev += tl.sum(q_deviation, 0)
            k_dev += tl.sum(tl.where(row_key_ok[:, None], tl.abs(k_back.to(tl.float32) - k_mean[None, :]), 0.0), 0)
        tl.store(QBlockMad + block_row, q_dev / tl.maximum(q_count, 1.0), mask=d_ok)
        tl.store(KBlockMad + block_row, k_dev / tl.maximum(k_count, 1.0), mask=d_ok)



# --------------------------------------------------------------------------------------------------------------------
# Statistics without copies
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows3(X, stride_b, stride_h, stride_s, off_b, off_h, source, mask, offs_d, HEAD_DIM: tl.constexpr):
    """Rows `source` (int64 `(SEGS, SEG)`) of one (batch, head) of `X` as float32 `(SEGS, SEG, HEAD_PAD)`; rows where
    `mask` is False and lanes past the head dim load as zeros."""
    base = X + off_b * stride_b + off_h * stride_h
    lanes = offs_d[None, None, :]
    full = mask[:, :, None] & (lanes < HEAD_DIM)
    return tl.load(base + source[:, :, None] * stride_s + lanes, mask=full, other=0.0).to(tl.float32)


@triton.jit
def _rows_finite3(x):
    """Per row of `(SEGS, SEG, D)`: every element is finite (x - x is 0 for finite x, NaN for NaN and +-inf)."""
    return tl.sum(((x - x) != 0.0).to(tl.int32), 2) == 0


@triton.jit
def _prepare_stats_kernel(
    Q,
    K,
    V,
    SourceIndex,
    KeyValid,
    KeyValidC,
    KeyUsableC,
    QTile,
    QTileCount,
    KTile,
    KTileCount,
    RestMean,
    RestCount,
    Outlier,
    OutlierCount,
    QBlock,
    QBlockMad,
    KBlock,
    KBlockMad,
    VBlock,
    KeyBlockCount,
    BlockNonFinite,
    num_heads,
    num_video_blocks,
    num_blocks,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_valid_b,
    stride_valid_h,
    stride_valid_s,
    BLOCK_SIZE: tl.constexpr,
    TILE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    OUTLIERS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # A chunk of CHUNK rows is held as (SEGS, SEG, HEAD_PAD): SEGS whole tiles when CHUNK >= TILE_SIZE (their sums,
    # and the outliers, are reductions over the middle axis), else one piece of a tile (PIECES chunks per tile).
    SEG: tl.constexpr = TILE_SIZE if CHUNK >= TILE_SIZE else CHUNK
    SEGS: tl.constexpr = CHUNK // SEG
    PIECES: tl.constexpr = TILE_SIZE // SEG
    tl.static_assert(PIECES == 1 or not OUTLIERS, "outliers need whole tiles in a chunk (CHUNK >= TILE_SIZE)")
    CHUNKS: tl.constexpr = BLOCK_SIZE // CHUNK
    TILES_PER_BLOCK: tl.constexpr = BLOCK_SIZE // TILE_SIZE
    # Heads vary fastest over the grid: programs running together read neighbouring heads of the same tokens, which
    # a (B, S, H, D) buffer stores side by side.
    pid_bh = tl.program_id(0)
    block = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_DIM
    offs_seg = tl.arange(0, SEGS)
    offs_r = tl.arange(0, SEG)
    # Vectors of the block's kind (the interpreter cannot mask a vector with a scalar).
    video_seg = (offs_seg * 0 + block) < num_video_blocks
    video_d = ((offs_d * 0 + block) < num_video_blocks) & d_ok
    block_start = block.to(tl.int64) * BLOCK_SIZE
    canonical_base = bh * num_blocks * BLOCK_SIZE + block_start  # row 0 of the block in (B, H, P)
    valid_base = KeyValid + off_b * stride_valid_b + off_h * stride_valid_h
    tile_base = (bh * num_video_blocks + block) * TILES_PER_BLOCK

    q_sum = tl.zeros([HEAD_PAD], dtype=tl.float32)
    k_sum = tl.zeros([HEAD_PAD], dtype=tl.float32)
    v_sum = tl.zeros([HEAD_PAD], dtype=tl.float32)
    q_count = tl.sum(tl.zeros([SEGS], dtype=tl.float32), 0)
    k_count = tl.sum(tl.zeros([SEGS], dtype=tl.float32), 0)
    valid_count = tl.sum(tl.zeros([SEGS], dtype=tl.int32), 0)
    non_finite = tl.sum(tl.zeros([SEGS], dtype=tl.int32), 0)
    block_clean = non_finite == 0
    # Sums of the tile in progress when a tile spans several chunks (PIECES > 1).
    q_piece = tl.zeros([SEGS, HEAD_PAD], dtype=tl.float32)
    k_piece = tl.zeros([SEGS, HEAD_PAD], dtype=tl.float32)
    q_piece_count = tl.zeros([SEGS], dtype=tl.float32)
    k_piece_count = tl.zeros([SEGS], dtype=tl.float32)

    # Pass 1: read Q, K, V once; sum per tile and per block; store the canonical key validity. Rows with a NaN or an
    # infinity are left out of every statistic, and a valid key whose key or value row is not finite flags its block.
    # The sums run unchecked; only a chunk whose sums come out non-finite is summed again with a test per row. A loop,
    # not unrolled: unrolled, the compiler hoists every chunk's loads and runs out of registers.
    for chunk in range(CHUNKS):
        rows = chunk * CHUNK + offs_seg[:, None] * SEG + offs_r[None, :]  # (SEGS, SEG) rows of the block
        source = tl.load(SourceIndex + block_start + rows).to(tl.int64)
        real = source >= 0
        source = tl.where(real, source, 0)
        if HAS_KEY_VALID:
            unmasked = tl.load(valid_base + source * stride_valid_s, mask=real, other=0)
            key_ok = real & (unmasked != 0)
        else:
            key_ok = real
        # Queries of text blocks are never pooled; masked keys and values are never read.
        q = _load_rows3(Q, stride_qb, stride_qh, stride_qs, off_b, off_h, source, real & video_seg[:, None], offs_d,
                        HEAD_DIM)  # fmt: skip
        k = _load_rows3(K, stride_kb, stride_kh, stride_ks, off_b, off_h, source, key_ok, offs_d, HEAD_DIM)
        v = _load_rows3(V, stride_vb, stride_vh, stride_vs, off_b, off_h, source, key_ok, offs_d, HEAD_DIM)
        q_seg = tl.sum(q, 1)
        k_seg = tl.sum(k, 1)
        v_seg = tl.sum(v, 1)
        query_ok = real
        usable = key_ok
        # One test for the three: a non-finite sum stays non-finite in the total (finite sums that overflow only
        # send a clean chunk down the checked path, which sums it the same).
        total = q_seg + k_seg + v_seg
        dirty = tl.sum(tl.sum(((total - total) != 0.0).to(tl.int32), 1), 0) > 0
        if dirty:
            # Rare: a NaN or an infinity in the chunk. Sum again, leaving out the rows that hold one.
            query_ok = real & _rows_finite3(q)
            kv_finite = _rows_finite3(k) & _rows_finite3(v)
            usable = key_ok & kv_finite
            non_finite += tl.sum(tl.sum((key_ok & ~kv_finite).to(tl.int32), 1), 0)
            q_seg = tl.sum(tl.where(query_ok[:, :, None], q, 0.0), 1)
            k_seg = tl.sum(tl.where(usable[:, :, None], k, 0.0), 1)
            v_seg = tl.sum(tl.where(usable[:, :, None], v, 0.0), 1)
            block_clean = block_clean & False
        canonical = canonical_base + rows
        tl.store(KeyValidC + canonical, key_ok.to(tl.int8))
        tl.store(KeyUsableC + canonical, usable.to(tl.int8))
        q_seg_count = tl.sum((query_ok & video_seg[:, None]).to(tl.float32), 1)
        k_seg_count = tl.sum(usable.to(tl.float32), 1)
        valid_count += tl.sum(tl.sum(key_ok.to(tl.int32), 1), 0)
        q_sum += tl.sum(q_seg, 0)
        k_sum += tl.sum(k_seg, 0)
        v_sum += tl.sum(v_seg, 0)
        q_count += tl.sum(q_seg_count, 0)
        k_count += tl.sum(k_seg_count, 0)

        # Tile statistics (video blocks only).
        q_piece += q_seg
        k_piece += k_seg
        q_piece_count += q_seg_count
        k_piece_count += k_seg_count
        tile_done = ((offs_seg * 0 + chunk + 1) % PIECES == 0) & video_seg
        tiles = tile_base + (chunk // PIECES) * SEGS + offs_seg
        vectors = tiles[:, None] * HEAD_DIM + offs_d[None, :]
        vector_mask = tile_done[:, None] & d_ok[None, :]
        tl.store(QTile + vectors, (q_piece / tl.maximum(q_piece_count, 1.0)[:, None]).to(QTile.dtype.element_ty),
                 mask=vector_mask)  # fmt: skip
        k_mean = k_piece / tl.maximum(k_piece_count, 1.0)[:, None]
        tl.store(KTile + vectors, k_mean.to(KTile.dtype.element_ty), mask=vector_mask)
        tl.store(QTileCount + tiles, q_piece_count, mask=tile_done)
        tl.store(KTileCount + tiles, k_piece_count, mask=tile_done)
        if OUTLIERS:
            # Whole tiles are in registers (the launcher makes CHUNK >= TILE_SIZE): each tile's usable key farthest
            # from the tile's mean (the first on ties; a left-out row's -1 is below any distance), and the others' mean.
            deviation = k - k_mean[:, None, :]
            distance = tl.where(usable, tl.sum(deviation * deviation, 2), -1.0)
            farthest = tl.argmax(distance, 1, tie_break_left=True)
            is_outlier = (offs_r[None, :] == farthest[:, None]) & usable
            outlier = tl.sum(tl.where(is_outlier[:, :, None], k, 0.0), 1)
            has = tl.sum(is_outlier.to(tl.float32), 1)
            rest_count = k_piece_count - has
            rest_mean = (k_piece - outlier) / tl.maximum(rest_count, 1.0)[:, None]
            tl.store(RestMean + vectors, rest_mean.to(RestMean.dtype.element_ty), mask=vector_mask)
            tl.store(Outlier + vectors, outlier.to(Outlier.dtype.element_ty), mask=vector_mask)
            tl.store(RestCount + tiles, rest_count, mask=tile_done)
            tl.store(OutlierCount + tiles, has, mask=tile_done)
        q_piece = tl.where(tile_done[:, None], 0.0, q_piece)
        k_piece = tl.where(tile_done[:, None], 0.0, k_piece)
        q_piece_count = tl.where(tile_done, 0.0, q_piece_count)
        k_piece_count = tl.where(tile_done, 0.0, k_piece_count)

    tl.store(KeyBlockCount + bh * num_blocks + block, valid_count.to(tl.float32))
    tl.store(BlockNonFinite + bh * num_blocks + block, (non_finite > 0).to(tl.int8))

    # Pass 2 (video blocks): deviations about the block means. The rows are read again: this program read them a
    # moment ago, so they come from L2 (Q and K cross HBM once). The barrier makes the key-usable stores visible.
    q_mean = q_sum / tl.maximum(q_count, 1.0)
    k_mean_block = k_sum / tl.maximum(k_count, 1.0)
    block_row = (bh * num_video_blocks + block) * HEAD_DIM + offs_d
    tl.store(QBlock + block_row, q_mean, mask=video_d)
    tl.store(KBlock + block_row, k_mean_block, mask=video_d)
    tl.store(VBlock + block_row, v_sum / tl.maximum(k_count, 1.0), mask=video_d)
    q_dev = tl.zeros([HEAD_PAD], dtype=tl.float32)
    k_dev = tl.zeros([HEAD_PAD], dtype=tl.float32)
    if block < num_video_blocks:
        tl.debug_barrier()
        for chunk in range(CHUNKS):
            rows = chunk * CHUNK + offs_seg[:, None] * SEG + offs_r[None, :]
            source = tl.load(SourceIndex + block_start + rows).to(tl.int64)
            real = source >= 0
            source = tl.where(real, source, 0)
            usable = tl.load(KeyUsableC + canonical_base + rows) != 0
            q = _load_rows3(Q, stride_qb, stride_qh, stride_qs, off_b, off_h, source, real, offs_d, HEAD_DIM)
            k = _load_rows3(K, stride_kb, stride_kh, stride_ks, off_b, off_h, source, usable, offs_d, HEAD_DIM)
            query_ok = real
            if not block_clean:
                query_ok = real & _rows_finite3(q)
            q_dev += tl.sum(tl.sum(tl.where(query_ok[:, :, None], tl.abs(q - q_mean[None, None, :]), 0.0), 1), 0)
            k_dev += tl.sum(tl.sum(tl.where(usable[:, :, None], tl.abs(k - k_mean_block[None, None, :]), 0.0), 1), 0)
    tl.store(QBlockMad + block_row, q_dev / tl.maximum(q_count, 1.0), mask=video_d)
    tl.store(KBlockMad + block_row, k_dev / tl.maximum(k_count, 1.0), mask=video_d)

# (CHUNK rows held at once, warps): the chunk must divide the tile. The kernel only writes its outputs, so timing
# candidates on the real buffers is harmless.
_REORDER_POOL_CANDIDATES = ((16, 4), (16, 8), (32, 4), (32, 8), (64, 8))


def _prune_reorder_pool_configs(configs: list[triton.Config], named_args: dict, **kwargs: object):
    tile_size = {**named_args, **kwargs}["TILE_SIZE"]
    return [c for c in configs if tile_size % c.kwargs["CHUNK"] == 0]


_autotuned_reorder_pool = triton.autotune(
    configs=[triton.Config({"CHUNK": chunk}, num_warps=warps) for chunk, warps in _REORDER_POOL_CANDIDATES],
    key=["BLOCK_SIZE", "TILE_SIZE", "HEAD_PAD", "HAS_KEY_VALID"],
    prune_configs_by={"early_config_prune": _prune_reorder_pool_configs},
)(_reorder_pool_kernel)


def _check_power_of_two(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{low}, {high}], got {value!r}")
    return value


def _check_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    source_index: torch.Tensor,
    key_valid: torch.Tensor | None,
    *,
    num_video_blocks: int,
    block_size: int,
    tile_size: int,
) -> int:
    """Raise with the argument's name unless the launchers can take these inputs; returns NQ, the canonical blocks."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, S, D), got {tuple(tensor.shape)}")
        if tensor.dtype not in _INPUT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {tensor.dtype}")
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got strides {tensor.stride()}")
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            f"query, key and value must have one shape, got {tuple(query.shape)}, {tuple(key.shape)}, "
            f"{tuple(value.shape)}"
        )
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    device = query.device
    if key.device != device or value.device != device:
        raise ValueError(f"query, key and value must be on one device, got {device}, {key.device}, {value.device}")
    check_device(device, "query")
    batch, heads, seq_len, head_dim = query.shape
    if batch == 0 or heads == 0 or seq_len == 0:
        raise ValueError(f"query has an empty dimension: {tuple(query.shape)}")
    check_kernel_inputs("query", query)
    _check_power_of_two("block_size", block_size, 16, 256)
    _check_power_of_two("tile_size", tile_size, 16, 256)
    if block_size % tile_size:
        raise ValueError(f"tile_size={tile_size} must divide block_size={block_size}")
    if not isinstance(source_index, torch.Tensor):
        raise TypeError(f"source_index must be a torch.Tensor, got {type(source_index).__name__}")
    if source_index.dim() != 1 or source_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"source_index must be a 1-D int32/int64 tensor, got shape {tuple(source_index.shape)} and "
            f"dtype {source_index.dtype}"
        )
    if source_index.device != device:
        raise ValueError(f"source_index is on {source_index.device}, expected {device} (the device of query)")
    padded_len = source_index.numel()
    if padded_len == 0 or padded_len % block_size:
        raise ValueError(f"source_index has {padded_len} rows: expected a positive multiple of block_size={block_size}")
    num_blocks = padded_len // block_size
    if isinstance(num_video_blocks, bool) or not isinstance(num_video_blocks, int):
        raise TypeError(f"num_video_blocks must be an int, got {type(num_video_blocks).__name__}")
    if not 1 <= num_video_blocks <= num_blocks:
        raise ValueError(
            f"num_video_blocks must be in [1, {num_blocks}] (the canonical blocks), got {num_video_blocks}"
        )
    if key_valid is not None:
        if not isinstance(key_valid, torch.Tensor):
            raise TypeError(f"key_valid must be a torch.Tensor or None, got {type(key_valid).__name__}")
        if key_valid.dtype != torch.bool or tuple(key_valid.shape) != (batch, heads, seq_len):
            raise ValueError(
                f"key_valid must be a bool tensor of shape {(batch, heads, seq_len)}, got dtype {key_valid.dtype} "
                f"and shape {tuple(key_valid.shape)}"
            )
        if key_valid.device != device:
            raise ValueError(f"key_valid is on {key_valid.device}, expected {device} (the device of query)")
    return num_blocks


def reorder_pool_tensors(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    source_index: torch.Tensor,
    key_valid: torch.Tensor | None,
    *,
    num_video_blocks: int,
    block_size: int,
    tile_size: int,
) -> tuple[torch.Tensor, ...]:
    """Launch the reorder + pool kernel.

    Args:
        query, key, value: `(B, H, S, D)`, one dtype (float16, bfloat16, float32) and device, any strides with a
            contiguous last dim; `D` as `capability.kernel_limits` allows (padded to a power of two in registers).
        source_index: int32/int64 `(P,)`, `P = NQ * block_size`: original position of canonical row p, -1 for padding
            (`TokenLayout.source_index`). Entries must lie in [-1, S) (not checked: that would synchronise).
        key_valid: bool `(B, H, S)` (stride-0 views fine), False for masked keys; None: every key counts.
        num_video_blocks: NB, the leading canonical blocks that are video (pooled); the other NQ - NB are text.
        block_size, tile_size: powers of two, `tile_size` dividing `block_size`.

    Returns, with NT = NB * block_size / tile_size (statistics float32 over the *usable* rows: real queries with
    finite entries, unmasked keys whose key and value rows are finite; zero for a group with nothing counted):
        q_c, k_c, v_c `(B, H, P, D)` contiguous in the input dtype; key_valid_c bool `(B, H, P)` (real, unmasked);
        key_usable_c bool `(B, H, P)` (also finite); q_tile, k_tile `(B, H, NT, D)`; q_tile_count, k_tile_count
        `(B, H, NT)`; q_block, q_block_mad, k_block, k_block_mad, v_block `(B, H, NB, D)`;
        key_block_count `(B, H, NQ)`: unmasked keys of every canonical block, text blocks included;
        block_non_finite bool `(B, H, NQ)`: the block holds an unmasked key whose key or value row is not finite.
    """
    num_blocks = _check_inputs(
        query, key, value, source_index, key_valid, num_video_blocks=num_video_blocks, block_size=block_size,
        tile_size=tile_size,
    )  # fmt: skip
    batch, heads, seq_len, head_dim = query.shape
    device = query.device
    padded_len = source_index.numel()
    source_index = source_index.contiguous()
    num_tiles = num_video_blocks * (block_size // tile_size)
    q_c = torch.empty(batch, heads, padded_len, head_dim, device=device, dtype=query.dtype)
    k_c = torch.empty_like(q_c)
    v_c = torch.empty_like(q_c)
    key_valid_c = torch.empty(batch, heads, padded_len, device=device, dtype=torch.bool)
    key_usable_c = torch.empty_like(key_valid_c)
    q_tile = torch.empty(batch, heads, num_tiles, head_dim, device=device, dtype=torch.float32)
    k_tile = torch.empty_like(q_tile)
    q_tile_count = torch.empty(batch, heads, num_tiles, device=device, dtype=torch.float32)
    k_tile_count = torch.empty_like(q_tile_count)
    q_block = torch.empty(batch, heads, num_video_blocks, head_dim, device=device, dtype=torch.float32)
    q_block_mad, k_block, k_block_mad, v_block = (torch.empty_like(q_block) for _ in range(4))
    key_block_count = torch.empty(batch, heads, num_blocks, device=device, dtype=torch.float32)
    block_non_finite = torch.empty(batch, heads, num_blocks, device=device, dtype=torch.bool)

    valid_arg = key_valid if key_valid is not None else key_valid_c
    valid_strides = key_valid.stride() if key_valid is not None else (0, 0, 0)
    if INTERPRETED:
        kernel, launch = _reorder_pool_kernel, {"CHUNK": min(tile_size, 32), "num_warps": 4}
    else:
        kernel, launch = _autotuned_reorder_pool, {}
    kernel[(num_blocks, batch * heads)](
        query,
        key,
        value,
        source_index,
        valid_arg,
        q_c,
        k_c,
        v_c,
        key_valid_c.view(torch.int8),
        key_usable_c.view(torch.int8),
        q_tile,
        q_tile_count,
        k_tile,
        k_tile_count,
        q_block,
        q_block_mad,
        k_block,
        k_block_mad,
        v_block,
        key_block_count,
        block_non_finite.view(torch.int8),
        heads,
        num_video_blocks,
        num_blocks,
        *query.stride()[:3],
        *key.stride()[:3],
        *value.stride()[:3],
        *valid_strides,
        BLOCK_SIZE=block_size,
        TILE_SIZE=tile_size,
        HEAD_DIM=head_dim,
        HEAD_PAD=padded_head_dim(head_dim),
        HAS_KEY_VALID=key_valid is not None,
        **launch,
    )
    return (
        q_c,
        k_c,
        v_c,
        key_valid_c,
        key_usable_c,
        q_tile,
        q_tile_count,
        k_tile,
        k_tile_count,
        q_block,
        q_block_mad,
        k_block,
        k_block_mad,
        v_block,
        key_block_count,
        block_non_finite,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ReorderPoolOutput:
    """The canonical inputs and their pooled statistics.

    q, k, v: `(B, H, P, D)` canonical copies; key_valid: bool `(B, H, P)` (real and unmasked); key_usable: bool
    `(B, H, P)` (also finite); stats: float32 `PooledStats`; key_block_count: float32 `(B, H, NQ)`, unmasked keys of
    every canonical block (text blocks too); block_non_finite: bool `(B, H, NQ)`.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_valid: torch.Tensor
    key_usable: torch.Tensor
    stats: PooledStats
    key_block_count: torch.Tensor
    block_non_finite: torch.Tensor


def reorder_pool(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: TokenLayout,
    *,
    tile_size: int,
    key_valid: torch.Tensor | None = None,
) -> ReorderPoolOutput:
    """Gather `(B, H, S, D)` Q, K, V into `layout` and pool them in one pass (see `reorder_pool_tensors`).

    Equals `reference.gather_canonical` + `reference.canonical_key_valid` + `reference.pool_statistics` (statistics
    in float32). `key_valid` is the bool `(B, H, S)` key-padding mask in the original order
    (`reference.key_padding_valid`).
    """
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    if not isinstance(query, torch.Tensor):
        raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
    if query.dim() != 4 or query.shape[-2] != layout.seq_len:
        raise ValueError(f"query must have shape (B, H, {layout.seq_len}, D) for this layout, got {tuple(query.shape)}")
    on_device = layout.to(query.device)
    (q_c, k_c, v_c, key_valid_c, key_usable_c, q_tile, q_tile_count, k_tile, k_tile_count, q_block, q_block_mad,
     k_block, k_block_mad, v_block, key_block_count, block_non_finite) = reorder_pool_tensors(
        query,
        key,
        value,
        on_device.source_index,
        key_valid,
        num_video_blocks=layout.num_video_blocks,
        block_size=layout.block_size,
        tile_size=tile_size,
    )  # fmt: skip
    batch, heads = query.shape[:2]
    tiles_per_block = layout.block_size // tile_size
    stats = PooledStats(
        tile_size=tile_size,
        q_tile=q_tile,
        q_tile_count=q_tile_count,
        k_tile=k_tile,
        k_tile_count=k_tile_count,
        q_block=q_block,
        q_block_mad=q_block_mad,
        k_block=k_block,
        k_block_mad=k_block_mad,
        v_block=v_block,
        k_block_count=k_tile_count.view(batch, heads, layout.num_video_blocks, tiles_per_block).sum(-1),
    )
    return ReorderPoolOutput(q_c, k_c, v_c, key_valid_c, key_usable_c, stats, key_block_count, block_non_finite)


# (CHUNK rows held at once, warps): about 96 float32 registers per thread for the three (CHUNK, D = 128) row sets.
# Compiled for sm_90 with triton 3.6 these use 255 registers without spilling; one warp per 16-row tile (which keeps
# the row sums inside a warp) spilled 616 bytes.
_PREPARE_CANDIDATES = ((16, 2), (32, 4), (64, 8))

def _prune_prepare_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """The chunk must divide the block, and hold whole tiles when the outliers are computed."""
    args = {**named_args, **kwargs}
    block, tile, outliers = args["BLOCK_SIZE"], args["TILE_SIZE"], args["OUTLIERS"]
    fitting = [c for c in configs if block % c.kwargs["CHUNK"] == 0 and (c.kwargs["CHUNK"] >= tile or not outliers)]
    return fitting or [triton.Config({"CHUNK": tile}, num_warps=8)]


_autotuned_prepare = triton.autotune(
    configs=[triton.Config({"CHUNK": chunk}, num_warps=warps) for chunk, warps in _PREPARE_CANDIDATES],
    key=["BLOCK_SIZE", "TILE_SIZE", "HEAD_PAD", "HAS_KEY_VALID", "OUTLIERS"],
    prune_configs_by={"early_config_prune": _prune_prepare_configs},
)(_prepare_stats_kernel)


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedStatistics:
    """What `prepare_statistics` computes from one read of Q, K, V: everything planning needs, no copy of the inputs.

    key_valid: bool `(B, H, P)` in canonical order (real, unmasked); key_usable: bool `(B, H, P)` (also finite key and
    value rows); stats: `PooledStats` (block statistics float32, tile means in `tile_dtype`); key_block_count: float32
    `(B, H, NQ)`, unmasked keys of every canonical block; block_non_finite: bool `(B, H, NQ)`; outliers: the key
    tiles' outliers (`estimators.KeyTileOutliers`, tile means in `tile_dtype`) when asked for, else None.
    """

    layout: TokenLayout
    source_index: torch.Tensor
    key_valid: torch.Tensor
    key_usable: torch.Tensor
    stats: PooledStats
    key_block_count: torch.Tensor
    block_non_finite: torch.Tensor
    outliers: KeyTileOutliers | None

    def estimator_inputs(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> EstimatorInputs:
        """The estimators' inputs read from the caller's `query`, `key` through the layout (no canonical copies)."""
        return EstimatorInputs(
            query, key, self.key_usable, self.stats, self.layout, scale, source_index=self.source_index,
            outliers=self.outliers,
        )  # fmt: skip


def prepare_statistics(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: TokenLayout,
    *,
    tile_size: int,
    key_valid: torch.Tensor | None = None,
    outliers: bool = False,
    tile_dtype: torch.dtype | None = None,
    config: tuple[int, int] | None = None,
) -> PreparedStatistics:
    """The pooled statistics, the canonical key validity and the key tiles' outliers from one read of Q, K, V in the
    caller's order, through `layout.source_index`; nothing of the size of Q, K or V is written.

    Args:
        query, key, value: `(B, H, S, D)`, S = `layout.seq_len`, one dtype (float16, bfloat16, float32) and device,
            any strides with a contiguous last dim (stride-0 expanded batch or head dims too).
        layout: the canonical layout. tile_size: a power of two dividing the block size.
        key_valid: bool `(B, H, S)` key-padding mask in the original order (stride-0 views fine), or None.
        outliers: also compute `estimators.KeyTileOutliers` (the pooled estimator's, in the same pass over K).
        tile_dtype: dtype of the tile means (q_tile, k_tile, the outliers' vectors); default: the inputs' dtype when
            16-bit (the estimators' products round the means to it anyway, so nothing is lost), else float32.
        config: (rows per chunk, warps) instead of the autotuned choice (benchmarks).

    Equals `reference.canonical_key_valid`, `reference.key_usable`, `reference.pool_statistics`,
    `reference.block_non_finite` and `estimators.pooled.tile_outliers_reference` on the canonical inputs (statistics in
    float32, tile means then rounded to `tile_dtype`). Memory: `(B, H)` times `NT * D` tile means (two, four with
    outliers), `5 * NB * D` float32 block statistics and `2 * P` bytes of validity; no host synchronisation.
    """
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    if not isinstance(query, torch.Tensor):
        raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
    if query.dim() != 4 or query.shape[-2] != layout.seq_len:
        raise ValueError(f"query must have shape (B, H, {layout.seq_len}, D) for this layout, got {tuple(query.shape)}")
    source_index = layout.to(query.device).source_index
    num_blocks = _check_inputs(
        query, key, value, source_index, key_valid, num_video_blocks=layout.num_video_blocks,
        block_size=layout.block_size, tile_size=tile_size,
    )  # fmt: skip
    if not isinstance(outliers, bool):
        raise TypeError(f"outliers must be a bool, got {type(outliers).__name__}")
    if tile_dtype is None:
        tile_dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.float32
    if tile_dtype not in _INPUT_DTYPES:
        raise TypeError(f"tile_dtype must be float16, bfloat16 or float32, got {tile_dtype}")
    batch, heads, _, head_dim = query.shape
    device = query.device
    nb, padded_len = layout.num_video_blocks, layout.padded_len
    num_tiles = nb * (layout.block_size // tile_size)
    key_valid_c = torch.empty(batch, heads, padded_len, device=device, dtype=torch.bool)
    key_usable_c = torch.empty_like(key_valid_c)
    q_tile = torch.empty(batch, heads, num_tiles, head_dim, device=device, dtype=tile_dtype)
    k_tile = torch.empty_like(q_tile)
    q_tile_count = torch.empty(batch, heads, num_tiles, device=device, dtype=torch.float32)
    k_tile_count = torch.empty_like(q_tile_count)
    if outliers:
        rest_mean, outlier = torch.empty_like(q_tile), torch.empty_like(q_tile)
        rest_count, outlier_count = torch.empty_like(q_tile_count), torch.empty_like(q_tile_count)
    else:  # not written
        rest_mean, outlier, rest_count, outlier_count = q_tile, q_tile, q_tile_count, q_tile_count
    q_block = torch.empty(batch, heads, nb, head_dim, device=device, dtype=torch.float32)
    q_block_mad, k_block, k_block_mad, v_block = (torch.empty_like(q_block) for _ in range(4))
    key_block_count = torch.empty(batch, heads, num_blocks, device=device, dtype=torch.float32)
    block_non_finite = torch.empty(batch, heads, num_blocks, device=device, dtype=torch.bool)

    if config is not None:
        chunk, warps = config
        kernel, launch = _prepare_stats_kernel, {"CHUNK": chunk, "num_warps": warps}
    elif INTERPRETED:
        chunk = max(tile_size, 16) if outliers else 16
        kernel, launch = _prepare_stats_kernel, {"CHUNK": min(chunk, layout.block_size), "num_warps": 4}
    else:
        kernel, launch = _autotuned_prepare, {}
    kernel[(batch * heads, num_blocks)](
        query,
        key,
        value,
        source_index,
        key_valid if key_valid is not None else key_valid_c,
        key_valid_c.view(torch.int8),
        key_usable_c.view(torch.int8),
        q_tile,
        q_tile_count,
        k_tile,
        k_tile_count,
        rest_mean,
        rest_count,
        outlier,
        outlier_count,
        q_block,
        q_block_mad,
        k_block,
        k_block_mad,
        v_block,
        key_block_count,
        block_non_finite.view(torch.int8),
        heads,
        nb,
        num_blocks,
        *query.stride()[:3],
        *key.stride()[:3],
        *value.stride()[:3],
        *(key_valid.stride() if key_valid is not None else (0, 0, 0)),
        BLOCK_SIZE=layout.block_size,
        TILE_SIZE=tile_size,
        HEAD_DIM=head_dim,
        HEAD_PAD=padded_head_dim(head_dim),
        HAS_KEY_VALID=key_valid is not None,
        OUTLIERS=outliers,
        **launch,
    )
    tiles_per_block = layout.block_size // tile_size
    stats = PooledStats(
        tile_size=tile_size,
        q_tile=q_tile,
        q_tile_count=q_tile_count,
        k_tile=k_tile,
        k_tile_count=k_tile_count,
        q_block=q_block,
        q_block_mad=q_block_mad,
        k_block=k_block,
        k_block_mad=k_block_mad,
        v_block=v_block,
        k_block_count=k_tile_count.view(batch, heads, nb, tiles_per_block).sum(-1),
    )
    found = KeyTileOutliers(rest_mean, rest_count, outlier, outlier_count) if outliers else None
    return PreparedStatistics(
        layout, source_index, key_valid_c, key_usable_c, stats, key_block_count, block_non_finite, found
    )
