"""The public functions: `select_plan` (stages 0-2: which blocks to attend) and `sparse_attention` (attend, with a
given plan or a fresh one).

Planning is separate from attending (FlashInfer's plan / run; FlexAttention's `BlockMask`): `select_plan` returns a
`SparsePlan` that can be inspected, cached, edited or reused; `sparse_attention(..., plan=plan)` attends with it.
Without a plan `sparse_attention` selects one itself (one preparation shared by both). This module is the edge of the
library for tensors a user passes: it validates them once (`inputs.validate_attention_inputs`, naming the argument)
and hands the call to `attention.SparseAttention`, the orchestrator the compiled graphs' op uses too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import SparseAttention
from .config import SparseAttentionConfig, current_config
from .implementations import Implementation, check_autograd, implementation_for
from .inputs import validate_attention_inputs
from .plan import SparsePlan

__all__ = ["select_plan", "sparse_attention"]


def _settings(config: object, impl: str, query: torch.Tensor) -> tuple[SparseAttentionConfig, Implementation]:
    """The call's settings and implementation (ValueError naming `impl` when it cannot run the call)."""
    if config is None:
        config = current_config()
    elif not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig or None, got {type(config).__name__}")
    return config, implementation_for(impl, query)


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
    """Choose the key blocks each query block attends to (stages 0-2), without attending.

    Args: as `sparse_attention` (`value` is optional: selection reads only queries and keys). The plan is selected at
    `config.density` with `config.estimator` (plus `config.mass_threshold`, `max_density`, `neighbors`) and lists
    the blocks rectification compensates for `config.rectify` / `config.gapr`.

    Returns:
        a `SparsePlan` over the canonical layout of (`video_grid`, `text_len`, `text_first`, `config.block_size`,
        `config.reorder`), for `(B, H)` of the inputs, on their device. Attend with it with
        `sparse_attention(query, key, value, ..., plan=plan)`.
    """
    value = key if value is None else value
    layout, checked_scale = validate_attention_inputs(
        query, key, value, video_grid=video_grid, text_len=text_len, text_first=text_first, attn_mask=attn_mask,
        scale=scale,
    )  # fmt: skip
    config, implementation = _settings(config, impl, query)
    if query.shape[0] == 0:
        raise ValueError(f"query has an empty batch dimension: {tuple(query.shape)}; there is nothing to plan")
    call = SparseAttention(query, key, value, layout, attn_mask=attn_mask, scale=checked_scale, config=config,
                           implementation=implementation)  # fmt: skip
    return call.plan()


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
    layout, checked_scale = validate_attention_inputs(
        query, key, value, video_grid=video_grid, text_len=text_len, text_first=text_first, attn_mask=attn_mask,
        scale=scale,
    )  # fmt: skip
    config, implementation = _settings(config, impl, query)
    batch, heads, seq_len, _ = query.shape
    if plan is not None:
        if not isinstance(plan, SparsePlan):
            raise TypeError(f"plan must be a SparsePlan or None, got {type(plan).__name__}")
        plan.check_compatible(batch, heads, layout.token_layout(config.block_size, config.reorder), query.device)
    if batch == 0 or (plan is None and seq_len < config.min_seq_len):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=checked_scale)
    check_autograd(impl, query, key, value)
    call = SparseAttention(query, key, value, layout, attn_mask=attn_mask, scale=checked_scale, config=config,
                           implementation=implementation)  # fmt: skip
    return call.run(call.plan() if plan is None else plan)
