"""The pooled estimator on the device (`estimators.PooledTiles`): tile-mean queries against tile-mean keys.

Two kernels:

- `_tile_outliers_kernel` (only with `outliers=True`): per video key tile, the usable key farthest from the tile's
  mean (the first on ties), the mean and count of the tile's other usable keys, and whether the outlier exists.
- `_pooled_scores_kernel`: per (batch, head, group of query blocks), tile logits `scale * q_tile . k + log2 n` (log2
  units) against every key tile (its mean over the others and, with outliers, its outlier key with multiplicity 1)
  and every text key (isolated, multiplicity 1, masked keys excluded); two passes over the keys (row maximum and
  normaliser, then the normalised weights), summed per key block and averaged over the query tiles of each block
  with their true row counts: `P_hat (B, H, NB, NB + 1)` in float32, as `estimators.pooled.pooled_scores_reference`.

Head dims that are not a power of two are padded to one in registers (masked loads); nothing reads back to the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..estimators.base import EstimatorInputs
from .common import INTERPRETED, LOG2E, check_device, online_logsumexp, padded_head_dim

__all__ = ["pooled_scores", "tile_outliers"]


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
    CHUNK: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_DIM
    offs_c = tl.arange(0, CHUNK)
    for index in range(TILES_PER_PROGRAM):
        tile = tl.program_id(0) * TILES_PER_PROGRAM + index
        if tile < num_tiles:
            first_row = bh * padded_len + tile.to(tl.int64) * TILE
            # Pass 1: the mean of the tile's usable keys.
            total = tl.zeros([HEAD_PAD], tl.float32)
            count = tl.sum(tl.zeros([CHUNK], tl.float32), 0)
            for chunk in tl.static_range(TILE // CHUNK):
                rows = first_row + chunk * CHUNK + offs_c
                ok = tl.load(KeyValidC + rows) != 0
                k_mask = ok[:, None] & d_ok[None, :]
                k = tl.load(KC + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=k_mask, other=0.0)
                total += tl.sum(k.to(tl.float32), 0)
                count += tl.sum(ok.to(tl.float32), 0)
            mean = total / tl.maximum(count, 1.0)
            # Pass 2 (the rows again, from L1/L2): the key farthest from the mean, the first one on ties.
            best = tl.max(tl.full([CHUNK], -1.0, tl.float32), 0)
            outlier = tl.zeros([HEAD_PAD], tl.float32)
            for chunk in tl.static_range(TILE // CHUNK):
                rows = first_row + chunk * CHUNK + offs_c
                ok = tl.load(KeyValidC + rows) != 0
                k_mask = ok[:, None] & d_ok[None, :]
                k = tl.load(KC + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=k_mask, other=0.0)
                k = k.to(tl.float32)
                deviation = k - mean[None, :]
                distance = tl.where(ok, tl.sum(tl.where(d_ok[None, :], deviation * deviation, 0.0), 1), -1.0)
                chunk_best = tl.max(distance, 0)
                chunk_row = tl.argmax(distance, 0)
                chunk_vector = tl.sum(tl.where((offs_c == chunk_row)[:, None], k, 0.0), 0)
                # Strictly larger: an earlier chunk keeps a tie, as the reference's first-maximum argmax does.
                take = (offs_d * 0.0 + chunk_best) > best
                outlier = tl.where(take, chunk_vector, outlier)
                best = tl.maximum(best, chunk_best)
            has = tl.where(best >= 0.0, 1.0, 0.0)
            rest_count = count - has
            out_row = bh * num_tiles + tile
            rest_mean = (total - outlier) / tl.maximum(rest_count, 1.0)
            tl.store(RestMean + out_row * HEAD_DIM + offs_d, rest_mean, mask=d_ok)
            tl.store(RestCount + out_row, rest_count)
            tl.store(Outlier + out_row * HEAD_DIM + offs_d, outlier, mask=d_ok)
            tl.store(OutlierCount + out_row, has)


@triton.jit
def _key_tile_logits(
    q, Keys, Counts, tile_base, start, num_tiles, offs_n, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Logits in log2 units of the query tiles `q` against key tiles `start + offs_n` of one key set:
    `scale * q . k * log2(e) + log2(n)`; tiles past the end or with no key get -inf."""
    tiles = start + offs_n
    in_range = tiles < num_tiles
    k_mask = in_range[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(Keys + (tile_base + tiles)[:, None] * HEAD_DIM + offs_d[None, :], mask=k_mask, other=0.0)
    count = tl.load(Counts + tile_base + tiles, mask=in_range, other=0.0)
    log_count = tl.where(count > 0, tl.math.log2(tl.maximum(count, 1.0)), float("-inf"))
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + log_count[None, :]


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
    logits = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION) * qk_scale
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
    key=["TILES_PER_BLOCK", "HEAD_PAD", "HAS_OUTLIERS", "HAS_TEXT", "DOT_PRECISION", "num_video_blocks"],
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
    tiles_per_program = 1 if INTERPRETED else 8
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
        CHUNK=min(tile_size, 32),
        TILES_PER_PROGRAM=tiles_per_program,
        HEAD_DIM=head_dim,
        HEAD_PAD=padded_head_dim(head_dim),
        num_warps=4,
    )
    return rest_mean, rest_count, outlier, outlier_count


def pooled_scores(inputs: EstimatorInputs, *, outliers: bool) -> torch.Tensor:
    """`P_hat` float32 `(B, H, NB, NB + 1)` of the pooled estimator from the canonical keys and float32 tile statistics
    of `inputs` (the Triton path's `reorder_pool`)."""
    stats, layout, k_c = inputs.stats, inputs.layout, inputs.k
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
        # One tf32 product per dot on the GPU: the scores rank blocks, and tf32's 10-bit mantissa is as fine as the
        # bfloat16 keys the probe estimators multiply; three (tf32x3) would cost 3x for digits nobody reads.
        "DOT_PRECISION": "ieee" if INTERPRETED else "tf32",
    }

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(nb * tiles_per_block, meta["BLOCK_M"]), batch * heads)

    if INTERPRETED:
        block = max(16, tiles_per_block)
        _pooled_scores_kernel[grid](*args, **constants, BLOCK_M=block, BLOCK_N=block)
    else:
        _autotuned_scores[grid](*args, **constants)
    return scores
