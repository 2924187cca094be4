"""The attention pass: decide, for every scaled_dot_product_attention call of a Dynamo FX graph, whether it becomes
sparse attention, and rewrite the ones that do into `torch.ops.spattn.sparse_attention`.

A call is rewritten when it is self-attention over one video grid, optionally joined by a span of text tokens placed
before or after the video (joint attention), with SDPA semantics the op reproduces: 4-D `(B, H, S, D)` inputs of one
shape and float dtype, no dropout, not causal, no grouped-query head mismatch, either no mask or a boolean
key-padding mask, and no autograd (the op is for inference and has no backward). The grid and the text span come
from `token_axes` (the data flow of the graph) or from the `video_grid` / `text_len` / `text_position` fields of the
config, and must satisfy `S == F*H*W + text_len` provably (for every size under dynamic shapes). The inputs must be
ones the sparse attention can run on (`spattn_compile.capability`: dtype, head dim, device). Anything else stays
dense, with a reason and a machine-readable `rule`.

Where the grid comes from (`AttentionDecision.grid_from`):

- "graph": the data flow proves it (a patch embedding, a reshape into the token grid, a rotary embedding's grid);
- "context": the graph is one block of a model (regional compilation) whose video tokens arrive as an input that the
  caller seeded (`seeds`, see `token_axes.ContextSpan`); the op takes the grid the model's forward recorded when it
  runs, and checks that it holds exactly the span's tokens;
- "config": no grid in the graph, the user's `video_grid` (given in `options` or in `spattn_compile.config(...)`); the
  op reads it when it runs, so one graph serves every resolution the user names per call.
- "run_time": no grid in the graph and no `video_grid` setting when it is compiled, in a graph that proves no grid
  for any call and (for a block) whose model's forward gave none: the video arrives as packed tokens. The call stays
  dense under the settings it was compiled with (`sparse` False, rule "no_grid"), but is handed to the op anyway
  (it has a `layer_index`), which runs it sparse on a call where a `video_grid` setting is in force then
  (`call_layout.TEXT_UNPLACED`), and dense, recorded as "no_grid", otherwise. So a model first run without a grid
  becomes sparse inside a later `spattn_compile.config(video_grid=...)`, with no recompile. A call without a grid in
  a graph that proves another call's grid (a text-only self-attention beside the video's) is not video attention,
  and is not handed over.

A `video_grid`/`text_len`/`text_position` override that contradicts what the graph proves raises
`LayoutOverrideError` naming both (a consistent one is accepted); under dynamic shapes the op makes the same check
when it runs.

Masks: a boolean mask broadcastable to `(B, H, 1, S)` is a key-padding mask. A full `(B, 1, S, S)` mask is kept when
`masks.prove_padding_mask` proves it a key-padding mask written out per query, or key-valid AND query-valid (every
valid query row is the key-padding mask; a padded query row masks every key): the rewrite then passes the validity
vector as the key-padding mask and gives the padded query rows what SDPA gives a row with every key masked, computed
by SDPA itself on one such row (the output of a fully masked row does not depend on its query).

Context parallelism (diffusers' Ulysses attention): after the all-to-all each rank runs SDPA over the whole sequence,
in global token order, for its group of heads. `token_axes` follows the sequence through the split (a chunk of the
token axis, or a block input seeded as this rank's shard) and the all-to-all back to the whole axis, and names the
heads the rank holds; the call then becomes sparse like any other, over the whole sequence, with
`AttentionDecision.heads` the global heads of the rank. An SDPA whose query holds one rank's shard of the sequence
(ring attention, which attends to one chunk of keys at a time and merges the chunks by their log-sum-exp) stays dense
("sequence_shard"): sparse attention needs every key of the sequence in one call. Attention computed by a fused
`aten` op other than SDPA (diffusers' flash or cuDNN backends, which ring attention needs) is listed, dense
("attention_backend"), so that `explain` shows it.

Layer indices: the rewritten calls of one graph are numbered 0, 1, 2... in graph order (which is execution order);
dense calls get none. The backend turns them into model-level layers (see `spattn_compile.backend`).

`config.min_seq_len` is decided here when the sequence length is a static int (a shorter call stays dense; Dynamo's
shape guards recompile when the length changes). When the length is symbolic (dynamic shapes) the call is rewritten
and the op applies `min_seq_len` when it runs, so one graph serves every length correctly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import re
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.fx.node import Argument

from ..call_layout import TEXT_REST, TEXT_UNPLACED, LayoutOverrideError, check_settings, fit_text
from ..capability import check_capability
from ..config import SparseAttentionConfig
from .masks import MaskForm, prove_padding_mask
from .token_axes import (
    VIDEO_SPANS,
    Annotation,
    Conflict,
    ContextSpan,
    DimInfo,
    Factor,
    GridSpan,
    GroupInfo,
    HeadGroup,
    Shard,
    TokenAxis,
    TokenAxisAnalysis,
    finer_axis,
    known_equal,
    node_value,
    resolve_group,
    size_hint,
)

__all__ = [
    "SDPA_TARGETS",
    "AttentionDecision",
    "LayoutOverrideError",
    "analyze_attention",
    "context_seeds",
    "rewrite_attention",
]

logger = logging.getLogger("spattn_compile")

SDPA_TARGETS = frozenset(
    {
        torch._C._nn.scaled_dot_product_attention,
        torch.nn.functional.scaled_dot_product_attention,
        torch.ops.aten.scaled_dot_product_attention.default,
    }
)
# Fused attention ops that diffusers' other attention backends call (flash, cuDNN, efficient; the ones ring attention
# needs, since they return the log-sum-exp): listed as dense calls, never rewritten.
_FUSED_ATTENTION = frozenset(
    {
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_efficient_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    }
)
GroupResolver = Callable[[object], GroupInfo | None]
_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Size = int | torch.SymInt


# eq=False: the sizes may be SymInts, and comparing those would evaluate (and guard on) symbolic expressions.
@dataclasses.dataclass(frozen=True, eq=False)
class AttentionDecision:
    """The pass's decision for one SDPA call.

    Attributes:
        graph_index: which Dynamo graph of the model (0 without graph breaks).
        node: the FX node's name.
        module: the module path of the attention layer (from Dynamo's `nn_module_stack`), relative to the compiled
            module (the model, or the block of a regionally compiled model); "" if unknown.
        sparse: True when the call is rewritten into `torch.ops.spattn.sparse_attention` and runs sparse under the
            settings it was decided with.
        layer_index: the index passed to the op (see the module docstring); None for calls left to SDPA. A call with
            grid_from "run_time" has one although it is dense under the settings it was decided with.
        query_shape: `(B, H, S, D)` of the query as traced (ints, or SymInts under dynamic shapes); () if not 4-D.
        video_grid: `(F, H, W)` of the video tokens, when known at compile time (also for dense calls, when inference
            got that far); for grid_from "config" the setting's grid at compile time (the op reads the setting when
            it runs); None for grid_from "context" (`explain` fills in the grid of the model's forward).
        text_len: number of text tokens in the sequence, when known (-1: the tokens the run-time grid leaves).
        text_position: "first" or "last" (None without text or when unknown).
        grid_from: "graph", "context", "config" or "run_time" (see the module docstring), or "".
        rule: why the call is dense, as a short code: "shape", "autograd", "dropout", "causal", "cross_attention",
            "gqa", "dtype", "capability", "mask", "scale", "no_grid", "ambiguous_grid", "override_mismatch",
            "short"; "" when sparse.
        reason: the same in words (for a sparse call: notes, e.g. that min_seq_len is checked at run time).
        mask: for a sparse call with a mask: "key_padding" (one query row), "key" (a full mask proved to be a
            key-padding mask) or "key_and_query" (key-valid AND query-valid); "" without a mask.
        world_size, rank: under context parallelism (Ulysses), the size of the sequence-parallel group and this
            process's rank in it (1 and 0 otherwise).
        heads: under context parallelism, (first, count): the call holds the model's heads `first ... first + count -
            1` (rank r of N holds heads `r * H/N ... (r + 1) * H/N - 1`); None otherwise (the call holds every head).
    """

    graph_index: int
    node: str
    module: str
    sparse: bool
    layer_index: int | None
    query_shape: tuple[Size, ...]
    video_grid: tuple[Size, Size, Size] | None
    text_len: Size | None
    text_position: str | None
    grid_from: str
    rule: str
    reason: str
    mask: str = ""
    world_size: int = 1
    rank: int = 0
    heads: tuple[Size, Size] | None = None


@dataclasses.dataclass(frozen=True)
class _MaskPlan:
    """How the rewrite passes the mask: `node` to the op as the key-padding mask (a node of the graph, or built from
    `valid` when it is set), and whether padded query rows need SDPA's fully masked output."""

    kind: str
    node: fx.Node | None = None
    valid: fx.Node | None = None


@dataclasses.dataclass(frozen=True)
class _Layout:
    """grid: the grid factors, or None when the op reads the grid at run time (`grid_from` "context" or "config").
    text_len: an int, a SymInt, or TEXT_REST."""

    grid: tuple[Factor, Factor, Factor] | None
    text_len: Size
    text_first: bool


@dataclasses.dataclass(frozen=True)
class _SparsePlan:
    """What the rewrite needs: the op's inputs, with the grid factors' graph sources for dynamic sizes."""

    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    mask: _MaskPlan | None
    scale: float | None
    layout: _Layout


class _Dense(Exception):
    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.rule = rule
        self.reason = reason


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"\.?__dict__\['_modules'\]\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    # A module whose forward diffusers' hooks wrap (context parallelism, caching) is reached through the original
    # bound forward that the wrapper closes over: `<module>.forward.func.__closure__[0].cell_contents.forward.__self__`
    # is <module> itself.
    path = re.sub(r"(\.forward(\.func)?\.__closure__\[\d+\]\.cell_contents)?\.forward\.__self__", "", path)
    # A hook with its own `new_forward` (diffusers' caches: FirstBlockCache, TaylorSeer...) is traced as a frame whose
    # `self` is the hook; it reaches its module through `fn_ref.original_forward.__self__`. A module whose forward
    # diffusers' `HookRegistry` replaced by `functools.partial(new_forward, module)` is that partial's `args[0]`.
    path = re.sub(r"(^|\.)fn_ref\.original_forward\.__self__", "", path)
    path = re.sub(r"\.forward\.args\[0\]", "", path)
    path = re.sub(r"^L\['[A-Za-z_][A-Za-z0-9_]*'\]", "", path)  # the compiled frame's module (self, or the hooked one)
    return path.lstrip(".")


@dataclasses.dataclass(frozen=True)
class _SdpaCall:
    """The eight arguments of an SDPA call node (defaults filled in): the query, key and value nodes, the rest as the
    graph gives them (constants, or nodes)."""

    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: object
    dropout_p: object
    is_causal: object
    scale: object
    enable_gqa: object


def _sdpa_arguments(node: fx.Node) -> _SdpaCall:
    """The eight SDPA parameters of a call node, from its positional and keyword forms (defaults filled in)."""
    if len(node.args) > len(_SDPA_PARAMETERS):
        raise _Dense("shape", f"unexpected positional arguments {node.args!r}")
    arguments: dict[str, object] = dict(zip(_SDPA_PARAMETERS, node.args))
    for name, value in node.kwargs.items():
        if name not in _SDPA_PARAMETERS or name in arguments:
            raise _Dense("shape", f"unexpected SDPA argument {name}={value!r}")
        arguments[name] = value
    tensors: list[fx.Node] = []
    for name in ("query", "key", "value"):
        given = arguments.get(name)
        if not isinstance(given, fx.Node):
            raise _Dense("shape", f"SDPA call without a {name} tensor of the graph (got {given!r})")
        tensors.append(given)
    rest = {name: arguments.get(name, default) for name, default in _SDPA_DEFAULTS.items()}
    return _SdpaCall(
        tensors[0],
        tensors[1],
        tensors[2],
        attn_mask=rest["attn_mask"],
        dropout_p=rest["dropout_p"],
        is_causal=rest["is_causal"],
        scale=rest["scale"],
        enable_gqa=rest["enable_gqa"],
    )


def _traced(node: fx.Node, name: str) -> torch.Tensor:
    """The traced (fake) tensor of a 4-D attention input."""
    value = node_value(node)
    if not isinstance(value, torch.Tensor):
        raise _Dense("shape", f"{name} has no traced tensor value")
    if value.dim() != 4:
        raise _Dense("shape", f"{name} is {value.dim()}-D {_shape_text(value.shape)}; expected (B, H, S, D)")
    return value


def _size_text(size: Size) -> str:
    return str(size)


def _shape_text(shape: Sequence[Size]) -> str:
    return "(" + ", ".join(_size_text(s) for s in shape) + ")"


def _constant(value: object, name: str, rule: str) -> object:
    if isinstance(value, fx.Node):
        raise _Dense(rule, f"{name} is a value computed in the graph, not a constant")
    return value


def _is_static(size: Size) -> bool:
    return isinstance(size, int) or is_concrete_int(size)


def _check_semantics(node: fx.Node, call: _SdpaCall) -> tuple[torch.Tensor, float | None, _MaskPlan | None, str]:
    """Everything but the token layout: shapes, dtypes, capability, dropout, causality, heads, scale, mask, autograd.
    Returns the traced query, the scale, how to pass the mask, and notes for the decision's reason."""
    query, key, value = _traced(call.query, "query"), _traced(call.key, "key"), _traced(call.value, "value")
    output = node_value(node)
    if isinstance(output, torch.Tensor) and output.requires_grad:
        raise _Dense(
            "autograd",
            "the attention output requires grad (grad mode on, and an input requires grad); the sparse op has no "
            "backward: run the model under torch.no_grad() or torch.inference_mode()",
        )

    dropout = _constant(call.dropout_p, "dropout_p", "dropout")
    if not isinstance(dropout, (int, float)) or dropout != 0:
        raise _Dense("dropout", f"dropout_p={dropout!r}; sparse attention has no dropout")
    causal = _constant(call.is_causal, "is_causal", "causal")
    if causal is not False:
        raise _Dense("causal", f"is_causal={causal!r}; causal attention is not supported")

    if not known_equal(query.shape[2], key.shape[2]):
        raise _Dense("cross_attention", f"cross-attention: query length {query.shape[2]} != key length {key.shape[2]}")
    if not (known_equal(query.shape[1], key.shape[1]) and known_equal(key.shape[1], value.shape[1])):
        raise _Dense(
            "gqa",
            f"grouped-query attention: {query.shape[1]} query heads, {key.shape[1]} key heads, "
            f"{value.shape[1]} value heads",
        )
    if not all(known_equal(a, b) for t in (key, value) for a, b in zip(query.shape, t.shape)):
        raise _Dense(
            "shape",
            f"query {_shape_text(query.shape)}, key {_shape_text(key.shape)} and value {_shape_text(value.shape)} "
            "differ in shape (batch or head dim)",
        )
    if query.dtype not in _FLOAT_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        raise _Dense("dtype", f"dtypes {query.dtype}, {key.dtype}, {value.dtype}; expected one float dtype")
    note = ""
    head_dim = query.shape[3]
    if _is_static(head_dim):
        capability = check_capability(query.dtype, int(head_dim), query.device)
        if not capability:
            raise _Dense("capability", capability.reason)
    else:
        note = f"dynamic head dim {head_dim}: what the kernels take is checked when the op runs"

    scale = _constant(call.scale, "scale", "scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
        raise _Dense("scale", f"scale={scale!r}; expected None or a positive number")

    mask_plan = None
    mask_node = call.attn_mask
    if mask_node is not None:
        mask_plan = _check_mask(mask_node, query)
    return query, None if scale is None else float(scale), mask_plan, note


def _check_mask(mask_node: object, query: torch.Tensor) -> _MaskPlan:
    mask = node_value(mask_node)
    if not isinstance(mask_node, fx.Node) or not isinstance(mask, torch.Tensor):
        raise _Dense("mask", f"attn_mask {mask_node!r} is not a traced tensor")
    if mask.dtype != torch.bool:
        raise _Dense(
            "mask", f"attn_mask has dtype {mask.dtype} (an additive mask); only boolean key-padding masks are kept"
        )
    batch, heads, seq_len = query.shape[0], query.shape[1], query.shape[2]
    if not 1 <= mask.dim() <= 4:
        raise _Dense("mask", f"attn_mask is {mask.dim()}-D; expected a key-padding mask")
    full = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    batch_ok = known_equal(full[0], 1) or known_equal(full[0], batch)
    if (
        (known_equal(full[3], seq_len) or known_equal(full[3], 1))  # a key dim of 1 broadcasts (SDPA's rules)
        and known_equal(full[2], 1)
        and (known_equal(full[1], 1) or known_equal(full[1], heads))
        and batch_ok
    ):
        return _MaskPlan("key_padding", node=mask_node)
    form = prove_padding_mask(mask_node, batch, seq_len)
    if isinstance(form, MaskForm):
        return _MaskPlan(form.kind, valid=form.valid)
    raise _Dense(
        "mask",
        f"attn_mask of shape {_shape_text(mask.shape)} is not a key-padding mask (a shape broadcastable to "
        f"(B, H, 1, S), or a (B, 1, S, S) mask proved to be key-valid, or key-valid AND query-valid): {form}",
    )


def _infer_layout(
    query_axis: DimInfo | None, key_axis: DimInfo | None, value_axis: DimInfo | None
) -> tuple[_Layout, Size]:
    """The grid (or a run-time grid) and text span that the data flow shows for the query and key (and value, if it
    has a claim); also the number of video tokens."""
    for name, axis in (("query", query_axis), ("key", key_axis), ("value", value_axis)):
        if isinstance(axis, Conflict):
            raise _Dense("ambiguous_grid", f"the {name}'s token layout is ambiguous: {axis.reason}")
        if isinstance(axis, Shard):
            raise _Dense(
                "sequence_shard",
                f"the {name} holds {axis.describe()}, not the whole sequence (context parallelism without a Ulysses "
                "all-to-all before the attention, e.g. ring attention, which merges chunks of keys by their "
                "log-sum-exp): sparse attention needs every key in one call; use ulysses_degree instead of "
                "ring_degree",
            )
    if not isinstance(query_axis, TokenAxis) or not isinstance(key_axis, TokenAxis):
        missing = "query" if not isinstance(query_axis, TokenAxis) else "key"
        raise _Dense(
            "no_grid",
            f"no video grid reaches the {missing}: no reshape of a (frames, height, width) grid into its "
            "sequence was found (set video_grid to force)",
        )
    # The query, key and value agree when their grids are equal or one refines the other (`finer_axis`).
    tokens: TokenAxis = query_axis
    for name, other in (("key", key_axis), ("value", value_axis)):
        if other is None or tokens.same_layout(other):
            continue
        merged = finer_axis(tokens, other)
        if merged is None:
            raise _Dense("ambiguous_grid", f"query ({tokens.describe()}) and {name} ({other.describe()}) differ")
        tokens = merged
    spans = tokens.spans
    grids = [i for i, span in enumerate(spans) if isinstance(span, VIDEO_SPANS)]
    if len(grids) != 1:
        raise _Dense("ambiguous_grid", f"the sequence holds {len(grids)} grids: {tokens.describe()}")
    position = grids[0]
    before, after = spans[:position], spans[position + 1 :]
    if before and after:
        raise _Dense("ambiguous_grid", f"tokens on both sides of the video grid: {tokens.describe()}")
    text = TokenAxis(before or after).length if (before or after) else 0
    span = spans[position]
    if isinstance(span, ContextSpan):
        return _Layout(None, text, bool(before)), span.length
    assert isinstance(span, GridSpan)  # VIDEO_SPANS are grid and context spans
    factors = list(span.factors)
    if len(factors) > 3:
        factors = [f for f in factors if not known_equal(f.size, 1)]
    if len(factors) != 3:
        raise _Dense(
            "ambiguous_grid",
            f"the token grid {span.describe()} has {len(factors)} dimensions; only 3-D (frames, height, "
            "width) grids are inferred (set video_grid to force)",
        )
    return _Layout((factors[0], factors[1], factors[2]), text, bool(before)), _grid_tokens(factors)




def _resolve_layout(
    inferred: tuple[_Layout, Size] | None,
    why_not: _Dense | None,
    seq_len: Size,
    config: SparseAttentionConfig,
    run_time: bool = False,
) -> tuple[_Layout, str]:
    """Apply the config's video_grid / text_len / text_position to the inferred layout; returns (layout, grid_from).
    Raises LayoutOverrideError for a setting that contradicts a layout the graph proves (static sizes). `run_time`: a
    call without a grid in the graph and without a video_grid setting is handed to the op (grid_from "run_time")."""
    if inferred is not None:
        layout, num_video = inferred
        # The spans were built to add up to the sequence length; prove it, for every size, before relying on it.
        if not known_equal(seq_len, num_video + layout.text_len):
            described_grid = "a run-time grid" if layout.grid is None else _grid_text(layout.grid)
            raise _Dense(
                "ambiguous_grid",
                f"inferred video grid {described_grid} + text {layout.text_len} cannot be proved to equal the sequence "
                f"length {seq_len}",
            )
        _check_agreement(layout, config)
        return layout, "graph" if layout.grid is not None else "context"
    assert why_not is not None
    if why_not.rule == "sequence_shard":
        raise why_not  # no setting makes one rank's shard the whole sequence
    if config.video_grid is None:
        if run_time and why_not.rule == "no_grid":
            return _Layout(None, TEXT_UNPLACED, False), "run_time"
        if config.text_len is not None or config.text_position is not None:
            raise _Dense(
                why_not.rule,
                f"text_len/text_position are set but the video grid is unknown ({why_not.reason}); set video_grid too",
            )
        raise why_not
    # No grid in the graph: the user's grid, read by the op when it runs (so that it may change per call).
    grid = config.video_grid
    num_video = grid[0] * grid[1] * grid[2]
    described = f"video_grid {grid} ({num_video} tokens)"
    if _is_static(seq_len):
        fitted = fit_text(grid, TEXT_REST if config.text_len is None else config.text_len, int(seq_len))
        if isinstance(fitted, str):
            raise _Dense("override_mismatch", fitted)
    if config.text_len == 0:
        return _Layout(None, 0, False), "config"
    if config.text_position is not None:
        text_len = TEXT_REST if config.text_len is None else config.text_len
        return _Layout(None, text_len, config.text_position == "first"), "config"
    if _is_static(seq_len) and int(seq_len) == num_video:
        return _Layout(None, 0, False), "config"
    raise _Dense("override_mismatch", f"{described}: where the text sits is unknown; set text_position")


def _check_agreement(layout: _Layout, config: SparseAttentionConfig) -> None:
    """Raise LayoutOverrideError when a setting contradicts the layout the graph proves (`call_layout.check_settings`;
    symbolic sizes are not checked here: the op checks them when it runs)."""
    grid = None
    if layout.grid is not None and all(_is_static(f.size) for f in layout.grid):
        grid = (int(layout.grid[0].size), int(layout.grid[1].size), int(layout.grid[2].size))
    text_len = int(layout.text_len) if _is_static(layout.text_len) else None
    check_settings(config, video_grid=grid, text_len=text_len, text_first=layout.text_first, source="the graph")


def _grid_tokens(grid: Sequence[Factor]) -> Size:
    total: Size = 1
    for factor in grid:
        total = total * factor.size
    return total


def _grid_text(grid: Sequence[Factor]) -> str:
    return "(" + ", ".join(_size_text(f.size) for f in grid) + ")"


def _decide(
    node: fx.Node,
    analysis: TokenAxisAnalysis,
    config: SparseAttentionConfig,
    graph_index: int,
    run_time: bool = False,
) -> tuple[AttentionDecision, _SparsePlan | None]:
    module = _module_path(node)
    query_shape: tuple[Size, ...] = ()
    layout: _Layout | None = None
    grid_from = ""
    try:
        call = _sdpa_arguments(node)
        traced_query = node_value(call.query)
        if isinstance(traced_query, torch.Tensor):
            query_shape = tuple(traced_query.shape)
        query, scale, mask, note = _check_semantics(node, call)
        seq_len = query.shape[2]
        axes = [analysis.axis(tensor, 2) for tensor in (call.query, call.key, call.value)]
        try:
            inferred, why_not = _infer_layout(*axes), None
        except _Dense as dense:
            inferred, why_not = None, dense
        layout, grid_from = _resolve_layout(inferred, why_not, seq_len, config, run_time)
        heads = _head_group(analysis, call)
        notes = [note] if note else []
        if heads is not None:
            notes.append(
                f"context parallel: rank {heads.rank} of {heads.world_size}, heads {heads.first}.."
                f"{heads.first + heads.heads - 1} over the whole sequence"
            )
        if _is_static(seq_len):
            if int(seq_len) < config.min_seq_len:
                raise _Dense("short", f"sequence length {seq_len} < min_seq_len={config.min_seq_len}")
        else:
            notes.append(
                f"dynamic sequence length {seq_len}: min_seq_len={config.min_seq_len} is applied when the op runs"
            )
        if grid_from == "context":
            notes.append("video grid from the model's forward, checked when the op runs")
        elif grid_from == "config":
            notes.append("video grid from the video_grid setting, read when the op runs")
        plan = _SparsePlan(node, call.query, call.key, call.value, mask, scale, layout)
        if grid_from == "run_time":
            assert why_not is not None
            reason = (
                f"{why_not.reason}; handed to the op, which runs it sparse on a call where a video_grid setting is "
                "in force (spattn_compile.config(video_grid=(frames, height, width)), with text_position when the "
                "sequence holds text), dense otherwise"
            )
            return _dense_decision(node, module, query_shape, layout, grid_from, graph_index, "no_grid", reason), plan
        text_len = layout.text_len
        video_grid: tuple[Size, Size, Size] | None = None
        if layout.grid is not None:
            video_grid = _grid_sizes(layout.grid)
        elif grid_from == "config" and config.video_grid is not None:
            video_grid = config.video_grid
            if text_len == TEXT_REST and _is_static(seq_len):
                text_len = int(seq_len) - math.prod(config.video_grid)  # what the op will find with this grid
        decision = AttentionDecision(
            graph_index=graph_index,
            node=node.name,
            module=module,
            sparse=True,
            layer_index=None,
            query_shape=query_shape,
            video_grid=video_grid,
            text_len=text_len,
            text_position=_position(layout),
            grid_from=grid_from,
            rule="",
            reason="; ".join(notes),
            mask="" if mask is None else mask.kind,
            world_size=1 if heads is None else heads.world_size,
            rank=0 if heads is None else heads.rank,
            heads=None if heads is None else (heads.first, heads.heads),
        )
        return decision, plan
    except _Dense as dense:
        source = "" if grid_from == "run_time" else grid_from  # dense for another reason: not handed to the op
        decision = _dense_decision(node, module, query_shape, layout, source, graph_index, dense.rule, dense.reason)
        return decision, None


def _dense_decision(
    node: fx.Node,
    module: str,
    query_shape: tuple[Size, ...],
    layout: _Layout | None,
    grid_from: str,
    graph_index: int,
    rule: str,
    reason: str,
) -> AttentionDecision:
    unplaced = layout is not None and _is_static(layout.text_len) and int(layout.text_len) == TEXT_UNPLACED
    return AttentionDecision(
        graph_index=graph_index,
        node=node.name,
        module=module,
        sparse=False,
        layer_index=None,
        query_shape=query_shape,
        video_grid=None if layout is None or layout.grid is None else _grid_sizes(layout.grid),
        text_len=None if layout is None or unplaced else layout.text_len,
        text_position=None if layout is None or unplaced else _position(layout),
        grid_from=grid_from,
        rule=rule,
        reason=reason,
    )


def _grid_sizes(grid: tuple[Factor, Factor, Factor]) -> tuple[Size, Size, Size]:
    return (grid[0].size, grid[1].size, grid[2].size)


def _head_group(analysis: TokenAxisAnalysis, call: _SdpaCall) -> HeadGroup | None:
    """The heads this rank holds, when the query, key and value come out of one Ulysses all-to-all; None without
    context parallelism."""
    groups = [analysis.axis(tensor, 1) for tensor in (call.query, call.key, call.value)]
    query = groups[0]
    if not isinstance(query, HeadGroup):
        if any(isinstance(group, HeadGroup) for group in groups):
            raise _Dense("ambiguous_grid", "the key or value holds one rank's group of heads, the query does not")
        return None
    if not all(query.same_layout(group) for group in groups[1:] if group is not None):
        raise _Dense("ambiguous_grid", f"the query holds the {query.describe()}, the key or value other heads")
    return query


def _fused_name(node: fx.Node) -> str | None:
    target = node.target
    if node.op != "call_function" or not isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return None
    name = target._opname if isinstance(target, torch._ops.OpOverload) else target._qualified_op_name.split("::")[-1]
    return name if name in _FUSED_ATTENTION else None


def _decide_fused(node: fx.Node, name: str, analysis: TokenAxisAnalysis, graph_index: int) -> AttentionDecision:
    """A fused attention op the pass does not rewrite: dense, and why (ring attention when its query is a shard)."""
    query = node.args[0] if node.args else node.kwargs.get("query")
    value = node_value(query)
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
    axis = analysis.axis(query, 2) if isinstance(query, fx.Node) and len(shape) == 4 else None
    if isinstance(axis, Shard):
        rule, reason = "sequence_shard", (
            f"aten.{name} over {axis.describe()}: ring attention (ring_degree > 1) attends to one chunk of keys at a "
            "time and merges the chunks by their log-sum-exp; sparse attention needs every key in one call, so it "
            "stays dense (use ulysses_degree instead of ring_degree)"
        )
    else:
        rule, reason = "attention_backend", (
            f"attention through aten.{name} (a diffusers attention backend other than the native one): only "
            "scaled_dot_product_attention calls are rewritten (model.set_attention_backend('native'))"
        )
    return AttentionDecision(
        graph_index=graph_index,
        node=node.name,
        module=_module_path(node),
        sparse=False,
        layer_index=None,
        query_shape=shape,
        video_grid=None,
        text_len=None,
        text_position=None,
        grid_from="",
        rule=rule,
        reason=reason,
    )


def _position(layout: _Layout) -> str | None:
    if _is_static(layout.text_len) and int(layout.text_len) == 0:
        return None
    return "first" if layout.text_first else "last"


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def context_seeds(
    graph: fx.Graph, video_tokens: int, shards: GroupInfo | None = None
) -> dict[fx.Node, Annotation]:
    """Seeds for a graph compiled from one block of a model whose forward holds `video_tokens` video tokens now: the
    graph inputs (not parameters) with at least 3 dims whose dim 1 holds exactly that many tokens at the traced size
    (diffusers blocks take the video stream as `(B, S, C)` and its rotary tables as `(B or 1, S, ...)`) get a
    `ContextSpan` on dim 1. The op checks on every call that the span's length equals the grid of the call.

    `shards`: the model runs with context parallelism over a group of this size, in which this process has this rank
    (diffusers' `enable_parallelism` splits the sequence in equal, contiguous pieces in rank order before the blocks):
    inputs whose dim 1 holds `video_tokens / size` tokens then get this rank's `Shard` of that span."""
    local = None
    if shards is not None and shards.size > 1 and video_tokens % shards.size == 0:
        local = video_tokens // shards.size
    seeds: dict[fx.Node, Annotation] = {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        value = node_value(node)
        if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter) or value.dim() < 3:
            continue
        if _is_parameter(node):
            continue
        tokens = size_hint(value.shape[1])
        if tokens == video_tokens:
            seeds[node] = {1: TokenAxis((ContextSpan(value.shape[1]),))}
        elif local is not None and shards is not None and tokens == local:
            whole = TokenAxis((ContextSpan(value.shape[1] * shards.size),))
            seeds[node] = {1: Shard(whole, shards.rank, shards.size, value.shape[1])}
    return seeds


def _is_parameter(node: fx.Node) -> bool:
    """Whether a placeholder is a module's parameter or buffer (Dynamo names their sources after `_parameters`)."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    text = "" if source is None else source.name() if callable(getattr(source, "name", None)) else str(source)
    return "_parameters" in text or "_buffers" in text


def _analyze(
    graph: fx.Graph,
    config: SparseAttentionConfig,
    graph_index: int,
    seeds: dict[fx.Node, Annotation] | None = None,
    groups: GroupResolver = resolve_group,
) -> list[tuple[AttentionDecision, _SparsePlan | None]]:
    nodes = [node for node in graph.nodes if _is_sdpa(node) or _fused_name(node)]
    if not nodes:
        return []
    analysis = TokenAxisAnalysis(graph, seeds, groups)
    results: list[tuple[AttentionDecision, _SparsePlan | None]] = []
    for node in nodes:
        fused = _fused_name(node)
        if fused is not None:
            results.append((_decide_fused(node, fused, analysis, graph_index), None))
        else:
            results.append(_decide(node, analysis, config, graph_index))
    # Packed tokens (module docstring, grid_from "run_time"): no call of the graph has a grid, nor (for a block) did
    # the model's forward give one; such calls go to the op, which takes the video_grid setting when it runs.
    if seeds is None and not any(d.grid_from in ("graph", "context") for d, _ in results):
        for position, (node, (decision, _)) in enumerate(zip(nodes, results)):
            if decision.rule == "no_grid":
                results[position] = _decide(node, analysis, config, graph_index, run_time=True)
    layer = 0
    numbered: list[tuple[AttentionDecision, _SparsePlan | None]] = []
    for decision, plan in results:
        if plan is not None:
            decision = dataclasses.replace(decision, layer_index=layer)
            layer += 1
        numbered.append((decision, plan))
    return numbered


def analyze_attention(
    graph: fx.Graph,
    config: SparseAttentionConfig,
    graph_index: int = 0,
    seeds: dict[fx.Node, Annotation] | None = None,
    groups: GroupResolver = resolve_group,
) -> list[AttentionDecision]:
    """The decision for every attention call of `graph` under `config`, without changing the graph. `seeds`: see
    `context_seeds`; `groups`: resolves the process groups collectives name (tests replace it). Raises
    LayoutOverrideError for settings that contradict the graph."""
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    return [decision for decision, _ in _analyze(graph, config, graph_index, seeds, groups)]


def _graph_size(graph: fx.Graph, factor: Factor) -> int | fx.Node:
    """An int, or a node computing the symbolic size from the tensor it was read from."""
    size = factor.size
    if isinstance(size, int):
        return size
    if is_concrete_int(size):
        return int(size)
    if factor.source is None:
        raise ValueError(f"symbolic grid size {size} has no source tensor")
    tensor, dim = factor.source
    node = graph.call_function(torch.ops.aten.sym_size.int, (tensor, dim))
    node.meta["example_value"] = size
    return node


def _graph_binary(
    graph: fx.Graph, op: Callable[[int, int], int], a: int | fx.Node, b: int | fx.Node, value: Size
) -> int | fx.Node:
    if isinstance(a, int) and isinstance(b, int):
        return op(a, b)
    node = graph.call_function(op, (a, b))
    node.meta["example_value"] = value
    return node


def _call(
    graph: fx.Graph,
    target: Callable[..., object],
    args: tuple[Argument, ...],
    value: object,
    kwargs: dict[str, Argument] | None = None,
) -> fx.Node:
    node = graph.call_function(target, args, kwargs or {})
    node.meta["example_value"] = value
    return node


def _value_of(node: fx.Node) -> torch.Tensor:
    """The traced tensor of a node the analysis has already checked to be a tensor."""
    value = node_value(node)
    assert isinstance(value, torch.Tensor), f"{node.name} has no traced tensor"
    return value


def _text_len_value(graph: fx.Graph, plan: _SparsePlan, grid: list[int | fx.Node]) -> int | fx.Node:
    text_len = plan.layout.text_len
    if _is_static(text_len):
        return int(text_len)
    if plan.layout.grid is None:
        # A run-time grid: the op derives the text from the sequence (the span's length is symbolic only under
        # dynamic shapes, where the op checks it against the grid of the call).
        return TEXT_REST
    # Symbolic: text_len = S - F*H*W, computed in the graph so that every traced size gets its own value.
    query = _value_of(plan.query)
    seq_len = _graph_size(graph, Factor(query.shape[2], (plan.query, 2)))
    factors = plan.layout.grid
    num_video = _graph_binary(graph, operator.mul, grid[0], grid[1], factors[0].size * factors[1].size)
    num_video = _graph_binary(graph, operator.mul, num_video, grid[2], _grid_tokens(factors))
    return _graph_binary(graph, operator.sub, seq_len, num_video, text_len)


def _mask_inputs(graph: fx.Graph, plan: _SparsePlan) -> tuple[fx.Node | None, fx.Node | None]:
    """The key-padding mask node for the op, and the (B or 1, 1, S, 1) query-validity node when padded query rows
    need SDPA's fully masked output."""
    mask = plan.mask
    if mask is None:
        return None, None
    if mask.kind == "key_padding":
        return mask.node, None
    valid = mask.valid
    assert valid is not None  # proved masks carry their validity vector
    rows = _value_of(valid).unsqueeze(1)
    key_mask = _call(graph, torch.unsqueeze, (_call(graph, torch.unsqueeze, (valid, 1), rows), 1), rows.unsqueeze(1))
    if mask.kind == "key":
        return key_mask, None
    query_valid = _call(graph, torch.unsqueeze, (key_mask.args[0], -1), rows.unsqueeze(-1))
    return key_mask, query_valid


def _rewrite(graph: fx.Graph, plan: _SparsePlan, layer_index: int) -> None:
    node = plan.node
    with graph.inserting_before(node):
        grid = [] if plan.layout.grid is None else [_graph_size(graph, factor) for factor in plan.layout.grid]
        text_len = _text_len_value(graph, plan, grid)
        key_mask, query_valid = _mask_inputs(graph, plan)
        replacement = graph.call_function(
            torch.ops.spattn.sparse_attention.default,
            (
                plan.query,
                plan.key,
                plan.value,
                grid,
                text_len,
                plan.layout.text_first,
                key_mask,
                plan.scale,
                layer_index,
            ),
        )
        replacement.meta.update(node.meta)
        if query_valid is not None:
            # Padded query rows: SDPA's output for a row whose keys are all masked, from SDPA itself on one such row.
            query = _value_of(plan.query)
            one_row = query[:, :, :1]
            first_query = _call(graph, operator.getitem, (plan.query, (slice(None), slice(None), slice(0, 1))), one_row)
            assert key_mask is not None  # query validity comes with a key-padding mask
            no_key = _call(graph, torch.zeros_like, (key_mask,), torch.zeros_like(_value_of(key_mask)))
            fill = _call(
                graph,
                torch.nn.functional.scaled_dot_product_attention,
                (first_query, plan.key, plan.value),
                torch.empty_like(one_row),
                {"attn_mask": no_key, "scale": plan.scale},
            )
            output = _call(graph, torch.where, (query_valid, replacement, fill), torch.empty_like(_value_of(node)))
            output.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        else:
            output = replacement
    node.replace_all_uses_with(output)
    graph.erase_node(node)


def rewrite_attention(
    gm: fx.GraphModule,
    config: SparseAttentionConfig,
    graph_index: int = 0,
    seeds: dict[fx.Node, Annotation] | None = None,
    groups: GroupResolver = resolve_group,
) -> list[AttentionDecision]:
    """Rewrite every eligible SDPA call of `gm` in place (then recompile it); returns every call's decision and logs
    it on the "spattn_compile" logger. `seeds`: see `context_seeds`. Raises LayoutOverrideError for settings that
    contradict the graph."""
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    from ..runtime import op  # noqa: F401  (registers torch.ops.spattn.sparse_attention)

    results = _analyze(gm.graph, config, graph_index, seeds, groups)
    for decision, plan in results:
        if plan is not None and decision.layer_index is not None:
            _rewrite(gm.graph, plan, decision.layer_index)
        _log(decision)
    if any(plan is not None for _, plan in results):
        gm.graph.lint()
        gm.recompile()
    return [decision for decision, _ in results]


def _log(decision: AttentionDecision) -> None:
    where = f"{decision.node}" + (f" ({decision.module})" if decision.module else "")
    if decision.sparse:
        text = "none" if decision.text_position is None else f"{decision.text_len} {decision.text_position}"
        grid = "at run time" if decision.video_grid is None else str(decision.video_grid)
        logger.info(
            "spattn: %s -> sparse attention, layer %d, video grid %s (from %s), text %s%s",
            where,
            decision.layer_index,
            grid,
            decision.grid_from,
            text,
            f"; {decision.reason}" if decision.reason else "",
        )
    elif decision.layer_index is not None:
        logger.info("spattn: %s -> the op, layer %d, dense until a video grid is set: %s", where,
                    decision.layer_index, decision.reason)  # fmt: skip
    else:
        logger.info("spattn: %s stays dense [%s]: %s", where, decision.rule, decision.reason)
