"""The op layer: `torch.ops.spattn.sparse_attention`, the custom op that compiled graphs call.

The compiler pass replaces an SDPA node with this op; the op is opaque to Dynamo and Inductor, so its settings are
read from `spattn_compile.current_config()` each time it runs (changing them never recompiles), and the choice
between the Triton pipeline (CUDA) and the reference (CPU) happens here, at run time. A fake implementation gives
compiled graphs the output's shape and dtype without running anything.

Arguments: `video_grid` is the grid the graph proves, or `[]` when it is read at run time: the `video_grid`
setting if set (the user's per-call grid), else the grid the model's forward recorded in the step context (a block of
a regionally compiled model). `text_len` is the text span, or -1 for "the tokens the run-time grid leaves". A
run-time grid that does not hold the call's video tokens leaves the call dense (recorded as "no_grid"); a
`video_grid` / `text_len` / `text_position` setting that contradicts the grid or text of the call raises
`LayoutOverrideError` naming both. Inputs the sparse attention cannot take (`spattn_compile.capability`) run dense.

Inside a compiled model the op also applies the schedule of stage 4 (`spattn_compile.schedule`): dense warm-up steps
and dense layers (by the model-level layer index of the call's module path), and plan reuse from the model's plan
cache at the adaptive density; it records each call in the model's report records. Outside one (no step context)
every call selects a fresh plan and nothing is recorded.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from . import schedule
from .capability import check_capability
from .config import SparseAttentionConfig, current_config
from .estimators import SampledRows
from .layout import token_layout
from .passes.attention import TEXT_REST, LayoutOverrideError
from .pipeline import in_query_layout, output_like, plan_attention, run_attention, stages_for
from .plan import SparsePlan
from .reference import key_padding_valid
from .report import record, timing_enabled

__all__ = ["sparse_attention_op"]


# Inductor must hand the op its inputs in the strides it was traced with: the fake promises the query's memory order
# for the output, which only holds if the query keeps its traced strides.
@torch.library.custom_op("spattn::sparse_attention", mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,))
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
    """Sparse self-attention of one rewritten SDPA node. `video_grid` `[]` and `text_len` -1: see the module
    docstring. `layer_index` is the node's index among its graph's rewritten calls (-1 when unknown); inside a
    compiled model it names the layer through the step context, and layers listed in `config.dense_layers` (by their
    model-level index) run dense attention."""
    config = current_config()
    context = schedule.current_step()
    layout = _call_layout(query, video_grid, text_len, text_first, config, context)
    if context is None:
        if (
            isinstance(layout, str)
            or layer_index in config.dense_layers
            or not _capable(query)
            or query.shape[-2] < config.min_seq_len
            or query.shape[0] == 0
        ):
            return _dense(query, key, value, attn_mask, scale)
        grid, text = layout
        out, _ = _sparse(query, key, value, grid, text, text_first, attn_mask, scale, config)
        return out
    layer = context.layer_name(layer_index)
    model_layer = context.model.layer_index(layer)
    events = None
    if timing_enabled() and query.is_cuda:
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record()
    out, outcome = _scheduled_attention(
        query, key, value, layout, text_first, attn_mask, scale, (model_layer, layer), config, context
    )
    if events is not None:
        events[1].record()
    kind, cache, density, recall, keep_share, estimator = outcome
    record(
        context,
        model_layer,
        kind,
        cache,
        density,
        recall,
        events,
        keep_share,
        layer=layer,
        estimator=estimator,
        heads=context.heads_of(layer_index),
    )
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
    return run_attention(
        query,
        key,
        value,
        **_pipeline_arguments(query, video_grid, text_len, text_first, attn_mask, config),
        scale=scale,
        config=config,
        plan=plan,
        density=density,
    )


def _exact_plan(query, key, value, video_grid, text_len, text_first, attn_mask, scale, config) -> SparsePlan:
    """The plan of the true block mass (every query row a probe: `SampledRows(rows=block_size)`) at the first sparse
    step's density."""
    arguments = _pipeline_arguments(query, video_grid, text_len, text_first, attn_mask, config)
    num_video_blocks = arguments["layout"].num_video_blocks
    density = schedule.refresh_density(config.density, config.density_decay, 0, num_video_blocks)
    plan, _ = plan_attention(
        query,
        key,
        value,
        **arguments,
        scale=scale,
        config=config,
        density=density,
        estimator=SampledRows(rows=config.block_size),
        estimator_name="exact",
    )
    return plan


def _pipeline_arguments(query, video_grid, text_len, text_first, attn_mask, config: SparseAttentionConfig) -> dict:
    """The call's layout, its key-validity mask and the stages for its device (the pipeline's keyword arguments)."""
    batch, heads, seq_len, _ = query.shape
    return {
        "layout": token_layout(video_grid, text_len, text_first, config.block_size, config.reorder),
        "key_valid": key_padding_valid(attn_mask, batch, heads, seq_len),
        "stages": stages_for("auto", query.device),
    }


def _capable(query: torch.Tensor) -> bool:
    return bool(check_capability(query.dtype, query.shape[-1], query.device))


