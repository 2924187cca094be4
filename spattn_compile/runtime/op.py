"""The op layer: `torch.ops.spattn.sparse_attention`, the custom op that compiled graphs call.

The compiler pass replaces an SDPA node with this op; the op is opaque to Dynamo and Inductor, so its settings are
read from `spattn_compile.current_config()` each time it runs (changing them never recompiles), and the choice
between the Triton kernels (CUDA) and the reference (CPU) happens here, at run time. A fake implementation gives
compiled graphs the output's shape and dtype without running anything.

Arguments: `video_grid` is the grid the graph proves, or `[]` when it is read at run time: the `video_grid` setting if
set (the user's per-call grid), else the grid the model's forward recorded in the step context (a block of a regionally
compiled model). `text_len` is the text span, or `call_layout.TEXT_REST` for "the tokens the run-time grid leaves". The
call's layout is resolved by `call_layout.resolve_call` (the rules the pass and the API share): a run-time grid that
does not hold the call's video tokens leaves the call dense (recorded as "no_grid"); a `video_grid` / `text_len` /
`text_position` setting that contradicts the call's raises `LayoutOverrideError` naming both. Inputs the sparse
attention cannot take (`spattn_compile.capability`) run dense.

Inside a compiled model the op also applies the schedule (`runtime.steps`, `runtime.plan_cache`): dense warm-up steps
and dense layers (by the model-level layer index of the call's module path), and plan reuse from the model's plan
cache at the adaptive density; it records each call in the model's report records. Outside one (no step context)
every call selects a fresh plan and nothing is recorded. Every path (fresh, cached, and the exact plan the last dense
step leaves) goes through `attention.SparseAttention`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..attention import SparseAttention
from ..call_layout import CallLayout, resolve_call
from ..capability import Capability, check_capability
from ..config import SparseAttentionConfig, current_config
from ..estimators import SampledRows
from ..implementations import make_implementation
from ..inputs import in_query_layout, output_like
from .model_state import StepContext, current_step, record
from .plan_cache import MaskFingerprints, plan_summary, refresh_density
from .records import head_summary, timing_enabled

__all__ = ["plan_signature", "sparse_attention_op"]


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
    """Sparse self-attention of one rewritten SDPA node. `video_grid` `[]` and `text_len` `TEXT_REST`: see the module
    docstring. `layer_index` is the node's index among its graph's rewritten calls (-1 when unknown); inside a
    compiled model it names the layer through the step context, and layers listed in `config.dense_layers` (by their
    model-level index) run dense attention."""
    config = current_config()
    context = current_step()
    forward_grid = None if context is None else context.video_grid
    note = "" if context is None else context.grid_note
    layout = resolve_call(query.shape[-2], video_grid, text_len, text_first, config, forward_grid, note)
    capability = check_capability(query.dtype, query.shape[-1], query.device)
    if context is None:
        if (
            isinstance(layout, str)
            or layer_index in config.dense_layers
            or not capability
            or query.shape[-2] < config.min_seq_len
            or query.shape[0] == 0
        ):
            return _dense(query, key, value, attn_mask, scale)
        call = _call(query, key, value, layout, attn_mask, scale, config, capability)
        return call.run(call.plan())
    layer = context.layer_name(layer_index)
    model_layer = context.model.layer_index(layer)
    events = None
    if timing_enabled() and query.is_cuda:
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record()
    out, outcome = _scheduled_attention(
        query, key, value, layout, attn_mask, scale, (model_layer, layer), config, capability, context
    )
    if events is not None:
        events[1].record()
    kind, cache, density, recall, keep_share, estimator, per_head = outcome
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
        head_summary=per_head,
    )
    return out


def _dense(query, key, value, attn_mask, scale) -> torch.Tensor:
    """Dense SDPA, in the memory order the op's fake promises."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
    return in_query_layout(out, query)


