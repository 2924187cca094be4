"""What runs when a compiled model runs: the custom op the compiled graphs call, and the schedule across denoising
steps and layers.

| module | owns |
|---|---|
| `op.py` | `torch.ops.spattn.sparse_attention`: a call's layout, dense or sparse, plan reuse, its report record |
| `steps.py` | which denoising step and CFG branch a forward is (`step`, `new_generation`) |
| `plan_cache.py` | plans reused across steps, per model, with the adaptive density |
| `model_state.py` | one compiled model's state (tracker, plan cache, records, layers) and the running call's step |
| `binding.py` | which model and block a compiled graph belongs to; the forward hook; `reset_schedule` |
| `records.py`, `report.py` | the per-call records and `report()` |

Importing it registers the op.
"""

from . import op  # noqa: F401  (registers torch.ops.spattn.sparse_attention)
from .binding import reset_schedule, set_plan_cache_limit
from .records import ScheduleReport, enable_timing
from .report import report, reset_report
from .steps import new_generation, step

__all__ = [
    "ScheduleReport",
    "enable_timing",
    "new_generation",
    "report",
    "reset_report",
    "reset_schedule",
    "set_plan_cache_limit",
    "step",
]
