"""The attention pass: decide, for every scaled_dot_product_attention call of a Dynamo FX graph, whether it becomes
sparse attention, and rewrite the ones that do into `torch.ops.spattn.sparse_attention`.

A call is rewritten when it is self-attention over one video grid, optionally joined by a span of text tokens placed
before or after the video (joint attention), with SDPA semantics the op reproduces: 4-D `(B, H, S, D)` inputs of one
shape and float dtype, no dropout, not causal, no grouped-query head mismatch, either no mask or a boolean
key-padding mask, and no autograd (the op is for inference and has no backward). The grid and the text span come
from `token_axes` (the data flow of the graph) or from the `video_grid` / `text_len` / `text_position` fields of the
config, and must satisfy `S == F*H*W + text_len` provably (for every size under dynamic shapes). Anything else
stays dense, with a reason and a machine-readable `rule`.

Layer indices: the rewritten calls of one graph are numbered 0, 1, 2... in graph order (which is execution order);
dense calls get none. For a model that Dynamo captures as one graph (Wan, HunyuanVideo, CogVideoX, LTX-Video) this
is the model's attention layer order restricted to the sparse-capable layers, so `dense_layers=(0, 1)` means "the
first two video self-attention layers"; with graph breaks the numbering restarts in each graph.

`config.min_seq_len` is decided here when the sequence length is a static int (a shorter call stays dense; Dynamo's
shape guards recompile when the length changes). When the length is symbolic (dynamic shapes) the call is rewritten
and the op applies `min_seq_len` when it runs, so one graph serves every length correctly.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import re
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..config import SparseAttentionConfig
from .token_axes import Conflict, DimInfo, Factor, GridSpan, TokenAxis, TokenAxisAnalysis, known_equal, node_value

__all__ = ["SDPA_TARGETS", "AttentionDecision", "analyze_attention", "rewrite_attention"]

logger = logging.getLogger("spattn_compile")

SDPA_TARGETS = frozenset(
    {
        torch._C._nn.scaled_dot_product_attention,
        torch.nn.functional.scaled_dot_product_attention,
        torch.ops.aten.scaled_dot_product_attention.default,
    }
)
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
        module: the module path of the attention layer (from Dynamo's `nn_module_stack`), "" if unknown.
        sparse: True when the call is rewritten into `torch.ops.spattn.sparse_attention`.
        layer_index: the index passed to the op (see the module docstring); None for dense calls.
        query_shape: `(B, H, S, D)` of the query as traced (ints, or SymInts under dynamic shapes); () if not 4-D.
        video_grid: `(F, H, W)` of the video tokens, when known (also for dense calls, when inference got that far).
        text_len: number of text tokens in the sequence, when known.
        text_position: "first" or "last" (None without text or when unknown).
        grid_from: "graph" (inferred from the data flow), "config" (the user's video_grid) or "".
        rule: why the call is dense, as a short code: "shape", "autograd", "dropout", "causal", "cross_attention",
            "gqa", "dtype", "mask", "scale", "no_grid", "ambiguous_grid", "override_mismatch", "short"; "" when
            sparse.
        reason: the same in words (for a sparse call: notes, e.g. that min_seq_len is checked at run time).
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


@dataclasses.dataclass(frozen=True)
class _SparsePlan:
    """What the rewrite needs: the op's inputs, with the grid factors' graph sources for dynamic sizes."""

    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: fx.Node | None
    scale: float | None
    grid: tuple[Factor, Factor, Factor]
    text_len: Size
    text_first: bool


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
    path = re.sub(r"^L\['self'\]", "", path)
    return path.lstrip(".")


def _sdpa_arguments(node: fx.Node) -> dict[str, object]:
    """The eight SDPA parameters of a call node, from its positional and keyword forms (defaults filled in)."""
    if len(node.args) > len(_SDPA_PARAMETERS):
        raise _Dense("shape", f"unexpected positional arguments {node.args!r}")
    arguments = dict(zip(_SDPA_PARAMETERS, node.args))
    for name, value in node.kwargs.items():
        if name not in _SDPA_PARAMETERS or name in arguments:
            raise _Dense("shape", f"unexpected SDPA argument {name}={value!r}")
        arguments[name] = value
    for name in ("query", "key", "value"):
        if name not in arguments:
            raise _Dense("shape", f"SDPA call without {name}")
    for name, default in _SDPA_DEFAULTS.items():
        arguments.setdefault(name, default)
    return arguments


def _size_text(size: Size) -> str:
    return str(size)


def _shape_text(shape: Sequence[Size]) -> str:
    return "(" + ", ".join(_size_text(s) for s in shape) + ")"


def _constant(value: object, name: str, rule: str) -> object:
    if isinstance(value, fx.Node):
        raise _Dense(rule, f"{name} is a value computed in the graph, not a constant")
    return value


def _check_semantics(node: fx.Node, arguments: dict[str, object]) -> tuple[torch.Tensor, float | None]:
    """Everything but the token layout: shapes, dtypes, dropout, causality, heads, scale, mask, autograd."""
    values = {name: node_value(arguments[name]) for name in ("query", "key", "value")}
    for name, value in values.items():
        if not isinstance(value, torch.Tensor):
            raise _Dense("shape", f"{name} has no traced tensor value")
        if value.dim() != 4:
            raise _Dense("shape", f"{name} is {value.dim()}-D {_shape_text(value.shape)}; expected (B, H, S, D)")
    query, key, value = values["query"], values["key"], values["value"]
    output = node_value(node)
    if isinstance(output, torch.Tensor) and output.requires_grad:
        raise _Dense(
            "autograd",
            "the attention output requires grad (grad mode on, and an input requires grad); the sparse op has no "
            "backward: run the model under torch.no_grad() or torch.inference_mode()",
        )

    dropout = _constant(arguments["dropout_p"], "dropout_p", "dropout")
    if not isinstance(dropout, (int, float)) or dropout != 0:
        raise _Dense("dropout", f"dropout_p={dropout!r}; sparse attention has no dropout")
    causal = _constant(arguments["is_causal"], "is_causal", "causal")
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

    scale = _constant(arguments["scale"], "scale", "scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
        raise _Dense("scale", f"scale={scale!r}; expected None or a positive number")

    mask_node = arguments["attn_mask"]
    if mask_node is not None:
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
        padding_form = (
            known_equal(full[3], seq_len)
            and known_equal(full[2], 1)
            and (known_equal(full[1], 1) or known_equal(full[1], heads))
            and (known_equal(full[0], 1) or known_equal(full[0], batch))
        )
        if not padding_form:
            raise _Dense(
                "mask",
                f"attn_mask of shape {_shape_text(mask.shape)} is not a key-padding mask "
                f"(expected a shape broadcastable to (B, H, 1, S) with one query row)",
            )
    return query, None if scale is None else float(scale)


@dataclasses.dataclass(frozen=True)
class _Layout:
    grid: tuple[Factor, Factor, Factor]
    text_len: Size
    text_first: bool


def _infer_layout(query_axis: DimInfo | None, key_axis: DimInfo | None, value_axis: DimInfo | None) -> _Layout:
    """The grid and text span that the data flow shows for the query and key (and value, if it has a claim)."""
    for name, axis in (("query", query_axis), ("key", key_axis), ("value", value_axis)):
        if isinstance(axis, Conflict):
            raise _Dense("ambiguous_grid", f"the {name}'s token layout is ambiguous: {axis.reason}")
    if query_axis is None or key_axis is None:
        missing = "query" if query_axis is None else "key"
        raise _Dense(
            "no_grid",
            f"no video grid reaches the {missing}: no reshape of a (frames, height, width) grid into its "
            "sequence was found (set video_grid to force)",
        )
    if not query_axis.same_layout(key_axis):
        raise _Dense("ambiguous_grid", f"query ({query_axis.describe()}) and key ({key_axis.describe()}) differ")
    if value_axis is not None and not query_axis.same_layout(value_axis):
        raise _Dense("ambiguous_grid", f"query ({query_axis.describe()}) and value ({value_axis.describe()}) differ")
    spans = query_axis.spans
    grids = [i for i, span in enumerate(spans) if isinstance(span, GridSpan)]
    if len(grids) != 1:
        raise _Dense("ambiguous_grid", f"the sequence holds {len(grids)} grids: {query_axis.describe()}")
    position = grids[0]
    before, after = spans[:position], spans[position + 1 :]
    if before and after:
        raise _Dense("ambiguous_grid", f"tokens on both sides of the video grid: {query_axis.describe()}")
    factors = list(spans[position].factors)
    if len(factors) > 3:
        factors = [f for f in factors if not known_equal(f.size, 1)]
    if len(factors) != 3:
        raise _Dense(
            "ambiguous_grid",
            f"the token grid {spans[position].describe()} has {len(factors)} dimensions; only 3-D (frames, height, "
            "width) grids are inferred (set video_grid to force)",
        )
    text = TokenAxis(before or after).length if (before or after) else 0
    return _Layout(tuple(factors), text, bool(before))


def _resolve_layout(
    inferred: _Layout | None, why_not: _Dense | None, seq_len: Size, config: SparseAttentionConfig
) -> tuple[_Layout, str]:
    """Apply the config's video_grid / text_len / text_position to the inferred layout; returns (layout, grid_from)."""
    if config.video_grid is None and config.text_len is None and config.text_position is None:
        if inferred is None:
            raise why_not
        # The spans were built to add up to the sequence length; prove it, for every size, before relying on it.
        if not known_equal(seq_len, _grid_tokens(inferred.grid) + inferred.text_len):
            raise _Dense(
                "ambiguous_grid",
                f"inferred video grid {_grid_text(inferred.grid)} + text {inferred.text_len} cannot be proved to "
                f"equal the sequence length {seq_len}",
            )
        return inferred, "graph"
    if config.video_grid is not None:
        grid = tuple(Factor(size) for size in config.video_grid)
        grid_from = "config"
    elif inferred is not None:
        grid = inferred.grid
        grid_from = "graph"
    else:
        raise _Dense(
            why_not.rule,
            f"text_len/text_position are set but the video grid is unknown ({why_not.reason}); set video_grid too",
        )
    num_video = _grid_tokens(grid)
    if config.text_len is not None:
        text_len: Size = config.text_len
    elif inferred is not None:
        text_len = inferred.text_len
    else:
        text_len = seq_len - num_video
    described = f"video_grid {_grid_text(grid)} ({num_video} tokens) + text_len {text_len}"
    if not known_equal(seq_len, num_video + text_len):
        raise _Dense("override_mismatch", f"{described} != sequence length {seq_len}")
    if inferred is not None and not known_equal(_grid_tokens(inferred.grid), num_video):
        raise _Dense(
            "override_mismatch",
            f"{described}, but the graph's video grid {_grid_text(inferred.grid)} holds "
            f"{_grid_tokens(inferred.grid)} tokens",
        )
    if known_equal(text_len, 0):
        return _Layout(grid, text_len, False), grid_from
    if config.text_position is not None:
        text_first = config.text_position == "first"
        if inferred is not None and not known_equal(inferred.text_len, 0) and inferred.text_first != text_first:
            where = "first" if inferred.text_first else "last"
            raise _Dense(
                "override_mismatch", f"text_position={config.text_position!r}, but the graph places the text {where}"
            )
    elif inferred is not None and not known_equal(inferred.text_len, 0):
        text_first = inferred.text_first
    else:
        raise _Dense("override_mismatch", f"{described}: where the text sits is unknown; set text_position")
    return _Layout(grid, text_len, text_first), grid_from


