"""The Triton implementation: the kernels of `spattn_compile.kernels` (CUDA, or the CPU under `TRITON_INTERPRET=1`).

No copy of Q, K or V is made: every kernel reads the caller's tensors through the layout's index
(`layout.source_index`, canonical row -> original row), each row one contiguous D-vector, so a gathered read costs the
bytes of a contiguous one.

- prepare: `prepare_statistics`, one read of Q, K, V: the pooled statistics, the canonical key validity and (for the
  pooled estimator) the key tiles' outliers;
- attend: the rectification's kernel inputs (its policy's `kernel` handler: block mode's `R`, `c` by small torch ops
  on `(B, H, NB, NB)` tensors, query mode's pooled keys), then `block_sparse_attention` with gathered reads, which
  stores each canonical row straight into its original position of the output, in the query's memory order.

The estimate and select stages run the estimators' and selection policies' `kernel` handlers; prepare and estimate
run by groups of heads (`prepare_and_estimate`), so that only one group's tile means are live. A
call allocates O(B * H * (S * D / block_size + NQ^2)) memory, plus one group's O(S * D / tile_size) tile means and
the estimators' bounded scratch (benchmarks/memory_model.py counts each), never O(S^2) nor a copy of the inputs;
nothing is read back to the host, so a call can be captured in a CUDA graph once its layout is cached.
Inputs: float16, bfloat16 or float32, any strides (a non-contiguous last dim is copied), head dims as
`spattn_compile.capability` allows (checked by the registry before this is made).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from ..inputs import output_like
from ..kernels.block_sparse_attention import KernelVariant, TileConfig, block_sparse_attention
from ..kernels.pooled_scores import planning_heads
from ..kernels.statistics import prepare_statistics
from ..layout import TokenLayout
from ..plan import SparsePlan
from ..policies.base import RectificationConfig, rectification_policy
from .base import Prepared

__all__ = ["TritonImplementation"]


class TritonImplementation:
    """The stages with the Triton kernels (module docstring).

    heads_per_group: heads per group of `prepare_and_estimate` (None: `kernels.pooled_scores.planning_heads`, the
    fewest heads whose groups take no more waves of the scores kernel's programs than all heads at once).
    tile_config, variant: the attention kernel's tiles (None: autotuned) and structural variant (None: the default),
    for benchmarks that compare them through this path (benchmarks/tune_attention.py).
    """

    name = "triton"
    kind: Literal["reference", "kernel"] = "kernel"

    def __init__(
        self,
        heads_per_group: int | None = None,
        *,
        tile_config: TileConfig | None = None,
        variant: KernelVariant | None = None,
    ) -> None:
        if heads_per_group is not None and (
            isinstance(heads_per_group, bool) or not isinstance(heads_per_group, int) or heads_per_group < 1
        ):
            raise ValueError(f"heads_per_group must be None or a positive int, got {heads_per_group!r}")
        self.heads_per_group = heads_per_group
        self.tile_config = tile_config
        self.variant = variant

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
        """Stages 0 and 1 in groups of heads: each group's tile means, outliers and the estimator's scratch live only
        while its scores are made, so planning holds one group's of them (at Wan 14B 720p: 7 of 40 heads); every
        group reads its heads of Q, K, V once, as one preparation of all heads would. The scores go into one
        `(B, H, NB, NB + 1)` tensor; the per-head statistics are concatenated once at the end."""
        query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
        batch, heads = query.shape[:2]
        group = self.heads_per_group or planning_heads(batch, heads, layout, tile_size, query.device)
        if group >= heads:
            prepared = self.prepare(query, key, value, layout, key_valid, tile_size, scale, outliers)
            scores = estimate(prepared)
            return prepared.for_attending(), scores
        parts: list[Prepared] = []
        all_scores: torch.Tensor | None = None
        for start in range(0, heads, group):
            span = slice(start, min(start + group, heads))
            part_valid = None if key_valid is None else key_valid[:, span]
            part = self.prepare(query[:, span], key[:, span], value[:, span], layout, part_valid, tile_size, scale,
                                outliers)  # fmt: skip
            scores = estimate(part)
            if all_scores is None:
                all_scores = scores.new_empty(batch, heads, *scores.shape[2:])
            all_scores[:, span] = scores
            parts.append(part.for_attending())
            del part, scores  # the group's tile means and scores go before the next group's are made
        assert all_scores is not None
        return Prepared.concatenate_heads(parts, query, query, key, value), all_scores

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
            tile_config=self.tile_config,
            variant=self.variant,
            **kernel.arguments,
        )
