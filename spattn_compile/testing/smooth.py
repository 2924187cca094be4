"""Video-like attention inputs for tests and benchmarks: Q, K, V whose attention looks like a video DiT's.

Random Gaussian Q/K give near-uniform attention, on which every sparse method looks equally good or bad. This module
owns `video_attention_inputs`, a deterministic generator whose attention has the structure the algorithms exploit:
a spatially smooth content field (nearby tokens carry similar content and similar values), a 3-D rotary position
embedding over (t, y, x) (nearby tokens attend to each other more), a few sink tokens with large keys, and optional
text tokens with their own distribution, some of them masked as padding. It depends only on torch, so the GPU
machine can use it too.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

__all__ = ["VideoAttentionInputs", "rope_dims", "video_attention_inputs"]

# Content channels of the smooth field, and its correlation length in grid cells along (t, y, x): latent frames are
# already 4x compressed in time, so content changes faster per frame than per pixel.
_FIELD_CHANNELS = 16
_FIELD_SPACING = (3.0, 5.0, 5.0)
_ROPE_THETA = 10000.0
# Rotary channels turning faster than this (radians per cell) decorrelate within a few cells: they carry position.
# Slower ones barely turn across a latent grid: they carry content (trained models tend to split them so).
_LOCAL_FREQUENCY = 0.05
# Gains of the video query/key parts (roughly sqrt of logits): position code (locality), content, noise.
_POSITION_GAIN, _CONTENT_GAIN, _NOISE_GAIN = 3.2, 2.0, 0.6
# Query component along the sink and text directions, and the shares of attention the sinks and text take.
_GLOBAL_BIAS, _SINK_SHARE, _TEXT_SHARE = 8.0, 0.08, 0.1


@dataclasses.dataclass(frozen=True, eq=False)
class VideoAttentionInputs:
    """One self-attention call of a video DiT.

    query, key, value: `(batch, heads, seq_len, head_dim)`, `seq_len = F*H*W + text_len`; video tokens in raster
        order (t, y, x), text before them (`text_first`) or after them.
    attn_mask: bool `(batch, 1, 1, seq_len)` key-padding mask (True = attend), or None when no token is padding.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    video_grid: tuple[int, int, int]
    text_len: int
    text_first: bool

    @property
    def seq_len(self) -> int:
        return self.query.shape[-2]

    @property
    def num_video(self) -> int:
        return math.prod(self.video_grid)

    def kwargs(self) -> dict[str, object]:
        """The keyword arguments of `spattn_compile.sparse_attention` that describe this call:
        `sparse_attention(x.query, x.key, x.value, **x.kwargs())`."""
        return {
            "video_grid": self.video_grid,
            "text_len": self.text_len,
            "text_first": self.text_first,
            "attn_mask": self.attn_mask,
        }


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """Head-dim channels rotated by time, height and width, Wan-style: height and width get `2 * (head_dim // 6)`
    each, time the rest (44/42/42 for 128, 24/20/20 for 64). All three are even."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _rope_frequencies(width: int) -> torch.Tensor:
    """Angular frequency of each channel pair of a `width`-channel rotary slice, `theta^(-2k/width)`."""
    return _ROPE_THETA ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)


def _apply_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of `x (..., N, D)` by angles `position * theta^(-2k/d_axis)`, each axis of
    `positions (N, 3)` owning its own slice of channels (`rope_dims`)."""
    pieces = []
    start = 0
    for axis, width in enumerate(rope_dims(x.shape[-1])):
        part = x[..., start : start + width]
        start += width
        if width == 0:
            continue
        freqs = _rope_frequencies(width).to(x.dtype)
        angle = positions[:, axis, None].to(x.dtype) * freqs  # (N, width / 2)
        cos, sin = angle.cos(), angle.sin()
        even, odd = part[..., 0::2], part[..., 1::2]
        rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
        pieces.append(rotated.flatten(-2))
    return torch.cat(pieces, dim=-1)


def _smooth_field(
    generator: torch.Generator,
    batch: int,
    grid: tuple[int, int, int],
    channels: int = _FIELD_CHANNELS,
    spacing: tuple[float, float, float] = _FIELD_SPACING,
) -> torch.Tensor:
    """`(batch, F*H*W, channels)`: coarse Gaussian noise with nodes `spacing` cells apart, trilinearly upsampled to
    the grid, unit mean square."""
    coarse = tuple(max(2, math.ceil(n / s) + 1) for n, s in zip(grid, spacing))
    noise = torch.randn(batch, channels, *coarse, generator=generator, dtype=torch.float64)
    field = F.interpolate(noise, size=grid, mode="trilinear", align_corners=True)
    field = field.flatten(2).transpose(1, 2)
    # Interpolation shrinks the variance between coarse nodes; restore unit mean square (per batch element).
    return field / field.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()


