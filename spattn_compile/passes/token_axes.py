"""Token-axis analysis: which tensor dimensions of a Dynamo FX graph are sequences of video tokens, and their layout.

This module owns the data-flow rules that let the attention pass know the video grid without being told. One forward
pass over the graph (in topological order) annotates every tensor dimension that carries *token structure*: a
`TokenAxis`, the concatenation of `GridSpan`s (tokens that are the row-major flattening of a grid of sizes
`factors`) and `OtherSpan`s (tokens of no known grid: text, registers, padding). Structure is created where a reshape
or flatten merges several dimensions into one (the patch embedding's `(B, C, F, H, W) -> (B, C, F*H*W)`, or the
coordinate grid a rotary embedding is built from), grows where `torch.cat` joins sequences (video then text, or text
then video), shrinks where slices or splits cut a sequence, and is carried by ops that keep the meaning of a
dimension: permutes, elementwise and broadcasting ops, normalisations, linear layers (all but the last dimension),
convolutions (the batch dimension) and attention itself (the query's sequence). An op without a rule drops the
annotations of its output, so missing knowledge never turns into a guess; when two inputs of one op claim different
layouts for the same dimension, that dimension is marked `Conflict`. Sizes are ints, or SymInts under dynamic shapes;
sizes are compared with `statically_known_true`, which proves equalities on the symbolic expressions (sympy) without
adding guards. Each grid factor remembers a `(node, dim)` whose size it is, so the pass can rebuild it as a graph value.

A graph compiled from one block of a model (regional compilation, `compile_repeated_blocks`) holds no patch embedding:
its video tokens arrive as an input. The caller may then *seed* inputs with a `ContextSpan`: tokens of the video whose
grid the model's forward knows at run time (the backend checks that the span's length equals that grid's size on
every call). A context span flows like a grid span, but has no factors, so it cannot be reshaped into a grid.
Context parallelism (diffusers' Ulysses attention, `enable_parallelism`): each rank holds one contiguous piece of the
sequence, in rank order. A `chunk`/`split` of a token axis into equal pieces makes piece i a `Shard` of that axis; the
caller may also seed a block's input as this rank's shard (the block of a model whose forward split the sequence). An
all-to-all (`_c10d_functional.all_to_all_single`) over a group of N ranks of a tensor `(N, S_local, ...)` whose dim 0
is the outer part of a split of the heads, and one of whose dims is this rank's shard of an axis (every rank sends
slice j to rank j), gives back `(N, S_local, ...)`: dim 0 is then the rank each slice came from (`RankAxis`), the
shard dim holds that rank's shard (`Shard` with index None) and the heads dim holds the heads of this rank's group
(`HeadGroup`). Merging the rank dim with the shard dim right after it (`flatten(0, 1)`) gives back the whole axis, in
global order. That every rank runs the same program (and so sends its own shard) is the one thing taken on trust: it
is how torch.distributed programs work (SPMD).

The module knows nothing of attention or of Triton.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = [
    "Conflict",
    "ContextSpan",
    "DimInfo",
    "Factor",
    "GridSpan",
    "GroupInfo",
    "HeadGroup",
    "OtherSpan",
    "RankAxis",
    "Shard",
    "TokenAxis",
    "TokenAxisAnalysis",
    "known_equal",
    "node_value",
    "size_hint",
]

Size = int | torch.SymInt

logger = logging.getLogger("spattn_compile")


def node_value(node: object) -> object:
    """The traced example value of an FX node (a fake tensor, SymInt, tuple...), or the constant itself."""
    if isinstance(node, fx.Node):
        value = node.meta.get("example_value")
        return node.meta.get("val") if value is None else value
    return node


def known_equal(a: Size, b: Size) -> bool:
    """True when `a == b` holds for every value of the shape symbols (no guard is added)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def size_hint(size: Size) -> int | None:
    """The concrete value of a size at the traced example (the hint of a SymInt); None when it has none."""
    if isinstance(size, int):
        return size
    hint = getattr(size.node, "hint", None)
    return int(hint) if hint is not None else None


def _product(sizes: Iterable[Size]) -> Size:
    result: Size = 1
    for size in sizes:
        result = result * size
    return result


@dataclasses.dataclass(frozen=True)
class Factor:
    """One grid dimension: its size, and a tensor node and dimension whose size it is (to rebuild it in the graph)."""

    size: Size
    source: tuple[fx.Node, int] | None = None


@dataclasses.dataclass(frozen=True)
class GridSpan:
    """Tokens that are the row-major flattening of a grid with sizes `factors` (outermost first)."""

    factors: tuple[Factor, ...]

    @property
    def length(self) -> Size:
        return _product(f.size for f in self.factors)

    def describe(self) -> str:
        return "grid(" + "x".join(str(f.size) for f in self.factors) + ")"


@dataclasses.dataclass(frozen=True)
class ContextSpan:
    """The video tokens of a block's input, whose (frames, height, width) grid is known only when the model runs."""

    length: Size

    def describe(self) -> str:
        return f"video({self.length}, grid at run time)"


@dataclasses.dataclass(frozen=True)
class OtherSpan:
    """Tokens of no known grid (text, registers, padding)."""

    length: Size

    def describe(self) -> str:
        return f"other({self.length})"


Span = GridSpan | ContextSpan | OtherSpan
VIDEO_SPANS = (GridSpan, ContextSpan)


