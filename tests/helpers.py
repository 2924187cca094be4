"""Helpers shared by the tests: the test settings, compiling with the spattn backend, and the eager
expectation of a compiled model (`SparseSDPA`, `compare_with_eager`). The models come from `spattn_compile.testing.zoo`
(diffusers classes) and, for the pass's unit tests, `TinyVideoAttention` here; `families.py` holds the table of model
families every backend test runs over. `conftest.py` resets Dynamo and the schedule around every test."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

import spattn_compile
from spattn_compile.testing import relative_error
from spattn_compile.testing.zoo import HEAD_DIM, HEADS, TinyModel, finish

# Settings that make the tiny models' sequences span several blocks: every test compiles with these.
SETTINGS = {"block_size": 16, "min_seq_len": 0}




def reset_dynamo() -> None:
    """Forget every compiled graph and zero Dynamo's counters (`torch._dynamo.reset()` keeps the counters), every
    model's schedule state and report records, and the hooks the backend put on models."""
    from torch._dynamo.utils import counters

    from spattn_compile.runtime.binding import reset_schedule

    torch._dynamo.reset()
    counters.clear()
    reset_schedule()
    spattn_compile.reset_report()


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process since the last `reset_dynamo()`."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_spattn(model: Callable, *, dynamic: bool | None = None, compiler: str = "eager", **options) -> Callable:
    """`torch.compile(model, backend="spattn")` with the test settings (and `options` on top)."""
    return torch.compile(
        model, backend="spattn", dynamic=dynamic, options={"compiler": compiler, **SETTINGS, **options}
    )


def compile_blocks(model: torch.nn.Module, compiler: str = "eager", **options) -> torch.nn.Module:
    """`model.compile_repeated_blocks(backend="spattn")` (diffusers' regional compilation) with the test settings."""
    model.compile_repeated_blocks(backend="spattn", options={"compiler": compiler, **SETTINGS, **options})
    return model


