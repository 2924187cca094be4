"""Token order and blocking: the generalized 3-D Hilbert curve and the canonical block layout of one attention call.

Everything here depends only on the latent grid, the text span and the block size, so it is computed once on the host
and cached (per device for the tensors). The *canonical layout* is the order in which every stage after the reorder
works: the video tokens in curve order, padded with empty rows to a whole number of blocks, then the text tokens,
padded likewise. `TokenLayout.source_index[p]` is the original sequence position of canonical row `p` (-1 for a padding
row): gathering with it is the reorder, scattering with it is the inverse reorder. Text is always placed after the
video in the canonical layout, whether it came first or last in the original sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Iterator

import torch

__all__ = [
    "TokenLayout",
    "hilbert_curve_3d",
    "hilbert_permutation",
    "inverse_permutation",
    "neighbor_block_mask",
    "token_layout",
]


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


Vector = tuple[int, int, int]


def _vector(values: Iterable[int]) -> Vector:
    x, y, z = values
    return (x, y, z)


def _walk(x: int, y: int, z: int, a: Vector, b: Vector, c: Vector) -> Iterator[Vector]:
    """Cover the box spanned at (x, y, z) by the axis vectors a, b, c, entering at its origin corner and leaving at
    the corner reached along `a`; the traversal halves the box and recurses (Cerveny's generalized Hilbert scheme)."""
    width, height, depth = abs(sum(a)), abs(sum(b)), abs(sum(c))
    step_a = _vector(_sign(v) for v in a)
    step_b = _vector(_sign(v) for v in b)
    step_c = _vector(_sign(v) for v in c)

    # Degenerate boxes are straight lines.
    if height == 1 and depth == 1:
        for i in range(width):
            yield (x + i * step_a[0], y + i * step_a[1], z + i * step_a[2])
        return
    if width == 1 and depth == 1:
        for i in range(height):
            yield (x + i * step_b[0], y + i * step_b[1], z + i * step_b[2])
        return
    if width == 1 and height == 1:
        for i in range(depth):
            yield (x + i * step_c[0], y + i * step_c[1], z + i * step_c[2])
        return

    def half(vector: Vector, step: Vector, length: int) -> Vector:
        halved = _vector(v // 2 for v in vector)
        # An odd half-length would end the sub-curve on the wrong corner; move the split by one step.
        if abs(sum(halved)) % 2 and length > 2:
            halved = _vector(h + s for h, s in zip(halved, step))
        return halved

    a2, b2, c2 = half(a, step_a, width), half(b, step_b, height), half(c, step_c, depth)

    def add(*vectors: Vector) -> Vector:
        return _vector(sum(parts) for parts in zip(*vectors))

    def sub(u: Vector, v: Vector) -> Vector:
        return _vector(p - q for p, q in zip(u, v))

    def neg(u: Vector) -> Vector:
        return _vector(-p for p in u)

    origin = (x, y, z)
    if 2 * width > 3 * height and 2 * width > 3 * depth:
        # Long along a: split it in two.
        yield from _walk(*origin, a2, b, c)
        yield from _walk(*add(origin, a2), sub(a, a2), b, c)
    elif 3 * height > 4 * depth:
        # Flat in c: split a and b only.
        yield from _walk(*origin, b2, c, a2)
        yield from _walk(*add(origin, b2), a, sub(b, b2), c)
        yield from _walk(*add(origin, sub(a, step_a), sub(b2, step_b)), neg(b2), c, neg(sub(a, a2)))
    elif 3 * depth > 4 * height:
        # Flat in b: split a and c only.
        yield from _walk(*origin, c2, a2, b)
        yield from _walk(*add(origin, c2), a, b, sub(c, c2))
        yield from _walk(*add(origin, sub(a, step_a), sub(c2, step_c)), neg(c2), neg(sub(a, a2)), b)
    else:
        # Split all three axes: five sub-boxes.
        yield from _walk(*origin, b2, c2, a2)
        yield from _walk(*add(origin, b2), c, a2, sub(b, b2))
        yield from _walk(*add(origin, sub(b2, step_b), sub(c, step_c)), a, neg(b2), neg(sub(c, c2)))
        yield from _walk(*add(origin, sub(a, step_a), b2, sub(c, step_c)), neg(c), neg(sub(a, a2)), sub(b, b2))
        yield from _walk(*add(origin, sub(a, step_a), sub(b2, step_b)), neg(b2), c2, neg(sub(a, a2)))


def hilbert_curve_3d(frames: int, height: int, width: int) -> list[tuple[int, int, int]]:
    """The (t, y, x) cells of a `frames x height x width` grid in generalized Hilbert order (any sizes)."""
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"hilbert_curve_3d: {name}={value!r}, expected a positive int")
    # The curve runs along its longest axis first; map the walk's (x, y, z) back to (t, y, x).
    sizes = {"x": width, "y": height, "t": frames}
    axes = sorted(sizes, key=lambda k: -sizes[k])
    vectors = []
    for k in range(3):
        v = [0, 0, 0]
        v[k] = sizes[axes[k]]
        vectors.append(_vector(v))
    cells = []
    for point in _walk(0, 0, 0, vectors[0], vectors[1], vectors[2]):
        coord = dict(zip(axes, point))
        cells.append((coord["t"], coord["y"], coord["x"]))
    return cells


@functools.lru_cache(maxsize=64)
def _hilbert_permutation_cached(frames: int, height: int, width: int) -> torch.Tensor:
    cells = torch.tensor(hilbert_curve_3d(frames, height, width), dtype=torch.int64)
    perm = (cells[:, 0] * height + cells[:, 1]) * width + cells[:, 2]
    return perm


def hilbert_permutation(video_grid: tuple[int, int, int], order: str = "hilbert") -> torch.Tensor:
    """`perm[new] = old`: the raster index (t*H + y)*W + x of the video token at curve position `new` (int64, CPU).

    `order="none"` gives the identity (raster order).
    """
    frames, height, width = _check_grid(video_grid)
    if order == "none":
        return torch.arange(frames * height * width, dtype=torch.int64)
    if order != "hilbert":
        raise ValueError(f"order={order!r}: expected 'hilbert' or 'none'")
    return _hilbert_permutation_cached(frames, height, width).clone()


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """`inv[old] = new` for a permutation `perm[new] = old`."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inv


def _check_grid(video_grid: object) -> tuple[int, int, int]:
    if (
        not isinstance(video_grid, (tuple, list))
        or len(video_grid) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in video_grid)
    ):
        raise ValueError(f"video_grid={video_grid!r}: expected three positive ints (frames, height, width)")
    return _vector(video_grid)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenLayout:
    """The canonical block layout of one attention call (see the module docstring). Host-side, cached per key.

    Attributes:
        video_grid: (frames, height, width); `num_video = F*H*W`.
        num_text: text tokens; `text_first` says where they sit in the original sequence.
        block_size: tokens per block.
        num_video_blocks: `ceil(num_video / block_size)`; the last one may be partial.
        num_text_blocks: `ceil(num_text / block_size)`.
        video_perm: int64 [num_video], `video_perm[new] = old` raster index.
        source_index: int64 [num_blocks * block_size], original sequence position of each canonical row, -1 if empty.
        row_count: int64 [num_blocks], the number of real (non-padding) rows of each block.
    """

    video_grid: tuple[int, int, int]
    num_text: int
    text_first: bool
    block_size: int
    reorder: str
    video_perm: torch.Tensor
    source_index: torch.Tensor
    row_count: torch.Tensor

    @property
    def num_video(self) -> int:
        return math.prod(self.video_grid)

    @property
    def seq_len(self) -> int:
        return self.num_video + self.num_text

    @property
    def num_video_blocks(self) -> int:
        return -(-self.num_video // self.block_size)

    @property
    def num_text_blocks(self) -> int:
        return -(-self.num_text // self.block_size)

    @property
    def num_blocks(self) -> int:
        return self.num_video_blocks + self.num_text_blocks

    @property
    def padded_len(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def text_offset(self) -> int:
        """First canonical row of the text tokens."""
        return self.num_video_blocks * self.block_size

    def to(self, device: torch.device | str) -> TokenLayout:
        """The same layout with its index tensors on `device` (cached per device)."""
        return _layout_on_device(self, torch.device(device))


@functools.lru_cache(maxsize=128)
def _layout_on_device(layout: TokenLayout, device: torch.device) -> TokenLayout:
    if layout.source_index.device == device:
        return layout
    return dataclasses.replace(
        layout,
        video_perm=layout.video_perm.to(device),
        source_index=layout.source_index.to(device),
        row_count=layout.row_count.to(device),
    )


@functools.lru_cache(maxsize=128)
def token_layout(
    video_grid: tuple[int, int, int],
    text_len: int = 0,
    text_first: bool = False,
    block_size: int = 128,
    reorder: str = "hilbert",
) -> TokenLayout:
    """Build (and cache) the canonical layout for a grid, a text span and a block size. Tensors live on the CPU."""
    grid = _check_grid(tuple(video_grid))
    if not isinstance(text_len, int) or isinstance(text_len, bool) or text_len < 0:
        raise ValueError(f"text_len={text_len!r}: expected an int >= 0")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: expected a positive int")
    perm = hilbert_permutation(grid, reorder)
    num_video = perm.numel()
    num_video_blocks = -(-num_video // block_size)
    num_text_blocks = -(-text_len // block_size)
    video_offset = text_len if text_first else 0
    text_start = 0 if text_first else num_video

    source = torch.full(((num_video_blocks + num_text_blocks) * block_size,), -1, dtype=torch.int64)
    source[:num_video] = perm + video_offset
    text_offset = num_video_blocks * block_size
    source[text_offset : text_offset + text_len] = torch.arange(text_start, text_start + text_len, dtype=torch.int64)
    row_count = (source.view(-1, block_size) >= 0).sum(dim=1)
    return TokenLayout(
        video_grid=grid,
        num_text=text_len,
        text_first=text_first,
        block_size=block_size,
        reorder=reorder,
        video_perm=perm,
        source_index=source,
        row_count=row_count,
    )


@functools.lru_cache(maxsize=32)
def _neighbor_block_mask_cpu(layout: TokenLayout) -> torch.Tensor:
    frames, height, width = layout.video_grid
    num_video_blocks = layout.num_video_blocks
    block_of_token = torch.empty(layout.num_video, dtype=torch.int64)
    block_of_token[layout.video_perm] = torch.arange(layout.num_video) // layout.block_size
    grid_blocks = block_of_token.view(frames, height, width)
    mask = torch.zeros(num_video_blocks, num_video_blocks, dtype=torch.bool)
    # Each of the 27 offsets (self included) pairs a token's block with its neighbour's block.
    for dt in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                src = grid_blocks[
                    max(0, -dt) : frames - max(0, dt),
                    max(0, -dy) : height - max(0, dy),
                    max(0, -dx) : width - max(0, dx),
                ]
                dst = grid_blocks[
                    max(0, dt) : frames + min(0, dt),
                    max(0, dy) : height + min(0, dy),
                    max(0, dx) : width + min(0, dx),
                ]
                mask[src.reshape(-1), dst.reshape(-1)] = True
    return mask


def neighbor_block_mask(layout: TokenLayout) -> torch.Tensor:
    """bool [num_video_blocks, num_video_blocks]: key block j holds a 26-neighbour of some token of query block i
    (the diagonal included). Depends only on the grid; shared by all heads."""
    return _neighbor_block_mask_cpu(layout)
