"""The pipeline's stages with the Triton kernels (`pipeline.Stages`); the orchestration is `spattn_compile.pipeline`'s.

- prepare: `reorder_pool` (gather into the canonical layout + pooled statistics, one read of Q, K, V);
- scores: the configured estimator's kernel (`spattn_compile.estimators`);
- select: `select.gapr_gate` (when the plan needs trusted lists) and `select.select_plan`;
- attend: the rectification inputs (block mode's `R`, `c` by `reference.block_rectification`'s small torch ops on
  `(B, H, NB, NB)` tensors; query mode's pooled keys), then `block_sparse_attention`, which stores each canonical row
  straight into its original position of the output (the inverse reorder fused into the epilogue), in the query's
  memory order.

Beyond the three canonical copies of Q, K, V this allocates O(B * H * (S * D / tile_size + NQ^2)) memory (plus the
probe estimators' bounded scratch), never O(S^2); nothing is read back to the host, so a call can be captured in a
CUDA graph once its layout is cached. On the CPU it runs under the Triton interpreter (`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import SparseAttentionConfig
from ..estimators import EstimatorConfig, estimator_for
from ..layout import TokenLayout
from ..pipeline import Prepared, output_like
from ..plan import SparsePlan
from ..reference import block_rectification
from .block_sparse_attention import block_sparse_attention
from .reorder_pool import reorder_pool
from .select import gapr_gate, select_plan

__all__ = ["TritonStages"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonStages:
    """The Triton kernels' stages. Inputs float16, bfloat16 or float32, any strides (a non-contiguous last dim is
    copied); head dims as `spattn_compile.capability` allows."""

    name = "triton"

    def prepare(self, query, key, value, layout: TokenLayout, key_valid, tile_size: int, scale: float) -> Prepared:
        if query.dtype not in _TRITON_DTYPES:
            raise TypeError(
                f"impl='triton' takes float16, bfloat16 or float32 inputs, got query of dtype {query.dtype}"
            )
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

    def scores(self, prepared: Prepared, estimator: EstimatorConfig) -> torch.Tensor:
        return estimator_for(estimator).kernel(prepared.estimator_inputs(), estimator)

    def select(
        self, prepared: Prepared, scores: torch.Tensor, *, density: float, config: SparseAttentionConfig,
        estimator_name: str,
    ) -> SparsePlan:  # fmt: skip
        layout = prepared.layout
        needs_gate = config.gapr and config.rectify != "none"
        gate = gapr_gate(prepared.stats, prepared.key_block_count, layout) if needs_gate else None
        return select_plan(
            scores.float(),
            prepared.key_block_count,
            layout,
            density=density,
            config=config,
            estimator=estimator_name,
            gate=gate,
            forced_blocks=prepared.block_non_finite,
        )

    def attend(self, prepared: Prepared, plan: SparsePlan, *, rectify: str) -> torch.Tensor:
        layout = prepared.layout
        plan = plan.expand_batch(prepared.q.shape[0])
        stats = prepared.stats
        rectification: dict[str, Any] = {}
        if rectify == "block":
            rescale, correction = block_rectification(plan, stats, layout.num_blocks)
            rectification = {"rescale": rescale.float(), "correction": correction.float()}
        elif rectify == "query":
            rectification = {
                "trusted_counts": plan.trusted_counts,
                "trusted_indices": plan.trusted_indices,
                "k_block": stats.k_block,
                "v_block": stats.v_block,
                # Trusted blocks are never empty, so the -inf of an empty block is never read.
                "k_block_log_count": stats.k_block_count.log(),
            }
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
            rectify=rectify,
            out_index=layout.to(prepared.q.device).source_index,
            out=output_like(prepared.query),
            # Text query rows attend to every block, so their programs run ~1/density times longer than a video
            # row's: started first, they do not leave a tail at the end of the grid.
            priority_query_blocks=layout.num_text_blocks,
            **rectification,
        )
