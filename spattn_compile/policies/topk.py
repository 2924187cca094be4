"""Top-k selection (stage 2, select): a uniform budget of key blocks per query block, optionally grown by a mass
threshold; the one selection policy so far.

Per (batch, head, video query block), from its row of `P_hat`: the budget `block_budget(density, NB)` video key blocks,
the forced ones first (the diagonal, the 26-neighbour blocks if `neighbors`, every block holding a non-finite key),
then by descending score (stable: ties by index). With `mass_threshold`, more blocks are added in descending order
until the kept video blocks plus text hold that share of the row, up to `block_budget(max_density, NB)` (never below
the budget). Text query rows keep every block, every query row keeps every text block, and blocks without a valid key
are never listed. The trusted blocks follow the rectification's `Trust` (`policies.rectification.trusted_blocks`).

The reference is `select_blocks` / `select_plan_reference`; the kernel is `kernels.select` (threshold search by
bisection, no sort), which equals it (tested). How the blocks are shared between heads is `TopK.budget`, a budget
policy (`policies.budgets`, from `head_budget`): the uniform budget, or int32 `(B, H)` per-head budgets that both the
reference and the kernel take.
"""

from __future__ import annotations

import dataclasses
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

__all__ = [
    "TopK",
    "check_budget",
    "forced_block_mask",
    "head_budgets",
    "select_blocks",
    "select_plan_reference",
    "select_top_k",
]


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
    scores: torch.Tensor,
    layout: TokenLayout,
    selection: TopK,
    forced_blocks: torch.Tensor | None = None,
    *,
    stats: PooledStats | None = None,
    scale: float | None = None,
    trust: Trust | None = None,
) -> torch.Tensor | None:
    """int32 `(B, H)`: the video key blocks per video query block of each head under `selection.budget` (from the
    scores `P_hat (B, H, NB, NB + 1)`, and for the policies that weigh rectification the pooled `stats`, the softmax
    `scale` and the rectification's `trust`), or None for the uniform budget `block_budget(selection.density, NB)`."""
    nb = layout.num_video_blocks
    forced = forced_block_mask(layout, selection.neighbors, forced_blocks, scores.device)
    inputs = BudgetInputs(scores, forced, block_budget(selection.density, nb), stats, scale, trust)
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
    int32 `(B, H)` per-head budgets of video blocks in place of `block_budget(density, NB)` (`check_budget`)."""
    nb, nt = layout.num_video_blocks, layout.num_text_blocks
    b, h = scores.shape[:2]
    device = scores.device
    video_scores = scores[..., :nb]
    forced = forced_block_mask(layout, neighbors, forced_blocks, device)
    # Forced blocks rank first; scores are in [0, 1], so adding 2 orders them ahead without changing the rest.
    priority = video_scores.nan_to_num(0.0) + 2.0 * forced
    order = priority.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)
    row_budget: int | torch.Tensor = (
        block_budget(density, nb) if head_budget is None else head_budget.to(device)[..., None, None]
    )
    keep_video = forced | (rank < row_budget)
    if mass_threshold is not None:
        cap: int | torch.Tensor = block_budget(max_density, nb)
        cap = torch.clamp(row_budget, min=cap) if isinstance(row_budget, torch.Tensor) else max(row_budget, cap)
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
    budget: torch.Tensor | None = None,
    scale: float | None = None,
) -> SparsePlan:
    """The plan of `selection` from the block scores `P_hat (B, H, NB, NB + 1)` (`estimator` names their origin),
    with the trusted blocks of `trust`. `key_valid_c` (bool `(B, H, P)`) says which keys exist; `forced_blocks`
    (bool `(B, H, NQ)`) are kept for every query block; `budget`: int32 `(B, H)` per-head budgets of video blocks in
    place of those of `selection.budget`'s policy (`head_budgets`, which reads the softmax `scale`, None:
    `1/sqrt(D)`; `check_budget`)."""
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
        head_budget=(
            head_budgets(scores, layout, selection, forced_blocks, stats=stats, scale=scale, trust=trust)
            if budget is None
            else check_budget(budget, scores.shape[:2], layout)
        ),
    )
    kv_counts, kv_indices = indices_from_mask(keep)
    trusted_counts, trusted_indices = indices_from_mask(trusted_blocks(keep, stats, layout, trust))
    return SparsePlan(layout, kv_counts, kv_indices, trusted_counts, trusted_indices, scores, estimator)


def check_budget(budget: object, batch_heads: tuple[int, ...], layout: TokenLayout) -> torch.Tensor:
    """`budget` as given, after checking that it is an int32 `(B, H)` tensor of per-head budgets (video key blocks
    per video query block; the values, in [1, NB], are not checked: that would read them back from the device)."""
    shape = tuple(batch_heads)
    if not isinstance(budget, torch.Tensor) or budget.dtype != torch.int32 or tuple(budget.shape) != shape:
        got = f"{budget.dtype} of shape {tuple(budget.shape)}" if isinstance(budget, torch.Tensor) else repr(budget)
        raise ValueError(
            f"budget must be an int32 tensor of shape {shape} (video blocks per query block, each in "
            f"[1, {layout.num_video_blocks}]), got {got}"
        )
    return budget


def select_top_k(
    inputs: SelectionInputs,
    settings: TopK,
    trust: Trust,
    *,
    kind: str,
    budget: torch.Tensor | None = None,
) -> SparsePlan:
    """The plan of `settings` with the `kind` ("reference" or "kernel") implementation; `budget`: int32 `(B, H)`
    per-head budgets of video blocks in place of those of `settings.budget`'s policy (`head_budgets`;
    `check_budget`)."""
    density = settings.density
    if budget is None and (isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1):
        raise ValueError(f"TopK: density must be a number in (0, 1], got {density!r}")
    if kind == "reference":
        return select_plan_reference(
            inputs.scores,
            inputs.stats,
            inputs.key_valid,
            inputs.layout,
            selection=settings,
            trust=trust,
            estimator=inputs.estimator,
            forced_blocks=inputs.forced_blocks,
            budget=budget,
            scale=inputs.scale,
        )
    from ..kernels.select import select_plan

    layout = inputs.layout
    if budget is None:
        budget = head_budgets(
            inputs.scores, layout, settings, inputs.forced_blocks, stats=inputs.stats, scale=inputs.scale, trust=trust
        )
    return select_plan(
        inputs.scores.float(),
        inputs.key_block_count,
        layout,
        budget=block_budget(settings.density, layout.num_video_blocks) if budget is None else budget,
        estimator=inputs.estimator,
        mass_threshold=settings.mass_threshold,
        max_density=settings.max_density,
        neighbors=settings.neighbors,
        trusted=trust.compensate,
        gate=trust_gate(inputs.stats, inputs.key_block_count, layout, trust),
        forced_blocks=inputs.forced_blocks,
    )


def _reference(inputs: SelectionInputs, settings: TopK, trust: Trust) -> SparsePlan:
    return select_top_k(inputs, settings, trust, kind="reference")


def _kernel(inputs: SelectionInputs, settings: TopK, trust: Trust) -> SparsePlan:
    return select_top_k(inputs, settings, trust, kind="kernel")


register_selection(TopK, reference=_reference, kernel=_kernel)
