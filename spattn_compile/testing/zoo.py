"""Tiny diffusers video transformers with random weights: the model zoo of the tests, examples and benchmarks.

Each builder returns a `TinyModel`: a real diffusers model class built from a small random config (float32, CPU,
eval mode, seeded; nothing is downloaded), a function `make_inputs(frames, height, width, batch=1, seed=0) -> dict`
of keyword arguments for `model(**inputs)` whose sizes are in *latent* units before patching, and what the attention
pass should find in it (`patch`: the patch sizes that turn the latent size into the attention grid; `text_len`,
`text_first`: the text span of the joint attention, 0 for video-only self-attention). The configs keep two attention
heads of 16 dims (Kandinsky 5: its rotary axes fix 16 as well) and one or two blocks, so that a CPU forward takes
milliseconds while a sequence of about a hundred tokens still spans several 16-token blocks.

`BUILDERS` maps each family name to its builder. diffusers is imported inside the builders, so importing this module
needs only torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "BUILDERS",
    "HEADS",
    "HEAD_DIM",
    "TEXT_DIM",
    "TinyModel",
    "finish",
    "hunyuan_video_config",
    "wan_config",
    "wan_pipeline",
    "wan_vae",
]

HEADS = 2
HEAD_DIM = 16
TEXT_DIM = 32


@dataclasses.dataclass
class TinyModel:
    """A tiny model, its input factory and the layout its joint attention has.

    patch: (t, h, w) patch sizes: the attention grid of latent size (F, H, W) is (F // t, H // h, W // w).
    text_len: text tokens in each joint (video + text) attention, 0 for video-only self-attention.
    text_first: where the text sits in the joint sequence.
    """

    model: torch.nn.Module
    make_inputs: Callable[..., dict]
    patch: tuple[int, int, int]
    text_len: int = 0
    text_first: bool = False

    def patch_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        t, h, w = self.patch
        return (frames // t, height // h, width // w)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def finish(model: Any) -> torch.nn.Module:
    """Eval mode, float32, and random weights everywhere: diffusers zero-initialises some output projections and
    gates, and a zero gate would hide an attention error behind it. (`Any`: diffusers' model classes are untyped.)"""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = model.eval().float()
    generator = _generator(1234)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def _timestep(batch: int, value: int = 500) -> torch.Tensor:
    return torch.full((batch,), value, dtype=torch.long)


def wan_config(num_layers: int = 2) -> dict:
    """The tiny WanTransformer3DModel config (shared by the zoo, the examples and the benchmarks' smoke runs)."""
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": HEADS,
        "attention_head_dim": HEAD_DIM,
        "in_channels": 4,
        "out_channels": 4,
        "text_dim": TEXT_DIM,
        "freq_dim": 32,
        "ffn_dim": 64,
        "num_layers": num_layers,
        "rope_max_seq_len": 64,
    }


def _wan_inputs(text_len: int) -> Callable[..., dict]:
    def make_inputs(frames: int = 3, height: int = 8, width: int = 12, batch: int = 1, seed: int = 0) -> dict:
        g = _generator(seed)
        return {
            "hidden_states": _randn(g, batch, 4, frames, height, width),
            "timestep": _timestep(batch),
            "encoder_hidden_states": _randn(g, batch, text_len, TEXT_DIM),
            "return_dict": False,
        }

    return make_inputs


def wan(num_layers: int = 2, text_len: int = 7) -> TinyModel:
    """WanTransformer3DModel: conv3d patch embedding, video-only self-attention plus cross-attention to text."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**wan_config(num_layers))
    return TinyModel(finish(model), _wan_inputs(text_len), (1, 2, 2))


def skyreels_v2(num_layers: int = 2, text_len: int = 7) -> TinyModel:
    """SkyReelsV2Transformer3DModel: Wan's architecture (video self-attention, cross-attention to text)."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    model = SkyReelsV2Transformer3DModel(**wan_config(num_layers))
    return TinyModel(finish(model), _wan_inputs(text_len), (1, 2, 2))


def wan_vace(num_layers: int = 2, text_len: int = 7) -> TinyModel:
    """WanVACETransformer3DModel: Wan plus VACE blocks over the control latents (VACE block 0 beside block 0); every
    self-attention, of the main and of the VACE blocks, is over the same video grid."""
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    model = WanVACETransformer3DModel(**wan_config(num_layers), vace_layers=[0], vace_in_channels=4)
    base = _wan_inputs(text_len)

    def make_inputs(frames: int = 3, height: int = 8, width: int = 12, batch: int = 1, seed: int = 0) -> dict:
        inputs = base(frames, height, width, batch, seed)
        g = _generator(seed + 101)
        inputs["control_hidden_states"] = _randn(g, batch, 4, frames, height, width)
        return inputs

    return TinyModel(finish(model), make_inputs, (1, 2, 2))


def wan_vae():
    """A tiny AutoencoderKLWan with 4 latent channels (temporal stride 4, spatial stride 8), random weights."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        # The pipeline normalises latents with one mean and std per latent channel: 4 here, not the checkpoint's 16.
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()


def wan_pipeline(transformer: torch.nn.Module, tokenizer=None, text_encoder=None):
    """A diffusers WanPipeline around `transformer` with `wan_vae()` and a flow-matching UniPC scheduler; without a
    tokenizer and text encoder, call it with `prompt_embeds` (and `negative_prompt_embeds`)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=wan_vae(), scheduler=scheduler
    )


