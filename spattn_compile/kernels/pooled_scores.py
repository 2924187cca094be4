"""The pooled estimator on the device (`estimators.PooledTiles`): tile-mean queries against tile-mean keys.

`_pooled_scores_kernel` (`pooled_scores`): per (batch, head, group of query tiles), the tile logits
`scale * q_tile . k + log2 n` (log2 units) against every key tile (its mean over the others and, with outliers, its
outlier key with multiplicity 1) and every text key (isolated, multiplicity 1, masked keys excluded), each computed and
exponentiated once. Persistent programs keep each (query tile, key block) sum relative to the running maximum of its
group of key blocks in a scratch slot of their own and rescale it once at the end; keys go key-block-major (one tile
of each of BLOCK_N key blocks per step), so the per-block sums are an accumulator, not a reduction. The text keys are
read from the caller's keys through the layout's index; the tile means and the key tiles' outliers come from
`kernels.statistics.prepare_statistics` (one pass over Q, K, V, no canonical copies).

It gives `P_hat (B, H, NB, NB + 1)` in float32, as `estimators.pooled.pooled_scores_reference`. For 16-bit inputs the
products take the tile means in the inputs' type (float32 accumulation). Head dims that are not a power of two are
padded to one in registers (masked loads); nothing reads back to the host. benchmarks/NOTES_pipeline.md has the
measurements behind the choices (a two-pass kernel, float16-pair exponentials and float8 products were measured and
dropped: slower, or no faster with 20x the error).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..estimators.base import EstimatorInputs
from ..layout import TokenLayout
from .common import INTERPRETED, LOG2E, check_device, padded_head_dim

__all__ = ["ScoreLaunch", "planning_heads", "pooled_scores", "scratch_dtype"]


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
def _tile_logits_two_sets(
    q, KeyMean, MeanCounts, KeyOutlier, OutlierCounts, tiles, in_range, second, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """`_tile_logits` against two key sets at once: column j is tile `tiles[j]` (absolute) of the rest means where
    `second[j]` is False, of the outliers where it is True."""
    k_mask = in_range[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = tiles[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(tl.where(second[:, None], KeyOutlier + rows, KeyMean + rows), mask=k_mask, other=0.0)
    count = tl.load(tl.where(second, OutlierCounts + tiles, MeanCounts + tiles), mask=in_range, other=0.0)
    log_count = tl.where(count > 0, tl.math.log2(tl.maximum(count, 1.0)), float("-inf"))
    return tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale + log_count[None, :]


@triton.jit
def _accumulate(m_i, acc, logits):
    """Fold a tile of logits (log2 units, one column per key block) into the per-column sums `acc`, kept relative to
    the running row maximum `m_i`; returns the new maximum and sums. A row that saw only -inf keeps m = -inf, no NaN."""
    m_new = tl.maximum(m_i, tl.max(logits, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    acc = acc * tl.math.exp2(m_i - m_shift)[:, None] + tl.math.exp2(logits - m_shift[:, None])
    return m_new, acc


@triton.jit
def _text_logits_indexed(
    q, K, SourceIndex, KeyUsable, key_base, usable_base, text_offset, start, text_rows, offs_n, offs_d, stride_ks,
    qk_scale, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Logits in log2 units of the query tiles `q` against the text keys `start + offs_n` (canonical rows from
    `text_offset`), read from the caller's keys through `SourceIndex`;
    keys that are not usable (masked, padding, not finite) get -inf."""
    rows = start + offs_n
    in_range = rows < text_rows
    canonical = text_offset + rows
    ok = tl.load(KeyUsable + usable_base + canonical, mask=in_range, other=0) != 0
    source = tl.maximum(tl.load(SourceIndex + canonical, mask=in_range, other=0).to(tl.int64), 0)
    k_mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(key_base + source[:, None] * stride_ks + offs_d[None, :], mask=k_mask, other=0.0)
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
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FUSED_SETS: tl.constexpr = False,
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
    offs_n2 = tl.arange(0, 2 * BLOCK_N)
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

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for key_group in range(0, key_groups):
            key_blocks = key_group * BLOCK_N + offs_n
            block_ok = key_blocks < num_video_blocks
            m_start = m_i
            if HAS_OUTLIERS and FUSED_SETS:
                # Both key sets in one product of 2 * BLOCK_N columns (the first BLOCK_N the tiles' rest means, the
                # others their outliers): one product and one softmax step per tile instead of two; the two halves
                # of the accumulator are added once per group.
                pairs = key_group * BLOCK_N + offs_n2 % BLOCK_N
                pair_ok = pairs < num_video_blocks
                acc2 = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
                for part in range(0, TILES_PER_BLOCK):
                    tiles = tile_base + pairs * TILES_PER_BLOCK + part
                    logits = _tile_logits_two_sets(
                        q, KeyMean, KeyMeanCount, KeyOutlier, KeyOutlierCount, tiles, pair_ok, offs_n2 >= BLOCK_N,
                        offs_d, qk_scale, HEAD_DIM, DOT_PRECISION,
                    )  # fmt: skip
                    m_i, acc2 = _accumulate(m_i, acc2, logits)
                acc = tl.sum(tl.reshape(acc2, (BLOCK_M, 2, BLOCK_N)), 1)
            else:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for part in range(0, TILES_PER_BLOCK):
                    tiles = key_blocks * TILES_PER_BLOCK + part
                    logits = _tile_logits(
                        q, KeyMean, KeyMeanCount, tile_base, tiles, block_ok, offs_d, qk_scale, HEAD_DIM, DOT_PRECISION
                    )
                    m_i, acc = _accumulate(m_i, acc, logits)
                    if HAS_OUTLIERS:
                        # The second key set after the first: one tile of logits in registers at a time.
                        logits = _tile_logits(
                            q, KeyOutlier, KeyOutlierCount, tile_base, tiles, block_ok, offs_d, qk_scale, HEAD_DIM,
                            DOT_PRECISION,
                        )  # fmt: skip
                        m_i, acc = _accumulate(m_i, acc, logits)
            # The normaliser sums the sums as stored (rounded to the scratch's dtype), so that each row of scores
            # still sums to 1 to float32 rounding.
            stored = acc.to(Partial.dtype.element_ty)
            m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
            l_i = l_i * tl.math.exp2(m_start - m_shift) + tl.sum(stored.to(tl.float32), 1)
            tl.store(partial_rows + key_blocks[None, :], stored, mask=block_ok[None, :])
            tl.store(max_rows + key_group, m_i)
        # The text keys, last: their sum is relative to the final maximum as it stands.
        text_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_TEXT:
            key_base = K + off_b * stride_kb + off_h * stride_kh
            for start in range(0, text_rows, BLOCK_N):
                logits = _text_logits_indexed(
                    q, K, SourceIndex, KeyUsable, key_base, bh * padded_len, text_offset, start, text_rows, offs_n,
                    offs_d, stride_ks, qk_scale, HEAD_DIM, DOT_PRECISION,
                )  # fmt: skip
                m_new = tl.maximum(m_i, tl.max(logits, 1))
                m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_shift)
                text_weights = tl.sum(tl.math.exp2(logits - m_shift[:, None]), 1)
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
            partial = tl.load(partial_rows3 + key_blocks[None, None, :], mask=block_ok[None, None, :], other=0.0).to(
                tl.float32
            )
            # The maximum the group's sums are relative to (-inf for a group that saw no key: its sums are 0).
            factor = tl.math.exp2(tl.load(max_rows3 + key_group) - m_final3) * row_factor3
            per_block = tl.sum(partial * factor[:, :, None], 1)
            store_ok = (q_blocks < num_video_blocks)[:, None] & block_ok[None, :]
            tl.store(score_rows + key_blocks[None, :], per_block, mask=store_ok)
        text_mass = tl.sum(tl.reshape(text_sum * row_factor, (BLOCK_Q, TILES_PER_BLOCK)), 1)
        tl.store(score_rows + num_video_blocks, text_mass[:, None], mask=(q_blocks < num_video_blocks)[:, None])
        tl.debug_barrier()  # the slot is read before the next item writes it

