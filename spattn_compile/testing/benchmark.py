"""What the benchmarks share: the published model configurations and attention shapes they measure, timing, and the
error measure.

The benchmark scripts (`benchmarks/`) run as plain scripts (`python benchmarks/<name>.py`) and import everything they
share from here, so none edits `sys.path`.

- `MODELS`: the transformer configurations of the published checkpoints (Wan 2.1 1.3B and 14B, HunyuanVideo 13B) and
  the latent size of their usual video; `ATTENTION_CASES`: the attention calls those models make at that size (grid,
  heads, text tokens and how many of them are padding).
- `time_ms`: the median wall time of a callable, synchronising the device around each call.
- `relative_error`: `spattn_compile.testing.relative_error`, the tests' measure.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .metrics import relative_error

__all__ = ["ATTENTION_CASES", "MODELS", "AttentionCase", "ModelPreset", "relative_error", "synchronize", "time_ms"]


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """A published transformer: its diffusers class name, its config (the checkpoint's `config.json`), the latent size
    (frames, height, width) of its usual video (before patching) and its transformer calls per denoising step."""

    family: str
    config: dict[str, Any]
    latent: tuple[int, int, int]
    calls_per_step: int


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """One self-attention call of a published model at its usual size: the latent token grid after patching, the
    heads, the text tokens in the joint sequence (after the video) and how many of them are padding."""

    grid: tuple[int, int, int]
    heads: int
    head_dim: int = 128
    text_len: int = 0
    text_padding: int = 0


_WAN_COMMON: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

# The published configs; Wan: 81 frames at 480p (1.3B) or 720p (14B), VAE stride (4, 8, 8), two CFG calls per step;
# HunyuanVideo (diffusers' HunyuanVideoTransformer3DModel defaults are the 13B model, spelled out so that tables
# state them): 129 frames at 720p, guidance-distilled (one call per step).
MODELS: dict[str, ModelPreset] = {
    "wan2.1-1.3b": ModelPreset(
        "WanTransformer3DModel",
        {**_WAN_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
        (21, 60, 104),
        2,
    ),
    "wan2.1-14b": ModelPreset(
        "WanTransformer3DModel",
        {**_WAN_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
        (21, 90, 160),
        2,
    ),
    "hunyuan-13b": ModelPreset(
        "HunyuanVideoTransformer3DModel",
        {
            "in_channels": 16,
            "out_channels": 16,
            "num_attention_heads": 24,
            "attention_head_dim": 128,
            "num_layers": 20,
            "num_single_layers": 40,
            "num_refiner_layers": 2,
            "mlp_ratio": 4.0,
            "patch_size": 2,
            "patch_size_t": 1,
            "qk_norm": "rms_norm",
            "guidance_embeds": True,
            "text_embed_dim": 4096,
            "pooled_projection_dim": 768,
            "rope_theta": 256.0,
            "rope_axes_dim": (16, 56, 56),
        },
        (33, 90, 160),
        1,
    ),
}

# Their self-attention calls: Wan 2.1 1.3B at 480p (32,760 tokens), 14B at 720p (75,600 tokens), HunyuanVideo 13B at
# 720p (118,800 video tokens and 256 text tokens, half of them padding).
ATTENTION_CASES: dict[str, AttentionCase] = {
    "wan1.3b-480p": AttentionCase((21, 30, 52), heads=12),
    "wan14b-720p": AttentionCase((21, 45, 80), heads=40),
    "hunyuan-720p": AttentionCase((33, 45, 80), heads=24, text_len=256, text_padding=128),
}


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[int], object], repeats: int, device: torch.device | str) -> tuple[object, float]:
    """Median wall time in ms of `fn(i)` for i = 1..repeats (the caller has warmed up), synchronising the device
    before and after each call, and the last call's result."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times, out = [], None
    for i in range(1, repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        out = fn(i)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return out, statistics.median(times)