def _grid_tokens(grid: Sequence[Factor]) -> Size:
    total: Size = 1
    for factor in grid:
        total = total * factor.size
    return total


def _grid_text(grid: Sequence[Factor]) -> str:
    return "(" + ", ".join(_size_text(f.size) for f in grid) + ")"


def _decide(
    node: fx.Node, analysis: TokenAxisAnalysis, config: SparseAttentionConfig, graph_index: int
) -> tuple[AttentionDecision, _SparsePlan | None]:
    base = dict(graph_index=graph_index, node=node.name, module=_module_path(node), layer_index=None)
    query_shape: tuple[Size, ...] = ()
    layout: _Layout | None = None
    grid_from = ""
    try:
        arguments = _sdpa_arguments(node)
        traced_query = node_value(arguments["query"])
        if isinstance(traced_query, torch.Tensor):
            query_shape = tuple(traced_query.shape)
        query, scale = _check_semantics(node, arguments)
        seq_len = query.shape[2]
        axes = [analysis.axis(arguments[name], 2) for name in ("query", "key", "value")]
        try:
            inferred, why_not = _infer_layout(*axes), None
        except _Dense as dense:
            inferred, why_not = None, dense
        layout, grid_from = _resolve_layout(inferred, why_not, seq_len, config)
        note = ""
        if isinstance(seq_len, int) or is_concrete_int(seq_len):
            if int(seq_len) < config.min_seq_len:
                raise _Dense("short", f"sequence length {seq_len} < min_seq_len={config.min_seq_len}")
        else:
            note = f"dynamic sequence length {seq_len}: min_seq_len={config.min_seq_len} is applied when the op runs"
        plan = _SparsePlan(
            node,
            arguments["query"],
            arguments["key"],
            arguments["value"],
            arguments["attn_mask"],
            scale,
            layout.grid,
            layout.text_len,
            layout.text_first,
        )
        decision = AttentionDecision(
            **base,
            sparse=True,
            query_shape=query_shape,
            video_grid=tuple(f.size for f in layout.grid),
            text_len=layout.text_len,
            text_position=_position(layout),
            grid_from=grid_from,
            rule="",
            reason=note,
        )
        return decision, plan
    except _Dense as dense:
        decision = AttentionDecision(
            **base,
            sparse=False,
            query_shape=query_shape,
            video_grid=None if layout is None else tuple(f.size for f in layout.grid),
            text_len=None if layout is None else layout.text_len,
            text_position=None if layout is None else _position(layout),
            grid_from=grid_from,
            rule=dense.rule,
            reason=dense.reason,
        )
        return decision, None


