"""The sparse-attention pipeline: one orchestrator of the stages, for both implementations.

A call goes through four stages (docs/DESIGN.md), each provided by an implementation (`Stages`): the plain-PyTorch
reference (`ReferenceStages`, the specification and the CPU path) or the Triton kernels (`kernels.stages.
TritonStages`, CUDA, or the CPU under `TRITON_INTERPRET=1`):

1. `prepare`: the Hilbert reorder into the canonical layout and the pooled statistics (`plan.PooledStats`);
2. `scores`: the block-importance estimate of the configured estimator (`spattn_compile.estimators`);
3. `select`: the plan (`plan.SparsePlan`: kept and trusted blocks) at a density;
4. `attend`: rectified block-sparse attention with a plan, back in the original token order.

`plan_attention` runs 1-3, `attend_with_plan` runs 1 and 4, `run_attention` runs all four (a fresh plan) or 1 and 4
(a given plan). The public `select_plan` / `sparse_attention` (`spattn_compile.api`) and the compiled graphs' op
(`spattn_compile.ops`, with the denoising schedule's plan cache) all come through here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch

from .config import SparseAttentionConfig
from .estimators import EstimatorConfig, EstimatorInputs, estimator_for
from .layout import TokenLayout
from .plan import PooledStats, SparsePlan
from .reference import (
    block_non_finite,
    canonical_key_valid,
    gather_canonical,
    key_usable,
    pool_statistics,
    rectified_sparse_attention,
    scatter_canonical,
    select_plan_reference,
)

__all__ = [
    "IMPLS",
    "output_like",
    "Prepared",
    "ReferenceStages",
    "Stages",
    "attend_with_plan",
    "plan_attention",
    "resolve_impl",
    "run_attention",
    "stages_for",
]

IMPLS = ("auto", "triton", "reference")


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """Stage 1's result: the canonical inputs of one call and their pooled statistics.

    query: the caller's `(B, H, S, D)` query (for the output's dtype and memory order).
    q, k, v: `(B, H, P, D)` canonical copies (padding rows zero). key_valid: bool `(B, H, P)`: a real, unmasked key.
    key_usable: bool `(B, H, P)`: a valid key whose key and value rows are finite (what statistics and estimators
    read). key_block_count: `(B, H, NQ)` valid keys per canonical block. block_non_finite: bool `(B, H, NQ)`: the
    block holds a valid key that is not usable. stats: pooled statistics at `stats.tile_size`.
    masked_keys: the call has a key-padding mask (else only padding rows are invalid).
    """

    layout: TokenLayout
    query: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_valid: torch.Tensor
    key_usable: torch.Tensor
    key_block_count: torch.Tensor
    block_non_finite: torch.Tensor
    stats: PooledStats
    scale: float
    masked_keys: bool

    def estimator_inputs(self) -> EstimatorInputs:
        return EstimatorInputs(self.q, self.k, self.key_usable, self.stats, self.layout, self.scale)


def output_like(query: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of the query's shape, dtype, device and memory order (the order of its strides), so
    that a `(B, S, H, D)` query viewed as `(B, H, S, D)` gets an output the caller can transpose back for free. The
    custom op's fake implementation promises exactly this layout."""
    order = sorted(range(query.dim()), key=lambda d: (query.stride(d), query.shape[d]), reverse=True)
    strides = [0] * query.dim()
    running = 1
    for dim in reversed(order):
        strides[dim] = running
        running *= max(1, query.shape[dim])
    return torch.empty_strided(query.shape, tuple(strides), dtype=query.dtype, device=query.device)