def hunyuan_video_config(num_layers: int = 1, num_single_layers: int = 1) -> dict:
    """The tiny HunyuanVideoTransformer3DModel config (shared by the zoo, the examples and the benchmarks)."""
    return {
        "in_channels": 4,
        "out_channels": 4,
        "num_attention_heads": HEADS,
        "attention_head_dim": HEAD_DIM,
        "num_layers": num_layers,
        "num_single_layers": num_single_layers,
        "num_refiner_layers": 1,
        "patch_size": 2,
        "patch_size_t": 1,
        "text_embed_dim": TEXT_DIM,
        "pooled_projection_dim": 16,
        "rope_axes_dim": (4, 6, 6),
    }


def hunyuan_video(num_layers: int = 1, num_single_layers: int = 1, text_len: int = 9, valid_text: int = 6) -> TinyModel:
    """HunyuanVideoTransformer3DModel: joint attention over [video, text] (text last) with a key-padding mask for the
    padded text; a token refiner runs text-only self-attention with a full (B, 1, T, T) mask."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**hunyuan_video_config(num_layers, num_single_layers))

    def make_inputs(frames: int = 3, height: int = 8, width: int = 12, batch: int = 1, seed: int = 0) -> dict:
        g = _generator(seed)
        mask = torch.zeros(batch, text_len, dtype=torch.long)
        mask[:, :valid_text] = 1
        return {
            "hidden_states": _randn(g, batch, 4, frames, height, width),
            "timestep": _timestep(batch),
            "encoder_hidden_states": _randn(g, batch, text_len, TEXT_DIM),
            "encoder_attention_mask": mask,
            "pooled_projections": _randn(g, batch, 16),
            "guidance": torch.full((batch,), 3500.0),
            "return_dict": False,
        }

    return TinyModel(finish(model), make_inputs, (1, 2, 2), text_len, False)


# HunyuanVideo 1.5's text tokens: the Qwen text, the ByT5 glyph text and the image tokens, joined after the video.
HV15_TEXT, HV15_TEXT_2, HV15_IMAGE = 6, 3, 2


def hunyuan_video_15(num_layers: int = 2, valid_text: int = 4, valid_text_2: int = 2) -> TinyModel:
    """HunyuanVideo15Transformer3DModel: joint attention over [video, text] (text last) whose mask is (B, 1, S, S),
    built as key-valid AND query-valid from the padded text; a token refiner runs text-only attention."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=num_layers,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=TEXT_DIM,
        text_embed_2_dim=TEXT_DIM,
        image_embed_dim=TEXT_DIM,
        rope_axes_dim=(4, 6, 6),
    )

    def make_inputs(frames: int = 3, height: int = 8, width: int = 12, batch: int = 1, seed: int = 0) -> dict:
        g = _generator(seed)
        mask = torch.zeros(batch, HV15_TEXT, dtype=torch.long)
        mask[:, :valid_text] = 1
        mask_2 = torch.zeros(batch, HV15_TEXT_2, dtype=torch.long)
        mask_2[:, :valid_text_2] = 1
        return {
            "hidden_states": _randn(g, batch, 4, frames, height, width),
            # A float timestep: HunyuanVideo 1.5 casts its timestep embedding to the timestep's dtype.
            "timestep": torch.full((batch,), 500.0),
            "encoder_hidden_states": _randn(g, batch, HV15_TEXT, TEXT_DIM),
            "encoder_attention_mask": mask,
            "encoder_hidden_states_2": _randn(g, batch, HV15_TEXT_2, TEXT_DIM),
            "encoder_attention_mask_2": mask_2,
            # All-zero image embeddings: text-to-video, whose image tokens are padding.
            "image_embeds": torch.zeros(batch, HV15_IMAGE, TEXT_DIM),
            "return_dict": False,
        }

    return TinyModel(finish(model), make_inputs, (1, 2, 2), HV15_TEXT + HV15_TEXT_2 + HV15_IMAGE, False)


