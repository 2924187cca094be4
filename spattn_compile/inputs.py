"""The tensors of one attention call at the edge: their validation, the key-padding mask rule and the output's memory
order.

Inputs are validated once, where they enter: `validate_attention_inputs` for the public functions (`api.py`); the
compiled graphs' op takes what the compiler pass proved. After the edge nothing checks them again.

- `key_padding_valid`: the one rule of which masks are key-padding masks (SDPA's broadcasting, a query dimension of
  1), shared by the API, the op, the reference and the test toolkit;
- `output_like` / `in_query_layout`: the output has the query's shape, dtype and memory order (so a `(B, S, H, D)`
  projection viewed as `(B, H, S, D)` gets an output the caller transposes back for free); the op's fake promises it.
"""

from __future__ import annotations

import math
import numbers

import torch

from .call_layout import CallLayout, user_layout

__all__ = ["default_scale", "in_query_layout", "key_padding_valid", "output_like", "validate_attention_inputs"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def key_padding_valid(attn_mask: torch.Tensor | None, batch: int, heads: int, seq_len: int) -> torch.Tensor | None:
    """Validate a boolean key-padding mask by SDPA's broadcasting rules and return it as bool `(B, H, S)` (a view).

    SDPA broadcasts a mask of 2 to 4 dims, aligned right, to `(B, H, L, S)`; a key-padding mask is one whose query
    dimension is 1: `(1, S)`, `(H|1, 1, S)`, `(B|1, H|1, 1, S)`. True keeps a key, as in SDPA. A 1-D mask (SDPA rejects
    it), masks that vary over queries and float masks raise.
    """
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be a boolean key-padding mask (True = attend), got dtype {attn_mask.dtype}")
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() < 2 or attn_mask.dim() > 4 or shape[-1] != seq_len:
        raise ValueError(
            f"attn_mask of shape {shape} is not a key-padding mask: expected 2 to 4 dims broadcastable to "
            f"({batch}, {heads}, 1, {seq_len}) (SDPA's rules: aligned right)"
        )
    full = (1,) * (4 - attn_mask.dim()) + shape
    if full[2] != 1 or full[0] not in (1, batch) or full[1] not in (1, heads):
        raise ValueError(
            f"attn_mask of shape {shape} is not a key-padding mask: expected a shape broadcastable to "
            f"({batch}, {heads}, 1, {seq_len}) with a query dimension of 1"
        )
    return attn_mask.reshape(full)[:, :, 0, :].expand(batch, heads, seq_len)


def validate_attention_inputs(
    query: object,
    key: object,
    value: object,
    *,
    video_grid: object,
    text_len: object,
    text_first: object,
    attn_mask: object,
    scale: object,
) -> tuple[CallLayout, float | None]:
    """Raise TypeError / ValueError naming the argument for anything `sparse_attention` cannot take; returns the
    call's layout and the scale as Python numbers (NumPy scalars are accepted wherever numbers are)."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, seq_len, head_dim), got {tuple(tensor.shape)}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
    assert isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            "query, key and value must have the same shape (self-attention, equal heads and head dim): got "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if key.device != query.device or value.device != query.device:
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    batch, heads, seq_len, head_dim = query.shape
    if 0 in (heads, seq_len, head_dim):
        raise ValueError(f"query has an empty heads, sequence or head dimension: {tuple(query.shape)}")
    layout = user_layout(video_grid, text_len, text_first, seq_len)
    checked_scale = None
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be None or a positive finite number, got {scale!r}")
        checked_scale = float(scale)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device}, query on {query.device}")
        key_padding_valid(attn_mask, batch, heads, seq_len)
    return layout, checked_scale


def default_scale(query: torch.Tensor, scale: float | None) -> float:
    """The softmax scale of a call: `scale`, or `1 / sqrt(D)`."""
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)


def output_like(query: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of the query's shape, dtype, device and memory order (the order of its strides), so
    that a `(B, S, H, D)` query viewed as `(B, H, S, D)` gets an output the caller can transpose back for free. The
    custom op's fake implementation promises exactly this layout."""
    order = sorted(range(query.dim()), key=lambda d: (query.stride(d), query.shape[d]), reverse=True)
    strides = [0] * query.dim()
    running = 1
    for dim in reversed(order):
        strides[dim] = running
        running *= max(1, query.shape[dim])
    return torch.empty_strided(query.shape, tuple(strides), dtype=query.dtype, device=query.device)


def in_query_layout(out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """`out` itself when it already has `output_like(query)`'s strides, else a copy that has them."""
    target = output_like(query)
    return out if out.stride() == target.stride() else target.copy_(out)
