"""Attention inputs for tests and benchmarks, with the structure of a video DiT's self-attention.

- `video_attention_inputs` (smooth.py): content smooth at the scale of a block, local rotary attention, sinks, text.
  The regression set: on it a block's mean stands for its tokens.
- `dit_attention_inputs` (dit.py): token-scale heterogeneity, head kinds and temperatures, sinks, padded text and
  step-to-step drift. The hard suite, on which selection decisions and defaults are made.
- `PlanEvaluator` (evaluate.py): dense attention, the true block mass and the output of many plans of one call at the
  cost of about one dense pass (fidelity studies).
- `relative_error` (metrics.py): the one error measure of the tests and benchmarks.
- `zoo`: tiny diffusers video transformers (random weights) for the tests, examples and benchmarks.
- `strategies`: hypothesis strategies shared by the property tests (imports hypothesis, a test dependency: import it
  as `spattn_compile.testing.strategies`).
"""

from . import zoo
from .dit import HEAD_KINDS, HeadProfile, dit_attention_inputs
from .evaluate import PlanEvaluator, PlanResult
from .metrics import relative_error
from .smooth import VideoAttentionInputs, rope_dims, video_attention_inputs

__all__ = [
    "HEAD_KINDS",
    "HeadProfile",
    "PlanEvaluator",
    "PlanResult",
    "VideoAttentionInputs",
    "dit_attention_inputs",
    "relative_error",
    "rope_dims",
    "video_attention_inputs",
    "zoo",
]
