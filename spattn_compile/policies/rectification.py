"""The rectification modes (stage 3, attend) and GAPR's gate, the rule of which skipped blocks may be compensated.

Attending to the kept blocks only is biased: the kept keys are over-weighted and the skipped ones get nothing. The
plan lists, per query block, the skipped video blocks whose pooled summary (the block's mean key `k_bar_j`, mean
value `v_bar_j` and key count `n_j`) may stand in for them: the *trusted* blocks (`policies.base.Trust`; with GAPR,
only those whose pooling gain beats its first-order error, `gapr_trusted`). The modes, `SparseAttentionConfig.rectify`:

- `"none"` (`NoRectification`): plain block-sparse attention, renormalised over the kept blocks;
- `"block"` (`BlockRectification`, Rectified SpaAttn's IPAR/GAPR): `R_i * O + c_i` per query block, with
  `R_i = 1 - sum_{j in T_i} P_hat[i, j]` and `c_i = sum_{j in T_i} P_hat[i, j] v_bar_j` (`block_rectification`);
- `"query"` (`QueryRectification`, the default): each trusted block joins every query's softmax as one virtual key
  with logit `s * q . k_bar_j + log n_j` and value `v_bar_j`, so each query gets its own, exactly normalised
  correction.

Each mode gives the plain-PyTorch attentions its `RectificationTerms` and the attention kernel its mode and inputs.
"""

from __future__ import annotations

import dataclasses

import torch

from ..layout import TokenLayout
from ..plan import PooledStats, SparsePlan
from .base import (
    KernelRectification,
    RectificationConfig,
    RectificationTerms,
    Trust,
    register_rectification,
)

__all__ = [
    "BlockRectification",
    "NoRectification",
    "QueryRectification",
    "block_rectification",
    "gapr_trusted",
    "trust_gate",
    "trusted_blocks",
]


@dataclasses.dataclass(frozen=True)
class NoRectification(RectificationConfig):
    """`rectify="none"`: plain block-sparse attention over the kept blocks; the plan lists no trusted block."""

    name = "none"
    compensates = False


@dataclasses.dataclass(frozen=True)
class BlockRectification(RectificationConfig):
    """`rectify="block"`: one rescale and one correction per query block from its trusted blocks' estimated mass."""

    name = "block"


@dataclasses.dataclass(frozen=True)
class QueryRectification(RectificationConfig):
    """`rectify="query"`: every trusted block joins each query's softmax as one virtual pooled key."""

    name = "query"


# --------------------------------------------------------------------------------------------------------------------
# Which skipped blocks are trusted (used by every selection policy)
# --------------------------------------------------------------------------------------------------------------------


def gapr_trusted(stats: PooledStats) -> torch.Tensor:
    """GAPR's gate, bool `(B, H, NB, NB)`: pooled block pair (i, j) approximates its attention better than its
    first-order pooling error, `|q_i . k_j| > |dq_i . k_j| + |q_i . dk_j|`, and key block j has an unmasked key."""
    dtype = torch.promote_types(stats.q_block.dtype, torch.float32)
    q, dq = stats.q_block.to(dtype), stats.q_block_mad.to(dtype)
    k, dk = stats.k_block.to(dtype), stats.k_block_mad.to(dtype)
    gain = (q @ k.transpose(-1, -2)).abs()
    error = (dq @ k.transpose(-1, -2)).abs() + (q @ dk.transpose(-1, -2)).abs()
    return (gain > error) & (stats.k_block_count > 0)[..., None, :]


