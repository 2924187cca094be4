"""The public functions: `select_plan` (stages 1-3: which blocks to attend) and `sparse_attention` (attend, with a
given plan or a fresh one), their argument validation and the choice of implementation.

Planning is separate from attending (FlashInfer's plan / run; FlexAttention's `BlockMask`): `select_plan` returns a
`SparsePlan` that can be inspected, cached, edited or reused; `sparse_attention(..., plan=plan)` attends with it.
Without a plan `sparse_attention` selects one itself (one preparation shared by both). This module owns what a user may
pass and the errors they get back; the stages run in `spattn_compile.pipeline`. The compiler pass does not come
through here: it inserts the `spattn::sparse_attention` custom op (`spattn_compile.ops`), which uses the same pipeline.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .capability import check_capability, kernel_limits
from .config import SparseAttentionConfig, current_config
from .layout import token_layout
from .pipeline import IMPLS, attend_with_plan, plan_attention, resolve_impl, stages_for
from .plan import SparsePlan
from .reference import key_padding_valid

__all__ = ["select_plan", "sparse_attention", "validate_attention_inputs"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _as_int(name: str, value: object) -> int:
    """A Python int from an int-like value (Python or NumPy integer, not bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} has type {type(value).__name__}: expected an int")
    return int(value)


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
) -> tuple[tuple[int, int, int], int, float | None]:
    """Raise TypeError / ValueError naming the argument for anything `sparse_attention` cannot take; returns the video
    grid, the text length and the scale as Python numbers (NumPy scalars are accepted wherever numbers are)."""
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

    if not isinstance(video_grid, (tuple, list, torch.Size)) or len(video_grid) != 3:
        raise ValueError(f"video_grid must be three positive ints (frames, height, width), got {video_grid!r}")
    frames, height, width = (_as_int("video_grid entry", v) for v in video_grid)
    grid = (frames, height, width)
    if min(grid) < 1:
        raise ValueError(f"video_grid must be three positive ints (frames, height, width), got {video_grid!r}")
    text = _as_int("text_len", text_len)
    if text < 0:
        raise ValueError(f"text_len must be an int >= 0, got {text_len!r}")
    if not isinstance(text_first, bool):
        raise TypeError(f"text_first must be a bool, got {type(text_first).__name__}")
    expected = math.prod(grid) + text
    if expected != seq_len:
        raise ValueError(
            f"video_grid {grid} holds {math.prod(grid)} tokens; with text_len={text} that is {expected}, but the "
            f"sequence length is {seq_len}"
        )
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
    return grid, text, checked_scale


def _check_config_and_impl(config: object, impl: object, query: torch.Tensor) -> SparseAttentionConfig:
    if config is None:
        config = current_config()
    elif not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig or None, got {type(config).__name__}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if resolve_impl(impl, query.device) == "triton":
        # The one rule of the pass, the op and the kernels (on the CPU, impl="triton" runs the interpreter).
        capability = (
            check_capability(query.dtype, query.shape[-1], query.device) if query.device.type == "cuda" else None
        )
        reason = kernel_limits(query.dtype, query.shape[-1]) if capability is None else capability.reason
        if reason:
            raise ValueError(f"impl={impl!r} cannot run this call: {reason}; impl='reference' runs it on the CPU")
    return config


def _check_autograd(impl: str, device: torch.device, *tensors: torch.Tensor) -> None:
    if resolve_impl(impl, device) == "triton" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "sparse_attention(impl='triton') has no backward (it is an inference kernel), but an input requires "
            "grad: run it under torch.no_grad() / torch.inference_mode(), detach the inputs, or use "
            "impl='reference' (plain PyTorch, differentiable) for gradients"
        )


