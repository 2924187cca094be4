"""The model-family table every backend test runs over: one row per diffusers video-DiT family (built tiny by
`spattn_compile.testing.zoo`), with what the attention pass must decide for it.

`expected` lists every attention call of one forward in execution order, as (module path, decision): "sparse", or
the dense rule the pass must give (cross-attention, a text-only attention without a video grid, a mask that is not a
key-padding mask...). `grid` and `text_len` / `text_position` are the layout of the sparse calls at the family's
latent size `latent` (frames, height, width, before patching). `regional`: the family has `_repeated_blocks`, so
`compile_repeated_blocks` applies; otherwise `blocks` names the model's list of transformer blocks, which the tests
compile one by one (`block.compile(...)`, what `compile_repeated_blocks` does). `graph_breaks`: how many breaks a
whole-model compile has. `dynamo`: Dynamo settings the family needs (`torch._dynamo.config.patch(**dict(...))`).

`FAMILIES` is the table every backend test runs over; `NEEDS_DYNAMO_SETTINGS` holds the families that compile only
with a Dynamo setting (Mochi: `capture_dynamic_output_shape_ops`, see docs/COMPATIBILITY.md), run by the tests that
apply it (`tests/test_families_compile_modes.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from spattn_compile.testing import zoo


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], zoo.TinyModel]
    expected: tuple[tuple[str, str], ...]
    grid: tuple[int, int, int]
    text_len: int = 0
    text_position: str | None = None
    latent: tuple[int, int, int] = (3, 8, 12)
    regional: bool = False
    graph_breaks: int = 0
    blocks: str = "transformer_blocks"
    dynamo: tuple[tuple[str, object], ...] = ()

    @property
    def sparse_modules(self) -> tuple[str, ...]:
        return tuple(module for module, decision in self.expected if decision == "sparse")

    def __str__(self) -> str:
        return self.name


def _wan_like(prefix: str = "blocks", layers: int = 2) -> tuple[tuple[str, str], ...]:
    rows: list[tuple[str, str]] = []
    for i in range(layers):
        rows += [(f"{prefix}.{i}.attn1", "sparse"), (f"{prefix}.{i}.attn2", "cross_attention")]
    return tuple(rows)


FAMILIES = (
    Family("wan", zoo.wan, _wan_like(), (3, 4, 6), regional=True),
    Family("skyreels_v2", zoo.skyreels_v2, _wan_like(), (3, 4, 6), regional=True),
    Family(
        "wan_vace",
        zoo.wan_vace,
        (("vace_blocks.0.attn1", "sparse"), ("vace_blocks.0.attn2", "cross_attention"), *_wan_like()),
        (3, 4, 6),
        regional=True,
    ),
    Family(
        "hunyuan_video",
        zoo.hunyuan_video,
        (
            ("context_embedder.token_refiner.refiner_blocks.0.attn", "mask"),
            ("transformer_blocks.0.attn", "sparse"),
            ("single_transformer_blocks.0.attn", "sparse"),
        ),
        (3, 4, 6),
        text_len=9,
        text_position="last",
        regional=True,
    ),
    Family(
        "hunyuan_video_15",
        zoo.hunyuan_video_15,
        (
            ("context_embedder.token_refiner.refiner_blocks.0.attn", "mask"),
            ("transformer_blocks.0.attn", "sparse"),
            ("transformer_blocks.1.attn", "sparse"),
        ),
        (3, 4, 6),
        text_len=zoo.HV15_TEXT + zoo.HV15_TEXT_2 + zoo.HV15_IMAGE,
        text_position="last",
        regional=True,
        # `if is_t2v:` on a tensor: the blocks after the break are compiled on their own, as in regional compilation.
        graph_breaks=1,
    ),
    Family(
        "cogvideox",
        zoo.cogvideox,
        (("transformer_blocks.0.attn1", "sparse"), ("transformer_blocks.1.attn1", "sparse")),
        (3, 4, 6),
        text_len=8,
        text_position="first",
    ),
    Family(
        "cogvideox_15",
        lambda: zoo.cogvideox(patch_size_t=2),
        (("transformer_blocks.0.attn1", "sparse"), ("transformer_blocks.1.attn1", "sparse")),
        (2, 4, 6),
        text_len=8,
        text_position="first",
        latent=(4, 8, 12),
    ),
    Family("ltx_video", zoo.ltx_video, _wan_like("transformer_blocks"), (3, 4, 6), latent=(3, 4, 6), regional=True),
    Family("allegro", zoo.allegro, _wan_like("transformer_blocks"), (3, 4, 6)),
    Family(
        "easyanimate",
        zoo.easyanimate,
        (("transformer_blocks.0.attn1", "sparse"), ("transformer_blocks.1.attn1", "sparse")),
        (3, 4, 6),
        text_len=7,
        text_position="first",
    ),
    Family("cosmos", zoo.cosmos, _wan_like("transformer_blocks"), (3, 4, 6)),
    Family(
        "kandinsky5",
        zoo.kandinsky5,
        (
            ("text_transformer_blocks.0.self_attention", "no_grid"),
            ("visual_transformer_blocks.0.self_attention", "sparse"),
            ("visual_transformer_blocks.0.cross_attention", "cross_attention"),
            ("visual_transformer_blocks.1.self_attention", "sparse"),
            ("visual_transformer_blocks.1.cross_attention", "cross_attention"),
        ),
        (3, 4, 6),
        regional=True,
    ),
    # Linear attention over the video (not SDPA): only the cross-attention is SDPA, so nothing becomes sparse.
    Family(
        "sana_video",
        zoo.sana_video,
        (("transformer_blocks.0.attn2", "cross_attention"), ("transformer_blocks.1.attn2", "cross_attention")),
        (3, 4, 6),
    ),
)



NEEDS_DYNAMO_SETTINGS = (
    Family(
        "mochi",
        zoo.mochi,
        # The time embedding's attention pooler (one query) is cross-attention; the joint attention runs once per
        # sample: twice for the batch of 2 its tests run.
        (
            ("time_embed.pooler", "cross_attention"),
            ("transformer_blocks.0.attn1", "sparse"),
            ("transformer_blocks.0.attn1", "sparse"),
        ),
        (3, 4, 6),
        text_len=7,
        text_position="last",
        dynamo=(("capture_dynamic_output_shape_ops", True),),
    ),
)

BY_NAME = {family.name: family for family in (*FAMILIES, *NEEDS_DYNAMO_SETTINGS)}


def families(*, regional: bool | None = None, sparse: bool | None = None, every: bool = False) -> list:
    """pytest parameters over the table (filtered), with the family's name as the test id; `every`: with the families
    that need Dynamo settings."""
    pool = (*FAMILIES, *NEEDS_DYNAMO_SETTINGS) if every else FAMILIES
    selected = [
        family
        for family in pool
        if (regional is None or family.regional == regional)
        and (sparse is None or bool(family.sparse_modules) == sparse)
    ]
    return [pytest.param(family, id=family.name) for family in selected]
