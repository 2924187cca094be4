"""Tiny diffusers video transformers with random weights, and matching random inputs, for the backend tests.

Each builder returns `(model, make_inputs)`: the model in eval mode (float32, CPU, seeded) and a function
`make_inputs(frames, height, width, batch=1) -> dict` of keyword arguments for `model(**inputs)`, whose sizes are in
*latent* units before patching (the grid the attention sees is given by `patch_grid`). Nothing touches the hub. The
configs keep two attention heads of 16 dims and one or two layers, so that a CPU forward takes milliseconds and a
sequence of about a hundred tokens still spans several 16-token blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

HEADS = 2
HEAD_DIM = 16
TEXT_DIM = 32


@dataclasses.dataclass
class TinyModel:
    """A model, its input factory and what the pass should infer for it.

    patch: (t, h, w) patch sizes: the attention grid of latent size (F, H, W) is (F // t, H // h, W // w).
    text_len: text tokens in each joint attention (0 for video-only self-attention).
    text_first: where the text sits in the joint sequence.
    joint_attentions: how many SDPA calls the pass should rewrite.
    """

    model: torch.nn.Module
    make_inputs: Callable[..., dict]
    patch: tuple[int, int, int]
    text_len: int
    text_first: bool
    joint_attentions: int

    def patch_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        t, h, w = self.patch
        return (frames // t, height // h, width // w)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    model = model.eval().float()
    # diffusers zero-initialises some output projections; random weights everywhere keep every path alive, so an
    # attention error cannot hide behind a zero gate.
    generator = _seeded(1234)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def wan(num_layers: int = 2, text_len: int = 7) -> TinyModel:
    """WanTransformer3DModel: conv3d patch embedding, video-only self-attention plus cross-attention to text."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=4,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=num_layers,
        rope_max_seq_len=64,
    )

    def make_inputs(frames: int = 3, height: int = 8, width: int = 12, batch: int = 1, seed: int = 0) -> dict:
        g = _seeded(seed)
        return {
            "hidden_states": _randn(g, batch, 4, frames, height, width),
            "timestep": torch.full((batch,), 500, dtype=torch.long),
            "encoder_hidden_states": _randn(g, batch, text_len, TEXT_DIM),
            "return_dict": False,
        }

    return TinyModel(_finish(model), make_inputs, (1, 2, 2), 0, False, num_layers)


