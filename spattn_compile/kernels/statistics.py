"""Stage 0 on the device: the canonical layout's statistics from one pass over Q, K, V, without copies.

`prepare_statistics` (`_prepare_stats_kernel`), one program per (batch, head, canonical block), reads the block's rows
from the caller's tensors through `layout.source_index` (any input strides, the last dim contiguous, so a transposed
`(B, S, H, D)` buffer is read in place) and writes the pooled statistics (tile means of Q and K, block means of Q, K,
V, the per-dimension mean absolute deviations of Q and K about their block means for GAPR, the unmasked key counts per
tile and per block), the canonical key validity and the pooled estimator's key-tile outliers
(`estimators.KeyTileOutliers`, from the keys already in registers): nothing of the size of Q, K or V, so Q, K and V
cross HBM once, in. A chunk holds several whole tiles (their sums and outliers are reductions inside the chunk) or a
piece of a larger tile; the deviations read Q and K again, from L2. Heads vary fastest over the grid, so programs
running together read neighbouring heads of the same tokens, which a `(B, S, H, D)` buffer stores side by side.

Means divide by true counts of the usable rows (real queries with finite entries; unmasked keys whose key and value
rows are finite, for keys and values), as `reference.pool_statistics` does; a group with nothing to count has a zero
mean. Block statistics are float32; tile means the inputs' 16-bit dtype by default (the estimators round them to it for
their products anyway), else float32. (A kernel that also wrote canonical copies was 2.2x slower at Wan 14B 720p on the
H200 and doubled the memory: benchmarks/NOTES_pipeline.md.)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..estimators.base import EstimatorInputs, KeyTileOutliers
from ..layout import TokenLayout
from ..plan import PooledStats
from .common import INTERPRETED, check_device, check_kernel_inputs, padded_head_dim

__all__ = ["PrepareLaunch", "PreparedStatistics", "prepare_statistics"]

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    RELOAD_KEYS: tl.constexpr = False,
    ROLE: tl.constexpr = 0,
):
    # A chunk of CHUNK rows is held as (SEGS, SEG, HEAD_PAD): SEGS whole tiles when CHUNK >= TILE_SIZE (their sums,
    # and the outliers, are reductions over the middle axis), else one piece of a tile (PIECES chunks per tile).
    SEG: tl.constexpr = TILE_SIZE if CHUNK >= TILE_SIZE else CHUNK
    SEGS: tl.constexpr = CHUNK // SEG
    PIECES: tl.constexpr = TILE_SIZE // SEG
    tl.static_assert(PIECES == 1 or not OUTLIERS, "outliers need whole tiles in a chunk (CHUNK >= TILE_SIZE)")
    CHUNKS: tl.constexpr = BLOCK_SIZE // CHUNK
    TILES_PER_BLOCK: tl.constexpr = BLOCK_SIZE // TILE_SIZE
    # ROLE 0 reads Q, K and V; 1 only Q and writes only the queries' statistics; 2 only K and V and writes the rest.
    # A role's skipped rows are constant zeros, so the compiler drops what depends on them alone.
    QUERIES: tl.constexpr = ROLE != 2
    KEYS: tl.constexpr = ROLE != 1
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
        if HAS_KEY_VALID and KEYS:
            unmasked = tl.load(valid_base + source * stride_valid_s, mask=real, other=0)
            key_ok = real & (unmasked != 0)
        else:
            key_ok = real
        # Queries of text blocks are never pooled; masked keys and values are never read.
        if QUERIES:
            q = _load_rows3(Q, stride_qb, stride_qh, stride_qs, off_b, off_h, source, real & video_seg[:, None],
                            offs_d, HEAD_DIM)  # fmt: skip
        else:
            q = tl.zeros([SEGS, SEG, HEAD_PAD], dtype=tl.float32)
        if KEYS:
            k = _load_rows3(K, stride_kb, stride_kh, stride_ks, off_b, off_h, source, key_ok, offs_d, HEAD_DIM)
            v = _load_rows3(V, stride_vb, stride_vh, stride_vs, off_b, off_h, source, key_ok, offs_d, HEAD_DIM)
        else:
            k = tl.zeros([SEGS, SEG, HEAD_PAD], dtype=tl.float32)
            v = tl.zeros([SEGS, SEG, HEAD_PAD], dtype=tl.float32)
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
            if RELOAD_KEYS:
                # Read the rows again (L1/L2) rather than keep all three sets in registers until the test above.
                if QUERIES:
                    q = _load_rows3(Q, stride_qb, stride_qh, stride_qs, off_b, off_h, source,
                                    real & video_seg[:, None], offs_d, HEAD_DIM)  # fmt: skip
                if KEYS:
                    k = _load_rows3(K, stride_kb, stride_kh, stride_ks, off_b, off_h, source, key_ok, offs_d,
                                    HEAD_DIM)  # fmt: skip
                    v = _load_rows3(V, stride_vb, stride_vh, stride_vs, off_b, off_h, source, key_ok, offs_d,
                                    HEAD_DIM)  # fmt: skip
            query_ok = real & _rows_finite3(q)
            kv_finite = _rows_finite3(k) & _rows_finite3(v)
            usable = key_ok & kv_finite
            non_finite += tl.sum(tl.sum((key_ok & ~kv_finite).to(tl.int32), 1), 0)
            q_seg = tl.sum(tl.where(query_ok[:, :, None], q, 0.0), 1)
            k_seg = tl.sum(tl.where(usable[:, :, None], k, 0.0), 1)
            v_seg = tl.sum(tl.where(usable[:, :, None], v, 0.0), 1)
            block_clean = block_clean & False
        canonical = canonical_base + rows
        if KEYS:
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
        if QUERIES:
            q_tile_mean = q_piece / tl.maximum(q_piece_count, 1.0)[:, None]
            tl.store(QTile + vectors, q_tile_mean.to(QTile.dtype.element_ty), mask=vector_mask)
            tl.store(QTileCount + tiles, q_piece_count, mask=tile_done)
        k_mean = k_piece / tl.maximum(k_piece_count, 1.0)[:, None]
        if KEYS:
            tl.store(KTile + vectors, k_mean.to(KTile.dtype.element_ty), mask=vector_mask)
            tl.store(KTileCount + tiles, k_piece_count, mask=tile_done)
        if OUTLIERS and KEYS:
            # Whole tiles are in registers (the launcher makes CHUNK >= TILE_SIZE): each tile's usable key farthest
            # from the tile's mean (the first on ties; a left-out row's -1 is below any distance), and the others' mean.
            if RELOAD_KEYS:
                # The keys read again (from L1/L2, after the stores above, so the compiler cannot reuse the first
                # load): the chunk's keys need not stay in registers past their sums, which leaves room for more
                # programs per SM; the outlier is then one gathered row per tile.
                k_again = _load_rows3(K, stride_kb, stride_kh, stride_ks, off_b, off_h, source, usable, offs_d,
                                      HEAD_DIM)  # fmt: skip
                deviation = k_again - k_mean[:, None, :]
            else:
                deviation = k - k_mean[:, None, :]
            distance = tl.where(usable, tl.sum(deviation * deviation, 2), -1.0)
            farthest = tl.argmax(distance, 1, tie_break_left=True)
            is_outlier = (offs_r[None, :] == farthest[:, None]) & usable
            has = tl.sum(is_outlier.to(tl.float32), 1)
            if RELOAD_KEYS:
                outlier_row = tl.sum(tl.where(is_outlier, source, 0), 1)
                outlier = tl.load(
                    K + off_b * stride_kb + off_h * stride_kh + outlier_row[:, None] * stride_ks + offs_d[None, :],
                    mask=(has > 0.0)[:, None] & d_ok[None, :], other=0.0,
                ).to(tl.float32)  # fmt: skip
            else:
                outlier = tl.sum(tl.where(is_outlier[:, :, None], k, 0.0), 1)
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

    if KEYS:
        tl.store(KeyBlockCount + bh * num_blocks + block, valid_count.to(tl.float32))
        tl.store(BlockNonFinite + bh * num_blocks + block, (non_finite > 0).to(tl.int8))

    # Pass 2 (video blocks): deviations about the block means. The rows are read again: this program read them a
    # moment ago, so they come from L2 (Q and K cross HBM once). The barrier makes the key-usable stores visible.
    q_mean = q_sum / tl.maximum(q_count, 1.0)
    k_mean_block = k_sum / tl.maximum(k_count, 1.0)
    block_row = (bh * num_video_blocks + block) * HEAD_DIM + offs_d
    if QUERIES:
        tl.store(QBlock + block_row, q_mean, mask=video_d)
    if KEYS:
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
            if QUERIES:
                q = _load_rows3(Q, stride_qb, stride_qh, stride_qs, off_b, off_h, source, real, offs_d, HEAD_DIM)
                query_ok = real
                if not block_clean:
                    query_ok = real & _rows_finite3(q)
                q_dev += tl.sum(tl.sum(tl.where(query_ok[:, :, None], tl.abs(q - q_mean[None, None, :]), 0.0), 1), 0)
            if KEYS:
                usable = tl.load(KeyUsableC + canonical_base + rows) != 0
                k = _load_rows3(K, stride_kb, stride_kh, stride_ks, off_b, off_h, source, usable, offs_d, HEAD_DIM)
                k_dev += tl.sum(
                    tl.sum(tl.where(usable[:, :, None], tl.abs(k - k_mean_block[None, None, :]), 0.0), 1), 0
                )
    if QUERIES:
        tl.store(QBlockMad + block_row, q_dev / tl.maximum(q_count, 1.0), mask=video_d)
    if KEYS:
        tl.store(KBlockMad + block_row, k_dev / tl.maximum(k_count, 1.0), mask=video_d)

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



class PrepareLaunch(NamedTuple):
    """A launch configuration of `_prepare_stats_kernel`: rows per chunk, warps, whether the keys are read again for
    the outliers (and all three row sets for the rare non-finite chunk) instead of held in registers, a register
    cap per thread (None: the compiler's choice), and `split`: two launches, one reading Q (the queries'
    statistics), one reading K and V (the rest), each program with one third or two thirds of the rows to hold."""

    chunk: int
    warps: int
    reread: bool = False
    maxnreg: int | None = None
    split: bool = False


# About 96 float32 registers per thread hold the three (CHUNK, D = 128) row sets. Compiled for sm_90 with triton 3.6
# every configuration takes 255 registers; one warp per 16-row tile (which keeps the row sums inside a warp) spills
# 616 bytes, and is still the fastest measured: 1.49 ms against 2.55-14.1 ms for the others at Wan 14B 720p on the
# H200 (`benchmarks/tune_planning.py`, results/2026-12-03-h200/session3/tune.log): a program's time hardly depends on
# its warps (time grew with warps at a fixed 8 warps per SM), so programs per SM set the rate. The re-reading forms
# free the row sets after their sums; they are candidates until measured. The split form (`PrepareLaunch.split`, two
# launches: 147 and 255 registers at (16, 1)) is not a candidate (the autotuner times one launch); the benchmark times
# it (benchmarks/NOTES_pipeline.md, "Planning launch variants").
_PREPARE_CANDIDATES = (
    PrepareLaunch(16, 1),
    PrepareLaunch(16, 2),
    PrepareLaunch(16, 1, reread=True),
    PrepareLaunch(16, 2, reread=True),
    PrepareLaunch(32, 2, reread=True),
)


def _prune_prepare_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """The chunk must divide the block, and hold whole tiles when the outliers are computed."""
    args = {**named_args, **kwargs}
    block, tile, outliers = args["BLOCK_SIZE"], args["TILE_SIZE"], args["OUTLIERS"]
    fitting = [c for c in configs if block % c.kwargs["CHUNK"] == 0 and (c.kwargs["CHUNK"] >= tile or not outliers)]
    return fitting or [triton.Config({"CHUNK": tile}, num_warps=8)]


_autotuned_prepare = triton.autotune(
    configs=[
        triton.Config({"CHUNK": c.chunk, "RELOAD_KEYS": c.reread}, num_warps=c.warps, maxnreg=c.maxnreg)
        for c in _PREPARE_CANDIDATES
    ],
    # The shape is in the key (the block count): the best chunk differs between a small first call and a long video.
    key=["BLOCK_SIZE", "TILE_SIZE", "HEAD_PAD", "HAS_KEY_VALID", "OUTLIERS", "ROLE", "num_blocks"],
    prune_configs_by={"early_config_prune": _prune_prepare_configs},
)(_prepare_stats_kernel)


def _launch_config(config: object) -> PrepareLaunch:
    if not isinstance(config, tuple) or not 2 <= len(config) <= 5:
        raise ValueError(f"config must be (rows per chunk, warps[, reread[, maxnreg[, split]]]), got {config!r}")
    launch = PrepareLaunch(*config)
    _check_power_of_two("config rows per chunk", launch.chunk, 1, 256)
    _check_power_of_two("config warps", launch.warps, 1, 32)
    for name in ("reread", "split"):
        if not isinstance(getattr(launch, name), bool):
            raise TypeError(f"config {name} must be a bool, got {getattr(launch, name)!r}")
    if launch.maxnreg is not None and (isinstance(launch.maxnreg, bool) or not isinstance(launch.maxnreg, int)
                                       or not 24 <= launch.maxnreg <= 255):  # fmt: skip
        raise ValueError(f"config maxnreg must be None or an int in [24, 255], got {launch.maxnreg!r}")
    return launch


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
    config: tuple | None = None,
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
        config: a `PrepareLaunch` (rows per chunk, warps[, reread[, maxnreg]]) instead of the autotuned choice
            (benchmarks, tests).

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

    roles: list[dict[str, int]] = [{}]
    if config is not None:
        chosen = _launch_config(config)
        kernel = _prepare_stats_kernel
        launch = {"CHUNK": chosen.chunk, "RELOAD_KEYS": chosen.reread, "num_warps": chosen.warps}
        if chosen.maxnreg is not None:
            launch["maxnreg"] = chosen.maxnreg
        if chosen.split:
            roles = [{"ROLE": 1}, {"ROLE": 2}]  # the queries' statistics, then the keys' and values'
    elif INTERPRETED:
        chunk = max(tile_size, 16) if outliers else 16
        kernel, launch = _prepare_stats_kernel, {"CHUNK": min(chunk, layout.block_size), "num_warps": 4}
    else:
        # One launch: the split form was faster alone (1.51 / 1.39 ms against 1.54 / 1.56 at Wan 14B / HunyuanVideo
        # 720p, tune_planning.py) but planning through select_plan was slower with it as the default (6.5 / 9.7 ms
        # against 6.2 / 9.0; benchmarks/NOTES_pipeline.md), so it stays an explicit option.
        kernel, launch = _autotuned_prepare, {}
    args = (
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
    )
    meta = dict(
        BLOCK_SIZE=layout.block_size,
        TILE_SIZE=tile_size,
        HEAD_DIM=head_dim,
        HEAD_PAD=padded_head_dim(head_dim),
        HAS_KEY_VALID=key_valid is not None,
        OUTLIERS=outliers,
    )
    for role in roles:
        kernel[(batch * heads, num_blocks)](*args, **meta, **launch, **role)
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
