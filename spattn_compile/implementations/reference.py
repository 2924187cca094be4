"""The plain-PyTorch implementation: the reference (`spattn_compile.reference`) as an implementation of the stages,
the CPU path and the specification the Triton kernels are tested against.

Any device and float dtype; it computes in `compute_dtype` (default: the inputs' dtype promoted to at least float32;
the tests use float64) and returns the query's dtype and memory order. It is differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from ..inputs import in_query_layout
from ..layout import TokenLayout
from ..plan import SparsePlan
from ..policies.base import RectificationConfig, rectification_policy
from ..reference import (
    block_non_finite,
    canonical_key_valid,
    gather_canonical,
    key_usable,
    pool_statistics,
    rectified_sparse_attention,
    scatter_canonical,
)
from .base import Prepared

__all__ = ["ReferenceImplementation"]


class ReferenceImplementation:
    """The stages in plain PyTorch, computing in `compute_dtype` (module docstring)."""

    name = "reference"
    kind: Literal["reference", "kernel"] = "reference"

    def __init__(self, compute_dtype: torch.dtype | None = None) -> None:
        self.compute_dtype = compute_dtype

    def prepare(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: TokenLayout,
        key_valid: torch.Tensor | None,
        tile_size: int,
        scale: float,
        outliers: bool = False,
    ) -> Prepared:
        del outliers  # the reference estimator derives the outliers from the canonical keys
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

    def prepare_and_estimate(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: TokenLayout,
        key_valid: torch.Tensor | None,
        tile_size: int,
        scale: float,
        outliers: bool,
        estimate: Callable[[Prepared], torch.Tensor],
    ) -> tuple[Prepared, torch.Tensor]:
        prepared = self.prepare(query, key, value, layout, key_valid, tile_size, scale, outliers)
        scores = estimate(prepared)
        return prepared.for_attending(), scores

    def attend(self, prepared: Prepared, plan: SparsePlan, rectification: RectificationConfig) -> torch.Tensor:
        plan = plan.expand_batch(prepared.q.shape[0])
        terms = rectification_policy(rectification).reference(plan, prepared.stats, rectification)
        out_c = rectified_sparse_attention(
            prepared.q,
            prepared.k,
            prepared.v,
            prepared.key_valid,
            plan,
            prepared.layout,
            scale=prepared.scale,
            terms=terms,
        )
        return in_query_layout(scatter_canonical(out_c, prepared.layout).to(prepared.query.dtype), prepared.query)