def hunyuan_video(num_layers: int = 1, num_single_layers: int = 1, text_len: int = 9, valid_text: int = 6) -> TinyModel:
    """HunyuanVideoTransformer3DModel: joint attention over [video, text] (text last) with a key-padding mask for the
    padded text; a token refiner runs text-only self-attention with a full (B, 1, T, T) mask."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=TEXT_DIM,
        pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6),
    )

    def make_inputs(frames: int = 3, height: int = 8, width: int = 12, batch: int = 1, seed: int = 0) -> dict:
        g = _seeded(seed)
        mask = torch.zeros(batch, text_len, dtype=torch.long)
        mask[:, :valid_text] = 1
        return {
            "hidden_states": _randn(g, batch, 4, frames, height, width),
            "timestep": torch.full((batch,), 500, dtype=torch.long),
            "encoder_hidden_states": _randn(g, batch, text_len, TEXT_DIM),
            "encoder_attention_mask": mask,
            "pooled_projections": _randn(g, batch, 16),
            "guidance": torch.full((batch,), 3500.0),
            "return_dict": False,
        }

    return TinyModel(_finish(model), make_inputs, (1, 2, 2), text_len, False, num_layers + num_single_layers)


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
        g = _seeded(seed)
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
            "timestep": torch.full((batch,), 500, dtype=torch.long),
            # Fresh tensors: views would make Dynamo guard on the strides of their bases.
            "image_rotary_emb": (freqs_cos.clone(), freqs_sin.clone()),
            "return_dict": False,
        }

    return TinyModel(_finish(model), make_inputs, (patch_t, 2, 2), text_len, True, num_layers)


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
        g = _seeded(seed)
        mask = torch.ones(batch, text_len, dtype=torch.long)
        mask[:, -2:] = 0
        return {
            "hidden_states": _randn(g, batch, frames * height * width, 4),
            "encoder_hidden_states": _randn(g, batch, text_len, TEXT_DIM),
            "timestep": torch.full((batch,), 500, dtype=torch.long),
            "encoder_attention_mask": mask,
            "num_frames": frames,
            "height": height,
            "width": width,
            "return_dict": False,
        }

    return TinyModel(_finish(model), make_inputs, (1, 1, 1), 0, False, num_layers)


class TinyVideoAttention(torch.nn.Module):
    """A hand-written joint-attention layer with the structure of a video DiT, to exercise every rule of the pass.

    forward(video (B, 4, F, H, W), text (B, T, 8), attn_mask=None) -> (B, S, 4): a conv3d patch embedding (patch
    1x2x2) flattened to video tokens, text tokens joined before or after them by `torch.cat`, one attention call whose
    form `attention(q, k, v, attn_mask)` the caller chooses (positional or keyword SDPA, a cross-attention, a causal
    or dropout variant...), then an output projection. With `patch_embed=False` the video enters as packed tokens
    (B, F*H*W, 4) through a linear layer, so no grid is visible in the graph.
    """

    def __init__(
        self,
        attention: Callable | None = None,
        *,
        text_first: bool = False,
        heads: int = HEADS,
        head_dim: int = HEAD_DIM,
        patch_embed: bool = True,
    ) -> None:
        super().__init__()
        width = heads * head_dim
        self.heads, self.head_dim, self.text_first = heads, head_dim, text_first
        self.attention = attention or (
            lambda q, k, v, mask: torch.nn.functional.scaled_dot_product_attention(
                query=q, key=k, value=v, attn_mask=mask
            )
        )
        self.patch = torch.nn.Conv3d(4, width, (1, 2, 2), stride=(1, 2, 2)) if patch_embed else None
        self.tokens = None if patch_embed else torch.nn.Linear(4, width)
        self.text = torch.nn.Linear(8, width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, 4)
        _finish(self)

    def forward(self, video: torch.Tensor, text: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.patch is not None:
            tokens = self.patch(video).flatten(2).transpose(1, 2)
        else:
            tokens = self.tokens(video)
        words = self.text(text)
        x = torch.cat([words, tokens] if self.text_first else [tokens, words], dim=1)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        out = self.attention(q, k, v, attn_mask)
        return self.out(out.transpose(1, 2).flatten(2))


def tiny_inputs(
    frames: int, height: int, width: int, text_len: int, batch: int = 1, seed: int = 0, packed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (video, text) for `TinyVideoAttention`; `height`, `width` in pixels (the grid is F x H/2 x W/2)."""
    g = _seeded(seed)
    if packed:
        video = _randn(g, batch, frames * (height // 2) * (width // 2), 4)
    else:
        video = _randn(g, batch, 4, frames, height, width)
    return video, _randn(g, batch, text_len, 8)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm()).item()


class SparseSDPA:
    """Context manager: in eager mode, make `F.scaled_dot_product_attention` compute sparse attention (through
    `spattn_compile.sparse_attention` with the reference implementation and the active config) for self-attention
    calls of sequence length `video_grid` tokens + `text_len`, and plain SDPA for every other call. This is the
    expected output of a compiled model whose pass found exactly that grid and text span. `sparse_calls` counts the
    calls that went sparse."""

    def __init__(self, video_grid: tuple[int, int, int], text_len: int = 0, text_first: bool = False) -> None:
        self.video_grid, self.text_len, self.text_first = tuple(video_grid), text_len, text_first
        self.sparse_calls = 0
        self._original = None

    def _attention(
        self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        import math

        import spattn_compile

        seq_len = math.prod(self.video_grid) + self.text_len
        joint_self_attention = (
            query.dim() == 4
            and query.shape == key.shape == value.shape
            and query.shape[2] == seq_len
            and dropout_p == 0.0
            and not is_causal
            and (attn_mask is None or (attn_mask.dtype == torch.bool and attn_mask.shape[-2] == 1))
        )
        if not joint_self_attention:
            return self._original(
                query,
                key,
                value,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        self.sparse_calls += 1
        return spattn_compile.sparse_attention(
            query,
            key,
            value,
            video_grid=self.video_grid,
            text_len=self.text_len,
            text_first=self.text_first,
            attn_mask=attn_mask,
            scale=scale,
            impl="reference",
        )

    def __enter__(self) -> SparseSDPA:
        self._original = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = self._attention
        return self

    def __exit__(self, *exc) -> None:
        torch.nn.functional.scaled_dot_product_attention = self._original


# Settings that make the tiny models' sequences span several blocks: every test compiles with these.
SETTINGS = {"block_size": 16, "tile_size": 16, "min_seq_len": 0}


def compile_spattn(model: Callable, *, dynamic: bool | None = None, compiler: str = "eager", **options) -> Callable:
    """`torch.compile(model, backend="spattn")` with the test settings (and `options` on top)."""
    return torch.compile(
        model, backend="spattn", dynamic=dynamic, options={"compiler": compiler, **SETTINGS, **options}
    )


def reset_dynamo() -> None:
    """Forget every compiled graph and zero Dynamo's counters (`torch._dynamo.reset()` keeps the counters), and the
    schedule state and report records tied to the forgotten graphs (their model keys are Dynamo frame ids, which a
    later compile may reuse)."""
    from torch._dynamo.utils import counters

    import spattn_compile
    from spattn_compile import schedule

    torch._dynamo.reset()
    counters.clear()
    schedule.reset_schedule()
    spattn_compile.reset_report()


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process since the last `reset_dynamo()`."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def explain_model(tiny: TinyModel, inputs: dict, **overrides):
    """`spattn_compile.explain` of a tiny model under the test settings."""
    import spattn_compile

    with torch.no_grad(), spattn_compile.config(**{**SETTINGS, **overrides}):
        return spattn_compile.explain(tiny.model, **inputs)


@dataclasses.dataclass
class Comparison:
    """Relative errors of a compiled model against eager runs of the same inputs (see `compare_with_eager`)."""

    dense_at_sparsity_0: float  # compiled at sparsity 0 vs the eager (dense) model
    reference_at_sparsity: float  # compiled at `sparsity` vs the eager model with the expected sparse attention
    dense_at_sparsity: float  # compiled at `sparsity` vs the eager (dense) model: the cost of sparsity
    sparse_calls: int  # attention calls the eager reference made sparse
    finite: bool


def compare_with_eager(
    tiny: TinyModel,
    compiled: Callable,
    inputs: dict,
    grid: tuple[int, int, int],
    sparsity: float = 0.75,
    **settings,
) -> Comparison:
    """Run `compiled` at sparsity 0 and at `sparsity` (changing only the run-time config) and compare it with the eager
    model: dense, and with `SparseSDPA(grid, tiny.text_len, tiny.text_first)` standing in for the expected rewrite."""
    import spattn_compile

    with torch.no_grad():
        dense = tiny.model(**inputs)[0]
        with spattn_compile.config(**SETTINGS, **settings, sparsity=0.0):
            exact = compiled(**inputs)[0]
        with spattn_compile.config(**SETTINGS, **settings, sparsity=sparsity):
            with SparseSDPA(grid, tiny.text_len, tiny.text_first) as reference:
                expected = tiny.model(**inputs)[0]
            sparse = compiled(**inputs)[0]
    return Comparison(
        dense_at_sparsity_0=relative_error(exact, dense),
        reference_at_sparsity=relative_error(sparse, expected),
        dense_at_sparsity=relative_error(sparse, dense),
        sparse_calls=reference.sparse_calls,
        finite=bool(torch.isfinite(sparse).all()),
    )
