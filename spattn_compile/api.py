"""The public entry point `sparse_attention`: argument validation and the choice of implementation.

This module owns what a user may pass and the errors they get back. It validates once, then runs the pipeline with
the Triton kernels (CUDA; or on the CPU under `TRITON_INTERPRET=1`) or with the plain-PyTorch reference. The compiler
pass does not come through here: it inserts the `spattn::sparse_attention` custom op (`spattn_compile.ops`), which
shares `run_sparse_attention` below.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import SparseAttentionConfig, current_config
from .reference import SparsePlan, key_padding_valid, sparse_attention_reference

__all__ = ["sparse_attention", "run_sparse_attention", "validate_attention_inputs"]

_IMPLS = ("auto", "triton", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
) -> tuple[int, int, int]:
    """Raise TypeError / ValueError naming the argument for anything `sparse_attention` cannot take; returns the
    video grid as a tuple of ints."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, seq_len, head_dim), got {tuple(tensor.shape)}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
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
    if 0 in (batch, heads, seq_len, head_dim):
        raise ValueError(f"query has an empty dimension: {tuple(query.shape)}")

    if (
        not isinstance(video_grid, (tuple, list, torch.Size))
        or len(video_grid) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in video_grid)
    ):
        raise ValueError(f"video_grid must be three positive ints (frames, height, width), got {video_grid!r}")
    if not isinstance(text_len, int) or isinstance(text_len, bool) or text_len < 0:
        raise ValueError(f"text_len must be an int >= 0, got {text_len!r}")
    if not isinstance(text_first, bool):
        raise TypeError(f"text_first must be a bool, got {type(text_first).__name__}")
    expected = math.prod(video_grid) + text_len
    if expected != seq_len:
        raise ValueError(
            f"video_grid {tuple(video_grid)} holds {math.prod(video_grid)} tokens; with text_len={text_len} that is "
            f"{expected}, but the sequence length is {seq_len}"
        )
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be None or a positive finite float, got {scale!r}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device}, query on {query.device}")
        key_padding_valid(attn_mask, batch, heads, seq_len)
    return tuple(int(v) for v in video_grid)


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return impl


def run_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    video_grid: tuple[int, int, int],
    text_len: int,
    text_first: bool,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    config: SparseAttentionConfig,
    impl: str = "auto",
    density: float | None = None,
    plan: SparsePlan | None = None,
    return_plan: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SparsePlan | None]:
    """Run validated inputs: dense SDPA below `config.min_seq_len`, else the sparse pipeline with `impl`.

    `density` overrides `config.density`; `plan` reuses a cached `SparsePlan` instead of scoring and selecting;
    with `return_plan` the result is `(output, plan)`, the plan being None for dense SDPA.
    """
    if query.shape[-2] < config.min_seq_len:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
        return (out, None) if return_plan else out
    if _resolve_impl(impl, query.device) == "triton":
        from .kernels.pipeline import triton_sparse_attention

        return triton_sparse_attention(
            query,
            key,
            value,
            video_grid=video_grid,
            text_len=text_len,
            text_first=text_first,
            attn_mask=attn_mask,
            scale=scale,
            config=config,
            density=density,
            plan=plan,
            return_plan=return_plan,
        )
    return sparse_attention_reference(
        query,
        key,
        value,
        video_grid=video_grid,
        text_len=text_len,
        text_first=text_first,
        attn_mask=attn_mask,
        scale=scale,
        config=config,
        density=density,
        plan=plan,
        return_plan=return_plan,
    )


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
) -> torch.Tensor:
    """Block-sparse, rectified self-attention over a video token grid, with SDPA's layout and semantics.

    Args:
        query, key, value: `(B, H, S, D)`, one float dtype and device. `S = F*Hh*W + text_len`.
        video_grid: `(F, Hh, W)`, the latent grid; the video tokens are in raster order (t, y, x) in the sequence.
        text_len: number of text tokens, placed after the video (`text_first=False`) or before it.
        attn_mask: optional boolean key-padding mask broadcastable to `(B, H, 1, S)`; True keeps a key.
        scale: softmax scale, `1/sqrt(D)` by default.
        config: settings; `spattn_compile.current_config()` by default.
        impl: "auto" (Triton on CUDA, the reference on the CPU), "triton" (on the CPU: the Triton interpreter,
            `TRITON_INTERPRET=1` must be set before triton is imported), or "reference".

    Returns:
        `(B, H, S, D)` in the dtype of `query`. Sequences shorter than `config.min_seq_len` get exact dense attention.
    """
    grid = validate_attention_inputs(
        query,
        key,
        value,
        video_grid=video_grid,
        text_len=text_len,
        text_first=text_first,
        attn_mask=attn_mask,
        scale=scale,
    )
    if config is None:
        config = current_config()
    elif not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig or None, got {type(config).__name__}")
    _resolve_impl(impl, query.device)
    return run_sparse_attention(
        query,
        key,
        value,
        video_grid=grid,
        text_len=text_len,
        text_first=text_first,
        attn_mask=attn_mask,
        scale=None if scale is None else float(scale),
        config=config,
        impl=impl,
    )