def cogvideox(num_layers: int = 2, text_len: int = 8, patch_size_t: int | None = None) -> TinyModel:
    """CogVideoXTransformer3DModel with rotary embeddings: joint attention over [text, video] (text first). Without
    `patch_size_t` the patch embedding is a conv2d over batch*frames (CogVideoX 1.0); with it, a reshape and a linear
    projection (CogVideoX 1.5)."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=TEXT_DIM,
        num_layers=num_layers,
        sample_width=12,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        patch_size_t=patch_size_t,
        max_text_seq_length=text_len,
        use_rotary_positional_embeddings=True,
    )
    patch_t = patch_size_t or 1

    def make_inputs(frames: int = 3, height: int = 8, width: int = 12, batch: int = 1, seed: int = 0) -> dict:
        g = _generator(seed)
        grid = (frames // patch_t, height // 2, width // 2)
        freqs_cos, freqs_sin = get_3d_rotary_pos_embed(
            embed_dim=HEAD_DIM,
            crops_coords=None,
            grid_size=grid[1:],
            temporal_size=grid[0],
            grid_type="slice",
            max_size=grid[1:],
        )
        return {
            "hidden_states": _randn(g, batch, frames, 4, height, width),
            "encoder_hidden_states": _randn(g, batch, text_len, TEXT_DIM),
            "timestep": _timestep(batch),
            # Fresh tensors: views would make Dynamo guard on the strides of their bases.
            "image_rotary_emb": (freqs_cos.clone(), freqs_sin.clone()),
            "return_dict": False,
        }

    return TinyModel(finish(model), make_inputs, (patch_t, 2, 2), text_len, True)


def ltx_video(num_layers: int = 2, text_len: int = 7) -> TinyModel:
    """LTXVideoTransformer3DModel: the latents come in already packed as (B, S, C) tokens, so no tensor in the graph
    has the video grid's shape except the rotary embedding's coordinate grid; self-attention over video only, and
    cross-attention to text with a padding mask."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        cross_attention_dim=HEADS * HEAD_DIM,
        num_layers=num_layers,
        caption_channels=TEXT_DIM,
    )

    def make_inputs(frames: int = 3, height: int = 4, width: int = 6, batch: int = 1, seed: int = 0) -> dict:
        g = _generator(seed)
        mask = torch.ones(batch, text_len, dtype=torch.long)
        mask[:, -2:] = 0
        return {
            "hidden_states": _randn(g, batch, frames * height * width, 4),
            "encoder_hidden_states": _randn(g, batch, text_len, TEXT_DIM),
            "timestep": _timestep(batch),
            "encoder_attention_mask": mask,
            "num_frames": frames,
            "height": height,
            "width": width,
            "return_dict": False,
        }

    return TinyModel(finish(model), make_inputs, (1, 1, 1))


