"""Rectified block-sparse attention: one Triton kernel (stage 3 of docs/DESIGN.md) and its Python launcher.

This module owns the attention kernel of the canonical layout and nothing else: each program takes `BLOCK_M` query
rows of one query block of one (batch, head), runs a FlashAttention-style online softmax (fp32 statistics, `exp2`
with log2(e) folded into the scale) over the key blocks listed for that query block, in tiles of `BLOCK_N` keys, and
never scans a dense mask. Rectification happens in the same pass: in "block" mode the epilogue applies `R_i * O + c_i`;
in "query" mode each trusted skipped block enters the softmax as one virtual key (its pooled key, value and
`log n_j`), gathered by index in chunks. The epilogue stores canonical row `p` at row `out_index[p]` of the output,
which fuses the inverse Hilbert reorder into the store (and can write a transposed `(B, S, H, D)` buffer in place).
The launcher `block_sparse_attention` validates its inputs and picks the tile configuration (autotuned on CUDA; a
fixed one under the Triton interpreter). Reference semantics: `reference.rectified_sparse_attention` followed by
`reference.scatter_canonical`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import INTERPRETED, check_kernel_inputs, padded_head_dim

__all__ = [
    "RECTIFY_MODES",
    "TileConfig",
    "autotune_configs",
    "block_sparse_attention",
    "chosen_tile_config",
    "prune_tile_configs",
]

RECTIFY_MODES = ("none", "block", "query")
_RECTIFY_CODES = {"none": 0, "block": 1, "query": 2}
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The rectification inputs and the mode that reads each of them.
_RECTIFY_INPUTS = {
    "rescale": "block",
    "correction": "block",
    "trusted_counts": "query",
    "trusted_indices": "query",
    "k_block": "query",
    "v_block": "query",
    "k_block_log_count": "query",
}
# Virtual keys of query mode processed per step: one `BLOCK_M x D x TRUSTED_CHUNK` product each (tl.dot needs >= 16).
# The interpreter uses the smallest chunk so that the tiny CPU test shapes still span several chunks.
_TRUSTED_CHUNK = 64
_TRUSTED_CHUNK_INTERPRETED = 16


@triton.jit
def _online_softmax_step(acc, m_i, l_i, qk, v, qk_scale, DOT_PRECISION: tl.constexpr):
    """Fold one tile of raw logits `qk (BLOCK_M, N)` and values `v (N, HEAD_DIM)` into the running row maximum
    `m_i` (log2 units), row sum `l_i` and unnormalised output `acc`. Masked logits are -inf."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    # A row whose keys so far are all masked keeps m = -inf: shift it by 0 so that exp2 gives 0 rather than NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk * qk_scale - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _block_sparse_attention_kernel(
    Q,
    K,
    V,
    Out,
    KvCounts,
    KvIndices,
    KeyValid,
    KeyBlockFull,
    Rescale,
    Correction,
    TrustedCounts,
    TrustedIndices,
    KBlock,
    VBlock,
    KBlockLogCount,
    OutIndex,
    sm_scale,
    num_heads,
    num_q_blocks,
    num_priority_blocks,
    kv_list_len,
    trusted_list_len,
    num_pooled_blocks,
    stride_qb,
    stride_qh,
    stride_qp,
    stride_kb,
    stride_kh,
    stride_kp,
    stride_vb,
    stride_vh,
    stride_vp,
    stride_ob,
    stride_oh,
    stride_os,
    stride_valid_b,
    stride_valid_h,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    RECTIFY: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    HAS_OUT_INDEX: tl.constexpr,
    TRUSTED_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid `(B * H * P / BLOCK_M,)`. Q, K, V `(B, H, P, HEAD_DIM)` and Out `(B, H, S, HEAD_DIM)` by strides (last dim
    contiguous); KeyValid `(B, H, P)` by strides; KeyBlockFull `(B, H, NQ)`, KvCounts, Rescale, TrustedCounts
    `(B, H, NQ)`, KvIndices `(B, H, NQ, kv_list_len)`, TrustedIndices `(B, H, NQ, trusted_list_len)`, Correction
    `(B, H, NQ, HEAD_DIM)`, KBlock, VBlock `(B, H, num_pooled_blocks, HEAD_DIM)`, KBlockLogCount
    `(B, H, num_pooled_blocks)` contiguous; OutIndex `(P,)`. RECTIFY: 0 none, 1 block, 2 query."""
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
    # Row of this (batch, head, query block) in the contiguous (B, H, NQ, ...) plan and statistics tensors.
    plan_row = pid_bh.to(tl.int64) * num_q_blocks + q_block

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_PAD)
    # Head dims that are not a power of two are padded to one in registers: the extra lanes load as zeros (adding
    # nothing to q . k) and are never stored.
    d_ok = offs_d < HEAD_DIM
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    # Offsets of a key tile from its first row: loop invariant, so each step only adds one scalar row offset.
    k_tile = offs_n[:, None] * stride_kp + offs_d[None, :]
    v_tile = offs_n[:, None] * stride_vp + offs_d[None, :]
    valid_base = KeyValid + off_b * stride_valid_b + off_h * stride_valid_h
    block_full_base = KeyBlockFull + pid_bh.to(tl.int64) * num_q_blocks

    # Q stays in registers for the whole program: it is loaded once.
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qp + offs_d[None, :],
        mask=d_ok[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)

    # Real keys: one flat loop over (listed key block, sub-tile) so that the compiler pipelines a single loop.
    kv_count = tl.load(KvCounts + plan_row)
    kv_list = KvIndices + plan_row * kv_list_len
    for step in range(0, kv_count * TILES_PER_BLOCK):
        kv_block = tl.load(kv_list + step // TILES_PER_BLOCK).to(tl.int64)
        start_n = kv_block * BLOCK_SIZE + (step % TILES_PER_BLOCK) * BLOCK_N
        k = tl.load(k_base + start_n * stride_kp + k_tile, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + start_n * stride_vp + v_tile, mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_KEY_VALID:
            # Only blocks holding a masked key pay for the select (most blocks are full).
            if tl.load(block_full_base + kv_block) == 0:
                key_ok = tl.load(valid_base + start_n + offs_n) != 0
                qk = tl.where(key_ok[None, :], qk, float("-inf"))
                # A masked key has no effect, whatever its value row holds (0 * NaN would be NaN).
                v = tl.where(key_ok[:, None], v, tl.zeros_like(v))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, qk, v, qk_scale, DOT_PRECISION)

    if RECTIFY == 2:
        # Query mode: trusted skipped block j is one virtual key with logit scale * q . k_bar_j + log n_j; the
        # log n_j term is divided by the scale because the softmax step multiplies every raw logit by it.
        trusted_count = tl.load(TrustedCounts + plan_row)
        trusted_list = TrustedIndices + plan_row * trusted_list_len
        pooled_base = pid_bh.to(tl.int64) * num_pooled_blocks
        offs_t = tl.arange(0, TRUSTED_CHUNK)
        for first in range(0, trusted_count, TRUSTED_CHUNK):
            slot = first + offs_t
            listed = slot < trusted_count
            pooled = pooled_base + tl.load(trusted_list + slot, mask=listed, other=0)
            pooled_mask = listed[:, None] & d_ok[None, :]
            k_bar = tl.load(KBlock + pooled[:, None] * HEAD_DIM + offs_d[None, :], mask=pooled_mask, other=0.0)
            v_bar = tl.load(VBlock + pooled[:, None] * HEAD_DIM + offs_d[None, :], mask=pooled_mask, other=0.0)
            log_count = tl.load(KBlockLogCount + pooled, mask=listed, other=float("-inf"))
            qk = tl.dot(q, tl.trans(k_bar.to(q.dtype)), input_precision=DOT_PRECISION)
            qk = qk + log_count[None, :] / sm_scale
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, qk, v_bar.to(q.dtype), qk_scale, DOT_PRECISION)

    # Rows with no allowed key have l = 0 and acc = 0: they output 0, never NaN.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if RECTIFY == 1:
        rescale = tl.load(Rescale + plan_row)
        correction = tl.load(Correction + plan_row * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        out = out * rescale + correction[None, :]

    if HAS_OUT_INDEX:
        dest = tl.load(OutIndex + offs_m).to(tl.int64)
    else:
        dest = offs_m.to(tl.int64)
    out_ptrs = Out + off_b * stride_ob + off_h * stride_oh + dest[:, None] * stride_os + offs_d[None, :]
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=(dest >= 0)[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------------------------------


class TileConfig(dict):
    """An explicit tile configuration for `block_sparse_attention(..., tile_config=...)`: keys BLOCK_M, BLOCK_N,
    num_warps, num_stages. Both block sizes must divide the plan's block size and be >= 16."""


