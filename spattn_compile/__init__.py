"""spattn_compile: training-free sparse attention for video diffusion transformers, as a `torch.compile` backend.

Public surface: `sparse_attention` (the attention function), `SparseAttentionConfig` with the `config` context manager
and `current_config`, and the `spattn` backend for `torch.compile`. Importing the package registers the
`torch.ops.spattn.*` custom ops.
"""

from . import ops  # noqa: F401  (registers torch.ops.spattn.sparse_attention)
from .api import sparse_attention
from .config import SparseAttentionConfig, config, current_config
from .reference import SparsePlan

__all__ = [
    "SparseAttentionConfig",
    "SparsePlan",
    "config",
    "current_config",
    "sparse_attention",
]

__version__ = "0.1.0"