def _call_layout(
    query: torch.Tensor,
    video_grid: list[int],
    text_len: int,
    text_first: bool,
    config: SparseAttentionConfig,
    context: schedule.StepContext | None,
) -> tuple[tuple[int, int, int], int] | str:
    """The (grid, text length) of this call, or why it has none (module docstring)."""
    seq_len = query.shape[-2]
    if video_grid:
        if len(video_grid) != 3:
            raise ValueError(f"spattn: video_grid={video_grid!r}: the graph passes (frames, height, width) or []")
        grid: tuple[int, int, int] = (int(video_grid[0]), int(video_grid[1]), int(video_grid[2]))
        if config.video_grid is not None and tuple(config.video_grid) != grid:
            raise LayoutOverrideError(
                f"spattn: video_grid={tuple(config.video_grid)} is set, but the graph proves the video grid {grid} "
                "for this attention call; remove the video_grid setting (the graph's grid is used without it) or "
                "set it to the graph's"
            )
    else:
        recorded = None if context is None else context.video_grid
        if config.video_grid is not None:
            grid = config.video_grid
            if recorded is not None and recorded != grid:
                raise LayoutOverrideError(
                    f"spattn: video_grid={grid} is set, but the model's input gives the video grid {recorded} for "
                    "this forward; remove the video_grid setting or set it to the model's"
                )
        elif recorded is not None:
            grid = recorded
        else:
            note = "" if context is None or not context.grid_note else f": {context.grid_note}"
            return f"no video grid for this call (set video_grid){note}"
    num_video = math.prod(grid)
    text = seq_len - num_video if text_len == TEXT_REST else text_len
    if text < 0 or num_video + text != seq_len:
        return f"video grid {grid} ({num_video} tokens) + text {text} does not make the sequence length {seq_len}"
    if config.text_len is not None and config.text_len != text:
        raise LayoutOverrideError(
            f"spattn: text_len={config.text_len} is set, but this attention call has text_len={text}; remove the "
            "text_len setting or set it to the call's"
        )
    if config.text_position is not None and text and (config.text_position == "first") != text_first:
        raise LayoutOverrideError(
            f"spattn: text_position={config.text_position!r} is set, but this attention call has "
            f"text_position={'first' if text_first else 'last'!r}; remove the text_position setting or set it to "
            "the call's"
        )
    return grid, text


# Settings that do not change which plan a call selects (the schedule's and the layout's); every other field does,
# and a cached plan is reused only while those are unchanged.
_NOT_SELECTION = frozenset(
    {
        "dense_steps",
        "dense_layers",
        "refresh_interval",
        "exact_plan_steps",
        "min_seq_len",
        "video_grid",
        "text_len",
        "text_position",
    }
)


_SELECTION_FIELDS = tuple(f.name for f in dataclasses.fields(SparseAttentionConfig) if f.name not in _NOT_SELECTION)


def _scheduled_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: tuple[tuple[int, int, int], int] | str,
    text_first: bool,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    layer: tuple[int, str],
    config: SparseAttentionConfig,
    context: schedule.StepContext,
) -> tuple[torch.Tensor, tuple]:
    """One call inside a compiled model: returns the output and (kind, cache, density, recall, keep share, estimator)
    for the report, see `spattn_compile.report.AttentionRecord`. `layer`: (model-level index, module path)."""
    layer_index, layer_name = layer
    dense_kind = ""
    if isinstance(layout, str):
        dense_kind = "no_grid"
    elif not _capable(query):
        dense_kind = "capability"
    elif layer_index in config.dense_layers:
        dense_kind = "dense_layer"
    elif context.step < config.dense_steps:
        dense_kind = "dense_step"
    elif query.shape[-2] < config.min_seq_len:
        dense_kind = "short"
    cache = context.model.plan_cache
    cache_key = (layer_name, context.branch)
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
            return out, (dense_kind, "", 1.0, 1.0, None, "")
        # The last dense step measures the true block mass (a Q K^T-only pass over every row) and leaves its plan
        # for the first `exact_plan_steps` sparse steps: on the drift suite such a plan beats a fresh estimate for
        # about that many steps (benchmarks/fidelity.py --suite drift).
        assert not isinstance(layout, str)
        video_grid, text_len = layout
        plan = _exact_plan(query, key, value, video_grid, text_len, text_first, attn_mask, scale, config)
        signature = _signature(query, video_grid, text_len, text_first, attn_mask, config)
        seeded_at = dataclasses.replace(context, step=context.step + 1)
        kept, recall, keep_share = schedule.plan_summary(plan)
        cache.store(cache_key, seeded_at, signature, plan, 0, (kept, recall), lifetime=config.exact_plan_steps)
        # Its kept blocks go to the report's plot: the steps it serves are cache hits, which record none.
        return out, (dense_kind, "exact", 1.0, 1.0, keep_share, plan.estimator)

    assert not isinstance(layout, str)
    video_grid, text_len = layout
    arguments = (query, key, value, video_grid, text_len, text_first, attn_mask, scale, config)
    signature = _signature(query, video_grid, text_len, text_first, attn_mask, config)
    entry = cache.lookup(cache_key, context, signature, config.refresh_interval)
    if entry is not None:
        out, _ = _sparse(*arguments, plan=entry.plan)
        kept, recall = entry.summary
        return out, ("sparse", "hit", kept, recall, None, entry.plan.estimator)

    refresh_count = cache.next_refresh_count(cache_key, context, signature)
    layout_ = token_layout(video_grid, text_len, text_first, config.block_size, config.reorder)
    density = schedule.refresh_density(config.density, config.density_decay, refresh_count, layout_.num_video_blocks)
    out, plan = _sparse(*arguments, density=density)
    kept, recall, keep_share = schedule.plan_summary(plan)
    cache.store(cache_key, context, signature, plan, refresh_count, (kept, recall))
    return out, ("sparse", "refresh", kept, recall, keep_share, plan.estimator)


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


@sparse_attention_op.register_fake
def _(query, key, value, video_grid, text_len, text_first, attn_mask, scale, layer_index):
    # The output has the query's memory order (as FlexAttention's does): a transposed (B, S, H, D) projection stays
    # transposed, and the caller's transpose back is free.
    return output_like(query)
