"""Attention inputs for tests and benchmarks, with the structure of a video DiT's self-attention.

- `video_attention_inputs` (smooth.py): content smooth at the scale of a block, local rotary attention, sinks, text.
  The regression set: on it a block's mean stands for its tokens.
- `dit_attention_inputs` (dit.py): token-scale heterogeneity, head kinds and temperatures, sinks, padded text and
  step-to-step drift. The hard suite, on which selection decisions and defaults are made.
- `PlanEvaluator` (evaluate.py): dense attention, the true block mass and the output of many plans of one call at the
  cost of about one dense pass (fidelity studies).
"""

from .dit import HEAD_KINDS, HeadProfile, dit_attention_inputs
from .evaluate import PlanEvaluator, PlanResult
from .smooth import VideoAttentionInputs, rope_dims, video_attention_inputs

__all__ = [
    "HEAD_KINDS",
    "HeadProfile",
    "PlanEvaluator",
    "PlanResult",
    "VideoAttentionInputs",
    "dit_attention_inputs",
    "rope_dims",
    "video_attention_inputs",
]