def _call(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: CallLayout,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    config: SparseAttentionConfig,
    capability: Capability,
) -> SparseAttention:
    implementation = make_implementation(capability.implementation)
    return SparseAttention(
        query, key, value, layout, attn_mask=attn_mask, scale=scale, config=config, implementation=implementation
    )


def plan_signature(
    call: SparseAttention, config: SparseAttentionConfig, masks: MaskFingerprints | None = None
) -> tuple:
    """What a cached plan is reused for: everything the call's plan depends on (`SparseAttention.plan_key`), the
    contents of its mask (named by `masks`, the plan cache's `MaskFingerprints`; without them, the mask tensor's
    identity, which never serves another tensor) and the schedule's decay of its density."""
    mask = call.attn_mask
    fingerprint = (None if mask is None else ("tensor", id(mask))) if masks is None else masks.of(mask)
    return (call.plan_key(), fingerprint, config.density_decay)


def _scheduled_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: CallLayout | str,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    layer: tuple[int, str],
    config: SparseAttentionConfig,
    capability: Capability,
    context: StepContext,
) -> tuple[torch.Tensor, tuple]:
    """One call inside a compiled model: returns the output and (kind, cache, density, recall, keep share, estimator,
    per-head density and recall) for the report, see `records.AttentionRecord`. `layer`: (model-level index, module
    path)."""
    layer_index, layer_name = layer
    context.model.check_dense_layers(config.dense_layers)
    dense_kind = ""
    if isinstance(layout, str):
        dense_kind = "no_grid"
    elif not capability:
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
            return out, (dense_kind, "", 1.0, 1.0, None, "", None)
        # The last dense step measures the true block mass (every query row a probe: a Q K^T-only pass) and leaves
        # its plan, at the first sparse step's density, for the first `exact_plan_steps` sparse steps: on the drift
        # suite such a plan beats a fresh estimate for about that many steps (benchmarks/fidelity.py --suite drift).
        assert isinstance(layout, CallLayout)
        call = _call(query, key, value, layout, attn_mask, scale, config, capability)
        density = refresh_density(call.selection.density, config.density_decay, 0, call.layout.num_video_blocks)
        plan = call.plan(
            selection=dataclasses.replace(call.selection, density=density),
            estimator=SampledRows(rows=config.block_size),
            label="exact",
        )
        seeded_at = dataclasses.replace(context, step=context.step + 1)
        kept, recall, keep_share = plan_summary(plan)
        signature = plan_signature(call, config, cache.masks)
        cache.store(cache_key, seeded_at, signature, plan, 0, (kept, recall), lifetime=config.exact_plan_steps)
        # Its kept blocks go to the report's plot: the steps it serves are cache hits, which record none.
        return out, (dense_kind, "exact", 1.0, 1.0, keep_share, plan.estimator, head_summary(plan))

    assert isinstance(layout, CallLayout)
    call = _call(query, key, value, layout, attn_mask, scale, config, capability)
    signature = plan_signature(call, config, cache.masks)
    entry = cache.lookup(cache_key, context, signature, config.refresh_interval)
    if entry is not None:
        out = call.run(entry.plan)
        kept, recall = entry.summary
        return out, ("sparse", "hit", kept, recall, None, entry.plan.estimator, None)

    refresh_count = cache.next_refresh_count(cache_key, context, signature)
    density = refresh_density(call.selection.density, config.density_decay, refresh_count, call.layout.num_video_blocks)
    plan = call.plan(selection=dataclasses.replace(call.selection, density=density))
    out = call.run(plan)
    kept, recall, keep_share = plan_summary(plan)
    cache.store(cache_key, context, signature, plan, refresh_count, (kept, recall))
    return out, ("sparse", "refresh", kept, recall, keep_share, plan.estimator, head_summary(plan))


@sparse_attention_op.register_fake
def _(query, key, value, video_grid, text_len, text_first, attn_mask, scale, layer_index):
    # The output has the query's memory order (as FlexAttention's does): a transposed (B, S, H, D) projection stays
    # transposed, and the caller's transpose back is free.
    return output_like(query)