def explain_model(model: Callable, inputs: dict, **overrides) -> spattn_compile.ExplainReport:
    """`spattn_compile.explain` of a model under the test settings."""
    with torch.no_grad(), spattn_compile.config(**{**SETTINGS, **overrides}):
        return spattn_compile.explain(model, **inputs)


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
            lambda q, k, v, mask: F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask)
        )
        self.patch = torch.nn.Conv3d(4, width, (1, 2, 2), stride=(1, 2, 2)) if patch_embed else None
        self.tokens = None if patch_embed else torch.nn.Linear(4, width)
        self.text = torch.nn.Linear(8, width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, 4)
        finish(self)

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
    g = torch.Generator().manual_seed(seed)
    if packed:
        video = torch.randn(batch, frames * (height // 2) * (width // 2), 4, generator=g)
    else:
        video = torch.randn(batch, 4, frames, height, width, generator=g)
    return video, torch.randn(batch, text_len, 8, generator=g)


def _padding_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """For a full (B, 1, S, S) boolean mask equal to valid[j] & valid[i], the (B, 1, S) vector `valid`; else None."""
    valid = mask.diagonal(dim1=-2, dim2=-1)
    if torch.equal(mask, valid[..., :, None] & valid[..., None, :]):
        return valid
    return None


class SparseSDPA:
    """Context manager: in eager mode, make `F.scaled_dot_product_attention` compute sparse attention (through
    `spattn_compile.sparse_attention` with the reference implementation and the active config) for self-attention
    calls of sequence length `video_grid` tokens + `text_len`, and plain SDPA for every other call. This is the
    expected output of a compiled model whose pass found exactly that grid and text span. A full (B, 1, S, S) mask
    built as key-valid AND query-valid counts as the key-padding mask of its valid rows, and its padded query rows get
    SDPA's output for a fully masked row. `sparse_calls` counts the calls that went sparse."""

    def __init__(self, video_grid: tuple[int, int, int], text_len: int = 0, text_first: bool = False) -> None:
        self.video_grid, self.text_len, self.text_first = tuple(video_grid), text_len, text_first
        self.sparse_calls = 0
        self._original: Callable | None = None

    def _attention(
        self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        seq_len = math.prod(self.video_grid) + self.text_len
        valid_rows = None
        if attn_mask is not None and attn_mask.dtype == torch.bool and attn_mask.dim() == 4:
            if attn_mask.shape[-2] == seq_len and attn_mask.shape[1] == 1:
                valid_rows = _padding_rows(attn_mask)
        key_padding = attn_mask is None or (attn_mask.dtype == torch.bool and attn_mask.shape[-2] == 1)
        joint_self_attention = (
            query.dim() == 4
            and query.shape == key.shape == value.shape
            and query.shape[2] == seq_len
            and dropout_p == 0.0
            and not is_causal
            and (key_padding or valid_rows is not None)
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
        mask = attn_mask if valid_rows is None else valid_rows[:, :, None, :]
        out = spattn_compile.sparse_attention(
            query,
            key,
            value,
            video_grid=self.video_grid,
            text_len=self.text_len,
            text_first=self.text_first,
            attn_mask=mask,
            scale=scale,
            impl="reference",
        )
        if valid_rows is None:
            return out
        fill = self._original(query[:, :, :1], key, value, attn_mask=torch.zeros_like(mask), scale=scale)
        return torch.where(valid_rows[..., None], out, fill)

    def __enter__(self) -> SparseSDPA:
        self._original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self._attention
        return self

    def __exit__(self, *exc: object) -> None:
        F.scaled_dot_product_attention = self._original


@dataclasses.dataclass
class Comparison:
    """Relative errors of a compiled model against eager runs of the same inputs (see `compare_with_eager`)."""

    dense_at_sparsity_0: float  # compiled at sparsity 0 vs the eager (dense) model
    reference_at_sparsity: float  # compiled at `sparsity` vs the eager model with the expected sparse attention
    dense_at_sparsity: float  # compiled at `sparsity` vs the eager (dense) model: the cost of sparsity
    sparse_calls: int  # attention calls the eager reference made sparse
    finite: bool


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def compare_with_eager(
    tiny: TinyModel,
    compiled: Callable,
    inputs: dict,
    grid: tuple[int, int, int],
    sparsity: float = 0.75,
    eager: Callable | None = None,
    **settings,
) -> Comparison:
    """Run `compiled` at sparsity 0 and at `sparsity` (changing only the run-time config) and compare it with the eager
    model (`eager`, by default `tiny.model`): dense, and with `SparseSDPA(grid, tiny.text_len, tiny.text_first)`
    standing in for the expected rewrite."""
    eager = tiny.model if eager is None else eager
    with torch.no_grad():
        dense = _first(eager(**inputs))
        with spattn_compile.config(**SETTINGS, **settings, sparsity=0.0):
            exact = _first(compiled(**inputs))
        with spattn_compile.config(**SETTINGS, **settings, sparsity=sparsity):
            with SparseSDPA(grid, tiny.text_len, tiny.text_first) as reference:
                expected = _first(eager(**inputs))
            sparse = _first(compiled(**inputs))
    return Comparison(
        dense_at_sparsity_0=relative_error(exact, dense),
        reference_at_sparsity=relative_error(sparse, expected),
        dense_at_sparsity=relative_error(sparse, dense),
        sparse_calls=reference.sparse_calls,
        finite=bool(torch.isfinite(sparse).all()),
    )


@contextlib.contextmanager
def capture_warnings(caplog) -> Iterator[list[str]]:
    """The messages of the WARNINGs the "spattn_compile" logger emits inside the block."""
    import logging

    messages: list[str] = []
    with caplog.at_level(logging.WARNING, logger="spattn_compile"):
        start = len(caplog.records)
        yield messages
        messages.extend(
            r.getMessage()
            for r in caplog.records[start:]
            if r.name == "spattn_compile" and r.levelno == logging.WARNING
        )
