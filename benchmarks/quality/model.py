"""The model of the quality benchmark: diffusers' `WanTransformer3DModel` in pixel space, class-conditioned, with its
FLOP count, the flow-matching schedule and the Euler sampler shared by training, evaluation and the tests.

Pixel space: the transformer's own patch embedding (a Conv3d of stride `patch`) reads RGB videos directly and its
output projection writes RGB patches, so `in_channels = out_channels = 3`; no autoencoder is involved. Conditioning:
each class has `text_tokens` learned vectors of size `text_dim`, passed as `encoder_hidden_states` (Wan's text
embedder and cross-attention do the rest), so the model's self-attention is exactly Wan's.

Flow matching (rectified flow): `x_t = (1 - t) x_0 + t * noise`, the model predicts the velocity `noise - x_0` from
`(x_t, 1000 t, class)`. Times are shifted towards noise, `t' = s t / (1 + (s - 1) t)` (SD3's resolution shift), in
training (logit-normal draws) and sampling (a uniform grid) alike.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

__all__ = [
    "ClassConditionedWan",
    "ModelConfig",
    "euler_sample",
    "forward_flops",
    "shift_time",
    "to_inference_dtype",
    "train_step_flops",
]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The transformer and its conditioning. `patch` is (t, h, w) pixels per token."""

    num_classes: int = 8
    layers: int = 8
    heads: int = 4
    head_dim: int = 64
    ffn_dim: int = 1024
    patch: tuple[int, int, int] = (1, 4, 4)
    text_tokens: int = 4
    text_dim: int = 64
    freq_dim: int = 256

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def latent_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid (F, H, W) of a pixel video."""
        pt, ph, pw = self.patch
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"video {(frames, height, width)} is not a whole number of patches {self.patch}")
        return frames // pt, height // ph, width // pw

    def transformer_kwargs(self) -> dict:
        return dict(
            patch_size=tuple(self.patch),
            num_attention_heads=self.heads,
            attention_head_dim=self.head_dim,
            in_channels=3,
            out_channels=3,
            text_dim=self.text_dim,
            freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim,
            num_layers=self.layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        )


class ClassConditionedWan(nn.Module):
    """`transformer`: a `WanTransformer3DModel`; `class_tokens`: `(num_classes, text_tokens, text_dim)` learned."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        from diffusers import WanTransformer3DModel

        self.config = config
        self.transformer = WanTransformer3DModel(**config.transformer_kwargs())
        # float32 rotary tables (diffusers builds them in float64 off MPS): the float64 products cost more than
        # they give; the same tables serve training and every sampling run.
        self.transformer.rope.float()
        self.class_tokens = nn.Parameter(torch.randn(config.num_classes, config.text_tokens, config.text_dim))

    def conditioning(self, labels: torch.Tensor) -> torch.Tensor:
        """`encoder_hidden_states (B, text_tokens, text_dim)` of the classes `labels (B,)`."""
        return self.class_tokens[labels]

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocity `(B, 3, F, H, W)` at noise level `t (B,)` in [0, 1]."""
        return self.transformer(
            hidden_states=x, timestep=t * 1000, encoder_hidden_states=self.conditioning(labels), return_dict=False
        )[0]


def to_inference_dtype(model: ClassConditionedWan, dtype: torch.dtype) -> ClassConditionedWan:
    """Cast for sampling the way diffusers loads Wan in half precision: every parameter and buffer to `dtype` except
    the modules Wan keeps in float32 (`_keep_in_fp32_modules`: norms, time embedder, rotary tables, modulation)."""
    keep = tuple(getattr(model.transformer, "_keep_in_fp32_modules", None) or ())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point() or any(part in keep for part in name.split(".")):
            continue
        tensor.data = tensor.data.to(dtype)
    return model


def forward_flops(config: ModelConfig, grid: tuple[int, int, int]) -> dict[str, float]:
    """FLOPs of one forward of one sample (2 per multiply-add), by kind: `attention` (self-attention `QK^T` and `PV`),
    `linear` (every projection, FFN, cross-attention, patch embedding and output), and `total`. Norms, rotary and
    elementwise work are left out (memory-bound, a few percent at these sizes)."""
    n = math.prod(grid)
    d, t, layers = config.width, config.text_tokens, config.layers
    patch_values = 3 * math.prod(config.patch)
    per_layer_linear = (
        n
        * (
            4 * 2 * d * d  # self-attention q, k, v, o
            + 2 * 2 * d * d  # cross-attention q, o
            + 2 * 2 * d * config.ffn_dim  # FFN up and down
            + 2 * 2 * t * d  # cross-attention scores and values over the class tokens
        )
        + t * 2 * 2 * d * d
    )  # cross-attention k, v of the class tokens
    attention = layers * 4 * n * n * d  # 2 for QK^T, 2 for PV
    linear = layers * per_layer_linear + 2 * 2 * n * patch_values * d + t * 2 * 2 * d * d
    return dict(attention=float(attention), linear=float(linear), total=float(attention + linear))


def train_step_flops(config: ModelConfig, grid: tuple[int, int, int], batch: int) -> float:
    """FLOPs of one training step: forward + backward, the backward counted as 2x the forward for the linear layers
    and 2.5x for attention (flash attention's backward recomputes `QK^T`)."""
    flops = forward_flops(config, grid)
    return batch * (3.0 * flops["linear"] + 3.5 * flops["attention"])


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift towards noise: `s t / (1 + (s - 1) t)`."""
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def euler_sample(
    transformer,
    conditioning: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int,
    shift: float,
    dtype: torch.dtype,
    on_step=None,
) -> torch.Tensor:
    """Integrate the flow from `noise` (t = 1) to t = 0 with `steps` Euler steps; returns float32 videos.

    `transformer` is the bare `WanTransformer3DModel` or its compiled form (so the backend sees exactly the model's
    forward); the state is float32 between steps and `dtype` inside the model. `on_step(i, t)` runs before step i
    (at noise level t)."""
    times = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).tolist()
    x = noise.float()
    batch = x.shape[0]
    conditioning = conditioning.to(dtype)
    for index in range(steps):
        t, t_next = times[index], times[index + 1]
        if on_step is not None:
            on_step(index, t)
        timestep = torch.full((batch,), t * 1000, device=x.device, dtype=torch.float32)
        velocity = transformer(
            hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=conditioning, return_dict=False
        )[0]
        x = x + (t_next - t) * velocity.float()
    return x
