"""Attention inputs for tests and benchmarks, with the structure of a video DiT's self-attention.

- `video_attention_inputs` (smooth.py): content smooth at the scale of a block, local rotary attention, sinks, text.
  The regression set: on it a block's mean stands for its tokens.
- `dit_attention_inputs` (dit.py): token-scale heterogeneity, head kinds and temperatures, sinks, padded text and
  step-to-step drift. The hard suite, on which selection decisions and defaults are made.
"""

from .dit import HEAD_KINDS, HeadProfile, dit_attention_inputs
from .smooth import VideoAttentionInputs, rope_dims, video_attention_inputs

__all__ = [
    "HEAD_KINDS",
    "HeadProfile",
    "VideoAttentionInputs",
    "dit_attention_inputs",
    "rope_dims",
    "video_attention_inputs",
]