# Candidates for Hopper (H100/H200): 128-row query tiles with 8 warps (two warpgroups of wgmma), 64 or 128 keys per
# step, 2-4 pipeline stages; smaller tiles for block sizes below 128. On an H100 (benchmarks/NOTES_attention.md)
# (128, 128, 8, 3) won at D=128; (128, 64, 8, 2) never won and was dropped to shorten autotuning.
_GPU_CANDIDATES = (
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (64, 64, 4, 3),
    (64, 128, 4, 2),
    (32, 32, 4, 3),
    (16, 16, 4, 2),
)


def autotune_configs() -> list[triton.Config]:
    """The candidate tile configurations the CUDA path autotunes over (before pruning by block size)."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in _GPU_CANDIDATES
    ]


def prune_tile_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Keep the configurations whose tiles divide the plan's block size; prefer the largest query tile that fits
    (one program per query block reads the kv list and the block's statistics once)."""
    args = {**named_args, **kwargs}
    block_size = args["BLOCK_SIZE"]
    head_dim = args["HEAD_PAD"]
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= block_size and c.kwargs["BLOCK_N"] <= block_size]
    if head_dim > 128:
        # A 256-wide accumulator of 128 rows does not fit in registers next to the tiles.
        fitting = [c for c in fitting if c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64] or fitting
    largest_m = max(c.kwargs["BLOCK_M"] for c in fitting)
    kept = [c for c in fitting if c.kwargs["BLOCK_M"] == largest_m]
    if head_dim <= 64:
        # Small heads leave registers for the larger key tile; 128-key tiles are the only ones worth timing.
        kept = [c for c in kept if c.kwargs["BLOCK_N"] == min(128, block_size)] or kept
    return kept