@dataclasses.dataclass(frozen=True)
class TokenAxis:
    """A sequence dimension made of consecutive spans; at least one of them is a `GridSpan` or a `ContextSpan`."""

    spans: tuple[Span, ...]

    @property
    def length(self) -> Size:
        total: Size = 0
        for span in self.spans:
            total = total + span.length
        return total

    def describe(self) -> str:
        return " + ".join(s.describe() for s in self.spans)

    def same_layout(self, other: DimInfo) -> bool:
        """Same spans with provably equal sizes (the factor sources may differ)."""
        if not isinstance(other, TokenAxis) or len(self.spans) != len(other.spans):
            return False
        for mine, theirs in zip(self.spans, other.spans):
            if type(mine) is not type(theirs):
                return False
            if isinstance(mine, (OtherSpan, ContextSpan)) or isinstance(theirs, (OtherSpan, ContextSpan)):
                if not known_equal(mine.length, theirs.length):
                    return False
            elif len(mine.factors) != len(theirs.factors) or not all(
                known_equal(a.size, b.size) for a, b in zip(mine.factors, theirs.factors)
            ):
                return False
        return True


@dataclasses.dataclass(frozen=True)
class Shard:
    """One rank's contiguous piece of a token axis that context parallelism split into `count` equal pieces in rank
    order: positions `[index * length, (index + 1) * length)` of `axis`. `index` None: after an all-to-all, the piece
    of the rank that the `RankAxis` before it names."""

    axis: TokenAxis
    index: int | None
    count: int
    length: Size

    def describe(self) -> str:
        which = "each rank's" if self.index is None else f"rank {self.index}'s"
        return f"{which} shard (1 of {self.count}) of {self.axis.describe()}"

    def same_layout(self, other: DimInfo) -> bool:
        return (
            isinstance(other, Shard)
            and self.index == other.index
            and self.count == other.count
            and self.axis.same_layout(other.axis)
        )


@dataclasses.dataclass(frozen=True)
class RankAxis:
    """A dimension indexing the `count` ranks of a process group: after an all-to-all, the rank each slice came from."""

    count: int

    def describe(self) -> str:
        return f"ranks({self.count})"

    def same_layout(self, other: DimInfo) -> bool:
        return isinstance(other, RankAxis) and self.count == other.count


@dataclasses.dataclass(frozen=True)
class HeadGroup:
    """The attention heads this rank holds after an all-to-all that scattered the heads over `world_size` ranks in
    groups of `heads`: global heads `rank * heads ... (rank + 1) * heads - 1`."""

    rank: int
    world_size: int
    heads: Size

    @property
    def first(self) -> Size:
        return self.rank * self.heads

    def describe(self) -> str:
        return f"heads of rank {self.rank} of {self.world_size} ({self.heads} each)"

    def same_layout(self, other: DimInfo) -> bool:
        return (
            isinstance(other, HeadGroup)
            and (self.rank, self.world_size) == (other.rank, other.world_size)
            and known_equal(self.heads, other.heads)
        )


@dataclasses.dataclass(frozen=True)
class Conflict:
    """A dimension whose inputs claim different token layouts (or that descends from such a dimension)."""

    reason: str

    def describe(self) -> str:
        return f"conflict ({self.reason})"


DimInfo = TokenAxis | Shard | RankAxis | HeadGroup | Conflict


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """A process group as the analysis sees it: its size, and the rank of this process in it."""

    size: int
    rank: int


def resolve_group(name: object) -> GroupInfo | None:
    """The process group that a functional collective names (its `group_name` argument), or None when there is no
    initialised process group of that name in this process."""
    import torch.distributed as dist

    if not isinstance(name, str) or not dist.is_available() or not dist.is_initialized():
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        # torch types the name as GroupName (a NewType of str); the graph holds the plain string.
        group = _resolve_process_group(name)  # type: ignore[arg-type]
    except (KeyError, RuntimeError, ValueError):
        return None
    return GroupInfo(group.size(), dist.get_rank(group))


# Per tensor value: annotated dimensions only; a missing dimension carries no token structure.
Annotation = dict[int, DimInfo]


@dataclasses.dataclass(frozen=True)
class _Exchange:
    """The result of an all-to-all (see the module docstring), as the annotation of the tensor of `shape` that the
    flat output is reshaped back to."""

    shape: tuple[Size, ...]
    annotation: Annotation


def _make_axis(spans: Sequence[Span]) -> TokenAxis | None:
    """Normalise spans (drop provably empty ones, fuse neighbouring other-spans); None if no grid is left."""
    fused: list[Span] = []
    for span in spans:
        if isinstance(span, OtherSpan) and known_equal(span.length, 0):
            continue
        if isinstance(span, OtherSpan) and fused and isinstance(fused[-1], OtherSpan):
            fused[-1] = OtherSpan(fused[-1].length + span.length)
        else:
            fused.append(span)
    if not any(isinstance(s, VIDEO_SPANS) for s in fused):
        return None
    return TokenAxis(tuple(fused))


def _combine(infos: Iterable[DimInfo | None], where: str) -> DimInfo | None:
    """Merge the claims of several inputs about one output dimension."""
    result: DimInfo | None = None
    for info in infos:
        if info is None:
            continue
        if isinstance(info, Conflict):
            return info
        if result is None:
            result = info
        elif isinstance(result, Conflict):
            return result
        elif not result.same_layout(info):
            finer = finer_axis(result, info)
            if finer is None:
                return Conflict(f"{where}: {result.describe()} meets {info.describe()}")
            result = finer
    return result


def finer_axis(a: DimInfo, b: DimInfo) -> TokenAxis | None:
    """The one of two token axes whose grids refine the other's, span by span, or None when they disagree. A grid
    `(F, H*W)` (a per-frame modulation's reshape) and a grid `(F, H, W)` (a rotary table's) describe the same
    row-major tokens: each factor of the coarser is the product of consecutive factors of the finer, so the finer is
    what both prove. Grids of other orders (`(3, 4, 6)` against `(3, 6, 4)`) still conflict."""
    if not isinstance(a, TokenAxis) or not isinstance(b, TokenAxis) or len(a.spans) != len(b.spans):
        return None
    spans: list[Span] = []
    for mine, theirs in zip(a.spans, b.spans):
        if isinstance(mine, GridSpan) and isinstance(theirs, GridSpan):
            span = _finer_grid(mine, theirs)
            if span is None:
                return None
            spans.append(span)
        elif type(mine) is type(theirs) and known_equal(mine.length, theirs.length):
            spans.append(mine)
        else:
            return None
    return TokenAxis(tuple(spans))


