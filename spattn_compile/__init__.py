"""spattn_compile: training-free sparse attention for video diffusion transformers, as a `torch.compile` backend.

Public surface: `sparse_attention` (the attention function), `SparseAttentionConfig` with the `config` context manager
and `current_config`, the `spattn` backend for `torch.compile`, and `explain` (what the backend does to a model).
Importing the package registers the `torch.ops.spattn.*` custom ops and the backend's name.
"""

from . import (
    backend,  # noqa: F401  (registers the "spattn" torch.compile backend)
    ops,  # noqa: F401  (registers torch.ops.spattn.sparse_attention)
)
from .api import sparse_attention
from .config import SparseAttentionConfig, config, current_config
from .explain import ExplainReport, explain
from .reference import SparsePlan

__all__ = [
    "ExplainReport",
    "SparseAttentionConfig",
    "SparsePlan",
    "config",
    "current_config",
    "explain",
    "sparse_attention",
]

__version__ = "0.1.0"
