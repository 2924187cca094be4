"""What every block-importance estimator is: a frozen settings class, a reference function and a kernel function.

An estimator turns the canonical Q, K (and their pooled statistics) of one call into `P_hat (B, H, NB, NB + 1)`: for
each video query block, its estimated share of attention mass on each video key block (columns 0..NB-1) and on all
text keys together (column NB); each row sums to 1. Selection (stage 2) then keeps the highest-scoring blocks.

The registry maps a settings type to its `Estimator` (torchao's pattern: config type -> handler), so the pipeline never
names an estimator. Adding one is: a frozen dataclass deriving from `EstimatorConfig`, a plain-PyTorch reference
function, a kernel function (Triton, imported lazily so the package works without Triton), one
`register_estimator(...)` call, and their tests. Nothing else changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..layout import TokenLayout
from ..plan import PooledStats

__all__ = [
    "Estimator",
    "EstimatorConfig",
    "EstimatorInputs",
    "KeyTileOutliers",
    "estimator_for",
    "parse_estimator",
    "register_estimator",
    "probe_weights",
    "registered_estimators",
    "unregister_estimator",
]


@dataclasses.dataclass(frozen=True)
class EstimatorConfig:
    """Base class of the estimators' settings. Subclasses are frozen dataclasses (hashable: they are part of
    `SparseAttentionConfig`) with a unique `name`, validate their fields in `__post_init__`, and say which pooled
    statistics they read through `pool_tile_size`."""

    name: ClassVar[str] = ""
    # True when the scores are the exact attention mass of real query rows (so recall computed from them is a
    # measurement, not an estimate of an estimate).
    measures_mass: ClassVar[bool] = False

    def pool_tile_size(self, block_size: int) -> int:
        """The tile size of the `PooledStats` this estimator reads (`block_size`: it reads no tile statistics)."""
        return block_size

    @property
    def reads_tile_outliers(self) -> bool:
        """Whether the estimator reads the key tiles' outliers (`KeyTileOutliers`), which the Triton preparation
        computes in its one pass over the keys when asked."""
        return False

    def check_block_size(self, block_size: int) -> None:
        """Raise ValueError naming the field when these settings cannot work with `block_size`."""

    def query_probes_per_block(self, block_size: int) -> int:
        """Query vectors scored against the keys per query block (the cost in units of `1 / block_size` of the dense
        `Q K^T`); 0 when no query is scored against every key."""
        return 0


@dataclasses.dataclass(frozen=True, eq=False)
class KeyTileOutliers:
    """The pooled estimator's split of each video key tile (`estimators.pooled`): the tile's usable key farthest from
    the mean of its usable keys (the first on ties), and the mean and count of the others. The Triton path computes
    them in its one pass over the keys (`kernels.statistics.prepare_statistics`); the reference derives them from
    the canonical keys (`estimators.pooled.tile_outliers_reference`).

    rest_mean, outlier: `(B, H, NT, D)`; rest_count, outlier_count: float32 `(B, H, NT)` (outlier_count is 1 where the
    tile has a usable key; else 0, with a zero outlier).
    """

    rest_mean: torch.Tensor
    rest_count: torch.Tensor
    outlier: torch.Tensor
    outlier_count: torch.Tensor


@dataclasses.dataclass(frozen=True, eq=False)
class EstimatorInputs:
    """What an estimator may read, on the canonical layout of one call.

    q, k: the queries and keys. Without `source_index`: `(B, H, P, D)` canonical copies (P = layout.padded_len;
    padding rows are zero). With it: the caller's `(B, H, S, D)` tensors in the original order (any strides, the last
    dim contiguous), canonical row p being row `source_index[p]` (-1: a padding row, zero); the kernels read them
    through the index, and `canonical_q()` / `canonical_k()` gather copies for the references.
    key_valid: bool `(B, H, P)` in canonical order: the row is a real, unmasked key with finite key and value rows.
    stats: pooled statistics at the estimator's `pool_tile_size` (float32 block statistics; tile means float32 or,
    from `prepare_statistics`, the inputs' 16-bit dtype).
    layout: the canonical layout. scale: the softmax scale.
    source_index: None, or `layout.source_index` on the inputs' device (see q, k).
    outliers: the key tiles' outliers at `stats.tile_size` when the preparation computed them, else None (the pooled
    estimator then computes them).
    """

    q: torch.Tensor
    k: torch.Tensor
    key_valid: torch.Tensor
    stats: PooledStats
    layout: TokenLayout
    scale: float
    source_index: torch.Tensor | None = None
    outliers: KeyTileOutliers | None = None

    def __post_init__(self) -> None:
        if self.source_index is not None:
            rows = self.layout.seq_len
            if self.source_index.shape != (self.layout.padded_len,) or self.q.shape[-2] != rows:
                raise ValueError(
                    f"EstimatorInputs: with source_index, q and k must be the caller's (B, H, {rows}, D) tensors and "
                    f"source_index the layout's ({self.layout.padded_len},) index; got q {tuple(self.q.shape)}, "
                    f"source_index {tuple(self.source_index.shape)}"
                )

    @property
    def in_source_order(self) -> bool:
        """q and k are the caller's tensors, read through `source_index` (no canonical copies exist)."""
        return self.source_index is not None

    def canonical_q(self) -> torch.Tensor:
        """`(B, H, P, D)` canonical queries (a gathered copy when `in_source_order`)."""
        return self._canonical(self.q)

    def canonical_k(self) -> torch.Tensor:
        """`(B, H, P, D)` canonical keys (a gathered copy when `in_source_order`)."""
        return self._canonical(self.k)

    def _canonical(self, x: torch.Tensor) -> torch.Tensor:
        if self.source_index is None:
            return x
        # `reference.gather_canonical`'s arithmetic; the reference is above this layer (tests/test_architecture.py).
        source = self.source_index
        return x.index_select(-2, source.clamp(min=0)).masked_fill((source < 0)[:, None], 0)