_autotuned_kernel = triton.autotune(
    configs=autotune_configs(),
    key=["BLOCK_SIZE", "HEAD_DIM", "HEAD_PAD", "RECTIFY", "HAS_KEY_VALID", "HAS_OUT_INDEX"],
    prune_configs_by={"early_config_prune": prune_tile_configs},
)(_block_sparse_attention_kernel)


def chosen_tile_config() -> triton.Config | None:
    """The configuration the autotuner chose at the last CUDA launch (None before the first one)."""
    return getattr(_autotuned_kernel, "best_config", None)


# Under TRITON_INTERPRET=1, @triton.jit gives an interpreted function instead of a JITFunction; the launcher then runs
# a fixed configuration (timing candidates under the interpreter would measure numpy).
_INTERPRETED = INTERPRETED


def _interpreter_config(block_size: int) -> TileConfig:
    return TileConfig(BLOCK_M=min(block_size, 64), BLOCK_N=min(block_size, 32), num_warps=4, num_stages=1)


# --------------------------------------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, value: object, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], device) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {expected}, got {value.dtype}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, expected {device} (the device of q)")


def _check_tile_config(tile_config: object, block_size: int) -> TileConfig:
    if not isinstance(tile_config, dict):
        raise TypeError(f"tile_config must be a dict (TileConfig) or None, got {type(tile_config).__name__}")
    expected = {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
    if set(tile_config) != expected:
        raise ValueError(f"tile_config must have exactly the keys {sorted(expected)}, got {sorted(tile_config)}")
    for name in ("BLOCK_M", "BLOCK_N"):
        size = tile_config[name]
        if not isinstance(size, int) or size < 16 or size & (size - 1) or block_size % size:
            raise ValueError(
                f"tile_config[{name!r}]={size!r}: expected a power of two >= 16 dividing block_size={block_size}"
            )
    return TileConfig(tile_config)


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
    out_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    priority_query_blocks: int = 0,
    tile_config: dict | None = None,
) -> torch.Tensor:
    """Rectified block-sparse attention over the canonical layout; returns `out`.

    Args:
        q, k, v: `(B, H, P, D)` in the canonical layout (`P = layout.padded_len`, a multiple of `block_size`),
            float16, bfloat16 or float32 (one dtype), last dim contiguous, `D` as `capability.kernel_limits` allows
            (padded to a power of two in registers).
        kv_counts: int32 `(B, H, NQ)`, `NQ = P // block_size`: the number of key blocks query block i attends to.
        kv_indices: int32 `(B, H, NQ, L)`: their indices in `[0, NQ)`, first `kv_counts` entries read (ascending order
            keeps the key reads sequential; -1 padding after the count is never read).
        scale: softmax scale (positive).
        block_size: rows per block of the plan, a power of two in [16, 256].
        key_valid: bool `(B, H, P)` (an expanded view with stride 0 over H is fine), False for masked or padding
            keys; None: every key is valid.
        rectify: "none"; "block" (needs `rescale` fp32 `(B, H, NQ)` and `correction` fp32 `(B, H, NQ, D)`: the output
            of query block i is `rescale[i] * O + correction[i]`); or "query" (needs `trusted_counts` int32
            `(B, H, NQ)`, `trusted_indices` int32 `(B, H, NQ, T)` into the `NB` pooled blocks, `k_block` and
            `v_block` `(B, H, NB, D)` (float16/bfloat16/float32; cast to q's dtype for the products) and
            `k_block_log_count` fp32 `(B, H, NB)`, the log of each pooled block's unmasked key count).
        out_index: int32 or int64 `(P,)`: canonical row p is stored at row `out_index[p]` of `out` (-1: not stored).
            None: row p goes to row p. Entries must be in [-1, S) and distinct where >= 0 (not checked on the host,
            which would synchronise).
        out: `(B, H, S, D)` destination, any strides with the last dim contiguous (e.g. a `(B, S, H, D)` buffer
            transposed); float16, bfloat16 or float32. Needed when `out_index` is given; without both, a new
            `(B, H, P, D)` tensor of q's dtype is returned.
        priority_query_blocks: the last `priority_query_blocks` query blocks of every head are scheduled before all
            others. Pass the number of text query blocks (`layout.num_text_blocks`): text rows attend to every block,
            take ~1/density times longer than video rows, and would otherwise finish last (a tail of up to ~10%).
        tile_config: optional explicit `TileConfig` (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of the
            autotuned one (CUDA) or the interpreter's default.

    Each query row attends exactly (fp32 online softmax) to the valid keys of its listed blocks, plus the virtual
    keys in query mode; rows with nothing to attend output 0 (block mode: `correction`).
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, P, D), got {tuple(tensor.shape)}")
        if tensor.dtype not in _INPUT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {tensor.dtype}")
        if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got strides {tensor.stride()}")
    batch, heads, padded_len, head_dim = q.shape
    device = q.device
    for name, tensor in (("k", k), ("v", v)):
        _check_tensor(name, tensor, tuple(q.shape), (q.dtype,), device)
    if device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"q is on {device}: the kernel runs on CUDA, or on the CPU under the Triton interpreter "
            "(TRITON_INTERPRET=1 set before triton is first imported)"
        )
    if _INTERPRETED and q.dtype == torch.bfloat16:
        # The interpreter's tl.dot on bfloat16 returns wrong values instead of failing: refuse rather than mislead.
        raise TypeError("q is bfloat16: the Triton interpreter cannot multiply bfloat16, use float16 or float32")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 16 <= block_size <= 256:
        raise ValueError(f"block_size must be a power of two in [16, 256], got {block_size!r}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 256], got {block_size}")
    if padded_len == 0 or padded_len % block_size:
        raise ValueError(f"q has {padded_len} rows: expected a positive multiple of block_size={block_size}")
    check_kernel_inputs("q", q)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    if rectify not in RECTIFY_MODES:
        raise ValueError(f"rectify must be one of {RECTIFY_MODES}, got {rectify!r}")
    if batch == 0 or heads == 0:
        raise ValueError(f"q has an empty batch or head dimension: {tuple(q.shape)}")

    num_q_blocks = padded_len // block_size
    if (
        isinstance(priority_query_blocks, bool)
        or not isinstance(priority_query_blocks, int)
        or not 0 <= priority_query_blocks <= num_q_blocks
    ):
        raise ValueError(f"priority_query_blocks must be an int in [0, {num_q_blocks}], got {priority_query_blocks!r}")
    _check_tensor("kv_counts", kv_counts, (batch, heads, num_q_blocks), (torch.int32,), device)
    if not isinstance(kv_indices, torch.Tensor) or kv_indices.dim() != 4:
        raise ValueError("kv_indices must be an int32 tensor of shape (B, H, NQ, L)")
    kv_list_len = kv_indices.shape[-1]
    _check_tensor("kv_indices", kv_indices, (batch, heads, num_q_blocks, kv_list_len), (torch.int32,), device)
    kv_counts, kv_indices = kv_counts.contiguous(), kv_indices.contiguous()

    if key_valid is not None:
        _check_tensor("key_valid", key_valid, (batch, heads, padded_len), (torch.bool,), device)
        if key_valid.stride(-1) != 1:
            key_valid = key_valid.contiguous()

    float_stats = (torch.float32,)
    pooled_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    given = {
        "rescale": rescale,
        "correction": correction,
        "trusted_counts": trusted_counts,
        "trusted_indices": trusted_indices,
        "k_block": k_block,
        "v_block": v_block,
        "k_block_log_count": k_block_log_count,
    }
    for name, given_tensor in given.items():
        mode = _RECTIFY_INPUTS[name]
        if mode == rectify and given_tensor is None:
            raise ValueError(f"rectify={rectify!r} needs {name}")
        if mode != rectify and given_tensor is not None:
            raise ValueError(f"{name} is only used by rectify={mode!r}, got rectify={rectify!r}")
    trusted_list_len = num_pooled = 1
    if rectify == "block":
        assert rescale is not None and correction is not None  # checked above, by mode
        _check_tensor("rescale", rescale, (batch, heads, num_q_blocks), float_stats, device)
        _check_tensor("correction", correction, (batch, heads, num_q_blocks, head_dim), float_stats, device)
        rescale, correction = rescale.contiguous(), correction.contiguous()
    if rectify == "query":
        assert trusted_counts is not None and v_block is not None and k_block_log_count is not None
        _check_tensor("trusted_counts", trusted_counts, (batch, heads, num_q_blocks), (torch.int32,), device)
        if not isinstance(trusted_indices, torch.Tensor) or trusted_indices.dim() != 4:
            raise ValueError("trusted_indices must be an int32 tensor of shape (B, H, NQ, T)")
        trusted_list_len = trusted_indices.shape[-1]
        _check_tensor(
            "trusted_indices", trusted_indices, (batch, heads, num_q_blocks, trusted_list_len), (torch.int32,), device
        )
        if not isinstance(k_block, torch.Tensor) or k_block.dim() != 4:
            raise ValueError("k_block must be a tensor of shape (B, H, NB, D)")
        num_pooled = k_block.shape[2]
        _check_tensor("k_block", k_block, (batch, heads, num_pooled, head_dim), pooled_dtypes, device)
        _check_tensor("v_block", v_block, (batch, heads, num_pooled, head_dim), pooled_dtypes, device)
        _check_tensor("k_block_log_count", k_block_log_count, (batch, heads, num_pooled), float_stats, device)
        trusted_counts, trusted_indices = trusted_counts.contiguous(), trusted_indices.contiguous()
        k_block, v_block = k_block.contiguous(), v_block.contiguous()
        k_block_log_count = k_block_log_count.contiguous()

    if out_index is not None:
        if not isinstance(out_index, torch.Tensor):
            raise TypeError(f"out_index must be a torch.Tensor or None, got {type(out_index).__name__}")
        _check_tensor("out_index", out_index, (padded_len,), (torch.int32, torch.int64), device)
        out_index = out_index.contiguous()
        if out is None:
            raise ValueError("out must be given when out_index is: the output length cannot be read from out_index")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise ValueError("out must be a tensor of shape (B, H, S, D)")
        _check_tensor("out", out, (batch, heads, out.shape[2], head_dim), _INPUT_DTYPES, device)
        if out_index is None and out.shape[2] != padded_len:
            raise ValueError(f"out has {out.shape[2]} rows; without out_index it must have P={padded_len}")
        if out.stride(-1) != 1:
            raise ValueError(f"out must have a contiguous last dimension, got strides {out.stride()}")

    # Unused pointer arguments get a valid tensor of the right kind so that the signature stays fixed.
    placeholder_float = q.new_empty(1, dtype=torch.float32)
    placeholder_int = q.new_empty(1, dtype=torch.int32)
    valid_arg = key_valid if key_valid is not None else q.new_empty(1, dtype=torch.bool)
    # Per key block: True when none of its keys is masked (the kernel then skips the per-key select).
    block_full = (
        key_valid.reshape(batch, heads, num_q_blocks, block_size).all(-1)
        if key_valid is not None
        else q.new_empty(1, dtype=torch.bool)
    )
    valid_strides = (key_valid.stride(0), key_valid.stride(1)) if key_valid is not None else (0, 0)
    args = (
        q,
        k,
        v,
        out,
        kv_counts,
        kv_indices,
        valid_arg,
        block_full,
        rescale if rescale is not None else placeholder_float,
        correction if correction is not None else placeholder_float,
        trusted_counts if trusted_counts is not None else placeholder_int,
        trusted_indices if trusted_indices is not None else placeholder_int,
        k_block if k_block is not None else placeholder_float,
        v_block if v_block is not None else placeholder_float,
        k_block_log_count if k_block_log_count is not None else placeholder_float,
        out_index if out_index is not None else placeholder_int,
        float(scale),
        heads,
        num_q_blocks,
        priority_query_blocks,
        kv_list_len,
        trusted_list_len,
        num_pooled,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        *valid_strides,
    )
    constants = {
        "BLOCK_SIZE": block_size,
        "HEAD_DIM": head_dim,
        "HEAD_PAD": padded_head_dim(head_dim),
        "RECTIFY": _RECTIFY_CODES[rectify],
        "HAS_KEY_VALID": key_valid is not None,
        "HAS_OUT_INDEX": out_index is not None,
        "TRUSTED_CHUNK": _TRUSTED_CHUNK_INTERPRETED if _INTERPRETED else _TRUSTED_CHUNK,
        # fp32 inputs get exact fp32 products (no tf32), as the tests' tolerances assume; 16-bit inputs ignore it.
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }

    def grid(meta: dict) -> tuple[int]:
        return (batch * heads * (padded_len // meta["BLOCK_M"]),)

    if tile_config is None and _INTERPRETED:
        tile_config = _interpreter_config(block_size)
    if tile_config is None:
        _autotuned_kernel[grid](*args, **constants)
    else:
        config = _check_tile_config(tile_config, block_size)
        _block_sparse_attention_kernel[grid](*args, **constants, **config)
    return out
