"""Mask analysis: prove from an FX graph that a full `(B, 1, S, S)` boolean attention mask is built from one
per-token validity vector, as a key-padding mask or as key-valid AND query-valid.

This module owns the proof; the attention pass (`attention.py`) decides what to do with it. A mask qualifies when
it is computed, through ops whose effect on indices is known, from a 2-D boolean tensor `valid` of shape `(B or 1, S)`
(True = token j of sample b is real, not padding):

- **key form**: `mask[b, h, i, j] == valid[b, j]` for every query row i (a key-padding mask written out per query);
- **key-and-query form**: `mask[b, h, i, j] == valid[b, j] & valid[b, i]`, as HunyuanVideo 1.5 builds it
  (`m = valid.view(B, 1, 1, S).repeat(1, 1, S, 1); mask = m & m.transpose(2, 3)`). On every valid query row it is the
  key-padding mask `valid[b]`; the rows of padded queries mask every key.

Each dimension of every tensor on the way is given a *role*: "b" (it indexes the batch dimension of `valid`), "t"
(it indexes its token dimension) or "1" (size 1, or copies: broadcast). Ops that only move, insert or copy along
roles keep the proof: view/reshape/unsqueeze/squeeze that keep the order and sizes of the dims larger than 1,
expand/repeat along size-1 dims, transpose/permute, slicing with full slices and None, casts of booleans to bool.
`&` (or logical_and, or a product of booleans) of two forms over the same `valid` node combines them. Anything else,
or any in-place write into a tensor on the way (or into a view of it), leaves the mask unproved, and the call dense.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from .token_axes import known_equal, node_value

__all__ = ["MaskForm", "prove_padding_mask"]

# Ops that return a view of (an alias of) their first argument: writing into the result writes into the argument.
_ALIASING = frozenset(
    """
    view view_as reshape reshape_as unsqueeze squeeze flatten unflatten expand expand_as broadcast_to transpose
    swapaxes swapdims permute movedim t narrow select getitem __getitem__ as_strided detach alias unfold diagonal
    contiguous to type bool float half
    """.split()
)
_IN_PLACE_OPERATORS = frozenset(
    {operator.setitem, operator.iand, operator.ior, operator.ixor, operator.iadd, operator.isub, operator.imul}
)


@dataclasses.dataclass(frozen=True)
class MaskForm:
    """A proved mask: `kind` is "key" or "key_and_query"; `valid` is the `(B or 1, S)` boolean node it is built from."""

    kind: str
    valid: fx.Node


@dataclasses.dataclass(frozen=True)
class _Roles:
    """The roles of a tensor's dims relative to `valid`, and the nodes from `valid` to the tensor (`chain`)."""

    valid: fx.Node
    roles: tuple[str, ...]
    chain: tuple[fx.Node, ...]

    def then(self, node: fx.Node, roles: Sequence[str]) -> _Roles:
        return _Roles(self.valid, tuple(roles), (*self.chain, node))


