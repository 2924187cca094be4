"""The op layer: `torch.ops.spattn.sparse_attention`, the custom op that compiled graphs call.

The compiler pass replaces an SDPA node with this op; the op is opaque to Dynamo and Inductor, so its settings are
read from `spattn_compile.current_config()` each time it runs (changing them never recompiles), and the choice
between the Triton pipeline (CUDA) and the reference (CPU) happens here, at run time. A fake implementation gives
compiled graphs the output's shape and dtype without running anything.

Inside a compiled model the op also applies the schedule of stage 4 (`spattn_compile.schedule`): dense warm-up steps
and dense layers, and plan reuse from the plan cache at the adaptive density; it records each call for
`spattn_compile.report()`. Outside one (no step context) every call selects a fresh plan and nothing is recorded.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from . import schedule
from .config import SparseAttentionConfig, current_config
from .estimators import SampledRows
from .layout import token_layout
from .pipeline import in_query_layout, output_like, plan_attention, run_attention, stages_for
from .plan import SparsePlan
from .reference import key_padding_valid
from .report import record, timing_enabled

__all__ = ["sparse_attention_op"]


@torch.library.custom_op("spattn::sparse_attention", mutates_args=())
def sparse_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    video_grid: list[int],
    text_len: int,
    text_first: bool,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    layer_index: int,
) -> torch.Tensor:
    """Sparse self-attention of one rewritten SDPA node. `layer_index` is the node's stable index in its graph
    (-1 when unknown); layers listed in `config.dense_layers` run dense attention."""
    config = current_config()
    context = schedule.current_step()
    frames, height, width = video_grid
    grid = (frames, height, width)
    if context is None:
        if layer_index in config.dense_layers or query.shape[-2] < config.min_seq_len:
            return _dense(query, key, value, attn_mask, scale)
        out, _ = _sparse(query, key, value, grid, text_len, text_first, attn_mask, scale, config)
        return out
    events = None
    if timing_enabled() and query.is_cuda:
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record()
    out, outcome = _scheduled_attention(
        query, key, value, grid, text_len, text_first, attn_mask, scale, layer_index, config, context
    )
    if events is not None:
        events[1].record()
    kind, cache, density, recall, keep_share = outcome
    record(context, layer_index, kind, cache, density, recall, events, keep_share)
    return out


def _dense(query, key, value, attn_mask, scale) -> torch.Tensor:
    """Dense SDPA, in the memory order the op's fake promises."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
    return in_query_layout(out, query)


def _sparse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    video_grid: tuple[int, int, int],
    text_len: int,
    text_first: bool,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    config: SparseAttentionConfig,
    *,
    plan: SparsePlan | None = None,
    density: float | None = None,
) -> tuple[torch.Tensor, SparsePlan]:
    """The pipeline with a given plan, or a fresh one at `density`."""
    batch, heads, seq_len, _ = query.shape
    layout = token_layout(video_grid, text_len, text_first, config.block_size, config.reorder)
    return run_attention(
        query,
        key,
        value,
        layout=layout,
        key_valid=key_padding_valid(attn_mask, batch, heads, seq_len),
        scale=scale,
        config=config,
        stages=stages_for("auto", query.device),
        plan=plan,
        density=density,
    )


# Settings that change which plan a call selects: a cached plan is reused only if they are unchanged.
_SELECTION_FIELDS = (
    "sparsity",
    "block_size",
    "estimator",
    "mass_threshold",
    "max_density",
    "reorder",
    "rectify",
    "gapr",
    "neighbors",
    "density_decay",
)