class ScoreLaunch(NamedTuple):
    """A launch configuration of `_pooled_scores_kernel`: query tiles and key blocks per step, warps, pipeline stages,
    and whether the two key sets of the outlier form go through one product of 2 * BLOCK_N columns (`fused_sets`)."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    fused_sets: bool = False


# Measured side by side (`benchmarks/tune_planning.py`, H200, 2 programs per SM, results/2026-12-03-h200/session3/
# tune.log): the best differs by shape: (128, 16, 8, 3) at Wan 14B 720p (3.13 ms against 3.24-4.11), (64, 32, 4, 2)
# at HunyuanVideo 720p (5.47 ms against 5.73-10.0), so both are offered; (128, 16, 4, 2) was second at Hunyuan. The
# fused-sets form (one product and one softmax step per key tile instead of two; 168 registers at (64, 16, 4, 2) for
# sm_90 with triton 3.6, so two programs fit an SM) is a candidate until measured. Configurations measured slower in
# both cases ((128, 32, 8, 3), (128, 16, 8, 2), (128, 32, 8, 2)) were dropped.
_CANDIDATES = (
    ScoreLaunch(128, 16, 8, 3),
    ScoreLaunch(64, 32, 4, 2),
    ScoreLaunch(128, 16, 4, 2),
    ScoreLaunch(64, 16, 4, 2, fused_sets=True),
    ScoreLaunch(64, 16, 4, 3, fused_sets=True),
)
# Persistent programs per SM, and the scratch slot each owns.
_PROGRAMS_PER_SM = 2


def _prune_score_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """The query tiles must hold whole blocks."""
    tiles_per_block = {**named_args, **kwargs}["TILES_PER_BLOCK"]
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] >= tiles_per_block]
    return fitting or [triton.Config({"BLOCK_M": tiles_per_block, "BLOCK_N": 32}, num_warps=8)]


_autotuned_scores = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "FUSED_SETS": c.fused_sets}, num_warps=c.warps,
                      num_stages=c.stages)
        for c in _CANDIDATES
    ],
    key=[
        "TILES_PER_BLOCK",
        "HEAD_PAD",
        "HAS_OUTLIERS",
        "HAS_TEXT",
        "DOT_PRECISION",
        "num_video_blocks",
    ],
    prune_configs_by={"early_config_prune": _prune_score_configs},
)(_pooled_scores_kernel)


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _score_programs(items: int, device: torch.device, programs_per_sm: int = _PROGRAMS_PER_SM) -> int:
    """Persistent programs of a launch with `items` work items."""
    return max(1, min(items, programs_per_sm * _multiprocessors(device)))


def _candidates(tiles_per_block: int) -> list[ScoreLaunch]:
    """The configurations a launch may take (the interpreter runs one: its cost is per program)."""
    if INTERPRETED:
        return [ScoreLaunch(max(16, tiles_per_block), 16, 4, 1)]
    return list(_CANDIDATES)


def _tiles_per_item(tiles_per_block: int) -> int:
    """Query tiles per work item of the largest candidate (the scratch is sized for it)."""
    return max(max(c[0] for c in _candidates(tiles_per_block)), tiles_per_block)


def planning_heads(batch: int, heads: int, layout: TokenLayout, tile_size: int, device: torch.device) -> int:
    """Heads per group when planning goes by groups of heads: the fewest whose groups take no more waves of the
    scores kernel's persistent programs than every head at once (each program takes a work item of 128 query tiles
    of one (batch, head) in turn), so the groups fill the GPU as one launch would while the tile means and the scratch
    are those of one group. At Wan 14B 720p on an H200 (37 items a head, 264 programs): 7 heads, 6 groups of one
    wave, as 40 heads at once take 6 waves; HunyuanVideo 720p (59 items a head, 24 heads): 4 heads."""
    tiles = layout.num_video_blocks * (layout.block_size // tile_size)
    per_head = batch * triton.cdiv(tiles, _tiles_per_item(layout.block_size // tile_size))
    programs = _score_programs(per_head * heads, device)
    fewest_waves = triton.cdiv(per_head * heads, programs)
    for group in range(1, heads + 1):
        waves = triton.cdiv(heads, group) * triton.cdiv(per_head * group, programs)
        if waves <= fewest_waves:
            return group
    return heads


def scratch_dtype(tile_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the one-pass scratch's sums: float16 for 16-bit tile means, else float32.

    Each sum is relative to the running maximum of its group of key blocks, so it lies in [0, 2 * tiles per block]
    (float16's range holds it) and enters the final score multiplied by a factor <= 1 / l <= 1: float16 adds a relative
    error of at most 2^-11 per sum, below the 2^-8 of the bfloat16 tile means the products already take, and values
    under float16's smallest normal (6e-5) are at most that share of a row's mass. It halves the scratch, the largest
    allocation of planning after the tile means (benchmarks/NOTES_pipeline.md, "Memory")."""
    return torch.float16 if tile_dtype in (torch.float16, torch.bfloat16) else torch.float32


