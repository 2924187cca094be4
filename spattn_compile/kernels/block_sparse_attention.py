"""Rectified block-sparse attention: one Triton kernel (the attend stage of docs/DESIGN.md) and its launcher.

Each program takes `BLOCK_M` query rows of one query block of one (batch, head) and runs a FlashAttention-style online
softmax (fp32 statistics, `exp2` with log2(e) folded into the scale) over the key blocks listed for that query block,
in tiles of `BLOCK_N` keys; it never scans a dense mask. Rectification happens in the same pass: in "block" mode the
epilogue applies `R_i * O + c_i`; in "query" mode each trusted skipped block enters the softmax as one virtual key
(its pooled key, value and `log n_j`), gathered by index in chunks. The epilogue stores canonical row `p` at row
`out_index[p]` of the output (the inverse Hilbert reorder fused into the store; a transposed `(B, S, H, D)` buffer is
written in place).

Q, K and V are read either from canonical copies `(B, H, P, D)` (rows already in the layout's order), or, with
`row_index`, straight from the caller's `(B, H, S, D)` tensors: canonical row `p` is original row `row_index[p]`
(-1: a padding row, read as a zero query and a masked key). Every row is one contiguous D-vector, so a gathered tile
costs the bytes of a contiguous one plus one index vector from L2, and the op needs no copy of its inputs.

Masked keys cost little: a key block without a masked key (the flags come from the launcher) takes no select at all;
in the others the logits of masked keys are set to -inf, and their value rows are never read (a masked load gives
zeros, so a NaN in a masked value row cannot reach `0 * NaN`). Masking the load instead of the loaded tile keeps V on
its path from global memory to shared memory to the tensor cores (a `where` on V would route every tile through
registers and back).

The launcher takes a typed bundle (`AttentionLaunch`, with `BlockRectify` / `QueryRectify`), checks the invariants the
kernel relies on (shapes, dtypes, devices, tiles) and nothing the public API already validated;
`block_sparse_attention(...)` is the keyword form of the same call. Reference semantics:
`reference.rectified_sparse_attention` on the canonical layout, followed by `reference.scatter_canonical`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import triton
import triton.language as tl

from .common import INTERPRETED, check_device, check_kernel_inputs, padded_head_dim

__all__ = [
    "RECTIFY_MODES",
    "AttentionLaunch",
    "BlockRectify",
    "KernelVariant",
    "QueryRectify",
    "TileConfig",
    "autotune_configs",
    "block_sparse_attention",
    "chosen_tile_config",
    "compile_attention",
    "forget_tile_choices",
    "lane_groups",
    "launch_attention",
    "prune_tile_configs",
    "rectify_mode",
]

RECTIFY_MODES = ("none", "block", "query")
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
# Block lists: a plan's int16 (`plan.INDEX_DTYPE`) or int32 (FlexAttention's); the kernel widens each entry it reads.
_BLOCK_LIST_DTYPES = (torch.int16, torch.int32)


# --------------------------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _list_entries(List, entries, mask, PACKED: tl.constexpr):
    """Entries `entries` (flat offsets, masked by `mask` or None) of a plan's block list, as int32. PACKED: the list
    is int16 and `List` its storage viewed as int32 words, each holding two entries (the first in the low half). Why:
    a 2-byte load cannot be an asynchronous copy, and Triton 3.6 then stops pipelining the key and value loads whose
    addresses depend on it (in the TTGIR: 10 asynchronous copies instead of 16; on the H200 the kernel ran 24% slower
    with int16 entries loaded as such). Entries are block numbers below 2^15, so the low 16 bits are the entry."""
    if PACKED:
        if mask is None:
            word = tl.load(List + entries // 2)
        else:
            word = tl.load(List + entries // 2, mask=mask, other=0)
        entry = (word >> ((entries % 2) * 16).to(tl.int32)) & 0xFFFF
    else:
        if mask is None:
            entry = tl.load(List + entries)
        else:
            entry = tl.load(List + entries, mask=mask, other=0)
    return entry.to(tl.int32)


@triton.jit
def _online_softmax_step(m_i, l_i, qk, qk_scale):
    """Fold one tile of raw logits `qk (BLOCK_M, N)` into the running row maximum `m_i` (log2 units) and row sum
    `l_i`. Masked logits are -inf. Returns the tile's weights `p`, the factor `alpha` by which the unnormalised output
    must be scaled before `p @ v` is added to it (`_accumulate`), and the new `m_i`, `l_i`."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    # A row whose keys so far are all masked keeps m = -inf: shift it by 0 so that exp2 gives 0 rather than NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk * qk_scale - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _accumulate(acc, p, alpha, v, DOT_PRECISION: tl.constexpr):
    """`acc * alpha + p @ v` for one lane group of the output (`v (N, lanes)`), the product on the tensor cores."""
    return tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)


