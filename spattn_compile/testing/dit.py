"""Inputs as varied as a real video DiT's attention: the generator behind the *hard* fidelity suite.

`video_attention_inputs` (smooth.py) builds content that is smooth at the scale of a block, so a block's mean stands
for every token in it and any pooled estimate looks good. Real latents are not like that: texture, edges and noise
make neighbouring tokens differ, heads differ in temperature and in what they look at, and a few keys draw attention
from everywhere. `dit_attention_inputs` has each of these properties, each behind its own argument:

- **Token-scale heterogeneity** (`heterogeneity`): the content of a token is a smooth field plus a piecewise-constant
  segmentation with sharp edges (segments of about `segment_size` tokens, smaller than a 128-token brick) plus
  per-token texture. At `heterogeneity=1` the two token-scale parts carry most of the variance, so the mean of a
  brick does not represent its tokens (the tests measure this).
- **Head kinds** (`head_kinds`): "spatial" heads are local in (t, y, x); "temporal" heads are local in (y, x) but
  reach across frames; "global" heads put a large share of their attention on a few sink keys; "content" heads
  attend by content similarity wherever it is.
- **Head temperatures** (`temperatures`): the queries of head h are multiplied by `temperatures[h]`; 2.0 makes a
  head about twice as sharp in logit space.
- **Sinks** (`num_sinks`), **text** before or after the video with **padding** (`text_len`, `text_first`,
  `text_padding`), as in the smooth generator.
- **Step-to-step drift** (`step`, `drift`): the content and per-token noise of step s are
  `cos(drift * s) * A + sin(drift * s) * B` for two independent draws A and B, everything else (projections, position
  codes, sinks) fixed, so consecutive steps differ by about `drift` in relative terms, like consecutive denoising steps
  of one generation.

The generator is deterministic for a seed (float64 on the CPU, then converted) and depends only on torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from .smooth import (
    VideoAttentionInputs,
    _apply_rope,
    _check_int,
    _rope_frequencies,
    _smooth_field,
    calibrated_key_length,
    rope_dims,
)

__all__ = ["HEAD_KINDS", "HeadProfile", "dit_attention_inputs"]

_CHANNELS = 32
_SMOOTH_SPACING = (3.0, 6.0, 6.0)
# Time counts double in the segmentation's distance: latent frames are 4x compressed, content changes faster in t.
_SEGMENT_TIME_WEIGHT = 2.0
_LOCAL_FREQUENCY = 0.05
_POSITION_GAIN, _CONTENT_GAIN, _NOISE_GAIN = 3.2, 2.0, 0.6
_GLOBAL_BIAS, _TEXT_SHARE = 8.0, 0.1


@dataclasses.dataclass(frozen=True)
class HeadProfile:
    """What one kind of head looks at: gains of its temporal and spatial position code (locality along t and along
    y, x), of its content term, and the share of attention its sink keys take."""

    time_locality: float
    space_locality: float
    content: float
    sink_share: float


HEAD_KINDS: dict[str, HeadProfile] = {
    "spatial": HeadProfile(time_locality=1.0, space_locality=1.0, content=0.8, sink_share=0.03),
    "temporal": HeadProfile(time_locality=0.12, space_locality=1.3, content=0.8, sink_share=0.03),
    "global": HeadProfile(time_locality=0.25, space_locality=0.25, content=0.9, sink_share=0.3),
    "content": HeadProfile(time_locality=0.25, space_locality=0.35, content=1.7, sink_share=0.03),
}


def _positions(grid: tuple[int, int, int]) -> torch.Tensor:
    """int64 `(N, 3)`: (t, y, x) of the raster-ordered tokens."""
    axes = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    return torch.stack([a.flatten() for a in axes], dim=-1)


def _segment_field(
    generator: torch.Generator, batch: int, grid: tuple[int, int, int], channels: int, segment_size: int
) -> torch.Tensor:
    """`(batch, N, channels)`: a Voronoi segmentation of the grid into regions of about `segment_size` tokens, each
    region one random vector (sharp edges between regions), unit mean square."""
    positions = _positions(grid).to(torch.float64)
    positions[:, 0] *= _SEGMENT_TIME_WEIGHT
    num_tokens = positions.shape[0]
    num_segments = max(1, num_tokens // segment_size)
    extent = torch.tensor(grid, dtype=torch.float64) * torch.tensor([_SEGMENT_TIME_WEIGHT, 1.0, 1.0])
    fields = []
    for _ in range(batch):
        seeds = torch.rand(num_segments, 3, generator=generator, dtype=torch.float64) * extent
        colors = torch.randn(num_segments, channels, generator=generator, dtype=torch.float64)
        label = torch.empty(num_tokens, dtype=torch.int64)
        for start in range(0, num_tokens, 4096):
            chunk = positions[start : start + 4096]
            label[start : start + 4096] = torch.cdist(chunk, seeds).argmin(-1)
        fields.append(colors[label])
    field = torch.stack(fields)
    return field / field.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()


def _content_field(
    generator: torch.Generator, batch: int, grid: tuple[int, int, int], heterogeneity: float, segment_size: int
) -> torch.Tensor:
    """`(batch, N, _CHANNELS)`, unit mean square: smooth + heterogeneity * (segments + texture)."""
    num_tokens = math.prod(grid)
    smooth = _smooth_field(generator, batch, grid, _CHANNELS, _SMOOTH_SPACING)
    segments = _segment_field(generator, batch, grid, _CHANNELS, segment_size)
    texture = torch.randn(batch, num_tokens, _CHANNELS, generator=generator, dtype=torch.float64)
    field = smooth + heterogeneity * (segments + 0.8 * texture)
    return field / field.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()


def _per_head(name: str, value: object, heads: int, default: object) -> list:
    if value is None:
        value = default
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value] * heads
    if not isinstance(value, Sequence) or len(value) == 0:
        raise TypeError(f"{name} must be one value or a sequence of per-head values, got {value!r}")
    return [value[h % len(value)] for h in range(heads)]


def dit_attention_inputs(
    video_grid: tuple[int, int, int],
    *,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    head_kinds: str | Sequence[str] | None = None,
    temperatures: float | Sequence[float] | None = None,
    heterogeneity: float = 1.0,
    segment_size: int = 48,
    num_sinks: int = 4,
    text_len: int = 0,
    text_first: bool = False,
    text_padding: int = 0,
    step: int = 0,
    drift: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> VideoAttentionInputs:
    """Deterministic Q, K, V of one video DiT self-attention call with token-scale heterogeneity (module docstring).

    Args:
        video_grid: `(F, H, W)`; video tokens are in raster order.
        batch, heads, head_dim: tensor sizes; `head_dim` even and >= 6.
        head_kinds: a kind from `HEAD_KINDS` ("spatial", "temporal", "global", "content") or one per head (cycled);
            default: the four kinds in turn.
        temperatures: query multiplier, one for all heads or one per head (cycled); default 1.0.
        heterogeneity: weight of the token-scale content (segments with sharp edges, texture) next to the smooth
            field; 0 gives block-smooth content.
        segment_size: mean tokens per segment of the segmentation.
        num_sinks: video tokens whose keys every query of a head attends to; their share is the head kind's.
        text_len, text_first, text_padding: as in `video_attention_inputs`.
        step, drift: denoising step index and the change per step (radians of the mix of two draws; 0.05 is a 5%
            change per step).
        dtype, device, seed: of the result; float64 generation on the CPU.
    """
    if (
        not isinstance(video_grid, (tuple, list))
        or len(video_grid) != 3
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in video_grid)
    ):
        raise ValueError(f"video_grid must be three positive ints (frames, height, width), got {video_grid!r}")
    frames, height, width = video_grid
    grid = (int(frames), int(height), int(width))
    batch = _check_int("batch", batch, 1)
    heads = _check_int("heads", heads, 1)
    head_dim = _check_int("head_dim", head_dim, 6)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (rotary embedding pairs channels), got {head_dim}")
    kinds = _per_head("head_kinds", head_kinds, heads, list(HEAD_KINDS))
    for kind in kinds:
        if kind not in HEAD_KINDS:
            raise ValueError(f"head_kinds: unknown kind {kind!r}; known kinds: {sorted(HEAD_KINDS)}")
    temps = _per_head("temperatures", temperatures, heads, 1.0)
    for value in temps:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"temperatures must be positive finite numbers, got {temperatures!r}")
    for name, value in (("heterogeneity", heterogeneity), ("drift", drift)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    segment_size = _check_int("segment_size", segment_size, 1)
    num_video = math.prod(grid)
    num_sinks = _check_int("num_sinks", num_sinks, 0)
    if num_sinks > num_video:
        raise ValueError(f"num_sinks={num_sinks} exceeds the {num_video} video tokens")
    text_len = _check_int("text_len", text_len, 0)
    text_padding = _check_int("text_padding", text_padding, 0)
    if text_padding > text_len:
        raise ValueError(f"text_padding={text_padding} exceeds text_len={text_len}")
    if not isinstance(text_first, bool):
        raise TypeError(f"text_first must be a bool, got {type(text_first).__name__}")
    step = _check_int("step", step, 0)
    seed = _check_int("seed", seed, 0)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")

    # Fixed parts (the model: projections, position codes, sinks, text) come from one generator; the parts that
    # drift from step to step (content and per-token noise) are mixed from two further draws.
    generator = torch.Generator().manual_seed(seed)
    draws = [torch.Generator().manual_seed(seed * 2 + 1_000_003 + i) for i in range(2)]
    angle = drift * step
    mix = (math.cos(angle), math.sin(angle))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    def evolving(make) -> torch.Tensor:
        return mix[0] * make(draws[0]) + (mix[1] * make(draws[1]) if mix[1] else 0.0)

    unit = head_dim**-0.25
    scale = 1.0 / math.sqrt(head_dim)
    profiles = [HEAD_KINDS[kind] for kind in kinds]

    widths = rope_dims(head_dim)
    frequency = torch.cat([_rope_frequencies(w).repeat_interleave(2) for w in widths])
    axis = torch.cat([torch.full((w,), i) for i, w in enumerate(widths)])
    local = frequency >= _LOCAL_FREQUENCY
    axis_gain = torch.tensor([[p.time_locality, p.space_locality] for p in profiles], dtype=torch.float64)
    position_weight = local * axis_gain[:, (axis > 0).long()] * math.sqrt(head_dim / max(1, int(local.sum())))
    content_weight = torch.where(local, 0.3, 1.0).to(torch.float64)
    content_weight = content_weight * math.sqrt(head_dim) / content_weight.norm()
    content_gain = torch.tensor([p.content for p in profiles], dtype=torch.float64)[:, None, None]

    proj_q = randn(heads, _CHANNELS, head_dim) / math.sqrt(_CHANNELS) * content_weight
    proj_k = proj_q + 0.5 * randn(heads, _CHANNELS, head_dim) / math.sqrt(_CHANNELS) * content_weight
    proj_v = randn(heads, _CHANNELS, head_dim) / math.sqrt(_CHANNELS)
    position_code = _POSITION_GAIN * position_weight[:, None] * randn(heads, 1, head_dim)
    directions = torch.linalg.qr(randn(heads, head_dim, 2)).Q.transpose(-1, -2)
    sink_direction, text_direction = directions[:, :1], directions[:, 1:]
    sink_positions = torch.randperm(num_video, generator=generator)[:num_sinks]
    sample_positions = torch.randperm(num_video, generator=generator)[:256]

    field = evolving(lambda g: _content_field(g, batch, grid, heterogeneity, segment_size))[:, None]  # (B,1,N,C)
    noise_q, noise_k, noise_v = (
        evolving(lambda g: torch.randn(batch, heads, num_video, head_dim, generator=g, dtype=torch.float64))
        for _ in range(3)
    )
    q = _CONTENT_GAIN * content_gain * (field @ proj_q) + position_code + _NOISE_GAIN * noise_q
    k = _CONTENT_GAIN * content_gain * (field @ proj_k) + position_code + _NOISE_GAIN * noise_k
    v = field @ proj_v + 0.3 * noise_v

    positions = _positions(grid)
    q = _apply_rope(q * unit, positions)
    k = _apply_rope(k * unit, positions)
    q = q + _GLOBAL_BIAS * unit * (sink_direction + text_direction)
    sampled = q[:, :, sample_positions]
    log_partition = torch.logsumexp(scale * sampled @ k.transpose(-1, -2), dim=-1)

    if num_sinks:
        share = torch.tensor([p.sink_share for p in profiles], dtype=torch.float64)[:, None]
        length = calibrated_key_length(sampled, log_partition, scale, sink_direction, share, num_sinks)
        sink_noise = randn(batch, heads, num_sinks, head_dim)
        k[:, :, sink_positions] = length * sink_direction + _NOISE_GAIN * unit * sink_noise

    if text_len:
        text_q = unit * randn(batch, heads, text_len, head_dim) + _GLOBAL_BIAS * unit * sink_direction
        text_k = _NOISE_GAIN * unit * randn(batch, heads, text_len, head_dim)
        if text_len > text_padding:
            text_k = text_k + text_direction * calibrated_key_length(
                sampled, log_partition, scale, text_direction, _TEXT_SHARE, text_len - text_padding
            )
        text_v = 0.5 + 0.8 * randn(batch, heads, text_len, head_dim)
        if text_padding:
            pad = slice(text_len - text_padding, text_len)
            text_k[:, :, pad] = text_direction * calibrated_key_length(
                sampled, log_partition, scale, text_direction, 0.9, text_padding
            )
            text_v[:, :, pad] = 10.0
        parts = (text_q, q), (text_k, k), (text_v, v)
        q, k, v = (torch.cat(p if text_first else p[::-1], dim=2) for p in parts)

    q = q * torch.tensor(temps, dtype=torch.float64)[:, None, None]
    attn_mask = None
    if text_padding:
        text_start = 0 if text_first else num_video
        attn_mask = torch.ones(batch, 1, 1, num_video + text_len, dtype=torch.bool)
        attn_mask[..., text_start + text_len - text_padding : text_start + text_len] = False
        attn_mask = attn_mask.to(device)
    return VideoAttentionInputs(
        query=q.to(device=device, dtype=dtype).contiguous(),
        key=k.to(device=device, dtype=dtype).contiguous(),
        value=v.to(device=device, dtype=dtype).contiguous(),
        attn_mask=attn_mask,
        video_grid=grid,
        text_len=text_len,
        text_first=text_first,
    )