def pooled_scores(
    inputs: EstimatorInputs,
    *,
    outliers: bool,
    config: tuple | None = None,
    programs_per_sm: int = _PROGRAMS_PER_SM,
) -> torch.Tensor:
    """`P_hat` float32 `(B, H, NB, NB + 1)` of the pooled estimator, as `estimators.pooled.pooled_scores_reference`.

    Every (query tile, key tile) logit is computed and exponentiated once: persistent programs keep per (query tile,
    key block) the weights' sum relative to the running maximum of its step, with that maximum, in a scratch slot of
    their own (`programs * BLOCK_M * NB` sums in `scratch_dtype`, float16 for 16-bit tile means: about
    2 * SMs * 128 * NB * 2 bytes; and `programs * BLOCK_M * NB / BLOCK_N` float32 maxima), and rescale it to the final
    maximum and normaliser at the end of the item. `programs` is at most the work items, `B * H * NT / BLOCK_M`.

    `inputs` holds the caller's tensors read through `inputs.source_index` (`prepare_statistics(...)
    .estimator_inputs`); with `outliers`, the key tiles' outliers are `inputs.outliers`
    (`prepare_statistics(outliers=True)`). `config`: a `ScoreLaunch` (BLOCK_M, BLOCK_N, warps, stages[, fused_sets])
    instead of the autotuned choice; `programs_per_sm`: persistent programs (and scratch slots) per multiprocessor.
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
    if INTERPRETED and stats.q_tile.dtype == torch.bfloat16:
        # The interpreter's tl.dot on bfloat16 returns wrong values instead of failing: refuse rather than mislead.
        raise TypeError("the tile means are bfloat16: the Triton interpreter cannot multiply bfloat16")
    if not inputs.in_source_order:
        raise ValueError("pooled_scores reads the caller's keys through inputs.source_index (prepare_statistics)")
    if outliers:
        found = inputs.outliers
        if found is None:
            raise ValueError(
                "outliers=True needs inputs.outliers (prepare_statistics(..., outliers=True) computes them in its "
                "pass over the keys)"
            )
        key_sets = (found.rest_mean, found.rest_count, found.outlier, found.outlier_count)
    else:
        key_sets = (stats.k_tile, stats.k_tile_count, stats.k_tile, stats.k_tile_count)  # the second set is not read
    key = inputs.k
    scores = torch.empty(batch, heads, nb, nb + 1, device=device, dtype=torch.float32)
    if config is not None:
        if not isinstance(config, tuple) or not 4 <= len(config) <= 5:
            raise ValueError(f"config must be (BLOCK_M, BLOCK_N, warps, stages[, fused_sets]), got {config!r}")
        config = ScoreLaunch(*config)
        if config.block_m < tiles_per_block or config.block_m % tiles_per_block:
            raise ValueError(
                f"config BLOCK_M={config.block_m} must be a multiple of the {tiles_per_block} tiles of a block"
            )
    candidates = [config] if config is not None else _candidates(tiles_per_block)
    max_m = max(max(c[0] for c in candidates), tiles_per_block)
    steps = triton.cdiv(nb, min(c[1] for c in candidates))
    items = batch * heads * triton.cdiv(num_tiles, min(c[0] for c in candidates))
    programs = _score_programs(items, device, programs_per_sm)
    partial = torch.empty(programs, max_m, nb, device=device, dtype=scratch_dtype(stats.q_tile.dtype))
    row_max = torch.empty(programs, max_m, steps, device=device, dtype=torch.float32)
    args = (
        stats.q_tile.contiguous(),
        stats.q_tile_count.contiguous(),
        *(t.contiguous() for t in key_sets),
        key,
        inputs.source_index,
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
        "DOT_PRECISION": "ieee" if INTERPRETED else "tf32",
    }

    def grid(meta: dict) -> tuple[int]:
        return (min(batch * heads * triton.cdiv(num_tiles, meta["BLOCK_M"]), programs),)

    if INTERPRETED or config is not None:
        chosen = candidates[0]
        meta = {"BLOCK_M": chosen.block_m, "BLOCK_N": chosen.block_n, "FUSED_SETS": chosen.fused_sets}
        _pooled_scores_kernel[grid(meta)](*args, **constants, **meta, num_warps=chosen.warps, num_stages=chosen.stages)
    else:
        _autotuned_scores[grid](*args, **constants)
    return scores