@triton.jit
def _load_rows(ptrs, row_ok, offs_d, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, LANES_END: tl.constexpr):
    """Load a `(rows, lanes)` tile of lanes `offs_d` (ending at LANES_END). Rows where `row_ok` is False (when
    MASK_ROWS) and the lanes past HEAD_DIM of a head dim padded to a power of two read as zeros; a tile without either
    is an unmasked load."""
    if MASK_ROWS:
        if LANES_END != HEAD_DIM:
            tile = tl.load(ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if LANES_END != HEAD_DIM:
            tile = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _row_offsets(rows, stride, OFFSETS_32: tl.constexpr):
    """Element offsets of original rows `rows` (int32): 32-bit products when the launcher proved they fit (fewer
    instructions per gathered row), else 64-bit."""
    if OFFSETS_32:
        offsets = rows * stride
    else:
        offsets = rows.to(tl.int64) * stride
    return offsets


# Shape-dependent ints the kernel only multiplies into offsets: not specialised on (so a new resolution reuses the
# compiled kernel); the strides stay specialised (their divisibility gives the vectorised loads).
@triton.jit(
    do_not_specialize=[
        "num_heads",
        "num_q_blocks",
        "num_priority_blocks",
        "plan_batches",
        "kv_list_len",
        "trusted_list_len",
        "num_pooled_blocks",
    ]
)
def _block_sparse_attention_kernel(
    Q,
    K,
    V,
    Out,
    QueryRows,
    KeyRows,
    OutIndex,
    KvCounts,
    KvIndices,
    KeyValid,
    BlockFull,
    Rescale,
    Correction,
    TrustedCounts,
    TrustedIndices,
    KBlock,
    VBlock,
    KBlockLogCount,
    sm_scale,
    num_heads,
    num_q_blocks,
    num_priority_blocks,
    plan_batches,
    kv_list_len,
    trusted_list_len,
    num_pooled_blocks,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_os,
    stride_mask_b,
    stride_mask_h,
    stride_full_b,
    stride_full_h,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    HEAD_SPLIT: tl.constexpr,
    HEAD_REST: tl.constexpr,
    RECTIFY: tl.constexpr,
    GATHER: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_OUT_INDEX: tl.constexpr,
    OFFSETS_32: tl.constexpr,
    SHARED_ROW_OFFSETS: tl.constexpr,
    MASK_V_LOAD: tl.constexpr,
    TRUSTED_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PACKED_LISTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid `(B * H * P / BLOCK_M,)`. RECTIFY: 0 none, 1 block, 2 query. HEAD_SPLIT > 0: the head dim is computed
    as two lane groups, HEAD_SPLIT lanes and HEAD_REST lanes (both powers of two; D = 96 as 64 + 32 wastes no tensor
    work, where one group of HEAD_PAD = 128 lanes wastes a quarter); 0: one group of HEAD_PAD lanes.

    Canonical reads: Q, K, V `(B, H, P, HEAD_DIM)` by strides (last dim contiguous); with HAS_KEY_MASK, KeyValid
    `(B, H, P)` bool by (batch, head) strides (`stride_mask_*`). Gathered reads (GATHER): Q, K, V `(B, H, S,
    HEAD_DIM)` by strides; QueryRows `(P,)` int32, the original row of each canonical query row (-1: padding); KeyRows
    `(B, H, P)` int32 by (batch, head) strides (`stride_mask_*`, 0 when shared), the original row of each canonical
    key, -1 for padding rows and masked keys. With HAS_KEY_MASK, BlockFull `(B, H, NQ)` by (batch, head) strides:
    whether a key block has no masked key. Out `(B, H, S_out, HEAD_DIM)` by strides, row p stored at OutIndex[p]
    when HAS_OUT_INDEX. KvCounts, TrustedCounts int32 `(plan_batches, H, NQ)`, KvIndices int16/int32 `(plan_batches,
    H, NQ, kv_list_len)`, TrustedIndices int16/int32 `(plan_batches, H, NQ, trusted_list_len)` contiguous
    (`plan_batches`: 1 for a plan shared by the batch, else B); Rescale `(B, H, NQ)`, Correction `(B, H, NQ,
    HEAD_DIM)`, KBlock, VBlock `(B, H, num_pooled_blocks, HEAD_DIM)`, KBlockLogCount `(B, H, num_pooled_blocks)`
    contiguous."""
    TILES_PER_BLOCK: tl.constexpr = BLOCK_SIZE // BLOCK_N
    LOG2E: tl.constexpr = 1.4426950408889634
    qk_scale = sm_scale * LOG2E

    # One flat grid over (batch * head, query tile). Programs run head by head so that the ones running together
    # share their head's K and V in L2; the tiles of the last `num_priority_blocks` query blocks of every head (text
    # rows, which attend to every block and take many times longer) run first, so that none is left as a tail.
    TILES_PER_Q_BLOCK: tl.constexpr = BLOCK_SIZE // BLOCK_M
    pid = tl.program_id(0)
    tiles_per_head = num_q_blocks * TILES_PER_Q_BLOCK
    priority_tiles = num_priority_blocks * TILES_PER_Q_BLOCK
    num_priority_programs = (tl.num_programs(0) // tiles_per_head) * priority_tiles
    if pid < num_priority_programs:
        pid_bh = pid // priority_tiles
        pid_m = tiles_per_head - priority_tiles + pid % priority_tiles
    else:
        rest = pid - num_priority_programs
        pid_bh = rest // (tiles_per_head - priority_tiles)
        pid_m = rest % (tiles_per_head - priority_tiles)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    q_block = (pid_m * BLOCK_M) // BLOCK_SIZE
    # Rows of this (batch, head, query block) in the (B, H, NQ, ...) statistics and in the plan.
    stats_row = pid_bh.to(tl.int64) * num_q_blocks + q_block
    plan_row = ((off_b % plan_batches) * num_heads + off_h) * num_q_blocks + q_block

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    # Lanes of the head dim: one group (offs_d), or two (offs_d, offs_e) when HEAD_SPLIT > 0; every product, load
    # and store below is done per group.
    LANES: tl.constexpr = HEAD_SPLIT if HEAD_SPLIT > 0 else HEAD_PAD
    offs_d = tl.arange(0, LANES)
    if HEAD_SPLIT > 0:
        offs_e = HEAD_SPLIT + tl.arange(0, HEAD_REST)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    # KeyValid (canonical reads) or KeyRows (gathered reads) of this (batch, head).
    valid_base = KeyValid + off_b * stride_mask_b + off_h * stride_mask_h
    key_rows_base = KeyRows + off_b * stride_mask_b + off_h * stride_mask_h
    block_full_base = BlockFull + off_b * stride_full_b + off_h * stride_full_h
    # Offsets of a canonical key tile from its first row: loop invariant, so each step adds one scalar row offset.
    k_tile = offs_n[:, None] * stride_ks + offs_d[None, :]
    v_tile = offs_n[:, None] * stride_vs + offs_d[None, :]
    if HEAD_SPLIT > 0:
        k_tile_e = offs_n[:, None] * stride_ks + offs_e[None, :]
        v_tile_e = offs_n[:, None] * stride_vs + offs_e[None, :]

    # Q stays on chip for the whole program: it is loaded once.
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    if GATHER:
        q_rows = tl.load(QueryRows + offs_m)
        q_ok = q_rows >= 0
        q_ptrs = q_base + _row_offsets(q_rows, stride_qs, OFFSETS_32)[:, None]
    else:
        q_ok = offs_m >= 0
        q_ptrs = q_base + offs_m.to(tl.int64)[:, None] * stride_qs
    q = _load_rows(q_ptrs + offs_d[None, :], q_ok, offs_d, GATHER, HEAD_DIM, LANES)
    if HEAD_SPLIT > 0:
        q_e = _load_rows(q_ptrs + offs_e[None, :], q_ok, offs_e, GATHER, HEAD_DIM, HEAD_SPLIT + HEAD_REST)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, LANES], dtype=tl.float32)
    if HEAD_SPLIT > 0:
        acc_e = tl.zeros([BLOCK_M, HEAD_REST], dtype=tl.float32)

    # Real keys: one flat loop over (listed key block, sub-tile) so that the compiler pipelines a single loop.
    kv_count = tl.load(KvCounts + plan_row)
    kv_list = plan_row * kv_list_len  # entry 0 of this row's list
    for step in range(0, kv_count * TILES_PER_BLOCK):
        kv_block = _list_entries(KvIndices, kv_list + step // TILES_PER_BLOCK, None, PACKED_LISTS)
        start_n = kv_block.to(tl.int64) * BLOCK_SIZE + (step % TILES_PER_BLOCK) * BLOCK_N
        if GATHER:
            # Masked keys and padding rows have row -1: neither their K nor their V row is read.
            rows = tl.load(key_rows_base + start_n + offs_n)
            real = rows >= 0
            k_offsets = _row_offsets(rows, stride_ks, OFFSETS_32)[:, None]
            if SHARED_ROW_OFFSETS:
                # K and V rows have one stride: one offset per key serves both loads (25 instructions fewer per
                # step at D = 128 in the sm_90 SASS, the same buffers and pipelining).
                v_offsets = k_offsets
            else:
                v_offsets = _row_offsets(rows, stride_vs, OFFSETS_32)[:, None]
            k_rows = k_base + k_offsets
            v_rows = v_base + v_offsets
            k = _load_rows(k_rows + offs_d[None, :], real, offs_d, True, HEAD_DIM, LANES)
            v = _load_rows(v_rows + offs_d[None, :], real, offs_d, True, HEAD_DIM, LANES)
            if HEAD_SPLIT > 0:
                k_e = _load_rows(k_rows + offs_e[None, :], real, offs_e, True, HEAD_DIM, HEAD_SPLIT + HEAD_REST)
                v_e = _load_rows(v_rows + offs_e[None, :], real, offs_e, True, HEAD_DIM, HEAD_SPLIT + HEAD_REST)
        else:
            # The value rows of masked keys are not read (a zero weight times a NaN in them would be NaN).
            MASK_V: tl.constexpr = HAS_KEY_MASK and MASK_V_LOAD
            if MASK_V:
                v_ok = tl.load(valid_base + start_n + offs_n) != 0
            else:
                v_ok = offs_n >= 0
            k = _load_rows(k_base + start_n * stride_ks + k_tile, offs_n >= 0, offs_d, False, HEAD_DIM, LANES)
            v = _load_rows(v_base + start_n * stride_vs + v_tile, v_ok, offs_d, MASK_V, HEAD_DIM, LANES)
            if HEAD_SPLIT > 0:
                END: tl.constexpr = HEAD_SPLIT + HEAD_REST
                k_e = _load_rows(k_base + start_n * stride_ks + k_tile_e, offs_n >= 0, offs_e, False, HEAD_DIM, END)
                v_e = _load_rows(v_base + start_n * stride_vs + v_tile_e, v_ok, offs_e, MASK_V, HEAD_DIM, END)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HEAD_SPLIT > 0:
            qk = tl.dot(q_e, tl.trans(k_e), qk, input_precision=DOT_PRECISION)
        if HAS_KEY_MASK:
            # Only blocks holding a masked key or a padding row pay for the select (most blocks have none).
            if tl.load(block_full_base + kv_block) == 0:
                if GATHER:
                    key_ok = tl.load(key_rows_base + start_n + offs_n) >= 0
                else:
                    key_ok = tl.load(valid_base + start_n + offs_n) != 0
                qk = tl.where(key_ok[None, :], qk, float("-inf"))
                if not MASK_V_LOAD:
                    # The previous kernel's formulation, selectable for measurement: V goes through registers.
                    v = tl.where(key_ok[:, None], v, tl.zeros_like(v))
                    if HEAD_SPLIT > 0:
                        v_e = tl.where(key_ok[:, None], v_e, tl.zeros_like(v_e))
        p, alpha, m_i, l_i = _online_softmax_step(m_i, l_i, qk, qk_scale)
        acc = _accumulate(acc, p, alpha, v, DOT_PRECISION)
        if HEAD_SPLIT > 0:
            acc_e = _accumulate(acc_e, p, alpha, v_e, DOT_PRECISION)

    if RECTIFY == 2:
        # Query mode: trusted skipped block j is one virtual key with logit scale * q . k_bar_j + log n_j; the
        # log n_j term is divided by the scale because the softmax step multiplies every raw logit by it.
        trusted_count = tl.load(TrustedCounts + plan_row)
        trusted_list = plan_row * trusted_list_len
        pooled_base = pid_bh.to(tl.int64) * num_pooled_blocks
        offs_t = tl.arange(0, TRUSTED_CHUNK)
        for first in range(0, trusted_count, TRUSTED_CHUNK):
            slot = first + offs_t
            listed = slot < trusted_count
            pooled = pooled_base + _list_entries(TrustedIndices, trusted_list + slot, listed, PACKED_LISTS)
            pooled_rows = KBlock + pooled[:, None] * HEAD_DIM
            pooled_values = VBlock + pooled[:, None] * HEAD_DIM
            k_bar = _load_rows(pooled_rows + offs_d[None, :], listed, offs_d, True, HEAD_DIM, LANES)
            v_bar = _load_rows(pooled_values + offs_d[None, :], listed, offs_d, True, HEAD_DIM, LANES)
            log_count = tl.load(KBlockLogCount + pooled, mask=listed, other=float("-inf"))
            qk = tl.dot(q, tl.trans(k_bar.to(q.dtype)), input_precision=DOT_PRECISION)
            if HEAD_SPLIT > 0:
                END_BAR: tl.constexpr = HEAD_SPLIT + HEAD_REST
                k_bar_e = _load_rows(pooled_rows + offs_e[None, :], listed, offs_e, True, HEAD_DIM, END_BAR)
                v_bar_e = _load_rows(pooled_values + offs_e[None, :], listed, offs_e, True, HEAD_DIM, END_BAR)
                qk = tl.dot(q_e, tl.trans(k_bar_e.to(q.dtype)), qk, input_precision=DOT_PRECISION)
            qk = qk + log_count[None, :] / sm_scale
            p, alpha, m_i, l_i = _online_softmax_step(m_i, l_i, qk, qk_scale)
            acc = _accumulate(acc, p, alpha, v_bar.to(q.dtype), DOT_PRECISION)
            if HEAD_SPLIT > 0:
                acc_e = _accumulate(acc_e, p, alpha, v_bar_e.to(q.dtype), DOT_PRECISION)

    if HAS_OUT_INDEX:
        dest = tl.load(OutIndex + offs_m).to(tl.int64)
    else:
        dest = offs_m.to(tl.int64)
    out_rows = Out + off_b * stride_ob + off_h * stride_oh + dest[:, None] * stride_os
    # Rows with no allowed key have l = 0 and acc = 0: they output 0, never NaN.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    _store_lanes(out_rows, acc, l_safe, dest, offs_d, Rescale, Correction, stats_row, RECTIFY, HEAD_DIM)
    if HEAD_SPLIT > 0:
        _store_lanes(out_rows, acc_e, l_safe, dest, offs_e, Rescale, Correction, stats_row, RECTIFY, HEAD_DIM)


@triton.jit
def _store_lanes(out_rows, acc, l_safe, dest, offs_d, Rescale, Correction, stats_row, RECTIFY: tl.constexpr,
                 HEAD_DIM: tl.constexpr):  # fmt: skip
    """The epilogue for the lanes `offs_d` of the output: normalise, block rectification (`R_i * O + c_i`), store at
    the rows `dest` (rows < 0 and lanes past HEAD_DIM are not stored)."""
    out = acc / l_safe[:, None]
    if RECTIFY == 1:
        rescale = tl.load(Rescale + stats_row)
        correction = tl.load(Correction + stats_row * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        out = out * rescale + correction[None, :]
    out_ptrs = out_rows + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_rows.dtype.element_ty), mask=(dest >= 0)[:, None] & (offs_d < HEAD_DIM)[None, :])


# --------------------------------------------------------------------------------------------------------------------
# Tile configurations and structural variants
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """An explicit tile configuration: query rows per program, keys per step, warps, software-pipeline stages and an
    optional register cap per thread (ptxas `maxnreg`; None: the compiler's choice). Both tiles are powers of two
    >= 16 and must divide the plan's block size. A cap of 128 with 8 warps lets two programs share an SM (65,536
    registers) when their shared memory fits too (<= 113 KB each): one program's softmax then overlaps the other's
    products, which Triton 3.6 does not do within one program on Hopper."""

    block_m: int
    block_n: int
    num_warps: int = 8
    num_stages: int = 3
    max_registers: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int) or size < 16 or size & (size - 1):
                raise ValueError(f"TileConfig.{name}={size!r}: expected a power of two >= 16")
        regs = self.max_registers
        if regs is not None and (isinstance(regs, bool) or not isinstance(regs, int) or not 24 <= regs <= 255):
            raise ValueError(f"TileConfig.max_registers={regs!r}: expected None or an int in [24, 255]")

    @classmethod
    def of(cls, config: triton.Config) -> TileConfig:
        maxnreg = getattr(config, "maxnreg", None)
        return cls(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages, maxnreg)

    def to_triton(self) -> triton.Config:
        return triton.Config(
            {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n},
            num_warps=self.num_warps,
            num_stages=self.num_stages,
            maxnreg=self.max_registers,
        )

    def launch_options(self) -> dict[str, int]:
        options = {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }
        if self.max_registers is not None:
            options["maxnreg"] = self.max_registers
        return options

    def __str__(self) -> str:
        regs = f" regs<={self.max_registers}" if self.max_registers is not None else ""
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}{regs}"


@dataclasses.dataclass(frozen=True)
class KernelVariant:
    """Structural choices of the kernel, selectable so that a benchmark can compare them in one run (the defaults are
    the expected best; benchmarks/NOTES_attention.md has the counts and the measurements).

    key_mask (canonical reads): "load" leaves the value rows of masked keys unread (a masked load; V stays on the
        shared-memory path of the tensor cores); "select" zeroes them with a `where` on the loaded tile (the previous
        kernel: V makes a round trip through registers). Gathered reads never read a masked key's rows.
    pooled_dtype (query mode): "input" casts the pooled keys and values to the inputs' dtype once in the launcher
        (half the bytes per virtual key, no cast in the loop); "float32" reads them as given.
    trusted_chunk (query mode): virtual keys per step (None: 64 on the GPU, 16 under the interpreter).
    head_lanes: "pad" computes a head dim that is not a power of two over the next power of two's lanes (D = 96 as
        128: a quarter of the tensor work and of the accumulator's registers is padding); "split" computes it as two
        lane groups, half the padded width and the rest's power of two (96 = 64 + 32, 80 = 64 + 16), two products
        per step each for QK^T and PV, no lane wasted at D = 96 (`lane_groups`). Powers of two are never split.
    row_offsets (gathered reads): "shared" computes one row offset per key for both the K and the V load when their
        rows have the same stride (fewer address instructions per step); "separate" one per tensor.
    """

    key_mask: Literal["load", "select"] = "load"
    pooled_dtype: Literal["input", "float32"] = "input"
    trusted_chunk: int | None = None
    head_lanes: Literal["pad", "split"] = "pad"
    row_offsets: Literal["separate", "shared"] = "separate"

    def __post_init__(self) -> None:
        if self.key_mask not in ("load", "select"):
            raise ValueError(f"KernelVariant.key_mask={self.key_mask!r}: expected 'load' or 'select'")
        if self.pooled_dtype not in ("input", "float32"):
            raise ValueError(f"KernelVariant.pooled_dtype={self.pooled_dtype!r}: expected 'input' or 'float32'")
        chunk = self.trusted_chunk
        if chunk is not None and (not isinstance(chunk, int) or chunk < 16 or chunk & (chunk - 1)):
            raise ValueError(f"KernelVariant.trusted_chunk={chunk!r}: expected None or a power of two >= 16")
        if self.head_lanes not in ("pad", "split"):
            raise ValueError(f"KernelVariant.head_lanes={self.head_lanes!r}: expected 'pad' or 'split'")
        if self.row_offsets not in ("separate", "shared"):
            raise ValueError(f"KernelVariant.row_offsets={self.row_offsets!r}: expected 'separate' or 'shared'")


def lane_groups(head_dim: int, head_lanes: str = "split") -> tuple[int, int]:
    """The kernel's `(HEAD_SPLIT, HEAD_REST)` for a head dim: `(0, 0)` for one group of `padded_head_dim(head_dim)`
    lanes (head_lanes "pad", a power of two, or no lane saved by splitting), else the two groups' widths."""
    padded = padded_head_dim(head_dim)
    if head_lanes == "pad" or padded == head_dim:
        return 0, 0
    first = padded // 2
    rest = padded_head_dim(head_dim - first)
    return (first, rest) if first + rest < padded else (0, 0)


# Autotuning candidates per (padded head dim, gathered reads), for Hopper. The stages come from the compiled kernels'
# shared-memory buffers (benchmarks/NOTES_attention.md): canonical reads get three K/V buffers (two tiles in flight) at
# 3 stages, gathered reads (one more level of indirection: list -> row index -> rows) at 5; that is 224-226 KB of the
# 227 KB an H100/H200 block may use with 128 x 128 tiles at D = 128. (128, 128, 8 warps) won at D = 128 on an H100
# with the previous kernel; (64, 64, 4 warps) runs two programs per SM (115 KB each), whose softmax and products can
# overlap, at twice the L2 traffic per FLOP. The register-capped candidates also run two programs per SM, at the
# L2 traffic of 128-row tiles (sm_90 compiles, gathered, query mode: 128 registers, 82 KB at D = 64 with no spill;
# 98.5 KB at D = 128 with one spilled value reloaded per step).
def _tiles(*tiles: tuple[int, ...]) -> tuple[TileConfig, ...]:
    return tuple(TileConfig(*tile) for tile in tiles)


_CANDIDATES: dict[tuple[int, bool], tuple[TileConfig, ...]] = {
    (64, False): _tiles((128, 128, 8, 3), (128, 128, 8, 4), (64, 64, 4, 3)),
    (64, True): _tiles((128, 128, 8, 5), (128, 128, 8, 7), (64, 64, 4, 5), (128, 128, 8, 4, 128)),
    (128, False): _tiles((128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)),
    (128, True): _tiles((128, 128, 8, 5), (128, 128, 8, 3), (64, 64, 4, 5), (128, 64, 8, 3, 128)),
    (256, False): _tiles((64, 64, 4, 2), (64, 64, 4, 3)),
    (256, True): _tiles((64, 64, 4, 3), (64, 64, 4, 4)),
}
_SMALL_BLOCK_CANDIDATES = _tiles((64, 64, 4, 3), (32, 32, 4, 3), (16, 16, 4, 2))


def _tile_key(tile: TileConfig) -> tuple[int, int, int, int, int]:
    return (tile.block_m, tile.block_n, tile.num_warps, tile.num_stages, tile.max_registers or 0)


def autotune_configs() -> list[triton.Config]:
    """Every candidate tile configuration of the CUDA path (before pruning by head dim and block size)."""
    tiles = {tile for candidates in _CANDIDATES.values() for tile in candidates} | set(_SMALL_BLOCK_CANDIDATES)
    return [tile.to_triton() for tile in sorted(tiles, key=_tile_key, reverse=True)]


def _candidate_tiles(block_size: int, head_pad: int, gather: bool) -> list[TileConfig]:
    """The candidates of a call whose tiles divide its block size; for blocks smaller than those tiles, the largest
    small tiles that fit."""
    wanted = _CANDIDATES[(64 if head_pad <= 64 else 128 if head_pad <= 128 else 256, gather)]
    tiles = [tile for tile in wanted if tile.block_m <= block_size and tile.block_n <= block_size]
    if not tiles:
        small = [t for t in _SMALL_BLOCK_CANDIDATES if t.block_m <= block_size and t.block_n <= block_size]
        tiles = [tile for tile in small if tile.block_m == small[0].block_m]
    return tiles


def prune_tile_configs(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list[triton.Config]:
    """The autotuner's pruning hook: the candidates of the call's padded head dim, read mode and block size."""
    args = {**named_args, **kwargs}
    tiles = _candidate_tiles(int(args["BLOCK_SIZE"]), int(args["HEAD_PAD"]), bool(args["GATHER"]))
    return [config for config in configs if TileConfig.of(config) in tiles]


# The shape is in the key (query blocks and heads, whose product sets the number of programs): keyed by constexprs
# alone, the first call's shape (a small warm-up, a short clip) would choose the tile of every later one.
_AUTOTUNE_KEY = [
    "num_q_blocks",
    "num_heads",
    "BLOCK_SIZE",
    "HEAD_DIM",
    "HEAD_PAD",
    "HEAD_SPLIT",
    "RECTIFY",
    "GATHER",
    "HAS_KEY_MASK",
    "HAS_OUT_INDEX",
    "OFFSETS_32",
    "SHARED_ROW_OFFSETS",
    "MASK_V_LOAD",
    "TRUSTED_CHUNK",
]
_autotuned_kernel = triton.autotune(
    configs=autotune_configs(),
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": prune_tile_configs},
)(_block_sparse_attention_kernel)


def forget_tile_choices() -> None:
    """Drop the autotuner's choices. They are keyed by the kernel's constexprs (`_AUTOTUNE_KEY`), not by shapes: the
    first call of a key decides for every later shape, so a benchmark that compares shapes starts each afresh."""
    getattr(_autotuned_kernel, "cache", {}).clear()


def chosen_tile_config() -> TileConfig | None:
    """The configuration the autotuner chose at the last CUDA launch (None before the first one)."""
    best = getattr(_autotuned_kernel, "best_config", None)
    return None if best is None else TileConfig.of(best)


def _interpreter_config(block_size: int) -> TileConfig:
    # Under TRITON_INTERPRET=1 a fixed configuration runs (timing candidates under the interpreter would time numpy).
    return TileConfig(min(block_size, 64), min(block_size, 32), num_warps=4, num_stages=1)


# --------------------------------------------------------------------------------------------------------------------
# The launch bundle
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockRectify:
    """Block mode: the output of query block i is `rescale[i] * O + correction[i]`. rescale fp32 `(B, H, NQ)`,
    correction fp32 `(B, H, NQ, D)`."""

    rescale: torch.Tensor
    correction: torch.Tensor


@dataclasses.dataclass(frozen=True)
class QueryRectify:
    """Query mode: the trusted skipped blocks of query block i join its softmax as virtual keys.
    trusted_counts int32 `(B, H, NQ)`; trusted_indices int16/int32 `(B, H, NQ, T)` into the `NB` pooled blocks (first
    `trusted_counts` entries read); k_block, v_block `(B, H, NB, D)` float16/bfloat16/float32 (cast to the inputs'
    dtype for the products); k_block_log_count fp32 `(B, H, NB)`, the log of each pooled block's unmasked key count."""

    trusted_counts: torch.Tensor
    trusted_indices: torch.Tensor
    k_block: torch.Tensor
    v_block: torch.Tensor
    k_block_log_count: torch.Tensor


@dataclasses.dataclass(frozen=True)
class AttentionLaunch:
    """One call of the attention kernel (shapes: B batch, H heads, D head dim, P canonical rows, NQ = P / block_size).

    q, k, v: one dtype (float16, bfloat16, float32), last dim contiguous, other strides free (an expanded batch or
        head dim is fine). Canonical reads (`row_index` None): `(B, H, P, D)` in the canonical layout. Gathered reads:
        `(B, H, S, D)` in the original order, e.g. `(B, S, H, D)` buffers viewed as `(B, H, S, D)`.
    kv_counts int32 `(B, H, NQ)`, kv_indices int16/int32 `(B, H, NQ, L)`: the key blocks of each query block (first
        `kv_counts` entries read; ascending order keeps the reads sequential). A batch-expanded plan is read once.
    scale: softmax scale. block_size: rows per block, a power of two in [16, 256].
    key_valid: bool `(B, H, P)` in canonical order (any strides over B and H), False for masked keys; None: every key
        is valid (except padding rows of gathered reads).
    rectify: None, `BlockRectify` or `QueryRectify`.
    row_index: int32/int64 `(P,)`, canonical row -> original row, -1 for a padding row (read as a zero query and a
        masked key): Q, K and V are read through it. None: they are canonical copies.
    out_index: int32/int64 `(P,)`: canonical row p is stored at row `out_index[p]` of `out` (-1: not stored).
        Defaults to `row_index` (None for canonical reads: row p goes to row p). Entries >= 0 must be distinct and in
        range (not checked on the host, which would synchronise).
    out: `(B, H, S_out, D)` destination, last dim contiguous; None: a new tensor of q's dtype with `S` rows (gathered)
        or `P` rows (canonical, no out_index).
    priority_query_blocks: the last `priority_query_blocks` query blocks of every head run first (text rows: they
        attend to every block and take ~1/density times longer than video rows).
    tile_config: a `TileConfig` instead of the autotuned one (CUDA) or the interpreter's fixed one.
    variant: structural choices (`KernelVariant`).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    scale: float
    block_size: int
    key_valid: torch.Tensor | None = None
    rectify: BlockRectify | QueryRectify | None = None
    row_index: torch.Tensor | None = None
    out_index: torch.Tensor | None = None
    out: torch.Tensor | None = None
    priority_query_blocks: int = 0
    tile_config: TileConfig | None = None
    variant: KernelVariant = KernelVariant()


def _expect(name: str, tensor: torch.Tensor, shape: Sequence[int | None], dtypes, device: torch.device) -> None:
    """The launcher's one tensor check: dtype, shape (None: any size), device, and for 4-D tensors (the attention
    operands and the output) a contiguous last dim."""
    if tensor.dtype not in dtypes:
        allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be {allowed}, got {tensor.dtype}")
    if tensor.dim() != len(shape) or any(e is not None and e != s for e, s in zip(shape, tensor.shape)):
        wanted = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise ValueError(f"{name} must have shape {wanted}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device} (the device of q)")
    if tensor.dim() == 4 and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {tensor.stride()}")


def _check(launch: AttentionLaunch) -> tuple[int, int]:
    """Check the invariants the kernel relies on (the public API validated everything else); returns the canonical
    length P and the number of query blocks NQ."""
    q, block_size, row_index, rectify = launch.q, launch.block_size, launch.row_index, launch.rectify
    device = q.device
    check_device(device, "q")
    if INTERPRETED and q.dtype == torch.bfloat16:
        # The interpreter's tl.dot on bfloat16 returns wrong values instead of failing: refuse rather than mislead.
        raise TypeError("q is bfloat16: the Triton interpreter cannot multiply bfloat16, use float16 or float32")
    _expect("q", q, (None,) * 4, _INPUT_DTYPES, device)
    check_kernel_inputs("q", q)
    batch, heads, seq_len, head_dim = q.shape
    padded_len = seq_len if row_index is None else row_index.shape[-1]
    if block_size not in (16, 32, 64, 128, 256) or padded_len % block_size or not batch * heads * padded_len:
        raise ValueError(
            f"block_size must be a power of two in [16, 256] dividing the {padded_len} canonical rows "
            f"and (B, H) non-empty, got block_size={block_size!r}, B={batch}, H={heads}"
        )
    nq = padded_len // block_size
    if not 0 <= launch.priority_query_blocks <= nq:
        raise ValueError(f"priority_query_blocks must be in [0, {nq}], got {launch.priority_query_blocks}")
    tile = launch.tile_config
    if tile is not None and (block_size % tile.block_m or block_size % tile.block_n):
        raise ValueError(f"tile_config {tile} does not divide block_size={block_size}")
    out_index = launch.out_index if launch.out_index is not None else row_index
    if launch.out is None and out_index is not None and row_index is None:
        raise ValueError("out must be given with out_index for canonical reads: the output length is unknown")
    expected: list[tuple[str, torch.Tensor | None, tuple[int | None, ...], tuple[torch.dtype, ...]]] = [
        ("k", launch.k, q.shape, (q.dtype,)),
        ("v", launch.v, q.shape, (q.dtype,)),
        ("kv_counts", launch.kv_counts, (batch, heads, nq), (torch.int32,)),
        ("kv_indices", launch.kv_indices, (batch, heads, nq, None), _BLOCK_LIST_DTYPES),
        ("key_valid", launch.key_valid, (batch, heads, padded_len), (torch.bool,)),
        ("row_index", row_index, (padded_len,), _INDEX_DTYPES),
        ("out_index", out_index, (padded_len,), _INDEX_DTYPES),
        ("out", launch.out, (batch, heads, padded_len if out_index is None else None, head_dim), _INPUT_DTYPES),
    ]
    if isinstance(rectify, BlockRectify):
        expected += [
            ("rescale", rectify.rescale, (batch, heads, nq), (torch.float32,)),
            ("correction", rectify.correction, (batch, heads, nq, head_dim), (torch.float32,)),
        ]
    if isinstance(rectify, QueryRectify):
        num_pooled = rectify.k_block.shape[2] if rectify.k_block.dim() == 4 else -1
        expected += [
            ("trusted_counts", rectify.trusted_counts, (batch, heads, nq), (torch.int32,)),
            ("trusted_indices", rectify.trusted_indices, (batch, heads, nq, None), _BLOCK_LIST_DTYPES),
            ("k_block", rectify.k_block, (batch, heads, num_pooled, head_dim), _INPUT_DTYPES),
            ("v_block", rectify.v_block, (batch, heads, num_pooled, head_dim), _INPUT_DTYPES),
            ("k_block_log_count", rectify.k_block_log_count, (batch, heads, num_pooled), (torch.float32,)),
        ]
    for name, tensor, shape, dtypes in expected:
        if tensor is not None:
            _expect(name, tensor, shape, dtypes, device)
    return padded_len, nq


def _shared_dims(mask: torch.Tensor) -> torch.Tensor:
    """`mask (B, H, P)` without its expanded (stride-0) batch and head dims: `(B|1, H|1, P)`."""
    for dim in (0, 1):
        if mask.stride(dim) == 0:
            mask = mask.narrow(dim, 0, 1)
    return mask


def _batch_head_strides(tensor: torch.Tensor) -> tuple[int, int]:
    """Strides of a `(B|1, H|1, ...)` tensor's first two dims, 0 where the dim is shared."""
    return (tensor.stride(0) if tensor.shape[0] > 1 else 0, tensor.stride(1) if tensor.shape[1] > 1 else 0)


@dataclasses.dataclass(frozen=True)
class _KeyMask:
    """The key side of one launch as the kernel reads it. Gathered reads: `query_rows` int32 `(P,)` and `key_rows`
    int32 `(B|1, H|1, P)`, the original row of each canonical key or -1 for a padding row or a masked key (whose K
    and V rows are then never read). Canonical reads: `key_valid` bool `(B|1, H|1, P)` or None. `block_full` bool
    `(B|1, H|1, NQ)`: the key blocks with no masked key (the kernel skips their select)."""

    query_rows: torch.Tensor | None
    key_rows: torch.Tensor | None
    key_valid: torch.Tensor | None
    block_full: torch.Tensor | None

    @classmethod
    def of(cls, launch: AttentionLaunch, num_blocks: int) -> _KeyMask:
        valid = None if launch.key_valid is None else _shared_dims(launch.key_valid)
        if launch.row_index is None:
            if valid is None:
                return cls(None, None, None, None)
            valid = valid if valid.stride(-1) == 1 else valid.contiguous()
            return cls(None, None, valid, valid.unflatten(-1, (num_blocks, -1)).all(-1))
        query_rows = launch.row_index.to(torch.int32)
        key_rows = query_rows.expand(1, 1, -1) if valid is None else torch.where(valid, query_rows, -1)
        return cls(query_rows, key_rows, None, (key_rows >= 0).unflatten(-1, (num_blocks, -1)).all(-1))

    def strides(self) -> tuple[int, int, int, int]:
        """(batch, head) strides of the per-key tensor and of `block_full` (0 where shared)."""
        per_key = self.key_rows if self.key_rows is not None else self.key_valid
        if per_key is None or self.block_full is None:
            return (0, 0, 0, 0)
        return (*_batch_head_strides(per_key), *_batch_head_strides(self.block_full))


def _plan_rows(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """The plan tensors as the kernel reads them: one batch row when every one is expanded over the batch (a plan
    shared by the batch, read without copying it B times), else contiguous."""
    batch = tensors[0].shape[0]
    if batch > 1 and all(t.stride(0) == 0 for t in tensors):
        return [t[:1].contiguous() for t in tensors], 1
    return [t.contiguous() for t in tensors], batch


def _block_lists(lists: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """The plan's block lists (contiguous) as the kernel reads them: int16 lists as their storage viewed as int32
    words (`_list_entries` unpacks them; no copy) when every one can be viewed so (an even number of entries from an
    even offset), else every list as int32 (a copy: a lone plan of odd size). Returns the lists and whether they are
    packed."""
    if all(t.dtype == torch.int16 for t in lists):
        flat = [t.reshape(-1) for t in lists]
        if all(f.numel() % 2 == 0 and f.storage_offset() % 2 == 0 for f in flat):
            return [f.view(torch.int32) for f in flat], True
    return [t.to(torch.int32) for t in lists], False


@dataclasses.dataclass(frozen=True)
class _KernelCall:
    grid: Callable[[dict], tuple[int]]
    args: tuple
    options: dict[str, Any]
    tile: TileConfig | None
    out: torch.Tensor

    def run(self) -> torch.Tensor:
        if self.tile is None:
            _autotuned_kernel[self.grid](*self.args, **self.options)
        else:
            _block_sparse_attention_kernel[self.grid](*self.args, **self.options, **self.tile.launch_options())
        return self.out

    def compile(self) -> list[Any]:
        """Compile without launching (under `triton.AsyncCompileMode` the compiles run in its executor); every
        autotuning candidate when the tiles are not fixed. Nothing to do under the interpreter."""
        if INTERPRETED:
            return []
        options = self.options
        candidates = _candidate_tiles(options["BLOCK_SIZE"], options["HEAD_PAD"], options["GATHER"])
        tiles = [self.tile] if self.tile is not None else candidates
        return [
            _block_sparse_attention_kernel.warmup(*self.args, grid=self.grid, **options, **tile.launch_options())
            for tile in tiles
        ]


def _prepare(launch: AttentionLaunch) -> _KernelCall:
    """Check the launch and pack the kernel's arguments."""
    padded_len, num_q_blocks = _check(launch)
    q, k, v, rectify = launch.q, launch.k, launch.v, launch.rectify
    batch, heads, seq_len, head_dim = q.shape
    masks = _KeyMask.of(launch, num_q_blocks)
    out_index = launch.out_index if launch.out_index is not None else launch.row_index
    out = launch.out if launch.out is not None else q.new_empty(batch, heads, seq_len, head_dim)
    (kv_counts, kv_indices, *trusted), plan_batches = _plan_rows(
        [launch.kv_counts, launch.kv_indices]
        + ([rectify.trusted_counts, rectify.trusted_indices] if isinstance(rectify, QueryRectify) else [])
    )
    unused = {dtype: q.new_empty(1, dtype=dtype) for dtype in (torch.int32, torch.float32, torch.bool)}
    rescale = correction = k_block = v_block = log_count = unused[torch.float32]
    trusted_counts = trusted_indices = unused[torch.int32]
    if isinstance(rectify, BlockRectify):
        rescale, correction = rectify.rescale.contiguous(), rectify.correction.contiguous()
    if isinstance(rectify, QueryRectify):
        trusted_counts, trusted_indices = trusted
        cast = q.dtype if launch.variant.pooled_dtype == "input" else None
        k_block, v_block = (t.to(cast or t.dtype).contiguous() for t in (rectify.k_block, rectify.v_block))
        log_count = rectify.k_block_log_count.contiguous()
    kv_list_len, trusted_list_len = kv_indices.shape[-1], trusted_indices.shape[-1]
    lists, packed = _block_lists([kv_indices] + ([trusted_indices] if isinstance(rectify, QueryRectify) else []))
    kv_indices, trusted_indices = lists[0], lists[1] if len(lists) > 1 else trusted_indices
    args = (
        q,
        k,
        v,
        out,
        *(t if t is not None else unused[torch.int32] for t in (masks.query_rows, masks.key_rows)),
        out_index.contiguous() if out_index is not None else unused[torch.int32],
        kv_counts,
        kv_indices,
        *(t if t is not None else unused[torch.bool] for t in (masks.key_valid, masks.block_full)),
        rescale,
        correction,
        trusted_counts,
        trusted_indices,
        k_block,
        v_block,
        log_count,
        float(launch.scale),
        heads,
        num_q_blocks,
        launch.priority_query_blocks,
        plan_batches,
        kv_list_len,
        trusted_list_len,
        k_block.shape[2] if k_block.dim() == 4 else 1,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        *masks.strides(),
    )
    options: dict[str, Any] = {
        "BLOCK_SIZE": launch.block_size,
        "HEAD_DIM": head_dim,
        "HEAD_PAD": padded_head_dim(head_dim),
        **dict(zip(("HEAD_SPLIT", "HEAD_REST"), lane_groups(head_dim, launch.variant.head_lanes))),
        "RECTIFY": RECTIFY_MODES.index(rectify_mode(rectify)),
        "GATHER": masks.query_rows is not None,
        "HAS_KEY_MASK": masks.block_full is not None,
        "HAS_OUT_INDEX": out_index is not None,
        # Every row offset of a gathered read fits 32 bits: the kernel then multiplies in 32 bits.
        "OFFSETS_32": max((seq_len - 1) * t.stride(2) + head_dim for t in (q, k, v)) < 2**31,
        "SHARED_ROW_OFFSETS": launch.variant.row_offsets == "shared" and k.stride(2) == v.stride(2),
        "MASK_V_LOAD": launch.variant.key_mask == "load",
        # The interpreter takes the smallest chunk so that tiny CPU shapes still span several chunks.
        "TRUSTED_CHUNK": launch.variant.trusted_chunk or (16 if INTERPRETED else 64),
        # fp32 inputs get exact fp32 products (no tf32), as the tests' tolerances assume; 16-bit inputs ignore it.
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "PACKED_LISTS": packed,
    }
    tile = launch.tile_config or (_interpreter_config(launch.block_size) if INTERPRETED else None)

    def grid(meta: dict) -> tuple[int]:
        return (batch * heads * (padded_len // meta["BLOCK_M"]),)

    return _KernelCall(grid, args, options, tile, out)


def rectify_mode(rectify: BlockRectify | QueryRectify | None) -> str:
    """The `RECTIFY_MODES` name of a rectification bundle."""
    if rectify is None:
        return "none"
    if isinstance(rectify, BlockRectify):
        return "block"
    if isinstance(rectify, QueryRectify):
        return "query"
    raise TypeError(f"rectify must be None, BlockRectify or QueryRectify, got {type(rectify).__name__}")


def launch_attention(launch: AttentionLaunch) -> torch.Tensor:
    """Run the kernel for one `AttentionLaunch`; returns the output tensor (`launch.out` when given).

    Each query row attends exactly (fp32 online softmax) to the valid keys of its listed blocks, plus the virtual keys
    in query mode; rows with nothing to attend output 0 (block mode: `correction`)."""
    return _prepare(launch).run()


def compile_attention(launch: AttentionLaunch) -> Any:
    """Compile the kernel(s) that `launch_attention(launch)` would run, without running them (every autotuning
    candidate when no tile configuration is given). Under `triton.AsyncCompileMode(executor)` the compiles run in the
    executor, so that a benchmark can build many variants in parallel."""
    return _prepare(launch).compile()


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    scale: float,
    block_size: int,
    key_valid: torch.Tensor | None = None,
    rectify: str = "none",
    rescale: torch.Tensor | None = None,
    correction: torch.Tensor | None = None,
    trusted_counts: torch.Tensor | None = None,
    trusted_indices: torch.Tensor | None = None,
    k_block: torch.Tensor | None = None,
    v_block: torch.Tensor | None = None,
    k_block_log_count: torch.Tensor | None = None,
    row_index: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    priority_query_blocks: int = 0,
    tile_config: TileConfig | None = None,
    variant: KernelVariant | None = None,
) -> torch.Tensor:
    """`launch_attention` with the rectification inputs as keywords (see `AttentionLaunch`, `BlockRectify`,
    `QueryRectify`): rectify "none", "block" (rescale, correction) or "query" (trusted_counts, trusted_indices,
    k_block, v_block, k_block_log_count); each mode takes exactly its own inputs."""
    given = {
        "block": {"rescale": rescale, "correction": correction},
        "query": {
            "trusted_counts": trusted_counts,
            "trusted_indices": trusted_indices,
            "k_block": k_block,
            "v_block": v_block,
            "k_block_log_count": k_block_log_count,
        },
    }
    if rectify not in RECTIFY_MODES:
        raise ValueError(f"rectify must be one of {RECTIFY_MODES}, got {rectify!r}")
    for mode, inputs in given.items():
        for name, value in inputs.items():
            if (value is None) == (mode == rectify):
                raise ValueError(
                    f"rectify={rectify!r} needs {name}"
                    if mode == rectify
                    else f"{name} is only used by rectify={mode!r}, got rectify={rectify!r}"
                )
    bundle: BlockRectify | QueryRectify | None = None
    if rectify == "block":
        bundle = BlockRectify(**given["block"])  # type: ignore[arg-type]
    elif rectify == "query":
        bundle = QueryRectify(**given["query"])  # type: ignore[arg-type]
    return launch_attention(
        AttentionLaunch(
            q,
            k,
            v,
            kv_counts,
            kv_indices,
            scale,
            block_size,
            key_valid,
            bundle,
            row_index,
            out_index,
            out,
            priority_query_blocks,
            tile_config,
            variant or KernelVariant(),
        )
    )
