"""What a selection policy and a rectification policy are, and their registries (torchao's pattern, as the
estimators': a frozen settings type -> a reference handler and a kernel handler).

**Selection** (stage 2, select) turns the block scores of an estimator into a plan: which key blocks each query block
attends to, and which skipped blocks rectification may compensate (the *trusted* blocks). A policy registers its
settings type (a frozen `SelectionConfig` subclass with a unique `name`) with a reference function (plain PyTorch,
the specification) and a kernel function (the Triton implementation); both take the call's `SelectionInputs`, the
settings and the `Trust` rule of the rectification in force, and return a `SparsePlan`.

**Rectification** (stage 3, attend) corrects the bias of attending to the kept blocks only. A mode registers its
settings type (a frozen `RectificationConfig` subclass whose `name` is the value of `SparseAttentionConfig.rectify`)
with a reference function that says what the mode adds to attention over the kept blocks, as `RectificationTerms`
(virtual keys that join each query's softmax, and an affine correction of each query block's output; every
plain-PyTorch attention of the package consumes these terms), and a kernel function that gives the attention kernel
its mode and inputs (`KernelRectification`).

Adding a policy is one module (settings, reference, kernel handler, one `register_*` call), its kernel when it needs
a new one, and its tests; `SparseAttentionConfig` validates `rectify` against the registered modes. This module imports
nothing above the plan, so that the settings can be validated by `spattn_compile.config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..layout import TokenLayout
from ..plan import PooledStats, SparsePlan

__all__ = [
    "BudgetConfig",
    "BudgetInputs",
    "KernelRectification",
    "RectificationConfig",
    "RectificationPolicy",
    "RectificationTerms",
    "SelectionConfig",
    "SelectionInputs",
    "SelectionPolicy",
    "Trust",
    "budget_modes",
    "budget_policy",
    "parse_budget",
    "parse_rectification",
    "rectification_modes",
    "rectification_policy",
    "register_budget",
    "register_rectification",
    "register_selection",
    "registered_selections",
    "selection_policy",
    "unregister_budget",
    "unregister_rectification",
    "unregister_selection",
]


# --------------------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """Base of the selection policies' settings. Subclasses are frozen dataclasses (hashable: part of the plan cache's
    key) with a unique `name`. `density` is the share of video key blocks each video query block keeps (the budget);
    the schedule lowers it at each plan refresh (`density_decay`) with `dataclasses.replace`. Built from a validated
    `SparseAttentionConfig` (see `spattn_compile.policies.selection_settings`), so they do not validate again."""

    name: ClassVar[str] = ""
    density: float = 1.0


@dataclasses.dataclass(frozen=True)
class Trust:
    """Which skipped video blocks a plan lists as trusted, for rectification to compensate: none when `compensate` is
    False; otherwise every skipped block with a usable key, and with `gapr` only those that pass GAPR's test
    `|q_i . k_j| > |dq_i . k_j| + |q_i . dk_j|` (pooling gain beats its first-order error)."""

    compensate: bool
    gapr: bool


@dataclasses.dataclass(frozen=True, eq=False)
class SelectionInputs:
    """What selection reads, on the canonical layout of one call.

    scores: float `(B, H, NB, NB + 1)`, the estimator's `P_hat` (float32 on the Triton path).
    stats: pooled statistics (GAPR reads the block means and deviations). key_valid: bool `(B, H, P)`, a real,
    unmasked key. key_block_count: `(B, H, NQ)` valid keys per canonical block. forced_blocks: bool `(B, H, NQ)`,
    blocks holding a valid key that is not finite (kept for every query block, so that the output is non-finite
    exactly where dense attention's is). layout: the canonical layout. estimator: the label the plan records for the
    scores' origin. scale: the call's softmax scale (None: `1/sqrt(D)`), which a budget policy may read.
    """

    scores: torch.Tensor
    stats: PooledStats
    key_valid: torch.Tensor
    key_block_count: torch.Tensor
    forced_blocks: torch.Tensor
    layout: TokenLayout
    estimator: str
    scale: float | None = None


# The settings argument is the registered settings type; `Any` keeps each function typed by its own settings class.
SelectFunction = Callable[[SelectionInputs, Any, Trust], SparsePlan]


@dataclasses.dataclass(frozen=True)
class SelectionPolicy:
    """One registered selection policy: its settings type, its reference function (any device, computing in at least
    float32) and its kernel function (CUDA, or the CPU under TRITON_INTERPRET=1)."""

    config_type: type[SelectionConfig]
    reference: SelectFunction
    kernel: SelectFunction


# --------------------------------------------------------------------------------------------------------------------
# Rectification
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RectificationConfig:
    """Base of the rectification modes' settings. Subclasses are frozen dataclasses whose `name` is a value of
    `SparseAttentionConfig.rectify`; `compensates` says whether the mode compensates skipped blocks (and so needs the
    plan's trusted lists). `gapr`: gate the trusted blocks by GAPR's test (`Trust`)."""

    name: ClassVar[str] = ""
    compensates: ClassVar[bool] = True
    gapr: bool = True

    @property
    def trust(self) -> Trust:
        """The trusted blocks this mode needs in a plan."""
        return Trust(compensate=self.compensates, gapr=self.compensates and self.gapr)


@dataclasses.dataclass(frozen=True, eq=False)
class RectificationTerms:
    """What a rectification adds to exact attention over the kept blocks, per canonical query block; all optional.

    Virtual keys (all four or none): `virtual_keys (B, H, NV, D)`, `virtual_log_weights (B, H, NV)`, `virtual_values
    (B, H, NV, D)` and `virtual_allowed`, bool `(B, H, NQ, NV)`: virtual key j joins the softmax of every query row of
    block i where `virtual_allowed[i, j]`, with logit `scale * q . virtual_keys[j] + virtual_log_weights[j]` and value
    `virtual_values[j]`.
    Affine epilogue (both or none): `rescale (B, H, NQ)` and `correction (B, H, NQ, D)`: the output of the rows of
    query block i becomes `rescale[i] * out + correction[i]`.
    """

    virtual_keys: torch.Tensor | None = None
    virtual_log_weights: torch.Tensor | None = None
    virtual_values: torch.Tensor | None = None
    virtual_allowed: torch.Tensor | None = None
    rescale: torch.Tensor | None = None
    correction: torch.Tensor | None = None

    @property
    def has_virtual_keys(self) -> bool:
        return self.virtual_keys is not None

    @property
    def has_epilogue(self) -> bool:
        return self.rescale is not None


@dataclasses.dataclass(frozen=True, eq=False)
class KernelRectification:
    """What the attention kernel (`kernels.block_sparse_attention`) runs for a mode: its `mode` (one of the kernel's
    `RECTIFY_MODES`) and the keyword tensors that mode reads."""

    mode: str
    arguments: dict[str, Any] = dataclasses.field(default_factory=dict)


TermsFunction = Callable[[SparsePlan, PooledStats, Any], RectificationTerms]
KernelArgumentsFunction = Callable[[SparsePlan, PooledStats, Any], KernelRectification]


@dataclasses.dataclass(frozen=True)
class RectificationPolicy:
    """One registered rectification mode: its settings type, its reference function (the terms, in the dtype of the
    statistics) and its kernel function (the attention kernel's mode and inputs)."""

    config_type: type[RectificationConfig]
    reference: TermsFunction
    kernel: KernelArgumentsFunction


# --------------------------------------------------------------------------------------------------------------------
# Per-head budgets (part of selection)
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """Base of the budget policies' settings: how a selection policy shares its key blocks between the heads of a
    call. Subclasses are frozen dataclasses whose `name` is a value of `SparseAttentionConfig.head_budget`. A budget
    policy returns int32 `(B, H)`: the video key blocks each video query block of head h keeps, whose mean over the
    heads is the uniform budget `block_budget(density, NB)` (to one block per head)."""

    name: ClassVar[str] = ""


@dataclasses.dataclass(frozen=True, eq=False)
class BudgetInputs:
    """What a budget policy reads: the block scores `scores (B, H, NB, NB + 1)` the estimator (or, at an exact step,
    the true block mass) already produced, the blocks each row keeps whatever its budget `forced (B, H, NB, NB)`
    (the diagonal, neighbours, blocks holding a non-finite key), and the uniform budget `uniform` (blocks per query
    block) whose mean the per-head budgets keep. A policy that weighs what rectification recovers also reads the
    pooled statistics `stats` (block means and mean absolute deviations), the softmax `scale` (None: `1/sqrt(D)`)
    and the `trust` rule of the rectification in force (None: no rectification); a caller without them passes None.
    """

    scores: torch.Tensor
    forced: torch.Tensor
    uniform: int
    stats: PooledStats | None = None
    scale: float | None = None
    trust: Trust | None = None


# Budget function: (inputs, settings) -> int32 (B, H), or None for the uniform budget (no tensor: today's path).
BudgetFunction = Callable[[BudgetInputs, Any], "torch.Tensor | None"]


# --------------------------------------------------------------------------------------------------------------------
# The registries
# --------------------------------------------------------------------------------------------------------------------


class _Registry:
    """Settings type -> policy, and name -> settings type, in registration order."""

    def __init__(self, kind: str, base: type) -> None:
        self.kind, self.base = kind, base
        self.policies: dict[type, Any] = {}
        self.names: dict[str, type] = {}

    def add(self, config_type: type, policy: object) -> None:
        if not (isinstance(config_type, type) and issubclass(config_type, self.base)):
            raise TypeError(f"config_type must be a subclass of {self.base.__name__}, got {config_type!r}")
        name = config_type.name  # type: ignore[attr-defined]
        if not name or (name in self.names and self.names[name] is not config_type):
            raise ValueError(f"{self.kind} name {name!r} of {config_type.__name__} is empty or taken")
        self.policies[config_type] = policy
        self.names[name] = config_type

    def remove(self, config_type: type) -> None:
        self.policies.pop(config_type, None)
        self.names = {name: kind for name, kind in self.names.items() if kind is not config_type}

    def get(self, settings: object) -> Any:
        try:
            return self.policies[type(settings)]
        except KeyError:
            raise TypeError(
                f"no {self.kind} is registered for settings of type {type(settings).__name__}; registered: "
                f"{list(self.names)}"
            ) from None


_SELECTION = _Registry("selection policy", SelectionConfig)
_RECTIFICATION = _Registry("rectification mode", RectificationConfig)
_BUDGET = _Registry("budget policy", BudgetConfig)


def register_selection(
    config_type: type[SelectionConfig], *, reference: SelectFunction, kernel: SelectFunction
) -> None:
    """Register the selection policy whose settings are `config_type`."""
    _SELECTION.add(config_type, SelectionPolicy(config_type, reference, kernel))


def unregister_selection(config_type: type[SelectionConfig]) -> None:
    """Remove a registered selection policy (for tests that register one of their own)."""
    _SELECTION.remove(config_type)


def registered_selections() -> dict[str, type[SelectionConfig]]:
    """Selection policy names and their settings types."""
    return dict(_SELECTION.names)


def selection_policy(settings: SelectionConfig) -> SelectionPolicy:
    """The registered selection policy of these settings."""
    return _SELECTION.get(settings)


def register_rectification(
    config_type: type[RectificationConfig], *, reference: TermsFunction, kernel: KernelArgumentsFunction
) -> None:
    """Register the rectification mode whose settings are `config_type` (its `name` becomes a value of
    `SparseAttentionConfig.rectify`)."""
    _RECTIFICATION.add(config_type, RectificationPolicy(config_type, reference, kernel))


def unregister_rectification(config_type: type[RectificationConfig]) -> None:
    """Remove a registered rectification mode (for tests that register one of their own)."""
    _RECTIFICATION.remove(config_type)


def rectification_modes() -> tuple[str, ...]:
    """The registered rectification modes, in registration order: the values `SparseAttentionConfig.rectify` takes."""
    return tuple(_RECTIFICATION.names)


def rectification_policy(settings: RectificationConfig) -> RectificationPolicy:
    """The registered rectification mode of these settings."""
    return _RECTIFICATION.get(settings)


def parse_rectification(mode: str, gapr: bool = True) -> RectificationConfig:
    """The settings of the registered mode named `mode` (ValueError naming the registered ones otherwise)."""
    config_type = _RECTIFICATION.names.get(mode) if isinstance(mode, str) else None
    if config_type is None:
        raise ValueError(f"rectify={mode!r}: expected one of {rectification_modes()}")
    return config_type(gapr=gapr)


def register_budget(config_type: type[BudgetConfig], *, allocate: BudgetFunction) -> None:
    """Register the budget policy whose settings are `config_type` (its `name` becomes a value of
    `SparseAttentionConfig.head_budget`). `allocate(inputs, settings)` returns the int32 `(B, H)` budgets, or None
    for the uniform budget."""
    _BUDGET.add(config_type, allocate)


def unregister_budget(config_type: type[BudgetConfig]) -> None:
    """Remove a registered budget policy (for tests that register one of their own)."""
    _BUDGET.remove(config_type)


def budget_modes() -> tuple[str, ...]:
    """The registered budget policies, in registration order: the values `SparseAttentionConfig.head_budget` takes."""
    return tuple(_BUDGET.names)


def budget_policy(settings: BudgetConfig) -> BudgetFunction:
    """The allocation function of these budget settings."""
    return _BUDGET.get(settings)


def parse_budget(mode: str | BudgetConfig) -> BudgetConfig:
    """The settings of the registered budget policy named `mode` (settings pass through; ValueError naming the
    registered ones otherwise)."""
    if isinstance(mode, BudgetConfig):
        budget_policy(mode)  # TypeError when its type is not registered
        return mode
    config_type = _BUDGET.names.get(mode) if isinstance(mode, str) else None
    if config_type is None:
        raise ValueError(f"head_budget={mode!r}: expected one of {budget_modes()}")
    return config_type()
