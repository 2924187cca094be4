"""Per-head budgets (part of stage 2, select): how many key blocks each head's query blocks keep, at the same
average density as the user's setting.

Heads differ by an order of magnitude in how concentrated their attention is (`benchmarks/fidelity.py`: on a trained
video DiT most heads are near-uniform, a few hold most of their mass in a few blocks). One budget for every head
gives a sharp head too few blocks and a diffuse head blocks that each hold almost nothing. A budget policy,
`SparseAttentionConfig.head_budget`, returns int32 `(B, H)` budgets whose mean over the heads is the uniform budget
`block_budget(density, NB)` exactly (so the call's cost is unchanged); selection keeps each head's budget instead.

- `"uniform"` (`UniformBudget`): every head keeps the uniform budget (no tensor: selection runs as it always did).
- `"water_fill"` (`WaterFilling`): each head's estimated cumulative-mass curve, from the block scores the estimator
  already produced (no pass over Q or K): `gain[h, k]`, the mean over the head's video query blocks of the score of
  the row's `(k+1)`-th block in selection's order (forced blocks first, then by descending score). A row's sorted
  scores do not increase, so `sum_{k < b_h} gain[h, k]` (the head's estimated recall at budget `b_h`, less text) is
  concave in `b_h`, and taking the `H * uniform` largest gains over all heads (greedy water-filling) maximises the
  summed estimated recall, i.e. minimises the estimated missing mass, over every split of the blocks. Each head keeps
  at least its floor: its forced blocks (the diagonal, the 26-neighbour blocks with `neighbors`, blocks holding a
  non-finite key; text blocks are kept outside the budget) and `min_share` of the uniform budget.
  Calibration: at an exact step (`exact_plan_steps`) the scores are the true block mass, so the budgets are the
  true-mass optimum; otherwise they are the estimate's (`benchmarks/NOTES_budgets.md` states how far the estimated
  recall is from the true one, per suite).

Deterministic for a given input: a stable sort, ties broken by head then position.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .base import BudgetConfig, BudgetInputs, register_budget

__all__ = ["UniformBudget", "WaterFilling", "water_fill_budgets"]


@dataclasses.dataclass(frozen=True)
class UniformBudget(BudgetConfig):
    """`head_budget="uniform"`: every head keeps `block_budget(density, NB)` blocks per query block."""

    name = "uniform"


@dataclasses.dataclass(frozen=True)
class WaterFilling(BudgetConfig):
    """`head_budget="water_fill"`: blocks go to the heads whose next block holds the most estimated mass; no head
    below `min_share` of the uniform budget (nor below its forced blocks)."""

    name = "water_fill"
    min_share: float = 0.25


def water_fill_budgets(
    scores: torch.Tensor, forced: torch.Tensor, uniform: int, min_share: float = 0.0
) -> torch.Tensor:
    """int32 `(B, H)` per-head budgets (module docstring) from `scores (B, H, NB, NB + 1)` and the forced blocks
    `forced`, bool broadcastable to `(B, H, NB, NB)`, keeping the sum over heads at `H * uniform` (unless the floors
    alone exceed it: then every head keeps its floor)."""
    b, h, nb = scores.shape[0], scores.shape[1], scores.shape[2]
    video = scores[..., :nb].nan_to_num(0.0).to(torch.promote_types(scores.dtype, torch.float32))
    forced = forced.expand(b, h, nb, nb)
    # Selection's order: forced blocks first (scores are in [0, 1]), then by descending score, ties by index.
    order = (video + 2.0 * forced).argsort(dim=-1, descending=True, stable=True)
    gain = video.gather(-1, order).mean(-2)  # (B, H, NB)
    floor = forced.sum(-1).amax(-1).clamp(min=max(1, math.ceil(min_share * uniform - 1e-9)), max=nb)
    position = torch.arange(nb, device=scores.device)
    # Past its floor a head's rows are in descending score order, so its gains do not increase: a greedy choice of
    # the largest gains takes a prefix of each head's positions.
    gain = torch.where(position < floor[..., None], torch.full_like(gain, math.inf), gain)
    total = h * uniform
    ranked = gain.reshape(b, h * nb).argsort(dim=-1, descending=True, stable=True)
    chosen = torch.zeros(b, h * nb, dtype=torch.bool, device=scores.device)
    chosen.scatter_(-1, ranked[:, :total], True)
    budgets = chosen.reshape(b, h, nb).sum(-1)
    return torch.maximum(budgets, floor).to(torch.int32)


def _uniform(inputs: BudgetInputs, settings: UniformBudget) -> torch.Tensor | None:
    return None


def _water_fill(inputs: BudgetInputs, settings: WaterFilling) -> torch.Tensor:
    return water_fill_budgets(inputs.scores, inputs.forced, inputs.uniform, settings.min_share)


register_budget(UniformBudget, allocate=_uniform)
register_budget(WaterFilling, allocate=_water_fill)