def _finer_grid(a: GridSpan, b: GridSpan) -> GridSpan | None:
    for fine, coarse in ((a, b), (b, a)):
        sizes = [f.size for f in coarse.factors if not known_equal(f.size, 1)]
        if sizes and _partition_factors(fine.factors, sizes) is not None:
            return fine
    return None


def _slice_axis(info: DimInfo, start: Size, stop: Size) -> DimInfo | None:
    """The token structure of positions `[start, stop)` of an annotated dimension (0 <= start <= stop <= length)."""
    if isinstance(info, Conflict):
        return info
    if not isinstance(info, TokenAxis):
        return None  # part of a shard, of the ranks or of the heads: nothing we can name
    start_hint, stop_hint = size_hint(start), size_hint(stop)
    if start_hint is None or stop_hint is None:
        return None
    kept: list[Span] = []
    offset: Size = 0
    for span in info.spans:
        length = span.length
        end_offset = offset + length
        lo, hi = size_hint(offset), size_hint(end_offset)
        if lo is None or hi is None:
            return None
        # Each case is decided at the traced sizes, then proved for every size (else: no structure).
        if hi <= start_hint or lo >= stop_hint:
            if not (_known_le(end_offset, start) or _known_le(stop, offset)):
                return None
        else:
            starts_inside, ends_inside = lo < start_hint, hi > stop_hint
            begin = start if starts_inside else offset
            end = stop if ends_inside else end_offset
            start_proved = _known_le(offset, start) if starts_inside else _known_le(start, offset)
            stop_proved = _known_le(stop, end_offset) if ends_inside else _known_le(end_offset, stop)
            if not (start_proved and stop_proved):
                return None
            if not (starts_inside or ends_inside):
                kept.append(span)
            elif isinstance(span, OtherSpan):
                kept.append(OtherSpan(end - begin))  # part of a text span is still text
            else:
                return None  # cutting into a grid leaves no grid we can name
        offset = end_offset
    return _make_axis(kept)


def _known_le(a: Size, b: Size) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a <= b
    return bool(statically_known_true(a <= b))


def _normalize_dim(dim: object, rank: int) -> int | None:
    if isinstance(dim, bool) or not isinstance(dim, int) or rank == 0:
        return None
    if not -rank <= dim < rank:
        return None
    return dim % rank