def _position(layout: _Layout) -> str | None:
    if known_equal(layout.text_len, 0):
        return None
    return "first" if layout.text_first else "last"


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def _analyze(
    graph: fx.Graph, config: SparseAttentionConfig, graph_index: int
) -> list[tuple[AttentionDecision, _SparsePlan | None]]:
    nodes = [node for node in graph.nodes if _is_sdpa(node)]
    if not nodes:
        return []
    analysis = TokenAxisAnalysis(graph)
    results = []
    layer = 0
    for node in nodes:
        decision, plan = _decide(node, analysis, config, graph_index)
        if plan is not None:
            decision = dataclasses.replace(decision, layer_index=layer)
            layer += 1
        results.append((decision, plan))
    return results


def analyze_attention(graph: fx.Graph, config: SparseAttentionConfig, graph_index: int = 0) -> list[AttentionDecision]:
    """The decision for every SDPA call of `graph` under `config`, without changing the graph."""
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    return [decision for decision, _ in _analyze(graph, config, graph_index)]


def _graph_size(graph: fx.Graph, factor: Factor) -> object:
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


def _graph_binary(graph: fx.Graph, op, a: object, b: object, value: Size) -> object:
    if not isinstance(a, fx.Node) and not isinstance(b, fx.Node):
        return op(a, b)
    node = graph.call_function(op, (a, b))
    node.meta["example_value"] = value
    return node


