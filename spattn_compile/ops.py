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

import torch
import torch.nn.functional as F

from . import schedule
from .api import run_sparse_attention
from .config import SparseAttentionConfig, current_config
from .layout import token_layout
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
    if context is None:
        if layer_index in config.dense_layers:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
        return run_sparse_attention(
            query,
            key,
            value,
            video_grid=tuple(video_grid),
            text_len=text_len,
            text_first=text_first,
            attn_mask=attn_mask,
            scale=scale,
            config=config,
        ).contiguous()
    events = None
    if timing_enabled() and query.is_cuda:
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record()
    out, outcome = _scheduled_attention(
        query, key, value, tuple(video_grid), text_len, text_first, attn_mask, scale, layer_index, config, context
    )
    if events is not None:
        events[1].record()
    kind, cache, density, recall, keep_share = outcome
    record(context, layer_index, kind, cache, density, recall, events, keep_share)
    return out.contiguous()


# Settings that change which plan a call selects: a cached plan is reused only if they are unchanged.
_SELECTION_FIELDS = (
    "sparsity",
    "block_size",
    "tile_size",
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
    if dense_kind:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
        return out, (dense_kind, "", 1.0, 1.0, None)

    arguments = dict(
        video_grid=video_grid,
        text_len=text_len,
        text_first=text_first,
        attn_mask=attn_mask,
        scale=scale,
        config=config,
    )
    cache = schedule.plan_cache()
    cache_key = (context.model_key, layer_index, context.branch)
    signature = (
        tuple(query.shape),
        query.dtype,
        query.device,
        video_grid,
        text_len,
        text_first,
        None if attn_mask is None else tuple(attn_mask.shape),
        tuple(getattr(config, name) for name in _SELECTION_FIELDS),
    )
    entry = cache.lookup(cache_key, context, signature, config.refresh_interval)
    if entry is not None:
        out = run_sparse_attention(query, key, value, plan=entry.plan, **arguments)
        kept, recall = entry.summary
        return out, ("sparse", "hit", kept, recall, None)

    refresh_count = cache.next_refresh_count(cache_key, context, signature)
    layout = token_layout(video_grid, text_len, text_first, config.block_size, config.reorder)
    density = schedule.refresh_density(config.density, config.density_decay, refresh_count, layout.num_video_blocks)
    out, plan = run_sparse_attention(query, key, value, density=density, return_plan=True, **arguments)
    kept, recall, keep_share = schedule.plan_summary(plan)
    cache.store(cache_key, context, signature, plan, refresh_count, (kept, recall))
    return out, ("sparse", "refresh", kept, recall, keep_share)


@sparse_attention_op.register_fake
def _(query, key, value, video_grid, text_len, text_first, attn_mask, scale, layer_index):
    return torch.empty_like(query, memory_format=torch.contiguous_format)
