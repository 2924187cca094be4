"""spattn_compile: training-free sparse attention for video diffusion transformers, as a `torch.compile` backend.

Public surface: `select_plan` (which key blocks each query block attends to, as a `SparsePlan`) and
`sparse_attention` (attend, with a plan or a fresh one); `SparseAttentionConfig` with the `config` context manager
and `current_config`, and the block-importance estimators in `spattn_compile.estimators`; the `spattn` backend for
`torch.compile` (also `backend(**options)`, a backend with preset options for `torch.compile(..., mode=...)`),
`explain` (what the backend does to a model), `check_capability` (which inputs can run sparse), the selection and
rectification policies in `spattn_compile.policies`, the denoising
schedule's controls (`step`, `new_generation`, `set_plan_cache_limit`) and `report` (what the schedule did per model,
layer and step: dense or sparse, density, recall by the estimator, plan cache hits; `reset_report`,
`enable_timing`). Importing the package registers the `torch.ops.spattn.sparse_attention` custom op and the backend's
name. The design: docs/DESIGN.md.
"""

from . import (
    backend,  # noqa: F401  (registers the "spattn" torch.compile backend)
    estimators,
    policies,
    runtime,  # noqa: F401  (registers torch.ops.spattn.sparse_attention)
)
from .api import select_plan, sparse_attention
from .call_layout import LayoutOverrideError
from .capability import Capability, check_capability
from .config import SparseAttentionConfig, config, current_config
from .explain import ExplainReport, explain
from .plan import SparsePlan
from .runtime import ScheduleReport, enable_timing, new_generation, report, reset_report, set_plan_cache_limit, step

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
    "estimators",
    "policies",
    "select_plan",
    "sparse_attention",
    "step",
]

__version__ = "0.1.0"