def _rewrite(graph: fx.Graph, plan: _SparsePlan, layer_index: int) -> None:
    node = plan.node
    with graph.inserting_before(node):
        grid = [_graph_size(graph, factor) for factor in plan.grid]
        if isinstance(plan.text_len, int) or is_concrete_int(plan.text_len):
            text_len = int(plan.text_len)
        else:
            # Symbolic: text_len = S - F*H*W, computed in the graph so that every traced size gets its own value.
            query = node_value(plan.query)
            seq_len = _graph_size(graph, Factor(query.shape[2], (plan.query, 2)))
            num_video = _graph_binary(graph, operator.mul, grid[0], grid[1], plan.grid[0].size * plan.grid[1].size)
            num_video = _graph_binary(graph, operator.mul, num_video, grid[2], _grid_tokens(plan.grid))
            text_len = _graph_binary(graph, operator.sub, seq_len, num_video, plan.text_len)
        replacement = graph.call_function(
            torch.ops.spattn.sparse_attention.default,
            (
                plan.query,
                plan.key,
                plan.value,
                grid,
                text_len,
                plan.text_first,
                plan.attn_mask,
                plan.scale,
                layer_index,
            ),
        )
    replacement.meta.update(node.meta)
    node.replace_all_uses_with(replacement)
    graph.erase_node(node)


def rewrite_attention(
    gm: fx.GraphModule, config: SparseAttentionConfig, graph_index: int = 0
) -> list[AttentionDecision]:
    """Rewrite every eligible SDPA call of `gm` in place (then recompile it); returns every call's decision and logs
    it on the "spattn_compile" logger."""
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    from .. import ops  # noqa: F401  (registers torch.ops.spattn.sparse_attention)

    results = _analyze(gm.graph, config, graph_index)
    for decision, plan in results:
        if plan is not None:
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
        logger.info(
            "spattn: %s -> sparse attention, layer %d, video grid %s (from %s), text %s%s",
            where,
            decision.layer_index,
            decision.video_grid,
            decision.grid_from,
            text,
            f"; {decision.reason}" if decision.reason else "",
        )
    else:
        logger.info("spattn: %s stays dense [%s]: %s", where, decision.rule, decision.reason)
