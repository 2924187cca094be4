"""Top-k selection (stage 2, select): a budget of key blocks per query block, uniform or per head
(`policies.budgets`), optionally grown by a mass threshold; the one selection policy so far.

Per (batch, head, video query block), from its row of `P_hat`: the budget (`block_budget(density, NB)` video key
blocks, or the head's budget of the budget policy, whose mean over heads is that),
the forced ones first (the diagonal, the 26-neighbour blocks if `neighbors`, every block holding a non-finite key),
then by descending score (stable: ties by index). With `mass_threshold`, more blocks are added in descending order
until the kept video blocks plus text hold that share of the row, up to `block_budget(max_density, NB)` (never below
the budget). Text query rows keep every block, every query row keeps every text block, and blocks without a valid key
are never listed. The trusted blocks follow the rectification's `Trust` (`policies.rectification.trusted_blocks`).

The reference is `select_blocks` / `select_plan_reference`; the kernel is `kernels.select` (one program per query
block sorts its row), which equals it (tested). With per-head budgets the Triton implementation runs the reference
selection on the device (plain PyTorch, no host sync) until the selection kernel takes a `(B, H)` budget.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import torch

from ..layout import TokenLayout, neighbor_block_mask
from ..plan import PooledStats, SparsePlan, block_budget, indices_from_mask
from .base import (
    BudgetConfig,
    BudgetInputs,
    SelectionConfig,
    SelectionInputs,
    Trust,
    budget_policy,
    parse_budget,
    register_selection,
)
from .budgets import UniformBudget
from .rectification import trust_gate, trusted_blocks

if TYPE_CHECKING:
    from ..config import SparseAttentionConfig

__all__ = ["TopK", "forced_block_mask", "head_budgets", "select_blocks", "select_plan_reference"]


@dataclasses.dataclass(frozen=True)
class TopK(SelectionConfig):
    """A budget of `density` of the video key blocks per video query block, grown up to `max_density` while the kept
    blocks hold less than `mass_threshold` of the row's estimated mass (None: exactly the budget); `neighbors` keeps
    the blocks of each token's 26 grid neighbours. From `SparseAttentionConfig`'s `sparsity` (`density = 1 -
    sparsity`), `mass_threshold`, `max_density` and `neighbors`. `budget`: how the blocks are shared between heads
    (`policies.budgets`, from `head_budget`)."""

    name = "top_k"
    mass_threshold: float | None = None
    max_density: float = 0.5
    neighbors: bool = False
    budget: BudgetConfig = UniformBudget()

    @classmethod
    def from_config(cls, config: SparseAttentionConfig) -> TopK:
        budget = parse_budget(config.head_budget)
        return cls(config.density, config.mass_threshold, config.max_density, config.neighbors, budget)


def forced_block_mask(
    layout: TokenLayout, neighbors: bool, forced_blocks: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """bool `(NB, NB)` or `(B, H, NB, NB)`: the video key blocks each video query block keeps whatever its budget
    (the diagonal, the 26-neighbour blocks if `neighbors`, the blocks of `forced_blocks (B, H, NQ)`)."""
    nb = layout.num_video_blocks
    forced = torch.eye(nb, dtype=torch.bool, device=device)
    if neighbors:
        forced = forced | neighbor_block_mask(layout).to(device)
    if forced_blocks is not None:
        forced = forced | forced_blocks[..., None, :nb]
    return forced


def head_budgets(
    scores: torch.Tensor, layout: TokenLayout, selection: TopK, forced_blocks: torch.Tensor | None = None
) -> torch.Tensor | None:
    """int32 `(B, H)`: the video key blocks per video query block of each head under `selection.budget` (from the
    scores `P_hat (B, H, NB, NB + 1)`), or None for the uniform budget `block_budget(selection.density, NB)`."""
    nb = layout.num_video_blocks
    forced = forced_block_mask(layout, selection.neighbors, forced_blocks, scores.device)
    inputs = BudgetInputs(scores, forced, block_budget(selection.density, nb))
    return budget_policy(selection.budget)(inputs, selection.budget)


def select_blocks(
    scores: torch.Tensor,
    layout: TokenLayout,
    *,
    density: float,
    key_block_nonempty: torch.Tensor,
    mass_threshold: float | None = None,
    max_density: float = 1.0,
    neighbors: bool = False,
    forced_blocks: torch.Tensor | None = None,
    head_budget: torch.Tensor | None = None,
) -> torch.Tensor:
    """bool keep mask `(B, H, num_blocks, num_blocks)` over (query block, key block) of the canonical layout (module
    docstring). `key_block_nonempty`: bool `(B, H, num_blocks)`, the block has an unmasked key; `forced_blocks`: bool
    `(B, H, num_blocks)`, blocks kept for every video query row (those holding a non-finite key); `head_budget`:
    int32 `(B, H)`, each head's budget (None: `block_budget(density, NB)` for every head)."""
    nb, nt = layout.num_video_blocks, layout.num_text_blocks
    b, h = scores.shape[:2]
    device = scores.device
    video_scores = scores[..., :nb]
    forced = forced_block_mask(layout, neighbors, forced_blocks, device)
    # Forced blocks rank first; scores are in [0, 1], so adding 2 orders them ahead without changing the rest.
    priority = video_scores.nan_to_num(0.0) + 2.0 * forced
    order = priority.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)
    budget: int | torch.Tensor = block_budget(density, nb)
    if head_budget is not None:
        budget = head_budget.to(device)[..., None, None]
    keep_video = forced | (rank < budget)
    if mass_threshold is not None:
        cap = (
            max(budget, block_budget(max_density, nb))
            if isinstance(budget, int)
            else budget.clamp(min=block_budget(max_density, nb))
        )
        sorted_mass = video_scores.gather(-1, order)
        mass_before = sorted_mass.cumsum(-1) - sorted_mass + scores[..., nb:]
        grow_sorted = mass_before < mass_threshold
        grow = torch.zeros_like(grow_sorted).scatter(-1, order, grow_sorted)
        keep_video = keep_video | (grow & (rank < cap))

    keep = torch.ones(b, h, nb + nt, nb + nt, dtype=torch.bool, device=device)
    keep[..., :nb, :nb] = keep_video
    return keep & key_block_nonempty[..., None, :]


