"""The op layer: `torch.ops.spattn.sparse_attention`, the custom op that compiled graphs call.

The compiler pass replaces an SDPA node with this op; the op is opaque to Dynamo and Inductor, so its settings are
read from `spattn_compile.current_config()` each time it runs (changing them never recompiles), and the choice
between the Triton pipeline (CUDA) and the reference (CPU) happens here, at run time. A fake implementation gives
compiled graphs the output's shape and dtype without running anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .api import run_sparse_attention
from .config import current_config

__all__ = ["sparse_attention_op"]


@torch.library.custom_op("spattn::sparse_attention", mutates_args=())
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
    """Sparse self-attention of one rewritten SDPA node. `layer_index` is the node's stable index in its graph
    (-1 when unknown); layers listed in `config.dense_layers` run dense attention."""
    config = current_config()
    if layer_index in config.dense_layers:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
    return run_sparse_attention(
        query,
        key,
        value,
        video_grid=tuple(video_grid),
        text_len=text_len,
        text_first=text_first,
        attn_mask=attn_mask,
        scale=scale,
        config=config,
    ).contiguous()


@sparse_attention_op.register_fake
def _(query, key, value, video_grid, text_len, text_first, attn_mask, scale, layer_index):
    return torch.empty_like(query, memory_format=torch.contiguous_format)