def _tensor_shape(value: object) -> tuple[Size, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _shapes(values: Iterable[object]) -> list[tuple[Size, ...]] | None:
    """The traced shape of every value, or None when one is not a tensor."""
    shapes = [_tensor_shape(value) for value in values]
    return None if any(shape is None for shape in shapes) else [shape for shape in shapes if shape is not None]


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    """Argument `name` of a call node, given by keyword or at position `index` (`default` if absent)."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _reshape_groups(in_shape: Sequence[Size], out_shape: Sequence[Size]) -> list[tuple[list[int], list[int]]] | None:
    """Pair the input and output dimensions of a row-major reshape: each group of input dimensions holds exactly the
    elements of its group of output dimensions. Size-1 dimensions form their own groups. Computed on the traced
    sizes, then proved for every size."""
    a, b = _hints(in_shape), _hints(out_shape)
    if a is None or b is None or 0 in a or 0 in b:
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1 and not (j < len(b) and b[j] == 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(b) and b[j] == 1 and not (i < len(a) and a[i] == 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(a) or j >= len(b):
            return None
        ins, outs = [i], [j]
        product_in, product_out = a[i], b[j]
        i += 1
        j += 1
        while product_in != product_out:
            if product_in < product_out:
                if i >= len(a):
                    return None
                product_in *= a[i]
                ins.append(i)
                i += 1
            else:
                if j >= len(b):
                    return None
                product_out *= b[j]
                outs.append(j)
                j += 1
        groups.append((ins, outs))
    for ins, outs in groups:
        if not known_equal(_product(in_shape[d] for d in ins), _product(out_shape[d] for d in outs)):
            return None
    return _absorb_unit_dims(groups)


def _hints(sizes: Sequence[Size]) -> list[int] | None:
    """The traced value of every size, or None when one has none."""
    hints = [size_hint(size) for size in sizes]
    return None if any(hint is None for hint in hints) else [hint for hint in hints if hint is not None]


def _absorb_unit_dims(groups: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """Join each dropped size-1 input dimension to the merge next to it, so that flattening a (1, H, W) grid keeps
    three factors (a single-frame video is still a video)."""

    def is_merge(group: tuple[list[int], list[int]]) -> bool:
        return len(group[0]) >= 2 and len(group[1]) == 1

    result = [(list(ins), list(outs)) for ins, outs in groups]
    changed = True
    while changed:
        changed = False
        for k, (ins, outs) in enumerate(result):
            if len(ins) != 1 or outs:
                continue
            for neighbour in (k + 1, k - 1):
                if 0 <= neighbour < len(result) and is_merge(result[neighbour]):
                    target_ins, target_outs = result[neighbour]
                    merged = sorted(target_ins + ins)
                    result[neighbour] = (merged, target_outs)
                    del result[k]
                    changed = True
                    break
            if changed:
                break
    return result


def _partition_factors(factors: Sequence[Factor], sizes: Sequence[Size]) -> list[list[Factor]] | None:
    """Split a grid's factors into consecutive groups whose products are `sizes` (all > 1), or None."""
    targets = _hints(sizes)
    if targets is None:
        return None
    parts: list[list[Factor]] = [[] for _ in sizes]
    k, accumulated = 0, 1
    for factor in factors:
        hint = size_hint(factor.size)
        if hint is None:
            return None
        if accumulated == targets[k] and hint != 1:
            k += 1
            accumulated = 1
            if k >= len(sizes):
                return None
        parts[k].append(factor)
        accumulated *= hint
        if accumulated > targets[k]:
            return None
    if k != len(sizes) - 1 or accumulated != targets[k]:
        return None
    for part, size in zip(parts, sizes):
        if not known_equal(_product(f.size for f in part), size):
            return None
    return parts


def _axis_from_factors(factors: Sequence[Factor]) -> TokenAxis | None:
    # One factor is a plain sequence: only a merge of two or more dimensions (not counting size-1 ones) is a grid.
    extents = sum(1 for f in factors if not known_equal(f.size, 1))
    return TokenAxis((GridSpan(tuple(factors)),)) if extents >= 2 else None


# Ops whose output has the shape of their first input and keep the meaning of every dimension. Other tensor
# arguments (type_as's template, a norm's weight) say nothing about the layout.
_UNARY = frozenset(
    """
    abs bfloat16 bool ceil clamp clamp_max clamp_min clone contiguous cos cosh cumsum detach double dropout
    dropout1d dropout2d dropout3d elu empty_like erf exp exp2 expm1 float floor full_like gelu group_norm half
    hardsigmoid hardswish hardtanh instance_norm int layer_norm leaky_relu log log1p log2 log_softmax logical_not
    long mish nan_to_num neg normalize ones_like rand_like randn_like reciprocal relu relu6 requires_grad_ rms_norm
    round rsqrt selu sigmoid sign silu sin sinh softmax softplus sqrt square tanh to trunc type type_as zeros_like
    """.split()
)
# Elementwise ops with broadcasting: every tensor argument's claims count (aligned from the right).
_BROADCAST = frozenset(
    """
    add addcdiv addcmul and_ atan2 bitwise_and bitwise_or bitwise_xor copysign div eq floordiv fmod ge gt le lerp
    logical_and logical_or logical_xor lt masked_fill maximum minimum mod mul ne or_ polar pow remainder sub
    true_divide truediv where xor complex
    """.split()
)
_RESHAPES = frozenset("flatten reshape squeeze unflatten unsqueeze view view_as reshape_as".split())
# (`norm` is left out: its second positional argument is p, not dim.)
_REDUCTIONS = frozenset("all amax amin any logsumexp mean nanmean prod std sum var".split())
_CONVS = frozenset("conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d".split())
_ATTENTION = frozenset({"scaled_dot_product_attention", "sparse_attention"})


def _op_name(node: fx.Node) -> str | None:
    name: object
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            name = target._opname
        elif isinstance(target, torch._ops.OpOverloadPacket):
            name = target._qualified_op_name.split("::")[-1]
        else:
            name = getattr(target, "__name__", None)
    else:
        return None
    if not isinstance(name, str):
        return None
    # In-place variants (mul_, masked_fill_) keep the layout rules of their out-of-place forms.
    if name.endswith("_") and not name.endswith("__") and name[:-1] in (_UNARY | _BROADCAST):
        name = name[:-1]
    return name


class TokenAxisAnalysis:
    """Annotate the token axes of every tensor in `graph` (see the module docstring). `axis(node, dim)` answers."""

    def __init__(
        self,
        graph: fx.Graph,
        seeds: dict[fx.Node, Annotation] | None = None,
        groups: Callable[[object], GroupInfo | None] = resolve_group,
    ) -> None:
        """`seeds`: annotations of some nodes (block inputs), taken as given. `groups`: resolves the process group a
        collective names (tests replace it)."""
        self._values: dict[fx.Node, Annotation | tuple[Annotation, ...]] = {}
        self._groups = groups
        # 1-D views of multi-dim tensors (the flat buffer a collective sends), and all-to-all results (see _exchange).
        self._flat: dict[fx.Node, fx.Node] = {}
        self._exchanges: dict[fx.Node, _Exchange] = {}
        seeds = seeds or {}
        for node in graph.nodes:
            if node in seeds:
                self._values[node] = dict(seeds[node])
                continue
            try:
                result = self._visit(node)
            except Exception as error:
                # An op whose arguments a rule misreads loses its annotations (so later decisions say "no grid"),
                # and the analysis of the rest of the graph goes on.
                logger.debug("spattn: token-axis rule for %s (%s) failed: %r", node.name, node.target, error)
                result = {}
            self._values[node] = result

    def axis(self, node: fx.Node, dim: int) -> DimInfo | None:
        """The token structure of dimension `dim` of `node`'s tensor value, or None if it has none."""
        annotation = self._values.get(node)
        if not isinstance(annotation, dict):
            return None
        rank = len(_tensor_shape(node_value(node)) or ())
        normalized = _normalize_dim(dim, rank)
        return None if normalized is None else annotation.get(normalized)

    # --------------------------------------------------------------------------------------------------------------

    def _ann(self, arg: object) -> Annotation:
        annotation = self._values.get(arg) if isinstance(arg, fx.Node) else None
        return annotation if isinstance(annotation, dict) else {}

    def _visit(self, node: fx.Node) -> Annotation | tuple[Annotation, ...]:
        name = _op_name(node)
        if name is None:
            return {}
        value = node_value(node)
        if name == "getitem" and isinstance(node.args[0], fx.Node):
            source = self._values.get(node.args[0])
            if isinstance(source, tuple):
                index = node.args[1]
                return source[index] if isinstance(index, int) and -len(source) <= index < len(source) else {}
        if isinstance(value, (tuple, list)):
            return self._visit_multi(node, name, value)
        shape = _tensor_shape(value)
        if shape is None:
            return {}
        args = node.args
        first = args[0] if args else node.kwargs.get("input", node.kwargs.get("self"))
        first_shape = _tensor_shape(node_value(first))
        if name == "all_to_all_single":
            self._exchange(node)
            return {}
        if isinstance(first, fx.Node) and first in self._exchanges:
            exchange = self._exchanges[first]
            if name == "wait_tensor":
                self._exchanges[node] = exchange  # waiting changes nothing of the values
            elif name in _RESHAPES and len(shape) == len(exchange.shape):
                if all(known_equal(a, b) for a, b in zip(shape, exchange.shape)):
                    return dict(exchange.annotation)
            return {}
        if name == "wait_tensor":
            return self._broadcast(node, shape, [first])
        if name in _UNARY:
            return self._broadcast(node, shape, [first])
        if name in _BROADCAST:
            tensors = [a for a in (*args, *node.kwargs.values()) if isinstance(a, fx.Node)]
            return self._broadcast(node, shape, tensors)
        if name in ("cat", "concat", "concatenate"):
            return self._cat(node, shape)
        if name == "stack":
            return self._stack(node, shape)
        if name in _ATTENTION:
            # Output row i belongs to query i.
            query = node.kwargs.get("query", first)
            query_shape = _tensor_shape(node_value(query)) or ()
            return self._carry(query, query_shape, shape, range(len(shape) - 1))
        if first_shape is None:
            return {}
        if name == "getitem":
            return self._getitem(first, first_shape, args[1], shape)
        if name in _RESHAPES:
            if len(shape) == 1 and len(first_shape) > 1 and isinstance(first, fx.Node):
                self._flat[node] = first
            return self._reshape(first, first_shape, shape)
        if name in ("transpose", "swapaxes", "swapdims", "permute", "movedim", "t"):
            return self._permute(node, name, first, first_shape, shape)
        if name == "view_as_complex":
            # (..., n, 2) real -> (..., n) complex (complex rotary embeddings): every dim but the pairs is kept.
            return self._carry(first, first_shape, shape, range(len(shape)))
        if name == "view_as_real":
            return self._carry(first, first_shape, shape, range(len(first_shape)))
        if name in ("expand", "expand_as", "broadcast_to"):
            return self._broadcast(node, shape, [first])
        if name == "repeat":
            return self._repeat(first, first_shape, shape)
        if name == "repeat_interleave":
            dim = node.kwargs.get("dim", args[2] if len(args) > 2 else None)
            dim = _normalize_dim(dim, len(first_shape))
            return {d: i for d, i in self._ann(first).items() if d != dim} if dim is not None else {}
        if name in ("linear", "matmul", "mm", "bmm") and len(first_shape) >= 2:
            weight = args[1] if len(args) > 1 else node.kwargs.get("weight", node.kwargs.get("other"))
            weight_shape = _tensor_shape(node_value(weight))
            if weight_shape is None or (name != "linear" and len(weight_shape) != 2):
                return {}
            return self._carry(first, first_shape, shape, range(len(first_shape) - 1))
        if name in _CONVS:
            return self._carry(first, first_shape, shape, [0])
        if name == "outer":
            other = args[1] if len(args) > 1 else node.kwargs.get("vec2")
            result = self._carry(first, first_shape, shape[:1], [0])
            info = self._ann(other).get(0)
            if info is not None and known_equal(shape[1], (_tensor_shape(node_value(other)) or (0,))[0]):
                result[1] = info
            return result
        if name in _REDUCTIONS:
            return self._reduction(node, first, first_shape, shape)
        if name == "pad":
            return self._pad(node, first, first_shape, shape)
        return {}

    def _carry(
        self, source: object, source_shape: Sequence[Size], shape: Sequence[Size], dims: Iterable[int]
    ) -> Annotation:
        """Copy the annotations of `dims` from `source` where the output keeps their size."""
        annotation = self._ann(source)
        return {
            d: annotation[d]
            for d in dims
            if d in annotation and d < len(shape) and d < len(source_shape) and known_equal(shape[d], source_shape[d])
        }

    def _broadcast(self, node: fx.Node, shape: Sequence[Size], inputs: Sequence[object]) -> Annotation:
        claims: dict[int, list[DimInfo]] = {}
        for arg in inputs:
            annotation = self._ann(arg)
            arg_shape = _tensor_shape(node_value(arg))
            if not annotation or arg_shape is None:
                continue
            offset = len(shape) - len(arg_shape)
            for d, info in annotation.items():
                out = d + offset
                if 0 <= out < len(shape) and known_equal(arg_shape[d], shape[out]):
                    claims.setdefault(out, []).append(info)
        result: Annotation = {}
        for out, infos in claims.items():
            combined = _combine(infos, node.name)
            if combined is not None:
                result[out] = combined
        return result

    def _getitem(self, source: object, shape: Sequence[Size], index: object, out_shape: Sequence[Size]) -> Annotation:
        annotation = self._ann(source)
        items = index if isinstance(index, tuple) else (index,)
        consuming = sum(1 for item in items if item is not None and item is not Ellipsis)
        result: Annotation = {}
        in_dim = out_dim = 0
        for item in items:
            if item is None:
                out_dim += 1
            elif item is Ellipsis:
                for _ in range(len(shape) - consuming):
                    if in_dim in annotation:
                        result[out_dim] = annotation[in_dim]
                    in_dim += 1
                    out_dim += 1
            elif isinstance(item, slice):
                if in_dim in annotation:
                    sliced = self._slice(annotation[in_dim], shape[in_dim], item)
                    if sliced is not None:
                        result[out_dim] = sliced
                in_dim += 1
                out_dim += 1
            elif isinstance(item, int) or isinstance(node_value(item), (int, torch.SymInt)):
                in_dim += 1
            else:
                return {}  # advanced (tensor) indexing reorders tokens arbitrarily
        for d in range(in_dim, len(shape)):
            if d in annotation:
                result[out_dim] = annotation[d]
            out_dim += 1
        if out_dim != len(out_shape):
            return {}
        return {d: info for d, info in result.items() if known_equal(_length(info, out_shape[d]), out_shape[d])}

    def _slice(self, info: DimInfo, size: Size, item: slice) -> DimInfo | None:
        step = node_value(item.step)
        if step is not None and not (isinstance(step, int) and step == 1):
            return None
        start, stop = node_value(item.start), node_value(item.stop)
        start = 0 if start is None else start
        stop = size if stop is None else stop
        if not isinstance(start, (int, torch.SymInt)) or not isinstance(stop, (int, torch.SymInt)):
            return None
        start_hint, stop_hint, size_value = size_hint(start), size_hint(stop), size_hint(size)
        if start_hint is None or stop_hint is None or size_value is None:
            return None
        # Python slice semantics; negative bounds count from the end.
        if start_hint < 0:
            start = size + start
        if stop_hint < 0:
            stop = size + stop
        if (size_hint(stop) or 0) > size_value:
            stop = size
        if known_equal(start, 0) and known_equal(stop, size):
            return info
        return _slice_axis(info, start, stop)

    def _reshape(self, source: object, in_shape: Sequence[Size], out_shape: Sequence[Size]) -> Annotation:
        groups = _reshape_groups(in_shape, out_shape)
        if groups is None:
            return {}
        annotation = self._ann(source)
        result: Annotation = {}
        for ins, outs in groups:
            infos = [annotation.get(d) for d in ins]
            conflict = next((i for i in infos if isinstance(i, Conflict)), None)
            if conflict is not None:
                for o in outs:
                    result[o] = conflict
                continue
            if len(ins) == 1 and len(outs) == 1:
                if infos[0] is not None:
                    result[outs[0]] = infos[0]
            elif len(ins) >= 2 and len(outs) == 1:
                gathered = _gathered_axis(infos)
                if gathered is not None:
                    result[outs[0]] = gathered
                    continue
                factors: list[Factor] = []
                for d, info in zip(ins, infos):
                    if info is None:
                        factors.append(Factor(in_shape[d], (source, d) if isinstance(source, fx.Node) else None))
                    elif isinstance(info, TokenAxis) and len(info.spans) == 1 and isinstance(info.spans[0], GridSpan):
                        factors.extend(info.spans[0].factors)
                    else:
                        factors = []  # a joint (video + text) sequence, a shard or heads merged with another dim
                        break
                axis = _axis_from_factors(factors)
                if axis is not None:
                    result[outs[0]] = axis
            elif (
                len(ins) == 1
                and len(outs) >= 2
                and isinstance(infos[0], TokenAxis)
                and len(infos[0].spans) == 1
                and isinstance(infos[0].spans[0], GridSpan)
            ):
                parts = _partition_factors(infos[0].spans[0].factors, [out_shape[o] for o in outs])
                if parts is not None:
                    for o, part in zip(outs, parts):
                        axis = _axis_from_factors(part)
                        if axis is not None:
                            result[o] = axis
        return result

    def _permute(
        self, node: fx.Node, name: str, source: object, in_shape: Sequence[Size], out_shape: Sequence[Size]
    ) -> Annotation:
        rank = len(in_shape)
        if name in ("transpose", "swapaxes", "swapdims", "t") and rank < 2:
            return self._carry(source, in_shape, out_shape, range(rank))  # transposing a vector changes nothing
        order = _permutation(node, name, rank)
        if order is None:
            return {}
        annotation = self._ann(source)
        return {out: annotation[src] for out, src in enumerate(order) if src in annotation}

    def _repeat(self, source: object, in_shape, out_shape) -> Annotation:
        annotation = self._ann(source)
        offset = len(out_shape) - len(in_shape)
        return {d + offset: info for d, info in annotation.items() if known_equal(in_shape[d], out_shape[d + offset])}

    def _cat(self, node: fx.Node, shape: Sequence[Size]) -> Annotation:
        tensors = _arg(node, 0, "tensors")
        dim = _normalize_dim(node_value(_arg(node, 1, "dim", 0)), len(shape))
        if not isinstance(tensors, (list, tuple)) or dim is None:
            return {}
        shapes = _shapes(node_value(t) for t in tensors)
        if shapes is None or any(len(s) != len(shape) for s in shapes):
            return {}
        annotations = [self._ann(t) for t in tensors]
        result: Annotation = {}
        for d in range(len(shape)):
            if d != dim:
                combined = _combine((a.get(d) for a in annotations), node.name)
                if combined is not None:
                    result[d] = combined
        spans: list[Span] = []
        for annotation, tensor_shape in zip(annotations, shapes):
            info = annotation.get(dim)
            if isinstance(info, Conflict):
                result[dim] = info
                return result
            if info is None:
                spans.append(OtherSpan(tensor_shape[dim]))
            elif isinstance(info, TokenAxis):
                spans.extend(info.spans)
            elif isinstance(info, Shard):
                # Joint attention under context parallelism with each stream split on its own: after the all-to-all
                # the ranks' pieces alternate (video 0, text 0, video 1, text 1...), no layout the op takes.
                result[dim] = Conflict(
                    f"context parallelism: {info.describe()} is joined with other tokens on each rank, so the "
                    "whole sequence interleaves each rank's video and text pieces"
                )
                return result
            else:
                return result  # ranks or heads joined along the sequence: no layout we name
        axis = _make_axis(spans)
        if axis is not None:
            result[dim] = axis
        return result

    def _stack(self, node: fx.Node, shape: Sequence[Size]) -> Annotation:
        tensors = _arg(node, 0, "tensors")
        dim = _normalize_dim(node_value(_arg(node, 1, "dim", 0)), len(shape))
        if not isinstance(tensors, (list, tuple)) or dim is None:
            return {}
        claims: dict[int, list[DimInfo]] = {}
        for tensor in tensors:
            for d, info in self._ann(tensor).items():
                claims.setdefault(d if d < dim else d + 1, []).append(info)
        result: Annotation = {}
        for d, infos in claims.items():
            combined = _combine(infos, node.name)
            if combined is not None:
                result[d] = combined
        return result

    def _reduction(
        self, node: fx.Node, source: object, in_shape: Sequence[Size], out_shape: Sequence[Size]
    ) -> Annotation:
        given = _arg(node, 1, "dim")
        dims = None if given is None else _dims(given, len(in_shape))
        if dims is None:
            return {}
        reduced = set(dims)
        keepdim = bool(node_value(_arg(node, 2, "keepdim", False)))
        annotation = self._ann(source)
        result: Annotation = {}
        out = 0
        for d in range(len(in_shape)):
            if d in reduced and not keepdim:
                continue
            kept = d not in reduced and d in annotation and out < len(out_shape)
            if kept and known_equal(in_shape[d], out_shape[out]):
                result[out] = annotation[d]
            out += 1
        return result if out == len(out_shape) else {}

    def _pad(self, node: fx.Node, source: object, in_shape: Sequence[Size], out_shape: Sequence[Size]) -> Annotation:
        pad = _arg(node, 1, "pad")
        if not isinstance(pad, (list, tuple)) or len(in_shape) != len(out_shape):
            return {}
        amounts = [node_value(amount) for amount in pad]
        padded = {
            len(in_shape) - 1 - i // 2
            for i, amount in enumerate(amounts)
            if not (isinstance(amount, (int, torch.SymInt)) and known_equal(amount, 0))
        }
        return {d: info for d, info in self._ann(source).items() if d not in padded}

    def _visit_multi(self, node: fx.Node, name: str, values: Sequence[object]) -> tuple[Annotation, ...]:
        """Ops with several tensor outputs: split, chunk, unbind (per element); anything else has no structure."""
        empty: tuple[Annotation, ...] = tuple({} for _ in values)
        source = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
        in_shape = _tensor_shape(node_value(source))
        shapes = _shapes(values)
        if in_shape is None or shapes is None:
            return empty
        annotation = self._ann(source)
        if not annotation:
            return empty
        if name == "unbind":
            removed = _normalize_dim(node_value(_arg(node, 1, "dim", 0)), len(in_shape))
            if removed is None:
                return empty
            kept = {d if d < removed else d - 1: info for d, info in annotation.items() if d != removed}
            return tuple(dict(kept) for _ in values)
        if name not in ("split", "chunk", "split_with_sizes", "tensor_split"):
            return empty
        # All four take (input, sizes or count or indices, dim=0).
        dim = _normalize_dim(node_value(_arg(node, 2, "dim", 0)), len(in_shape))
        if dim is None or any(len(s) != len(in_shape) for s in shapes):
            return empty
        pieces = [s[dim] for s in shapes]
        equal = all(known_equal(piece, pieces[0]) for piece in pieces) and known_equal(
            in_shape[dim], pieces[0] * len(pieces)
        )
        elements = []
        offset: Size = 0
        for index, shape in enumerate(shapes):
            element: Annotation = {}
            for d, info in annotation.items():
                if d != dim:
                    element[d] = info
                elif known_equal(shape[d], in_shape[d]):
                    element[d] = info
                else:
                    sliced = _slice_axis(info, offset, offset + shape[d])
                    if sliced is None and equal and isinstance(info, TokenAxis):
                        # Equal pieces that cut into a grid: how context parallelism splits a sequence over ranks.
                        sliced = Shard(info, index, len(shapes), shape[d])
                    if sliced is not None:
                        element[d] = sliced
            elements.append(element)
            offset = offset + shape[dim]
        return tuple(elements)

    # --------------------------------------------------------------------------------------------------------------
    # Context parallelism: the all-to-all of Ulysses attention
    # --------------------------------------------------------------------------------------------------------------

    def _exchange(self, node: fx.Node) -> None:
        """Record what an all-to-all gives back (module docstring), when its input is the flat view of a tensor
        `(N, ...)` over a group of N ranks, in equal splits, whose dim 0 is the outer part of the heads and one of whose
        dims is this rank's shard of a token axis. When the input holds a shard but any of that fails, the result's
        dims are marked `Conflict` with the reason (the attention then stays dense and says why); an all-to-all of
        anything else leaves its result unannotated."""
        args = node.args
        source = self._flat.get(args[0]) if args and isinstance(args[0], fx.Node) else None
        if source is None:
            return
        annotation = self._ann(source)
        shape = _tensor_shape(node_value(source))
        held = [d for d, info in annotation.items() if isinstance(info, Shard) and info.index is not None]
        conflicts = {d: info for d, info in annotation.items() if isinstance(info, Conflict)}
        if shape is not None and conflicts and not held:
            # Tokens the analysis already gave up on (e.g. interleaved streams): the result says why, too.
            reason: Annotation = {0: next(iter(conflicts.values())), **conflicts}
            self._exchanges[node] = _Exchange(shape, reason)
            return
        if shape is None or not held:
            return
        group_name = args[3] if len(args) > 3 else node.kwargs.get("group_name")
        group = self._groups(node_value(group_name))
        why = ""
        result: Annotation = {}
        if group is None:
            why = f"the process group {node_value(group_name)!r} of the all-to-all is unknown"
        elif len(shape) < 3 or not known_equal(shape[0], group.size):
            why = f"the all-to-all sends {shape[0] if shape else 0} slices over {group.size} ranks"
        elif not all(_even_splits(splits, group.size) for splits in args[1:3]):
            why = "the all-to-all splits unevenly (diffusers' ulysses_anything)"
        else:
            shards = [
                d
                for d in held
                if isinstance(info := annotation[d], Shard)
                and (info.index, info.count) == (group.rank, group.size)
                and d > 0
            ]
            heads = _head_split(source, group.size)
            if len(shards) != 1:
                pieces = ", ".join(annotation[d].describe() for d in held)
                why = f"rank {group.rank} of {group.size} sends {pieces}, not its own shard of the sequence"
            elif heads is None or heads in (0, shards[0]):
                why = "the exchanged dim is not the outer part of a split of the attention heads"
            else:
                shard = annotation[shards[0]]
                assert isinstance(shard, Shard)
                result = {
                    0: RankAxis(group.size),
                    shards[0]: Shard(shard.axis, None, group.size, shard.length),
                    heads: HeadGroup(group.rank, group.size, shape[heads]),
                }
        if why:
            conflict = Conflict(f"context parallelism: {why}")
            result = {0: conflict}
            result.update((d, conflict) for d in held)
        self._exchanges[node] = _Exchange(shape, result)


def _even_splits(splits: object, size: int) -> bool:
    """Whether an all-to-all's split sizes (None: equal) give every rank the same slice."""
    if splits is None:
        return True
    if not isinstance(splits, (list, tuple)) or len(splits) != size:
        return False
    sizes = [value for value in (node_value(s) for s in splits) if isinstance(value, (int, torch.SymInt))]
    return len(sizes) == size and all(known_equal(s, sizes[0]) for s in sizes)


def _gathered_axis(infos: Sequence[DimInfo | None]) -> TokenAxis | None:
    """The whole axis, when dims (ranks, each rank's shard) are merged, ranks outermost (module docstring)."""
    if len(infos) != 2:
        return None
    ranks, shard = infos
    if isinstance(ranks, RankAxis) and isinstance(shard, Shard) and shard.index is None and shard.count == ranks.count:
        return shard.axis
    return None


_LAYOUT_ONLY = frozenset({"contiguous", "clone", "detach"})


def _head_split(node: fx.Node, groups: int) -> int | None:
    """The dim of `node`'s tensor that holds the inner part of a row-major split of one dim into `(groups, inner)`
    whose outer part is `node`'s dim 0: found by walking back through permutes (and copies) to the reshape that made
    the split. None when the data flow shows no such split."""
    rank = len(_tensor_shape(node_value(node)) or ())
    origin = list(range(rank))  # origin[d]: the dim of the current node that dim d of `node` comes from
    current: object = node
    while isinstance(current, fx.Node):
        name = _op_name(current)
        source = current.args[0] if current.args else None
        if name in _LAYOUT_ONLY:
            current = source
            continue
        if name in ("permute", "transpose", "swapaxes", "swapdims"):
            order = _permutation(current, name, rank)
            if order is None:
                return None
            origin = [order[o] for o in origin]
            current = source
            continue
        if name in ("reshape", "view"):
            in_shape = _tensor_shape(node_value(source))
            out_shape = _tensor_shape(node_value(current))
            if in_shape is None or out_shape is None:
                return None
            outer = origin[0]
            if outer + 1 >= len(out_shape) or not known_equal(out_shape[outer], groups):
                return None
            # Dims (outer, outer + 1) of the output index exactly one input dim, `outer` first, when the elements
            # before them and the two sizes agree (row-major order).
            before = _product(out_shape[:outer])
            for i in range(len(in_shape)):
                if known_equal(_product(in_shape[:i]), before) and known_equal(
                    in_shape[i], out_shape[outer] * out_shape[outer + 1]
                ):
                    return origin.index(outer + 1) if outer + 1 in origin else None
            return None
        return None
    return None


def _dims(value: object, rank: int) -> list[int] | None:
    """A dim or a sequence of dims (graph constants), normalised; None if any is not a valid dim."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    dims = [_normalize_dim(node_value(d), rank) for d in values]
    return None if any(d is None for d in dims) else [d for d in dims if d is not None]


def _permutation(node: fx.Node, name: str, rank: int) -> list[int] | None:
    """`order[i]`: the input dim of output dim i of a permute, transpose (swapaxes, swapdims, t) or movedim node;
    None if its dims are not constants of the graph."""
    args: list[object] = list(node.args[1:])
    if name == "permute":
        given: object = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        order = _dims(node.kwargs.get("dims", given), rank)
        return order if order is not None and sorted(order) == list(range(rank)) else None
    if name == "movedim":
        source = _dims(node.kwargs.get("source", args[0] if args else None), rank)
        destination = _dims(node.kwargs.get("destination", args[1] if len(args) > 1 else None), rank)
        if source is None or destination is None or len(source) != len(destination):
            return None
        moved: list[int | None] = [None] * rank
        for src, dst in zip(source, destination):
            moved[dst] = src
        rest = iter(d for d in range(rank) if d not in source)
        order = [next(rest) if d is None else d for d in moved]
        return order if sorted(order) == list(range(rank)) else None
    pair = _dims([0, 1] if name == "t" else args[:2], rank)
    if pair is None or len(pair) != 2:
        return None
    order = list(range(rank))
    order[pair[0]], order[pair[1]] = order[pair[1]], order[pair[0]]
    return order


def _length(info: DimInfo, fallback: Size) -> Size:
    return info.length if isinstance(info, (TokenAxis, Shard)) else fallback