def select_plan_reference(
    scores: torch.Tensor,
    stats: PooledStats,
    key_valid_c: torch.Tensor,
    layout: TokenLayout,
    *,
    selection: TopK,
    trust: Trust,
    estimator: str,
    forced_blocks: torch.Tensor | None = None,
) -> SparsePlan:
    """The plan of `selection` from the block scores `P_hat (B, H, NB, NB + 1)` (`estimator` names their origin),
    with the trusted blocks of `trust`. `key_valid_c` (bool `(B, H, P)`) says which keys exist; `forced_blocks`
    (bool `(B, H, NQ)`) are kept for every query block. The per-head budgets are `head_budgets`'s."""
    nonempty = key_valid_c.reshape(*key_valid_c.shape[:2], layout.num_blocks, layout.block_size).any(-1)
    keep = select_blocks(
        scores,
        layout,
        density=selection.density,
        key_block_nonempty=nonempty,
        mass_threshold=selection.mass_threshold,
        max_density=selection.max_density,
        neighbors=selection.neighbors,
        forced_blocks=forced_blocks,
        head_budget=head_budgets(scores, layout, selection, forced_blocks),
    )
    kv_counts, kv_indices = indices_from_mask(keep)
    trusted_counts, trusted_indices = indices_from_mask(trusted_blocks(keep, stats, layout, trust))
    return SparsePlan(layout, kv_counts, kv_indices, trusted_counts, trusted_indices, scores, estimator)


def _reference(inputs: SelectionInputs, settings: TopK, trust: Trust) -> SparsePlan:
    return select_plan_reference(
        inputs.scores,
        inputs.stats,
        inputs.key_valid,
        inputs.layout,
        selection=settings,
        trust=trust,
        estimator=inputs.estimator,
        forced_blocks=inputs.forced_blocks,
    )


@functools.lru_cache(maxsize=64)
def _launcher_settings(mass_threshold: float | None, max_density: float, neighbors: bool, trust: Trust):
    """The selection kernel's launcher takes these settings as a `SparseAttentionConfig` (whose sparsity it ignores:
    the density is its own argument); this is that config."""
    from ..config import SparseAttentionConfig  # the policies' package is imported by config: see policies.base

    return SparseAttentionConfig(
        mass_threshold=mass_threshold,
        max_density=max_density,
        neighbors=neighbors,
        gapr=trust.gapr,
        rectify="query" if trust.compensate else "none",
    )


def _kernel(inputs: SelectionInputs, settings: TopK, trust: Trust) -> SparsePlan:
    from ..kernels.select import select_plan

    layout = inputs.layout
    if not isinstance(settings.budget, UniformBudget):
        # The selection kernel takes one budget for all heads: per-head budgets run the reference on the device, in
        # float32 (the budget interface, int32 (B, H), is the one a kernel taking a budget tensor would read).
        return _reference(dataclasses.replace(inputs, scores=inputs.scores.float()), settings, trust)
    return select_plan(
        inputs.scores.float(),
        inputs.key_block_count,
        layout,
        density=settings.density,
        config=_launcher_settings(settings.mass_threshold, settings.max_density, settings.neighbors, trust),
        estimator=inputs.estimator,
        gate=trust_gate(inputs.stats, inputs.key_block_count, layout, trust),
        forced_blocks=inputs.forced_blocks,
    )


register_selection(TopK, reference=_reference, kernel=_kernel)