def calibrated_key_length(
    sampled_queries: torch.Tensor,
    log_partition: torch.Tensor,
    scale: float | torch.Tensor,
    direction: torch.Tensor,
    share: float | torch.Tensor,
    count: int,
) -> torch.Tensor:
    """`(B, H, 1, 1)`: the length of `count` keys along `direction (H, 1, D)` that take `share` of the attention of
    `sampled_queries (B, H, n, D)` next to keys whose log-partition per query is `log_partition (B, H, n)` (bisection:
    the mean share grows with the length). `scale` and `share` may be per-head tensors `(H, 1)`."""
    batch, heads = sampled_queries.shape[:2]
    along = scale * (sampled_queries @ direction.transpose(-1, -2)).squeeze(-1)  # (B, H, n)
    low = torch.zeros(batch, heads, 1, dtype=torch.float64)
    high = torch.full_like(low, 1e4)
    for _ in range(60):
        mid = (low + high) / 2
        mean_share = torch.sigmoid(math.log(count) + mid * along - log_partition).mean(-1, keepdim=True)
        low, high = torch.where(mean_share < share, mid, low), torch.where(mean_share < share, high, mid)
    return low[..., None]


def _check_int(name: str, value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def video_attention_inputs(
    video_grid: tuple[int, int, int],
    *,
    batch: int = 1,
    heads: int = 2,
    head_dim: int = 64,
    text_len: int = 0,
    text_first: bool = False,
    text_padding: int = 0,
    num_sinks: int = 2,
    peakedness: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> VideoAttentionInputs:
    """Deterministic video-like Q, K, V (same `seed` and arguments: bit-identical tensors, on any device).

    Args:
        video_grid: `(F, H, W)` latent token grid; video tokens are in raster order.
        batch, heads, head_dim: the tensor sizes; `head_dim` even and >= 6 (it is split in three RoPE slices).
        text_len: text tokens, after the video (`text_first=False`) or before it. Text keys and values have their
            own distribution (no rotary embedding) and take a modest share of the video queries' attention.
        text_padding: the last `text_padding` tokens of the text span are padding: `attn_mask` masks them out. Their
            keys are made to attract every query and their values are large, so attention that ignores the mask is
            visibly wrong.
        num_sinks: video tokens (at seeded random positions) with long keys that every video query attends to
            (attention sinks); together they take about 8% of a video query's attention.
        peakedness: multiplies the queries, i.e. the inverse softmax temperature. At 1.0, with head_dim 32 to 128,
            the top 10% of keys hold 0.8 to 0.95 of a video query's attention on grids of 500 to 7000 tokens;
            larger is more concentrated. Locality needs fast rotary channels: it is weak for head_dim < 32.
        dtype, device: of the returned tensors (generated in float64 on the CPU, then converted).
        seed: the random seed.

    Structure of the video part: a smooth random content field `f (N, 16)` over the grid; per head,
    `q = f Wq + u + noise`, `k = f Wk + u + noise` with `Wk` close to `Wq` (similar content attends) and a per-head
    position code `u` shared by q and k. Then the 3-D rotary embedding: `u` lives on the fast-turning rotary channels,
    so `q_i . k_j` decays with the grid distance of i and j (locality; each head weighs time and space differently);
    the content mostly on the slow ones, so it attends across the grid. `v = f Wv + noise` is spatially smooth.
    Every video query also has a component along two per-head directions, one of the sink keys and one of the text
    keys; their lengths are calibrated (on a sample of 256 queries) so that sinks and unpadded text take about 8% and
    10% of the attention.
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
    text_len = _check_int("text_len", text_len, 0)
    text_padding = _check_int("text_padding", text_padding, 0)
    if text_padding > text_len:
        raise ValueError(f"text_padding={text_padding} exceeds text_len={text_len}")
    if not isinstance(text_first, bool):
        raise TypeError(f"text_first must be a bool, got {type(text_first).__name__}")
    num_video = math.prod(grid)
    num_sinks = _check_int("num_sinks", num_sinks, 0)
    if num_sinks > num_video:
        raise ValueError(f"num_sinks={num_sinks} exceeds the {num_video} video tokens")
    if isinstance(peakedness, bool) or not isinstance(peakedness, (int, float)):
        raise TypeError(f"peakedness must be a float, got {type(peakedness).__name__}")
    if not math.isfinite(peakedness) or peakedness <= 0:
        raise ValueError(f"peakedness must be a positive finite float, got {peakedness!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    seed = _check_int("seed", seed, 0)

    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    # Entries of size d^(-1/4) make scale * q . k = (q . k) / sqrt(d) independent of the head dim.
    unit = head_dim**-0.25
    scale = 1.0 / math.sqrt(head_dim)
    channels = _FIELD_CHANNELS

    # Channel roles: position on the fast rotary channels, content mostly on the slow ones. Each head weighs its
    # temporal and spatial position channels differently (more "temporal" or more "spatial" heads).
    widths = rope_dims(head_dim)
    frequency = torch.cat([_rope_frequencies(w).repeat_interleave(2) for w in widths])
    axis = torch.cat([torch.full((w,), i) for i, w in enumerate(widths)])
    local = frequency >= _LOCAL_FREQUENCY
    axis_gain = 0.6 + 0.6 * torch.rand(heads, 2, generator=generator, dtype=torch.float64)  # (time, space) per head
    position_weight = local * axis_gain[:, (axis > 0).long()] * math.sqrt(head_dim / max(1, int(local.sum())))
    content_weight = torch.where(local, 0.3, 1.0).to(torch.float64)
    content_weight = content_weight * math.sqrt(head_dim) / content_weight.norm()

    field = _smooth_field(generator, batch, grid)[:, None]  # (B, 1, N, C)
    proj_q = randn(heads, channels, head_dim) / math.sqrt(channels) * content_weight
    proj_k = proj_q + 0.5 * randn(heads, channels, head_dim) / math.sqrt(channels) * content_weight
    proj_v = randn(heads, channels, head_dim) / math.sqrt(channels)
    position_code = _POSITION_GAIN * position_weight[:, None] * randn(heads, 1, head_dim)
    q = _CONTENT_GAIN * field @ proj_q + position_code + _NOISE_GAIN * randn(batch, heads, num_video, head_dim)
    k = _CONTENT_GAIN * field @ proj_k + position_code + _NOISE_GAIN * randn(batch, heads, num_video, head_dim)
    v = field @ proj_v + 0.3 * randn(batch, heads, num_video, head_dim)

    frames, height, width = grid
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    positions = torch.stack([t.flatten(), y.flatten(), x.flatten()], dim=-1)
    q = _apply_rope(q * unit, positions)
    k = _apply_rope(k * unit, positions)

    # Sinks and text are reached through two global per-head directions: every video query has a component along
    # both, so a key along one of them gets a similar logit from every query (a fixed logit would not do: the video
    # keys' partition function grows with the grid). Key lengths are calibrated on a sample of video queries so that
    # the sinks together, and the unpadded text tokens together, take _SINK_SHARE and _TEXT_SHARE of their attention.
    directions = torch.linalg.qr(randn(heads, head_dim, 2)).Q.transpose(-1, -2)  # (H, 2, D), orthonormal rows
    sink_direction, text_direction = directions[:, :1], directions[:, 1:]
    q = q + _GLOBAL_BIAS * unit * (sink_direction + text_direction)
    sampled = q[:, :, torch.randperm(num_video, generator=generator)[:256]]
    log_partition = torch.logsumexp(scale * sampled @ k.transpose(-1, -2), dim=-1)  # (B, H, 256)

    if num_sinks:
        sink_positions = torch.randperm(num_video, generator=generator)[:num_sinks]
        length = calibrated_key_length(sampled, log_partition, scale, sink_direction, _SINK_SHARE, num_sinks)
        k[:, :, sink_positions] = length * sink_direction + _NOISE_GAIN * unit * randn(
            batch, heads, num_sinks, head_dim
        )

    if text_len:
        text_q = unit * randn(batch, heads, text_len, head_dim) + _GLOBAL_BIAS * unit * sink_direction
        text_k = _NOISE_GAIN * unit * randn(batch, heads, text_len, head_dim)
        if text_len > text_padding:
            text_k = text_k + calibrated_key_length(
                sampled, log_partition, scale, text_direction, _TEXT_SHARE, text_len - text_padding
            ) * text_direction
        text_v = 0.5 + 0.8 * randn(batch, heads, text_len, head_dim)
        if text_padding:
            # Padding keys that would dominate every row, with large values, if the mask were ignored.
            pad = slice(text_len - text_padding, text_len)
            text_k[:, :, pad] = calibrated_key_length(
                sampled, log_partition, scale, text_direction, 0.9, text_padding
            ) * text_direction
            text_v[:, :, pad] = 10.0
        parts = (text_q, q), (text_k, k), (text_v, v)
        q, k, v = (torch.cat(p if text_first else p[::-1], dim=2) for p in parts)

    attn_mask = None
    if text_padding:
        text_start = 0 if text_first else num_video
        attn_mask = torch.ones(batch, 1, 1, num_video + text_len, dtype=torch.bool)
        attn_mask[..., text_start + text_len - text_padding : text_start + text_len] = False
        attn_mask = attn_mask.to(device)
    q = q * peakedness

    return VideoAttentionInputs(
        query=q.to(device=device, dtype=dtype).contiguous(),
        key=k.to(device=device, dtype=dtype).contiguous(),
        value=v.to(device=device, dtype=dtype).contiguous(),
        attn_mask=attn_mask,
        video_grid=grid,
        text_len=text_len,
        text_first=text_first,
    )
