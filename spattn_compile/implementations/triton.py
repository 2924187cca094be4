"""The Triton implementation: the kernels of `spattn_compile.kernels` (CUDA, or the CPU under `TRITON_INTERPRET=1`).

No copy of Q, K or V is made: every kernel reads the caller's tensors through the layout's index
(`layout.source_index`, canonical row -> original row), each row one contiguous D-vector, so a gathered read costs the
bytes of a contiguous one.

- prepare: `prepare_statistics`, one read of Q, K, V: the pooled statistics, the canonical key validity and (for the
  pooled estimator) the key tiles' outliers;
- attend: the rectification's kernel inputs (its policy's `kernel` handler: block mode's `R`, `c` by small torch ops
  on `(B, H, NB, NB)` tensors, query mode's pooled keys), then `block_sparse_attention` with gathered reads, which
  stores each canonical row straight into its original position of the output, in the query's memory order.

The estimate and select stages run the estimators' and selection policies' `kernel` handlers. A call allocates
O(B * H * (S * D / tile_size + NQ^2)) memory (plus the estimators' bounded scratch), never O(S^2) nor a copy of the
inputs; nothing is read back to the host, so a call can be captured in a CUDA graph once its layout is cached.
Inputs: float16, bfloat16 or float32, any strides (a non-contiguous last dim is copied), head dims as
`spattn_compile.capability` allows (checked by the registry before this is made).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..inputs import output_like
from ..kernels.block_sparse_attention import block_sparse_attention
from ..kernels.statistics import prepare_statistics
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
        outliers: bool = False,
    ) -> Prepared:
        query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
        found = prepare_statistics(
            query, key, value, layout, tile_size=tile_size, key_valid=key_valid, outliers=outliers
        )
        return Prepared(
            layout,
            query,
            query,
            key,
            value,
            found.key_valid,
            found.key_usable,
            found.key_block_count,
            found.block_non_finite,
            found.stats,
            scale,
            key_valid is not None,
            found.source_index,
            found.outliers,
        )

    def attend(self, prepared: Prepared, plan: SparsePlan, rectification: RectificationConfig) -> torch.Tensor:
        layout = prepared.layout
        plan = plan.expand_batch(prepared.q.shape[0])
        kernel = rectification_policy(rectification).kernel(plan, prepared.stats, rectification)
        return block_sparse_attention(
            prepared.q,
            prepared.k,
            prepared.v,
            plan.kv_counts,
            plan.kv_indices,
            scale=prepared.scale,
            block_size=layout.block_size,
            # Padding rows of a partial block are masked by the gathered reads themselves (row index -1).
            key_valid=prepared.key_valid if prepared.masked_keys else None,
            rectify=kernel.mode,
            row_index=prepared.source_index,
            out=output_like(prepared.query),
            # Text query rows attend to every block, so their programs run ~1/density times longer than a video
            # row's: started first, they do not leave a tail at the end of the grid.
            priority_query_blocks=layout.num_text_blocks,
            **kernel.arguments,
        )
