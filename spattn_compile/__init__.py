"""spattn_compile: training-free sparse attention for video diffusion transformers, as a `torch.compile` backend.

Public surface: `sparse_attention` (the attention function), `SparseAttentionConfig` with the `config` context manager
and `current_config`, the `spattn` backend for `torch.compile` (also `backend(**options)`, a backend with preset
options for `torch.compile(..., mode=...)`), `explain` (what the backend does to a model), `check_capability` (which
inputs can run sparse), the denoising schedule's controls (`step`, `new_generation`, `set_plan_cache_limit`) and
`report` (what the schedule did per model, layer and step: dense or sparse, density, estimated recall, plan cache
hits; `reset_report`, `enable_timing`).
Importing the package registers the `torch.ops.spattn.*` custom ops (the pipeline's `sparse_attention`, and with
Triton installed the kernels' `block_sparse_attention`, `reorder_pool`, `score_select`) and the backend's name.
"""

from . import (
    backend,  # noqa: F401  (registers the "spattn" torch.compile backend)
    ops,  # noqa: F401  (registers torch.ops.spattn.sparse_attention)
)
from .api import sparse_attention
from .capability import Capability, check_capability
from .config import SparseAttentionConfig, config, current_config
from .explain import ExplainReport, explain
from .passes import LayoutOverrideError
from .reference import SparsePlan
from .report import ScheduleReport, enable_timing, report, reset_report
from .schedule import new_generation, set_plan_cache_limit, step

try:
    import triton  # noqa: F401
except ImportError:  # no Triton on this platform: the reference path (CPU) still works
    pass
else:
    # Registers the kernels' own ops: torch.ops.spattn.block_sparse_attention, .reorder_pool and .score_select.
    from .kernels import attention_op, pooling_ops  # noqa: F401

__all__ = [
    "Capability",
    "ExplainReport",
    "LayoutOverrideError",
    "ScheduleReport",
    "SparseAttentionConfig",
    "SparsePlan",
    "backend",
    "check_capability",
    "config",
    "current_config",
    "enable_timing",
    "explain",
    "new_generation",
    "report",
    "reset_report",
    "set_plan_cache_limit",
    "sparse_attention",
    "step",
]

__version__ = "0.1.0"