def trusted_blocks(keep: torch.Tensor, stats: PooledStats, layout: TokenLayout, trust: Trust) -> torch.Tensor:
    """bool `(B, H, NQ, NB)`: the trusted blocks of a plan that keeps `keep (B, H, NQ, NQ)` (reference): the skipped
    video blocks with a usable key, gated by GAPR when `trust.gapr`; none in text query rows, none without
    `trust.compensate`."""
    nb = layout.num_video_blocks
    b, h = keep.shape[:2]
    trusted = torch.zeros(b, h, layout.num_blocks, nb, dtype=torch.bool, device=keep.device)
    if trust.compensate:
        # Only blocks with a usable key can stand in for their keys.
        skipped = ~keep[..., :nb, :nb] & (stats.k_block_count > 0)[..., None, :]
        trusted[..., :nb, :] = skipped & gapr_trusted(stats) if trust.gapr else skipped
    return trusted


def trust_gate(stats: PooledStats, key_block_count: torch.Tensor, layout: TokenLayout, trust: Trust):
    """The selection kernel's GAPR gate for `trust` (int8 `(B, H, NB, NB)`, `kernels.select.gapr_gate`), or None
    when the plan's trusted blocks are not gated."""
    if not trust.gapr:
        return None
    from ..kernels.select import gapr_gate

    return gapr_gate(stats, key_block_count, layout)


# --------------------------------------------------------------------------------------------------------------------
# The modes
# --------------------------------------------------------------------------------------------------------------------


def block_rectification(plan: SparsePlan, stats: PooledStats, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block mode's `R (B, H, NQ)` and `c (B, H, NQ, D)` in the dtype of the statistics:
    `R_i = 1 - sum_{j in T_i} P_hat[i, j]`, `c_i = sum_{j in T_i} P_hat[i, j] v_bar_j`; text query rows get R = 1,
    c = 0."""
    nb = plan.num_video_blocks
    trusted = plan.trusted_mask()[..., :nb, :]
    dtype = stats.v_block.dtype
    weight = plan.block_scores[..., :nb].to(dtype) * trusted
    b, h = weight.shape[:2]
    rescale = torch.ones(b, h, num_blocks, dtype=dtype, device=weight.device)
    rescale[..., :nb] = 1 - weight.sum(-1)
    correction = torch.zeros(b, h, num_blocks, stats.v_block.shape[-1], dtype=dtype, device=weight.device)
    correction[..., :nb, :] = weight @ stats.v_block
    return rescale, correction


def _none_terms(plan: SparsePlan, stats: PooledStats, settings: NoRectification) -> RectificationTerms:
    return RectificationTerms()


def _none_kernel(plan: SparsePlan, stats: PooledStats, settings: NoRectification) -> KernelRectification:
    return KernelRectification("none")


def _block_terms(plan: SparsePlan, stats: PooledStats, settings: BlockRectification) -> RectificationTerms:
    rescale, correction = block_rectification(plan, stats, plan.num_blocks)
    return RectificationTerms(rescale=rescale, correction=correction)


def _block_kernel(plan: SparsePlan, stats: PooledStats, settings: BlockRectification) -> KernelRectification:
    rescale, correction = block_rectification(plan, stats, plan.num_blocks)
    return KernelRectification("block", {"rescale": rescale.float(), "correction": correction.float()})


def _query_terms(plan: SparsePlan, stats: PooledStats, settings: QueryRectification) -> RectificationTerms:
    return RectificationTerms(
        virtual_keys=stats.k_block,
        virtual_log_weights=stats.k_block_count.log(),
        virtual_values=stats.v_block,
        virtual_allowed=plan.trusted_mask(),
    )


def _query_kernel(plan: SparsePlan, stats: PooledStats, settings: QueryRectification) -> KernelRectification:
    arguments = {
        "trusted_counts": plan.trusted_counts,
        "trusted_indices": plan.trusted_indices,
        "k_block": stats.k_block,
        "v_block": stats.v_block,
        # Trusted blocks are never empty, so the -inf of an empty block is never read.
        "k_block_log_count": stats.k_block_count.log(),
    }
    return KernelRectification("query", arguments)


register_rectification(NoRectification, reference=_none_terms, kernel=_none_kernel)
register_rectification(BlockRectification, reference=_block_terms, kernel=_block_kernel)
register_rectification(QueryRectification, reference=_query_terms, kernel=_query_kernel)