def select_plan(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None = None,
    *,
    video_grid: tuple[int, int, int],
    text_len: int = 0,
    text_first: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    config: SparseAttentionConfig | None = None,
    impl: str = "auto",
) -> SparsePlan:
    """Choose the key blocks each query block attends to (stages 1-3), without attending.

    Args: as `sparse_attention` (`value` is optional: selection reads only queries and keys). The plan is selected at
    `config.density` with `config.estimator` (plus `config.mass_threshold`, `max_density`, `neighbors`) and lists
    the blocks rectification compensates for `config.rectify` / `config.gapr`.

    Returns:
        a `SparsePlan` over the canonical layout of (`video_grid`, `text_len`, `text_first`, `config.block_size`,
        `config.reorder`), for `(B, H)` of the inputs, on their device. Attend with it with
        `sparse_attention(query, key, value, ..., plan=plan)`.
    """
    value = key if value is None else value
    grid, text, checked_scale = validate_attention_inputs(
        query, key, value, video_grid=video_grid, text_len=text_len, text_first=text_first, attn_mask=attn_mask,
        scale=scale,
    )  # fmt: skip
    config = _check_config_and_impl(config, impl, query)
    if query.shape[0] == 0:
        raise ValueError(f"query has an empty batch dimension: {tuple(query.shape)}; there is nothing to plan")
    batch, heads, seq_len, _ = query.shape
    layout = token_layout(grid, text, text_first, config.block_size, config.reorder)
    with torch.no_grad():
        plan, _ = plan_attention(
            query,
            key,
            value,
            layout=layout,
            key_valid=key_padding_valid(attn_mask, batch, heads, seq_len),
            scale=checked_scale,
            config=config,
            stages=stages_for(impl, query.device),
        )
    return plan


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    video_grid: tuple[int, int, int],
    text_len: int = 0,
    text_first: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    config: SparseAttentionConfig | None = None,
    impl: str = "auto",
    plan: SparsePlan | None = None,
) -> torch.Tensor:
    """Block-sparse, rectified self-attention over a video token grid, with SDPA's layout and semantics.

    Args:
        query, key, value: `(B, H, S, D)`, one float dtype and device. `S = F*Hh*W + text_len`.
        video_grid: `(F, Hh, W)`, the latent grid; the video tokens are in raster order (t, y, x) in the sequence.
        text_len: number of text tokens, placed after the video (`text_first=False`) or before it.
        attn_mask: optional boolean key-padding mask broadcastable (SDPA's rules) to `(B, H, 1, S)`; True keeps a key.
        scale: softmax scale, `1/sqrt(D)` by default.
        config: settings; `spattn_compile.current_config()` by default.
        impl: "auto" (Triton on CUDA, the reference on the CPU), "triton" (on the CPU: the Triton interpreter,
            `TRITON_INTERPRET=1` must be set before triton is imported), or "reference".
        plan: a `SparsePlan` from `select_plan` (or `SparsePlan.from_mask`) for this call's layout and `(B, H)` (a
            batch-1 plan applies to every sample). None: select one now, at `config.density`.

    Returns:
        `(B, H, S, D)` in the dtype and memory order of `query`. Without a plan, sequences shorter than
        `config.min_seq_len` get exact dense attention. A batch of 0 gives an empty output, as SDPA does.
    """
    grid, text, checked_scale = validate_attention_inputs(
        query, key, value, video_grid=video_grid, text_len=text_len, text_first=text_first, attn_mask=attn_mask,
        scale=scale,
    )  # fmt: skip
    config = _check_config_and_impl(config, impl, query)
    batch, heads, seq_len, _ = query.shape
    layout = token_layout(grid, text, text_first, config.block_size, config.reorder)
    if plan is not None:
        if not isinstance(plan, SparsePlan):
            raise TypeError(f"plan must be a SparsePlan or None, got {type(plan).__name__}")
        plan.check_compatible(batch, heads, layout, query.device)
    if batch == 0 or (plan is None and seq_len < config.min_seq_len):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=checked_scale)
    _check_autograd(impl, query.device, query, key, value)
    stages = stages_for(impl, query.device)
    key_valid = key_padding_valid(attn_mask, batch, heads, seq_len)
    if plan is None:
        with torch.no_grad():
            plan, prepared = plan_attention(
                query, key, value, layout=layout, key_valid=key_valid, scale=checked_scale, config=config,
                stages=stages,
            )  # fmt: skip
        # The reference path differentiates: with autograd on, prepare again outside no_grad.
        differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return attend_with_plan(
            query, key, value, plan=plan, key_valid=key_valid, scale=checked_scale, config=config, stages=stages,
            prepared=None if differentiable else prepared,
        )  # fmt: skip
    return attend_with_plan(
        query, key, value, plan=plan, key_valid=key_valid, scale=checked_scale, config=config, stages=stages
    )
