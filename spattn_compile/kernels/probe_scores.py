"""Probe scores on the device (`estimators.SampledRows`, `estimators.QueryTiles`): exact block mass of probe queries.

Each probe p (a query vector with a weight w_p, `R` per video query block) is scored against every key of its
(batch, head) in two kernels:

1. `_probe_log_mass_kernel`, one program per `BLOCK_M` probes: the keys stream once, a key block at a time, in tiles
   of `BLOCK_N`; per (probe, key block) an online (max, sum) of `exp2` gives the block's log-mass
   `a_pj = log2 sum_{k in j} 2^(s q_p . k log2 e)` (masked keys excluded; all text keys form one last column). The
   `(probes, NB + 1)` log-masses go to a float32 scratch buffer. This is the cost of the estimator: `R / block_size`
   of the dense `Q K^T` and its exponentials, no `P V`.
2. `_probe_combine_kernel`, one program per (batch, head, query block): each probe's log-sum-exp over its row of
   log-masses, then `P_hat[i, j] = sum_p w_p 2^(a_pj - lse_p) / sum_p w_p` (a probe with no valid key has no mass).

The keys are canonical copies, or the caller's `(B, H, S, D)` keys read through the layout's index (`source_index`:
each row is one contiguous D-vector, so the gathered load moves the same bytes). The scratch is
`B * H * NB * R * (NB + 1) * 4` bytes; the launcher processes (batch, head) pairs in groups that keep it under
`_SCRATCH_BYTES`. Equals `estimators.probes.probe_scores_reference`. Nothing reads back to the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..estimators.base import probe_weights
from ..layout import TokenLayout
from .common import INTERPRETED, LOG2E, STATS_DOT_PRECISION, check_device, online_logsumexp, padded_head_dim

__all__ = ["probe_scores"]

# Bound of the log-mass scratch buffer (bytes); groups of (batch, head) pairs are launched one after the other.
_SCRATCH_BYTES = 512 << 20


@triton.jit
def _key_tile_logits(q, key_base, SourceIndex, KeyValidC, BlockFull, valid_row, block_row, key_block, start, offs_n,
                     offs_d, stride_ks, qk_scale, HEAD_DIM: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
                     SOURCE_ORDER: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Logits in log2 units of the probes `q` against the canonical keys `start + offs_n` (in key block `key_block`),
    read through `SourceIndex` from the caller's keys (SOURCE_ORDER) or from canonical copies; masked keys get -inf
    (checked only in blocks that hold one)."""
    rows = start + offs_n
    if SOURCE_ORDER:
        source = tl.maximum(tl.load(SourceIndex + rows).to(tl.int64), 0)  # a padding row is masked below
    else:
        source = rows.to(tl.int64)
    k = tl.load(key_base + source[:, None] * stride_ks + offs_d[None, :], mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_KEY_VALID:
        if tl.load(BlockFull + block_row + key_block) == 0:
            ok = tl.load(KeyValidC + valid_row + rows) != 0
            logits = tl.where(ok[None, :], logits, float("-inf"))
    return logits


@triton.jit
def _probe_log_mass_kernel(
    Probes,
    K,
    SourceIndex,
    KeyValidC,
    BlockFull,
    LogMass,
    num_probes,
    num_video_blocks,
    num_blocks,
    padded_len,
    num_heads,
    first_pair,
    stride_kb,
    stride_kh,
    stride_ks,
    qk_scale,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    SOURCE_ORDER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    # bh: the (batch, head) pair within this launch's group (probes, validity, scratch); pair: within the call.
    bh = tl.program_id(1).to(tl.int64)
    pair = first_pair + bh
    key_base = K + (pair // num_heads) * stride_kb + (pair % num_heads) * stride_kh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_PAD)
    probe_ok = offs_m < num_probes
    probe_rows = bh * num_probes + offs_m
    q_mask = probe_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Probes + probe_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
    q = q.to(K.dtype.element_ty)
    num_cols = num_video_blocks + 1
    out = LogMass + probe_rows * num_cols

    for key_block in range(0, num_video_blocks):
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for part in tl.static_range(BLOCK_SIZE // BLOCK_N):
            start = key_block * BLOCK_SIZE + part * BLOCK_N
            logits = _key_tile_logits(
                q, key_base, SourceIndex, KeyValidC, BlockFull, bh * padded_len, bh * num_blocks, key_block, start,
                offs_n, offs_d, stride_ks, qk_scale, HEAD_DIM, HAS_KEY_VALID, SOURCE_ORDER, DOT_PRECISION,
            )  # fmt: skip
            m_i, l_i = online_logsumexp(m_i, l_i, logits)
        log_mass = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(out + key_block, log_mass, mask=probe_ok)

    # Every text key falls in one column (the text blocks always carry a key-valid mask: their padding rows).
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for key_block in range(num_video_blocks, num_blocks):
        for part in tl.static_range(BLOCK_SIZE // BLOCK_N):
            start = key_block * BLOCK_SIZE + part * BLOCK_N
            logits = _key_tile_logits(
                q, key_base, SourceIndex, KeyValidC, BlockFull, bh * padded_len, bh * num_blocks, key_block, start,
                offs_n, offs_d, stride_ks, qk_scale, HEAD_DIM, True, SOURCE_ORDER, DOT_PRECISION,
            )  # fmt: skip
            m_i, l_i = online_logsumexp(m_i, l_i, logits)
    log_mass = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
    tl.store(out + num_video_blocks, log_mass, mask=probe_ok)


@triton.jit
def _probe_combine_kernel(
    LogMass,
    Weights,
    Scores,
    num_video_blocks,
    PROBES: tl.constexpr,
    PROBES_PAD: tl.constexpr,
    COLS_CHUNK: tl.constexpr,
):
    q_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    num_cols = num_video_blocks + 1
    offs_r = tl.arange(0, PROBES_PAD)
    offs_c = tl.arange(0, COLS_CHUNK)
    probe_ok = offs_r < PROBES
    rows = LogMass + ((bh * num_video_blocks + q_block) * PROBES + offs_r)[:, None] * num_cols
    weight = tl.load(Weights + (bh * num_video_blocks + q_block) * PROBES + offs_r, mask=probe_ok, other=0.0)

    m_i = tl.full([PROBES_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([PROBES_PAD], dtype=tl.float32)
    for first in range(0, num_cols, COLS_CHUNK):
        cols = first + offs_c
        ok = probe_ok[:, None] & (cols < num_cols)[None, :]
        m_i, l_i = online_logsumexp(m_i, l_i, tl.load(rows + cols[None, :], mask=ok, other=float("-inf")))
    has_mass = l_i > 0.0
    lse = tl.where(has_mass, m_i + tl.math.log2(tl.where(has_mass, l_i, 1.0)), 0.0)
    coefficient = tl.where(has_mass, weight, 0.0) / tl.maximum(tl.sum(weight, 0), 1e-30)

    out = Scores + (bh * num_video_blocks + q_block) * num_cols
    for first in range(0, num_cols, COLS_CHUNK):
        cols = first + offs_c
        ok = probe_ok[:, None] & (cols < num_cols)[None, :]
        log_mass = tl.load(rows + cols[None, :], mask=ok, other=float("-inf"))
        # A probe without mass (no valid key, or a NaN or infinity in it) adds nothing, not NaN.
        contribution = coefficient[:, None] * tl.math.exp2(log_mass - lse[:, None])
        mass = tl.sum(tl.where(has_mass[:, None] & ok, contribution, 0.0), 0)
        tl.store(out + cols, mass, mask=cols < num_cols)


# (BLOCK_M probes, BLOCK_N keys, warps, stages).
_LOG_MASS_CANDIDATES = ((64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2))


def _prune_log_mass_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    block_size = {**named_args, **kwargs}["BLOCK_SIZE"]
    fitting = [c for c in configs if c.kwargs["BLOCK_N"] <= block_size]
    return fitting or [triton.Config({"BLOCK_M": 64, "BLOCK_N": block_size}, num_warps=4)]


_autotuned_log_mass = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in _LOG_MASS_CANDIDATES
    ],
    key=["BLOCK_SIZE", "HEAD_PAD", "HAS_KEY_VALID", "SOURCE_ORDER", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_log_mass_configs},
)(_probe_log_mass_kernel)


def _log_mass_grid(num_probes: int, pairs: int):
    return lambda meta: (triton.cdiv(num_probes, meta["BLOCK_M"]), pairs)


def probe_scores(
    probes: torch.Tensor,
    weights: torch.Tensor,
    k_c: torch.Tensor,
    key_valid_c: torch.Tensor,
    layout: TokenLayout,
    scale: float,
    *,
    source_index: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """`P_hat` float32 `(B, H, NB, NB + 1)` from `probes (B, H, NB * R, D)` (any float dtype; cast to the keys' dtype
    for the products) with `weights` float32 `(NB * R,)`, the keys `k_c` (float16, bfloat16 or float32) and
    `key_valid_c` bool `(B, H, P)` in canonical order; equals `estimators.probes.probe_scores_reference` on the
    canonical keys. `k_c` is `(B, H, P, D)` canonical copies, or with `source_index` (`layout.source_index` on the
    device) the caller's `(B, H, S, D)` keys (any strides, the last dim contiguous), read through it.
    Keys are masked only in blocks that hold an invalid one (a per-block flag, read once per block). `config`:
    (BLOCK_M, BLOCK_N, warps, stages) of the log-mass kernel instead of the autotuned choice (benchmarks)."""
    batch, heads, num_probes, head_dim = probes.shape
    device = k_c.device
    check_device(device, "k_c")
    nb, nq = layout.num_video_blocks, layout.num_blocks
    key_rows = layout.padded_len if source_index is None else layout.seq_len
    if num_probes % nb or tuple(k_c.shape) != (batch, heads, key_rows, head_dim):
        raise ValueError(
            f"probes {tuple(probes.shape)} and keys {tuple(k_c.shape)} do not fit the layout ({nb} video blocks, "
            f"{key_rows} key rows)"
        )
    if tuple(weights.shape) not in ((num_probes,), (batch, heads, num_probes)):
        raise ValueError(
            f"weights must have shape ({num_probes},) or {(batch, heads, num_probes)}, got {tuple(weights.shape)}"
        )
    if source_index is not None and tuple(source_index.shape) != (layout.padded_len,):
        raise ValueError(f"source_index must have shape ({layout.padded_len},), got {tuple(source_index.shape)}")
    per_block = num_probes // nb
    bh = batch * heads
    weights = probe_weights(probes, weights.to(device)).reshape(bh, num_probes).contiguous()
    probes = probes.reshape(bh, num_probes, head_dim).contiguous()
    keys = k_c if k_c.stride(-1) == 1 else k_c.contiguous()
    valid = key_valid_c.reshape(bh, layout.padded_len).contiguous()
    # True where a block has no masked key: the kernel then skips the per-key select.
    block_full = valid.view(bh, nq, layout.block_size).all(-1)
    scores = torch.empty(bh, nb, nb + 1, device=device, dtype=torch.float32)
    group = max(1, _SCRATCH_BYTES // max(1, num_probes * (nb + 1) * 4))
    log_mass = torch.empty(min(group, bh), num_probes, nb + 1, device=device, dtype=torch.float32)
    precision = STATS_DOT_PRECISION if keys.dtype == torch.float32 else "tf32"
    head_pad = padded_head_dim(head_dim)
    for first in range(0, bh, group):
        count = min(group, bh - first)
        pairs = slice(first, first + count)
        args = (
            probes[pairs],
            keys,
            source_index if source_index is not None else block_full,
            valid[pairs].view(torch.int8),
            block_full[pairs],
            log_mass,
            num_probes,
            nb,
            nq,
            layout.padded_len,
            heads,
            first,
            *keys.stride()[:3],
            float(scale) * LOG2E,
        )
        constants = dict(
            BLOCK_SIZE=layout.block_size,
            HEAD_DIM=head_dim,
            HEAD_PAD=head_pad,
            HAS_KEY_VALID=True,
            SOURCE_ORDER=source_index is not None,
            DOT_PRECISION=precision,
        )
        if INTERPRETED:
            block_n = min(layout.block_size, 32)
            grid = (triton.cdiv(num_probes, 16), count)
            _probe_log_mass_kernel[grid](*args, **constants, BLOCK_M=16, BLOCK_N=block_n)
        elif config is not None:
            block_m, block_n, warps, stages = config
            _probe_log_mass_kernel[(triton.cdiv(num_probes, block_m), count)](
                *args, **constants, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages
            )
        else:
            _autotuned_log_mass[_log_mass_grid(num_probes, count)](*args, **constants)
        _probe_combine_kernel[(nb, count)](
            log_mass,
            weights[pairs],
            scores[pairs],
            nb,
            PROBES=per_block,
            PROBES_PAD=max(2, triton.next_power_of_2(per_block)),
            COLS_CHUNK=min(1024, max(16, triton.next_power_of_2(nb + 1))),
            num_warps=4,
        )
    return scores.view(batch, heads, nb, nb + 1)