def allegro(num_layers: int = 2, text_len: int = 7) -> TinyModel:
    """AllegroTransformer3DModel: a per-frame 2-D patch embedding, video self-attention and cross-attention to text."""
    from diffusers import AllegroTransformer3DModel

    torch.manual_seed(0)
    model = AllegroTransformer3DModel(
        patch_size=2,
        patch_size_t=1,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        cross_attention_dim=HEADS * HEAD_DIM,
        sample_height=8,
        sample_width=12,
        sample_frames=3,
        caption_channels=TEXT_DIM,
    )

    def make_inputs(frames: int = 3, height: int = 8, width: int = 12, batch: int = 1, seed: int = 0) -> dict:
        g = _generator(seed)
        return {
            "hidden_states": _randn(g, batch, 4, frames, height, width),
            "encoder_hidden_states": _randn(g, batch, text_len, TEXT_DIM),
            "timestep": _timestep(batch),
            "return_dict": False,
        }

    return TinyModel(finish(model), make_inputs, (1, 2, 2))


def easyanimate(num_layers: int = 2, text_len: int = 7) -> TinyModel:
    """EasyAnimateTransformer3DModel: a per-frame 2-D patch embedding and joint attention over [text, video]."""
    from diffusers import EasyAnimateTransformer3DModel

    torch.manual_seed(0)
    model = EasyAnimateTransformer3DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=4,
        patch_size=2,
        sample_width=12,
        sample_height=8,
        num_layers=num_layers,
        mmdit_layers=num_layers,
        time_embed_dim=16,
        text_embed_dim=TEXT_DIM,
    )

    def make_inputs(frames: int = 3, height: int = 8, width: int = 12, batch: int = 1, seed: int = 0) -> dict:
        g = _generator(seed)
        return {
            "hidden_states": _randn(g, batch, 4, frames, height, width),
            "timestep": _timestep(batch),
            "encoder_hidden_states": _randn(g, batch, text_len, TEXT_DIM),
            "return_dict": False,
        }

    return TinyModel(finish(model), make_inputs, (1, 2, 2), text_len, True)


def cosmos(num_layers: int = 2, text_len: int = 7) -> TinyModel:
    """CosmosTransformer3DModel: a linear patch embedding of a channels-last 5-D tensor, video self-attention and
    cross-attention to text."""
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(0)
    model = CosmosTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=num_layers,
        mlp_ratio=2.0,
        text_embed_dim=TEXT_DIM,
        adaln_lora_dim=8,
        max_size=(8, 16, 16),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 1.0, 1.0),
        # The padding-mask channel is resized with torchvision, which the tests do not need.
        concat_padding_mask=False,
        extra_pos_embed_type="learnable",
    )

    def make_inputs(frames: int = 3, height: int = 8, width: int = 12, batch: int = 1, seed: int = 0) -> dict:
        g = _generator(seed)
        return {
            "hidden_states": _randn(g, batch, 4, frames, height, width),
            "timestep": _timestep(batch),
            "encoder_hidden_states": _randn(g, batch, text_len, TEXT_DIM),
            "return_dict": False,
        }

    return TinyModel(finish(model), make_inputs, (1, 2, 2))


