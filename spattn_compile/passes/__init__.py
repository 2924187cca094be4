"""FX graph passes of the `spattn` backend (graph analysis and rewriting only; no kernels here).

`token_axes` infers which tensor dimensions are sequences of video (and text) tokens from the data flow; `masks`
proves full attention masks to be key-padding masks; `attention` decides for each scaled_dot_product_attention call
whether it becomes `torch.ops.spattn.sparse_attention`, and rewrites it (also under context parallelism, after the
all-to-all of Ulysses attention).
"""

from .attention import (
    SDPA_TARGETS,
    AttentionDecision,
    LayoutOverrideError,
    analyze_attention,
    context_seeds,
    rewrite_attention,
)
from .token_axes import GroupInfo, resolve_group

__all__ = [
    "SDPA_TARGETS",
    "AttentionDecision",
    "GroupInfo",
    "LayoutOverrideError",
    "analyze_attention",
    "context_seeds",
    "resolve_group",
    "rewrite_attention",
]
