"""Selection and rectification policies, one module each, registered like the estimators (`base.py` says what a
policy is and holds the registries).

| stage | settings (`name`) | module | what it does |
|---|---|---|---|
| select | `TopK` (`"top_k"`) | `topk.py` | a budget per query block, optionally grown by a mass threshold |
| budget | `UniformBudget` (`"uniform"`) | `budgets.py` | every head keeps the same budget |
| budget | `WaterFilling` (`"water_fill"`) | `budgets.py` | per-head budgets at the same average: most estimated mass |
| budget | `ResidualFilling` (`"residual"`) | `budgets.py` | per-head budgets: least error left after rectification |
| budget | `CalibratedResidual` (`"calibrated"`) | `budgets.py` | the residual policy on the calibrated missing mass |
| attend | `NoRectification` (`"none"`) | `rectification.py` | plain block-sparse attention |
| attend | `BlockRectification` (`"block"`) | `rectification.py` | `R_i * O + c_i` per query block (IPAR/GAPR) |
| attend | `QueryRectification` (`"query"`) | `rectification.py` | trusted blocks as virtual pooled keys per query |

`selection_settings(config)` and `rectification_settings(config)` are the settings a `SparseAttentionConfig` asks
for: the one place where the config's fields choose a policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import budgets, rectification, topk  # noqa: F401  (register the built-in policies)
from .base import (
    BudgetConfig,
    BudgetInputs,
    KernelRectification,
    RectificationConfig,
    RectificationPolicy,
    RectificationTerms,
    SelectionConfig,
    SelectionInputs,
    SelectionPolicy,
    Trust,
    budget_modes,
    budget_policy,
    parse_budget,
    parse_rectification,
    rectification_modes,
    rectification_policy,
    register_budget,
    register_rectification,
    register_selection,
    registered_selections,
    selection_policy,
    unregister_budget,
    unregister_rectification,
    unregister_selection,
)
from .budgets import CalibratedResidual, MissingMassCalibration, ResidualFilling, UniformBudget, WaterFilling
from .rectification import BlockRectification, NoRectification, QueryRectification
from .topk import TopK

if TYPE_CHECKING:
    from ..config import SparseAttentionConfig
    from ..plan import PooledStats, SparsePlan

__all__ = [
    "BlockRectification",
    "BudgetConfig",
    "BudgetInputs",
    "CalibratedResidual",
    "KernelRectification",
    "MissingMassCalibration",
    "NoRectification",
    "QueryRectification",
    "RectificationConfig",
    "RectificationPolicy",
    "RectificationTerms",
    "ResidualFilling",
    "SelectionConfig",
    "SelectionInputs",
    "SelectionPolicy",
    "TopK",
    "Trust",
    "UniformBudget",
    "WaterFilling",
    "budget_modes",
    "budget_policy",
    "parse_budget",
    "parse_rectification",
    "rectification_modes",
    "rectification_policy",
    "rectification_settings",
    "rectification_terms",
    "register_budget",
    "register_rectification",
    "register_selection",
    "registered_selections",
    "selection_policy",
    "selection_settings",
    "unregister_budget",
    "unregister_rectification",
    "unregister_selection",
]


def selection_settings(config: SparseAttentionConfig) -> SelectionConfig:
    """The selection policy and its settings that `config` asks for (its `sparsity`, `mass_threshold`, `max_density`,
    `neighbors` and `head_budget`: top-k)."""
    return TopK.from_config(config)


def rectification_settings(config: SparseAttentionConfig) -> RectificationConfig:
    """The rectification mode and its settings that `config` asks for (`rectify`, `gapr`)."""
    return parse_rectification(config.rectify, config.gapr)


def rectification_terms(mode: str | RectificationConfig, plan: SparsePlan, stats: PooledStats) -> RectificationTerms:
    """The reference terms of a rectification mode (a registered name or settings) for `plan` and `stats`."""
    settings = parse_rectification(mode) if isinstance(mode, str) else mode
    return rectification_policy(settings).reference(plan, stats, settings)