def _scheduled_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    video_grid: tuple[int, int, int],
    text_len: int,
    text_first: bool,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    layer_index: int,
    config: SparseAttentionConfig,
    context: schedule.StepContext,
) -> tuple[torch.Tensor, tuple]:
    """One call inside a compiled model: returns the output and (kind, cache, density, recall, keep share) for the
    report, see `spattn_compile.report.AttentionRecord`."""
    dense_kind = ""
    if layer_index in config.dense_layers:
        dense_kind = "dense_layer"
    elif context.step < config.dense_steps:
        dense_kind = "dense_step"
    elif query.shape[-2] < config.min_seq_len:
        dense_kind = "short"
    cache = schedule.plan_cache()
    cache_key = (context.model_key, layer_index, context.branch)
    if dense_kind:
        out = _dense(query, key, value, attn_mask, scale)
        seeds = (
            dense_kind == "dense_step"
            and context.step == config.dense_steps - 1
            and config.exact_plan_steps > 0
            and query.shape[-2] >= config.min_seq_len
            and query.shape[0] > 0
        )
        if not seeds:
            return out, (dense_kind, "", 1.0, 1.0, None)
        # The last dense step measures the true block mass (a Q K^T-only pass over every row) and leaves its plan
        # for the first `exact_plan_steps` sparse steps: on the drift suite such a plan beats a fresh estimate for
        # about that many steps (benchmarks/fidelity.py --suite drift).
        plan = _exact_plan(query, key, value, video_grid, text_len, text_first, attn_mask, scale, config)
        signature = _signature(query, video_grid, text_len, text_first, attn_mask, config)
        seeded_at = dataclasses.replace(context, step=context.step + 1)
        kept, recall, _ = schedule.plan_summary(plan)
        cache.store(cache_key, seeded_at, signature, plan, 0, (kept, recall), lifetime=config.exact_plan_steps)
        return out, (dense_kind, "exact", 1.0, 1.0, None)

    arguments = (query, key, value, video_grid, text_len, text_first, attn_mask, scale, config)
    signature = _signature(query, video_grid, text_len, text_first, attn_mask, config)
    entry = cache.lookup(cache_key, context, signature, config.refresh_interval)
    if entry is not None:
        out, _ = _sparse(*arguments, plan=entry.plan)
        kept, recall = entry.summary
        return out, ("sparse", "hit", kept, recall, None)

    refresh_count = cache.next_refresh_count(cache_key, context, signature)
    layout = token_layout(video_grid, text_len, text_first, config.block_size, config.reorder)
    density = schedule.refresh_density(config.density, config.density_decay, refresh_count, layout.num_video_blocks)
    out, plan = _sparse(*arguments, density=density)
    kept, recall, keep_share = schedule.plan_summary(plan)
    cache.store(cache_key, context, signature, plan, refresh_count, (kept, recall))
    return out, ("sparse", "refresh", kept, recall, keep_share)


def _signature(query, video_grid, text_len, text_first, attn_mask, config: SparseAttentionConfig) -> tuple:
    """What a cached plan was built for: it is reused only by calls with the same signature."""
    return (
        tuple(query.shape),
        query.dtype,
        query.device,
        video_grid,
        text_len,
        text_first,
        None if attn_mask is None else tuple(attn_mask.shape),
        tuple(getattr(config, name) for name in _SELECTION_FIELDS),
    )


def _exact_plan(query, key, value, video_grid, text_len, text_first, attn_mask, scale, config) -> SparsePlan:
    """The plan of the true block mass (every query row a probe: `SampledRows(rows=block_size)`) at the first sparse
    step's density."""
    batch, heads, seq_len, _ = query.shape
    layout = token_layout(video_grid, text_len, text_first, config.block_size, config.reorder)
    density = schedule.refresh_density(config.density, config.density_decay, 0, layout.num_video_blocks)
    plan, _ = plan_attention(
        query,
        key,
        value,
        layout=layout,
        key_valid=key_padding_valid(attn_mask, batch, heads, seq_len),
        scale=scale,
        config=config,
        stages=stages_for("auto", query.device),
        density=density,
        estimator=SampledRows(rows=config.block_size),
        estimator_name="exact",
    )
    return plan


@sparse_attention_op.register_fake
def _(query, key, value, video_grid, text_len, text_first, attn_mask, scale, layer_index):
    # The output has the query's memory order (as FlexAttention's does): a transposed (B, S, H, D) projection stays
    # transposed, and the caller's transpose back is free.
    return output_like(query)