def kandinsky5(num_visual_blocks: int = 2, text_len: int = 7) -> TinyModel:
    """Kandinsky5Transformer3DModel: channels-last latents, a text encoder of its own (text-only self-attention), and
    decoder blocks with video self-attention and cross-attention to the text."""
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(0)
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=4,
        in_text_dim=TEXT_DIM,
        in_text_dim2=16,
        time_dim=16,
        out_visual_dim=4,
        patch_size=(1, 2, 2),
        model_dim=HEADS * HEAD_DIM,
        ff_dim=64,
        num_text_blocks=1,
        num_visual_blocks=num_visual_blocks,
        axes_dims=(4, 6, 6),
    )

    def make_inputs(frames: int = 3, height: int = 8, width: int = 12, batch: int = 1, seed: int = 0) -> dict:
        g = _generator(seed)
        return {
            "hidden_states": _randn(g, batch, frames, height, width, 4),
            "encoder_hidden_states": _randn(g, batch, text_len, TEXT_DIM),
            "timestep": torch.full((batch,), 0.5),
            "pooled_projections": _randn(g, batch, 16),
            "visual_rope_pos": (torch.arange(frames), torch.arange(height // 2), torch.arange(width // 2)),
            "text_rope_pos": torch.arange(text_len),
            "return_dict": False,
        }

    return TinyModel(finish(model), make_inputs, (1, 2, 2))


def sana_video(num_layers: int = 2, text_len: int = 7) -> TinyModel:
    """SanaVideoTransformer3DModel: linear attention over the video (no SDPA) and SDPA cross-attention to text."""
    from diffusers import SanaVideoTransformer3DModel

    torch.manual_seed(0)
    model = SanaVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=num_layers,
        num_cross_attention_heads=HEADS,
        cross_attention_head_dim=HEAD_DIM,
        cross_attention_dim=HEADS * HEAD_DIM,
        caption_channels=TEXT_DIM,
        sample_size=8,
        patch_size=(1, 2, 2),
        rope_max_seq_len=64,
    )

    def make_inputs(frames: int = 3, height: int = 8, width: int = 12, batch: int = 1, seed: int = 0) -> dict:
        g = _generator(seed)
        return {
            "hidden_states": _randn(g, batch, 4, frames, height, width),
            "encoder_hidden_states": _randn(g, batch, text_len, TEXT_DIM),
            "timestep": _timestep(batch),
            "return_dict": False,
        }

    return TinyModel(finish(model), make_inputs, (1, 2, 2))


def mochi(num_layers: int = 1, text_len: int = 7) -> TinyModel:
    """MochiTransformer3DModel: joint attention over the video and each sample's valid text tokens, computed one
    sample at a time (its attention processor selects the valid tokens with `torch.nonzero` in a per-sample loop, so
    a whole-model compile needs `torch._dynamo.config.capture_dynamic_output_shape_ops = True`)."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    model = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=HEADS,
        attention_head_dim=48,  # Mochi's rotary embedding splits the head dim in three
        num_layers=num_layers,
        pooled_projection_dim=TEXT_DIM,
        in_channels=4,
        text_embed_dim=TEXT_DIM,
        time_embed_dim=TEXT_DIM,
        max_sequence_length=16,
    )

    def make_inputs(frames: int = 3, height: int = 8, width: int = 12, batch: int = 1, seed: int = 0) -> dict:
        g = _generator(seed)
        return {
            "hidden_states": _randn(g, batch, 4, frames, height, width),
            "encoder_hidden_states": _randn(g, batch, text_len, TEXT_DIM),
            "timestep": _timestep(batch),
            "encoder_attention_mask": torch.ones(batch, text_len, dtype=torch.long),
            "return_dict": False,
        }

    return TinyModel(finish(model), make_inputs, (1, 2, 2), text_len, False)


BUILDERS: dict[str, Callable[..., TinyModel]] = {
    "wan": wan,
    "skyreels_v2": skyreels_v2,
    "wan_vace": wan_vace,
    "hunyuan_video": hunyuan_video,
    "hunyuan_video_15": hunyuan_video_15,
    "cogvideox": cogvideox,
    "ltx_video": ltx_video,
    "allegro": allegro,
    "easyanimate": easyanimate,
    "cosmos": cosmos,
    "kandinsky5": kandinsky5,
    "sana_video": sana_video,
    "mochi": mochi,
}