# The settings argument is the registered settings type; `Any` keeps each function typed by its own settings class.
ScoreFunction = Callable[[EstimatorInputs, Any], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Estimator:
    """One registered estimator: its settings type, its reference function (the specification, any dtype, computing
    in at least float32) and its kernel function (CUDA, or the CPU under TRITON_INTERPRET=1; float32 scores)."""

    config_type: type[EstimatorConfig]
    reference: ScoreFunction
    kernel: ScoreFunction


_REGISTRY: dict[type[EstimatorConfig], Estimator] = {}
_BY_NAME: dict[str, type[EstimatorConfig]] = {}


def register_estimator(config_type: type[EstimatorConfig], *, reference: ScoreFunction, kernel: ScoreFunction) -> None:
    """Register the estimator whose settings are `config_type` (a frozen `EstimatorConfig` subclass with a unique
    `name`)."""
    if not (isinstance(config_type, type) and issubclass(config_type, EstimatorConfig)):
        raise TypeError(f"config_type must be a subclass of EstimatorConfig, got {config_type!r}")
    name = config_type.name
    if not name or (name in _BY_NAME and _BY_NAME[name] is not config_type):
        raise ValueError(f"estimator name {name!r} of {config_type.__name__} is empty or taken")
    _REGISTRY[config_type] = Estimator(config_type, reference, kernel)
    _BY_NAME[name] = config_type


def unregister_estimator(config_type: type[EstimatorConfig]) -> None:
    """Remove a registered estimator (for tests that register one of their own)."""
    _REGISTRY.pop(config_type, None)
    for name in [name for name, kind in _BY_NAME.items() if kind is config_type]:
        del _BY_NAME[name]


def registered_estimators() -> dict[str, type[EstimatorConfig]]:
    """Estimator names and their settings types."""
    return dict(_BY_NAME)


def estimator_for(config: EstimatorConfig) -> Estimator:
    """The registered estimator of these settings."""
    try:
        return _REGISTRY[type(config)]
    except KeyError:
        raise TypeError(
            f"no estimator is registered for settings of type {type(config).__name__}; registered: "
            f"{sorted(_BY_NAME)}"
        ) from None


def parse_estimator(value: object) -> EstimatorConfig:
    """An `EstimatorConfig` instance as is, or a registered name with default settings."""
    if isinstance(value, EstimatorConfig):
        estimator_for(value)
        return value
    if isinstance(value, str):
        if value not in _BY_NAME:
            raise ValueError(
                f"SparseAttentionConfig.estimator={value!r} is invalid: expected one of {sorted(_BY_NAME)} or an "
                "EstimatorConfig instance (e.g. spattn_compile.estimators.QueryTiles(tile_size=16))"
            )
        return _BY_NAME[value]()
    raise TypeError(
        f"SparseAttentionConfig.estimator={value!r} has type {type(value).__name__}: expected an estimator name "
        f"({sorted(_BY_NAME)}) or an EstimatorConfig instance"
    )


def probe_weights(probes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`(B, H, NB * R)`: the probes' weights, zero for a probe with a NaN or an infinity (a query row that is not
    finite has no attention mass to estimate; dense attention gives that row NaN whatever the plan). Shared by the
    probe estimators' reference (`estimators.probes`) and their kernel (`kernels.probe_scores`)."""
    b, h, num_probes = probes.shape[:3]
    finite = torch.isfinite(probes).all(-1)
    return torch.where(finite, weights.to(torch.float32).expand(b, h, num_probes), 0.0)