def in_query_layout(out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """`out` itself when it already has `output_like(query)`'s strides, else a copy that has them."""
    target = output_like(query)
    return out if out.stride() == target.stride() else target.copy_(out)


class Stages(Protocol):
    """One implementation of the pipeline's stages (module docstring)."""

    name: str

    def prepare(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: TokenLayout,
        key_valid: torch.Tensor | None,
        tile_size: int,
        scale: float,
    ) -> Prepared: ...

    def scores(self, prepared: Prepared, estimator: EstimatorConfig) -> torch.Tensor: ...

    def select(
        self,
        prepared: Prepared,
        scores: torch.Tensor,
        *,
        density: float,
        config: SparseAttentionConfig,
        estimator_name: str,
    ) -> SparsePlan: ...

    def attend(self, prepared: Prepared, plan: SparsePlan, *, rectify: str) -> torch.Tensor: ...


class ReferenceStages:
    """The stages in plain PyTorch (`spattn_compile.reference`), computing in `compute_dtype` (default: the inputs'
    dtype promoted to at least float32). Any device, any float dtype; the output has the query's dtype."""

    name = "reference"

    def __init__(self, compute_dtype: torch.dtype | None = None) -> None:
        self.compute_dtype = compute_dtype

    def prepare(self, query, key, value, layout, key_valid, tile_size, scale) -> Prepared:
        dtype = self.compute_dtype or torch.promote_types(query.dtype, torch.float32)
        b, h = query.shape[:2]
        valid_c = canonical_key_valid(key_valid, layout, b, h, query.device)
        q_c, k_c, v_c = (gather_canonical(t.to(dtype), layout) for t in (query, key, value))
        stats = pool_statistics(q_c, k_c, v_c, valid_c, layout, tile_size)
        key_block_count = valid_c.reshape(b, h, layout.num_blocks, layout.block_size).sum(-1).to(dtype)
        return Prepared(
            layout,
            query,
            q_c,
            k_c,
            v_c,
            valid_c,
            key_usable(k_c, v_c, valid_c),
            key_block_count,
            block_non_finite(k_c, v_c, valid_c, layout),
            stats,
            scale,
            key_valid is not None,
        )

    def scores(self, prepared: Prepared, estimator: EstimatorConfig) -> torch.Tensor:
        return estimator_for(estimator).reference(prepared.estimator_inputs(), estimator)

    def select(self, prepared, scores, *, density, config, estimator_name) -> SparsePlan:
        return select_plan_reference(
            scores,
            prepared.stats,
            prepared.key_valid,
            prepared.layout,
            density=density,
            config=config,
            estimator=estimator_name,
            forced_blocks=prepared.block_non_finite,
        )

    def attend(self, prepared: Prepared, plan: SparsePlan, *, rectify: str) -> torch.Tensor:
        plan = plan.expand_batch(prepared.q.shape[0])
        out_c = rectified_sparse_attention(
            prepared.q,
            prepared.k,
            prepared.v,
            prepared.key_valid,
            plan,
            prepared.stats,
            prepared.layout,
            scale=prepared.scale,
            rectify=rectify,
        )
        return in_query_layout(scatter_canonical(out_c, prepared.layout).to(prepared.query.dtype), prepared.query)


def resolve_impl(impl: str, device: torch.device) -> str:
    """"triton" or "reference" for `impl` ("auto": Triton on CUDA, the reference elsewhere)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return impl


def stages_for(impl: str, device: torch.device) -> Stages:
    """The stages of `impl` ("auto", "triton" or "reference") for inputs on `device`."""
    if resolve_impl(impl, device) == "triton":
        from .kernels.stages import TritonStages

        return TritonStages()
    return ReferenceStages()


def _default_scale(query: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)


def plan_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    layout: TokenLayout,
    key_valid: torch.Tensor | None,
    scale: float | None,
    config: SparseAttentionConfig,
    stages: Stages,
    density: float | None = None,
    estimator: EstimatorConfig | None = None,
    estimator_name: str | None = None,
) -> tuple[SparsePlan, Prepared]:
    """Stages 1-3: the plan of one call at `density` (default `config.density`) from `estimator` (default
    `config.estimator`), and the prepared inputs (reusable by `attend_with_plan`'s stage 4)."""
    estimator = config.estimator if estimator is None else estimator
    density = config.density if density is None else density
    tile = estimator.pool_tile_size(layout.block_size)
    prepared = stages.prepare(query, key, value, layout, key_valid, tile, _default_scale(query, scale))
    scores = stages.scores(prepared, estimator)
    plan = stages.select(
        prepared, scores, density=density, config=config, estimator_name=estimator_name or estimator.name
    )
    return plan, prepared


def attend_with_plan(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    plan: SparsePlan,
    key_valid: torch.Tensor | None,
    scale: float | None,
    config: SparseAttentionConfig,
    stages: Stages,
    prepared: Prepared | None = None,
) -> torch.Tensor:
    """Stages 1 and 4 with a given plan (its layout must be the call's; see `SparsePlan.check_compatible`). The
    pooled statistics of the rectification are always fresh; block mode reuses the plan's `block_scores`."""
    if prepared is None:
        block = plan.layout.block_size
        prepared = stages.prepare(query, key, value, plan.layout, key_valid, block, _default_scale(query, scale))
    return stages.attend(prepared, plan, rectify=config.rectify)


def run_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    layout: TokenLayout,
    key_valid: torch.Tensor | None,
    scale: float | None,
    config: SparseAttentionConfig,
    stages: Stages,
    plan: SparsePlan | None = None,
    density: float | None = None,
) -> tuple[torch.Tensor, SparsePlan]:
    """The whole pipeline: with `plan`, stages 1 and 4; without, a fresh plan at `density` and all four stages (one
    preparation shared by both). Returns the output `(B, H, S, D)` and the plan used."""
    prepared = None
    if plan is None:
        plan, prepared = plan_attention(
            query, key, value, layout=layout, key_valid=key_valid, scale=scale, config=config, stages=stages,
            density=density,
        )  # fmt: skip
    out = attend_with_plan(
        query, key, value, plan=plan, key_valid=key_valid, scale=scale, config=config, stages=stages,
        prepared=prepared,
    )  # fmt: skip
    return out, plan
