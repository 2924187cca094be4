"""The Triton implementation: the kernels of `spattn_compile.kernels` (CUDA, or the CPU under `TRITON_INTERPRET=1`).

- prepare: `reorder_pool` (gather into the canonical layout + pooled statistics, one read of Q, K, V);
- attend: the rectification's kernel inputs (its policy's `kernel` handler: block mode's `R`, `c` by small torch ops
  on `(B, H, NB, NB)` tensors, query mode's pooled keys), then `block_sparse_attention`, which stores each canonical
  row straight into its original position of the output (the inverse reorder fused into the epilogue), in the query's
  memory order.

The estimate and select stages run the estimators' and selection policies' `kernel` handlers. Beyond the three
canonical copies of Q, K, V a call allocates O(B * H * (S * D / tile_size + NQ^2)) memory (plus the probe estimators'
bounded scratch), never O(S^2); nothing is read back to the host, so a call can be captured in a CUDA graph once its
layout is cached. Inputs: float16, bfloat16 or float32, any strides (a non-contiguous last dim is copied), head dims
as `spattn_compile.capability` allows (checked by the registry before this is made).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..inputs import output_like
from ..kernels.block_sparse_attention import block_sparse_attention
from ..kernels.reorder_pool import reorder_pool
from ..layout import TokenLayout
from ..plan import SparsePlan
from ..policies.base import RectificationConfig, rectification_policy
from .base import Prepared

__all__ = ["TritonImplementation"]


class TritonImplementation:
    """The stages with the Triton kernels (module docstring)."""

    name = "triton"
    kind: Literal["reference", "kernel"] = "kernel"

    def prepare(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: TokenLayout,
        key_valid: torch.Tensor | None,
        tile_size: int,
        scale: float,
    ) -> Prepared:
        query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
        pooled = reorder_pool(query, key, value, layout, tile_size=tile_size, key_valid=key_valid)
        return Prepared(
            layout,
            query,
            pooled.q,
            pooled.k,
            pooled.v,
            pooled.key_valid,
            pooled.key_usable,
            pooled.key_block_count,
            pooled.block_non_finite,
            pooled.stats,
            scale,
            key_valid is not None,
        )

    def attend(self, prepared: Prepared, plan: SparsePlan, rectification: RectificationConfig) -> torch.Tensor:
        layout = prepared.layout
        plan = plan.expand_batch(prepared.q.shape[0])
        kernel = rectification_policy(rectification).kernel(plan, prepared.stats, rectification)
        # Padding rows of a partial block are zero keys: they must be masked even when the caller masks nothing.
        needs_key_valid = prepared.masked_keys or layout.padded_len != layout.seq_len
        return block_sparse_attention(
            prepared.q,
            prepared.k,
            prepared.v,
            plan.kv_counts,
            plan.kv_indices,
            scale=prepared.scale,
            block_size=layout.block_size,
            key_valid=prepared.key_valid if needs_key_valid else None,
            rectify=kernel.mode,
            out_index=layout.to(prepared.q.device).source_index,
            out=output_like(prepared.query),
            # Text query rows attend to every block, so their programs run ~1/density times longer than a video
            # row's: started first, they do not leave a tail at the end of the grid.
            priority_query_blocks=layout.num_text_blocks,
            **kernel.arguments,
        )