def _name(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return node.target if isinstance(node.target, str) else None
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return target._opname
        if isinstance(target, torch._ops.OpOverloadPacket):
            return target._qualified_op_name.split("::")[-1]
        return getattr(target, "__name__", None)
    return None


def _shape(node: object) -> tuple[Any, ...] | None:
    value = node_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _is_bool(node: object) -> bool:
    value = node_value(node)
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool


def _is_one(size: Any) -> bool:
    return known_equal(size, 1)


def _writes(node: fx.Node, seen: set[fx.Node] | None = None) -> bool:
    """Whether the graph writes in place into `node`'s tensor, directly or through a view of it."""
    seen = set() if seen is None else seen
    if node in seen:
        return False
    seen.add(node)
    for user in node.users:
        first = user.args[0] if user.args else None
        if first is not node:
            continue
        if user.op == "call_function" and user.target in _IN_PLACE_OPERATORS:
            return True
        name = _name(user)
        if name is None:
            continue
        # A trailing underscore marks in-place tensor methods and ops (mul_, copy_), but not the functions of the
        # operator module (and_, or_), which return new tensors.
        python_operator = user.op == "call_function" and getattr(user.target, "__module__", "") == "_operator"
        if name.endswith("_") and not name.endswith("__") and not python_operator:
            return True
        if name in _ALIASING and _writes(user, seen):
            return True
    return False


class _Prover:
    def roles(self, node: object) -> _Roles | None:
        """The roles of `node`'s dims relative to the validity vector it is built from, or None."""
        if not isinstance(node, fx.Node) or not _is_bool(node):
            return None
        shape = _shape(node)
        if shape is None:
            return None
        name = _name(node)
        source = node.args[0] if node.args else None
        if name in ("bool", "to", "type") and isinstance(source, fx.Node) and _is_bool(source):
            parent = self.roles(source)
            return None if parent is None else parent.then(node, parent.roles)
        parent = self.roles(source) if isinstance(source, fx.Node) and name is not None else None
        source_shape = _shape(source)
        if parent is not None and name is not None and source_shape is not None:
            derived = self._derive(node, name, parent, source_shape, shape)
            if derived is not None:
                return derived
        if len(shape) == 2:
            # The validity vector itself: whatever computed it, a (B, S) boolean is the base of the proof.
            return _Roles(node, ("b", "t"), (node,))
        return None

    def _derive(
        self, node: fx.Node, name: str, parent: _Roles, in_shape: Sequence[Any], out_shape: Sequence[Any]
    ) -> _Roles | None:
        roles = parent.roles
        if name in ("view", "reshape", "unsqueeze", "squeeze", "flatten", "unflatten", "view_as", "reshape_as"):
            return self._reshape(node, parent, in_shape, out_shape)
        if name in ("expand", "expand_as", "broadcast_to", "repeat"):
            offset = len(out_shape) - len(in_shape)
            if offset < 0:
                return None
            new = ["1"] * offset
            for d, role in enumerate(roles):
                if not known_equal(in_shape[d], out_shape[d + offset]) and not _is_one(in_shape[d]):
                    return None  # copies along a dimension of real data: no longer one row per token
                new.append(role if known_equal(in_shape[d], out_shape[d + offset]) else "1")
            return parent.then(node, new)
        if name in ("transpose", "swapaxes", "swapdims"):
            pair = [node_value(a) for a in node.args[1:3]]
            if len(pair) != 2 or not all(isinstance(d, int) for d in pair):
                return None
            swapped = list(range(len(roles)))
            a, b = (int(d) % len(roles) for d in pair)  # type: ignore[call-overload]
            swapped[a], swapped[b] = swapped[b], swapped[a]
            return parent.then(node, [roles[i] for i in swapped])
        if name == "permute":
            given: Sequence[Any] = node.args[1:]
            if len(given) == 1 and isinstance(given[0], (list, tuple)):
                given = given[0]
            values: list[Any] = [node_value(d) for d in given]
            if not all(isinstance(d, int) for d in values):
                return None
            indices = [int(d) % len(roles) for d in values]
            if sorted(indices) != list(range(len(roles))):
                return None
            return parent.then(node, [roles[i] for i in indices])
        if name in ("getitem", "__getitem__"):
            return self._getitem(node, parent, node.args[1] if len(node.args) > 1 else None, out_shape)
        return None

    @staticmethod
    def _reshape(node: fx.Node, parent: _Roles, in_shape: Sequence[Any], out_shape: Sequence[Any]) -> _Roles | None:
        # Only size-1 dims may appear or disappear; the others keep their order and sizes.
        kept_in = [(size, role) for size, role in zip(in_shape, parent.roles) if not _is_one(size)]
        kept_out = [d for d, size in enumerate(out_shape) if not _is_one(size)]
        if len(kept_in) != len(kept_out):
            return None
        new = ["1"] * len(out_shape)
        for (size, role), d in zip(kept_in, kept_out):
            if not known_equal(size, out_shape[d]):
                return None
            new[d] = role
        return parent.then(node, new)

    @staticmethod
    def _getitem(node: fx.Node, parent: _Roles, index: object, out_shape: Sequence[Any]) -> _Roles | None:
        items = index if isinstance(index, tuple) else (index,)
        new: list[str] = []
        position = 0
        for item in items:
            if item is None:
                new.append("1")
            elif item is Ellipsis:
                rest = len(parent.roles) - position - sum(1 for i in items if i is not None and i is not Ellipsis)
                new.extend(parent.roles[position : position + rest])
                position += rest
            elif isinstance(item, slice) and item == slice(None):
                new.append(parent.roles[position])
                position += 1
            else:
                return None  # a slice or an index selects tokens: the proof does not follow it
        new.extend(parent.roles[position:])
        return parent.then(node, new) if len(new) == len(out_shape) else None


def _form(roles: _Roles, shape: Sequence[Any], batch: Any, seq_len: Any) -> str | None:
    """ "key" or "query" when `roles` (aligned to 4 dims) describe a (B|1, 1, S, S) mask of that form."""
    padded = ("1",) * (4 - len(roles.roles)) + roles.roles
    full = (1,) * (4 - len(shape)) + tuple(shape)
    if len(padded) != 4 or padded[1] != "1":
        return None
    if padded[0] not in ("b", "1") or (padded[0] == "b" and not known_equal(full[0], batch)):
        return None
    valid_shape = _shape(roles.valid)
    if valid_shape is None or not known_equal(valid_shape[1], seq_len):
        return None
    if not (_is_one(valid_shape[0]) or known_equal(valid_shape[0], batch)):
        return None
    if padded[2:] == ("1", "t"):
        return "key"
    if padded[2:] == ("t", "1"):
        return "query"
    return None


def prove_padding_mask(mask: fx.Node, batch: Any, seq_len: Any) -> MaskForm | str:
    """The form of the boolean attention mask `mask` of a self-attention over `seq_len` tokens with batch `batch`
    (see the module docstring), or why it cannot be proved, in words."""
    shape = _shape(mask)
    if shape is None or not _is_bool(mask):
        return "the mask has no traced boolean value"
    node = mask
    while _name(node) in ("bool", "to", "type") and node.args and isinstance(node.args[0], fx.Node):
        if not _is_bool(node.args[0]):
            break
        if _writes(node):
            return f"the mask {node.name} is written in place"
        node = node.args[0]
    forms: list[tuple[str, _Roles]] = []
    is_and = (node.op == "call_function" and node.target in (operator.and_, torch.logical_and, torch.bitwise_and)) or (
        _name(node) in ("__and__", "logical_and", "bitwise_and", "mul", "__mul__")
    )
    operands = [a for a in node.args if isinstance(a, fx.Node)] if is_and else [node]
    if is_and and (len(operands) != 2 or _writes(node)):
        return f"the mask {node.name} combines {len(operands)} tensors, or is written in place"
    for operand in operands:
        roles = _Prover().roles(operand)
        if roles is None:
            return (
                f"the mask {mask.name} of shape {tuple(shape)} is not built from a (batch, tokens) validity vector by "
                "ops whose effect on the indices is known"
            )
        form = _form(roles, _shape(operand) or (), batch, seq_len)
        if form is None:
            return f"the mask {mask.name} of shape {tuple(shape)} is neither a key-padding nor a query-padding mask"
        forms.append((form, roles))
    if len({id(roles.valid) for _, roles in forms}) != 1:
        return f"the mask {mask.name} combines different validity vectors"
    for _, roles in forms:
        written = next((n for n in roles.chain if _writes(n)), None)
        if written is not None:
            return f"the mask {mask.name} is built from {written.name}, which is written in place"
    kinds = sorted(form for form, _ in forms)
    valid = forms[0][1].valid
    if kinds in (["key"], ["key", "key"]):
        return MaskForm("key", valid)
    if kinds == ["key", "query"]:
        return MaskForm("key_and_query", valid)
    return f"the mask {mask.name} of shape {tuple(shape)} masks query rows only (no key-padding form)"
