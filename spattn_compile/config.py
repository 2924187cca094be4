"""Settings of spattn_compile: one frozen dataclass and a context manager that scopes overrides.

`SparseAttentionConfig` holds every knob of docs/DESIGN.md; each field is validated on construction with an error that
names the field, the value and what is allowed (this is the one place settings are validated). The estimator and the
rectification mode are validated against their registries (`estimators.base`, `policies.base`; importing those
registers the built-in estimators and policies), so a newly registered one is a valid setting. The active settings
live in a `contextvars.ContextVar`, so `with spattn_compile.config(...)` nests, and is private to its thread and its
asyncio task. Compiled graphs read the active settings when the op runs (never at trace time), so changing them never
recompiles.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import numbers
from collections.abc import Iterator
from typing import Literal

from .estimators.base import EstimatorConfig, parse_estimator
from .policies.base import budget_modes, rectification_modes

__all__ = ["SparseAttentionConfig", "config", "current_config", "explicit_fields", "reset_config", "set_config"]

ReorderMode = Literal["hilbert", "none"]
TextPosition = Literal["first", "last"]

_REORDER_MODES = ("hilbert", "none")
_TEXT_POSITIONS = ("first", "last")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# Fields holding numbers: NumPy scalars (np.int64, np.float32) are accepted and stored as Python numbers, so that
# configs compare, hash and print alike whatever built them.
_INT_FIELDS = ("block_size", "dense_steps", "refresh_interval", "exact_plan_steps", "min_seq_len", "text_len")
_FLOAT_FIELDS = ("sparsity", "mass_threshold", "max_density", "density_decay")


def _fail(field: str, value: object, allowed: str) -> None:
    raise ValueError(f"SparseAttentionConfig.{field}={value!r} is invalid: expected {allowed}")


def _fail_type(field: str, value: object, allowed: str) -> None:
    raise TypeError(f"SparseAttentionConfig.{field}={value!r} has type {type(value).__name__}: expected {allowed}")


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
    """Settings of sparse attention. Frozen: derive variants with `dataclasses.replace` or `spattn_compile.config`.

    Selection (estimate and select, stages 1-2 of docs/DESIGN.md):
        sparsity: fraction of video key blocks each query block skips, in [0, 1). 0 keeps every block (dense).
        block_size: tokens per block after reordering (a power of two, 16 to 256).
        estimator: the block-importance estimator: an `EstimatorConfig` (`spattn_compile.estimators`:
            `QueryTiles(tile_size)`, `SampledRows(rows)`, `PooledTiles(tile_size, outliers)`) or a registered name
            ("query_tiles", "sampled_rows", "pooled") for its default settings.
        mass_threshold: if set, in (0, 1]: keep adding blocks beyond the budget until the kept blocks hold this share
            of the estimated attention mass, up to `max_density`. None selects exactly the budget.
        max_density: upper bound, in (0, 1], on the share of video key blocks the threshold may grow a row to.
        reorder: "hilbert" (3-D generalized Hilbert curve) or "none" (raster order).
        neighbors: always keep the blocks holding any 26-neighbour of a token of the query block.
        head_budget: a registered budget policy (`spattn_compile.policies.budgets`): how the key blocks are shared
            between the heads of a call at the same average density. "uniform" (every head keeps `1 - sparsity`),
            "water_fill" (blocks go to the heads whose next block holds the most estimated mass), "residual" (to
            the heads whose next blocks leave the most error after rectification) or "calibrated" (the residual
            policy on each head's calibrated missing mass).
    Rectification (attend, stage 3):
        rectify: a registered rectification mode (`spattn_compile.policies`): "none" (plain block-sparse), "block"
            (IPAR/GAPR scalar R and vector c per query block) or "query" (trusted skipped blocks enter the softmax as
            virtual pooled keys).
        gapr: gate the compensation of skipped blocks by GAPR's test; False compensates every skipped block.
    Schedule (across denoising steps and layers, `spattn_compile.runtime`):
        dense_steps: number of leading denoising steps run dense.
        dense_layers: attention layer indices (as numbered by the compiler pass) that always run dense.
        refresh_interval: steps between recomputations of a cached plan (1: recompute every step).
        exact_plan_steps: with `dense_steps > 0`, the last dense step also measures the true block mass (a second,
            `Q K^T`-only pass) and its plan serves this many sparse steps before estimates take over (0: never).
        density_decay: density removed at each refresh, in [0, 1) (DFSAttn's adaptive ratio).
        min_seq_len: sequences shorter than this run dense attention.
    Overrides for the compiler pass (None: infer from the graph):
        video_grid: (frames, height, width) of the latent token grid.
        text_len: number of text tokens in the joint sequence.
        text_position: "first" or "last".
    """

    sparsity: float = 0.75
    block_size: int = 128
    # PooledTiles(tile_size=16, outliers=True): the registered "pooled" estimator's defaults.
    estimator: EstimatorConfig = dataclasses.field(default_factory=functools.partial(parse_estimator, "pooled"))
    mass_threshold: float | None = None
    max_density: float = 0.5
    reorder: ReorderMode = "hilbert"
    rectify: str = "query"
    gapr: bool = True
    neighbors: bool = False
    head_budget: str = "uniform"
    dense_steps: int = 0
    dense_layers: tuple[int, ...] = ()
    refresh_interval: int = 1
    exact_plan_steps: int = 5
    density_decay: float = 0.0
    min_seq_len: int = 2048
    video_grid: tuple[int, int, int] | None = None
    text_len: int | None = None
    text_position: TextPosition | None = None

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if _is_int(value):
                object.__setattr__(self, name, int(value))
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if _is_real(value) and not isinstance(value, numbers.Integral):
                object.__setattr__(self, name, float(value))
        for name in ("dense_layers", "video_grid"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and all(_is_int(x) for x in value):
                object.__setattr__(self, name, type(value)(int(x) for x in value))
        self._check_fraction("sparsity", self.sparsity, low_open=False, high_open=True, allowed="a number in [0, 1)")
        if not _is_int(self.block_size):
            _fail_type("block_size", self.block_size, "an int")
        if self.block_size < 16 or self.block_size > 256 or self.block_size & (self.block_size - 1):
            _fail("block_size", self.block_size, "a power of two from 16 to 256")
        estimator = parse_estimator(self.estimator)
        estimator.check_block_size(self.block_size)
        object.__setattr__(self, "estimator", estimator)
        if self.mass_threshold is not None:
            self._check_fraction(
                "mass_threshold",
                self.mass_threshold,
                low_open=True,
                high_open=False,
                allowed="None or a number in (0, 1]",
            )
        self._check_fraction(
            "max_density", self.max_density, low_open=True, high_open=False, allowed="a number in (0, 1]"
        )
        if self.reorder not in _REORDER_MODES:
            _fail("reorder", self.reorder, f"one of {_REORDER_MODES}")
        if self.rectify not in rectification_modes():
            _fail("rectify", self.rectify, f"one of {rectification_modes()}")
        if self.head_budget not in budget_modes():
            _fail("head_budget", self.head_budget, f"one of {budget_modes()}")
        for name in ("gapr", "neighbors"):
            if not isinstance(getattr(self, name), bool):
                _fail_type(name, getattr(self, name), "a bool")
        for name, low in (("dense_steps", 0), ("refresh_interval", 1), ("exact_plan_steps", 0), ("min_seq_len", 0)):
            value = getattr(self, name)
            if not _is_int(value):
                _fail_type(name, value, "an int")
            if value < low:
                _fail(name, value, f"an int >= {low}")
        layers = self.dense_layers
        if isinstance(layers, (list, set, frozenset)):
            layers = tuple(sorted(layers))
            object.__setattr__(self, "dense_layers", layers)
        if not isinstance(layers, tuple) or not all(_is_int(x) and x >= 0 for x in layers):
            _fail("dense_layers", self.dense_layers, "a tuple of non-negative ints")
        self._check_fraction(
            "density_decay", self.density_decay, low_open=False, high_open=True, allowed="a number in [0, 1)"
        )
        if self.video_grid is not None:
            grid = self.video_grid
            if isinstance(grid, list):
                grid = tuple(grid)
                object.__setattr__(self, "video_grid", grid)
            if not (isinstance(grid, tuple) and len(grid) == 3 and all(_is_int(x) and x >= 1 for x in grid)):
                _fail("video_grid", self.video_grid, "None or a tuple of three positive ints (frames, height, width)")
        if self.text_len is not None:
            if not _is_int(self.text_len):
                _fail_type("text_len", self.text_len, "None or an int")
            if self.text_len < 0:
                _fail("text_len", self.text_len, "None or an int >= 0")
        if self.text_position is not None and self.text_position not in _TEXT_POSITIONS:
            _fail("text_position", self.text_position, f"None or one of {_TEXT_POSITIONS}")

    @staticmethod
    def _check_fraction(name: str, value: object, *, low_open: bool, high_open: bool, allowed: str) -> None:
        if not _is_real(value):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                _fail(name, value, allowed)
            _fail_type(name, value, allowed)
        # A finite real number, checked above.
        number = float(value)  # type: ignore[arg-type]
        too_low = number <= 0 if low_open else number < 0
        too_high = number >= 1 if high_open else number > 1
        if too_low or too_high:
            _fail(name, value, allowed)

    @property
    def density(self) -> float:
        """Target share of video key blocks kept per query block, `1 - sparsity`."""
        return 1.0 - self.sparsity


_ACTIVE: contextvars.ContextVar[SparseAttentionConfig] = contextvars.ContextVar(
    "spattn_compile_config",
    default=SparseAttentionConfig(),  # noqa: B039  (frozen, so sharing the default is safe)
)


_ALL_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(SparseAttentionConfig))
# Names of the fields that an enclosing `config(...)` / `set_config` chose explicitly; compiled models let these win
# over their compile-time options (see `spattn_compile.backend`).
_EXPLICIT: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "spattn_compile_explicit_fields", default=frozenset()
)


def current_config() -> SparseAttentionConfig:
    """The settings in force in this thread / task: the innermost `config(...)` block, else the defaults."""
    return _ACTIVE.get()


def explicit_fields() -> frozenset[str]:
    """The fields set explicitly by the enclosing `config(...)` blocks (all fields after `set_config` or
    `config(base)`); the others hold library defaults."""
    return _EXPLICIT.get()


def set_config(new: SparseAttentionConfig) -> tuple[contextvars.Token, contextvars.Token]:
    """Replace the active settings (all fields count as explicitly set) until `reset_config(token)`; prefer the
    `config` context manager."""
    if not isinstance(new, SparseAttentionConfig):
        raise TypeError(f"set_config expects a SparseAttentionConfig, got {type(new).__name__}")
    return _ACTIVE.set(new), _EXPLICIT.set(_ALL_FIELDS)


def reset_config(token: tuple[contextvars.Token, contextvars.Token]) -> None:
    """Undo the `set_config` call that returned `token`."""
    config_token, explicit_token = token
    _EXPLICIT.reset(explicit_token)
    _ACTIVE.reset(config_token)


@contextlib.contextmanager
def config(base: SparseAttentionConfig | None = None, /, **overrides: object) -> Iterator[SparseAttentionConfig]:
    """Scope settings: `with spattn_compile.config(sparsity=0.9, rectify="query"): ...`.

    Fields not overridden keep their value from the enclosing block (or `base`, if given, whose fields then all count
    as explicitly set). Unknown names raise `TypeError`; out-of-range values raise `ValueError` naming the field.
    """
    start = current_config() if base is None else base
    if not isinstance(start, SparseAttentionConfig):
        raise TypeError(
            f"config() takes a SparseAttentionConfig as its positional argument, got {type(start).__name__}"
        )
    unknown = sorted(set(overrides) - _ALL_FIELDS)
    if unknown:
        raise TypeError(f"unknown SparseAttentionConfig field(s) {unknown}; known fields: {sorted(_ALL_FIELDS)}")
    # Values of any type reach __post_init__, which validates them with errors naming the field; a config given
    # whole was validated when it was built.
    new = dataclasses.replace(start, **overrides) if overrides else start  # type: ignore[arg-type]
    explicit = _ALL_FIELDS if base is not None else _EXPLICIT.get() | frozenset(overrides)
    token = set_config(new)
    _EXPLICIT.reset(token[1])
    explicit_token = _EXPLICIT.set(explicit)
    try:
        yield new
    finally:
        _EXPLICIT.reset(explicit_token)
        _ACTIVE.reset(token[0])
