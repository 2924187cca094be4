"""The generalized 3-D Hilbert order and the canonical block layout: bijection, step lengths (what the construction
promises in 2-D slabs and for even 3-D boxes, what we observe otherwise), block compactness, the layout's index
tensors, neighbour blocks and input errors."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spattn_compile.layout import (
    hilbert_curve_3d,
    hilbert_permutation,
    inverse_permutation,
    neighbor_block_mask,
    token_layout,
)

sizes = st.integers(min_value=1, max_value=13)
grids = st.tuples(sizes, sizes, sizes)


def curve_steps(grid: tuple[int, int, int]) -> torch.Tensor:
    """int64 `(N - 1, 3)`: |difference| of consecutive (t, y, x) cells along the curve."""
    cells = torch.tensor(hilbert_curve_3d(*grid), dtype=torch.int64).reshape(-1, 3)
    return (cells[1:] - cells[:-1]).abs()


def block_coordinates(grid: tuple[int, int, int], block_size: int, reorder: str) -> torch.Tensor:
    """float64 `(num_full_blocks, block_size, 3)`: (t, y, x) of the tokens of each full video block."""
    frames, height, width = grid
    perm = token_layout(grid, 0, False, block_size, reorder).video_perm
    coords = torch.stack([perm // (height * width), (perm // width) % height, perm % width], dim=-1)
    full = perm.numel() // block_size
    return coords[: full * block_size].reshape(full, block_size, 3).double()


# --------------------------------------------------------------------------------------------------------------------
# The curve
# --------------------------------------------------------------------------------------------------------------------


@given(grid=grids)
@settings(max_examples=150)
def test_curve_is_a_bijection_onto_the_grid(grid):
    cells = hilbert_curve_3d(*grid)
    assert len(cells) == math.prod(grid)
    assert set(cells) == set(itertools.product(*(range(n) for n in grid)))
    perm = hilbert_permutation(grid)
    assert perm.dtype == torch.int64
    assert torch.equal(perm.sort().values, torch.arange(math.prod(grid)))
    inverse = inverse_permutation(perm)
    assert torch.equal(perm[inverse], torch.arange(perm.numel()))
    assert torch.equal(inverse[perm], torch.arange(perm.numel()))


@pytest.mark.parametrize(
    "grid", [(1, 1, 1), (1, 1, 7), (1, 13, 17), (7, 1, 11), (5, 3, 1), (2, 3, 5), (1, 45, 80), (21, 30, 52)]
)
def test_permutation_maps_curve_cells_to_raster_indices(grid):
    frames, height, width = grid
    perm = hilbert_permutation(grid)
    for position, (t, y, x) in enumerate(hilbert_curve_3d(*grid)):
        if position % 97 == 0:  # a sample is enough; the bijection test covers the rest
            assert perm[position] == (t * height + y) * width + x


@given(a=st.integers(1, 40), b=st.integers(1, 40), flat_axis=st.sampled_from([0, 1, 2]))
@settings(max_examples=150)
def test_2d_slabs_step_to_face_neighbours(a, b, flat_axis):
    """A slab (one size 1) is Cerveny's 2-D curve: every step is to a face neighbour, except exactly one diagonal
    step when the long side is odd and the short side even. That step is forced: a path from a corner to the adjacent
    corner along the long side visits both ends on one colour of the checkerboard, impossible with unit steps when
    the cell count is even."""
    grid = [a, b]
    grid.insert(flat_axis, 1)
    if math.prod(grid) == 1:
        return
    steps = curve_steps(tuple(grid))
    manhattan = steps.sum(-1)
    long_side, short_side = max(a, b), min(a, b)
    diagonal_needed = long_side % 2 == 1 and short_side % 2 == 0
    assert int((manhattan != 1).sum()) == int(diagonal_needed)
    assert int(steps.amax()) == 1  # the one exception is a diagonal step, (1, 1) in the slab
    assert steps[:, flat_axis].eq(0).all()


@given(half=st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)))
@settings(max_examples=60)
def test_even_3d_boxes_step_to_face_neighbours(half):
    grid = tuple(2 * h for h in half)
    assert int(curve_steps(grid).sum(-1).amax()) == 1


@given(grid=st.tuples(st.integers(2, 14), st.integers(2, 14), st.integers(2, 14)))
@settings(max_examples=120)
def test_3d_steps_are_short(grid):
    """Odd 3-D sizes are outside what the construction promises; observed over every grid with sizes 2..16: steps of
    Manhattan length <= 4 and Chebyshev length <= 3, and at least 93% unit steps once the grid has 64 cells."""
    steps = curve_steps(grid)
    manhattan = steps.sum(-1)
    assert int(manhattan.amax()) <= 4
    assert int(steps.amax()) <= 3
    if math.prod(grid) >= 64:
        assert (manhattan == 1).double().mean() >= 0.93


@pytest.mark.parametrize("grid", [(21, 30, 52), (11, 48, 80)])
def test_real_model_grids_are_nearly_all_unit_steps(grid):
    steps = curve_steps(grid)
    manhattan = steps.sum(-1)
    assert int(manhattan.amax()) <= 2
    assert (manhattan == 1).double().mean() >= 0.99


def test_hilbert_blocks_are_compact_bricks():
    """On Wan 1.3B's 21 x 30 x 52 grid a 128-token raster block is a strip of 2-3 rows of 52 tokens; a Hilbert
    block is a brick of about 4 x 4 x 8 tokens. The bounding-box volume alone understates this (a strip is one
    frame thin), so the test also compares the longest side and the mean L1 distance between a block's tokens."""
    grid, block_size = (21, 30, 52), 128
    measures = {}
    for reorder in ("hilbert", "none"):
        coords = block_coordinates(grid, block_size, reorder)
        extent = coords.amax(1) - coords.amin(1) + 1
        measures[reorder] = {
            "volume": extent.prod(-1).mean().item(),
            "longest": extent.amax(-1).mean().item(),
            "spread": torch.cdist(coords, coords, p=1).mean().item(),
        }
    hilbert, raster = measures["hilbert"], measures["none"]
    assert hilbert["volume"] < 0.6 * raster["volume"]  # measured 216 vs 395
    assert hilbert["volume"] < 2 * block_size  # nearly a full brick
    assert hilbert["longest"] < raster["longest"] / 5  # measured 7.9 vs 52
    assert hilbert["spread"] < raster["spread"] / 3  # measured 5.5 vs 18.7


def test_raster_order_is_the_identity():
    assert torch.equal(hilbert_permutation((3, 4, 5), "none"), torch.arange(60))


def test_permutation_is_a_copy_of_the_cache():
    perm = hilbert_permutation((2, 3, 4))
    perm.zero_()
    assert hilbert_permutation((2, 3, 4)).unique().numel() == 24


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 2, 2), "frames=0"),
        ((2, -1, 2), "height=-1"),
        ((2, 2, 2.0), "width=2.0"),
        ((True, 2, 2), "frames=True"),
    ],
)
def test_curve_rejects_bad_sizes(args, message):
    with pytest.raises(ValueError, match=message):
        hilbert_curve_3d(*args)


@pytest.mark.parametrize("grid", [(2, 3), (2, 3, 0), (2, 3, 4.0), "234", None, (2, 3, 4, 5)])
def test_permutation_rejects_bad_grids(grid):
    with pytest.raises(ValueError, match="video_grid"):
        hilbert_permutation(grid)


def test_permutation_rejects_bad_order():
    with pytest.raises(ValueError, match="order='zorder'"):
        hilbert_permutation((2, 2, 2), "zorder")


# --------------------------------------------------------------------------------------------------------------------
# The canonical layout
# --------------------------------------------------------------------------------------------------------------------


@given(
    grid=st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9)),
    text_len=st.integers(0, 40),
    text_first=st.booleans(),
    block_size=st.sampled_from([1, 7, 16, 32, 64]),
    reorder=st.sampled_from(["hilbert", "none"]),
)
@settings(max_examples=150)
def test_layout_places_video_in_curve_order_then_text(grid, text_len, text_first, block_size, reorder):
    layout = token_layout(grid, text_len, text_first, block_size, reorder)
    num_video = math.prod(grid)
    nvb, ntb = -(-num_video // block_size), -(-text_len // block_size)
    assert (layout.num_video, layout.num_text, layout.seq_len) == (num_video, text_len, num_video + text_len)
    assert (layout.num_video_blocks, layout.num_text_blocks, layout.num_blocks) == (nvb, ntb, nvb + ntb)
    assert layout.padded_len == (nvb + ntb) * block_size == layout.source_index.numel()
    assert layout.text_offset == nvb * block_size

    source = layout.source_index
    video_start = text_len if text_first else 0
    text_start = 0 if text_first else num_video
    assert torch.equal(source[:num_video], hilbert_permutation(grid, reorder) + video_start)
    assert (source[num_video : layout.text_offset] == -1).all()
    text_rows = source[layout.text_offset : layout.text_offset + text_len]
    assert torch.equal(text_rows, torch.arange(text_start, text_start + text_len))
    assert (source[layout.text_offset + text_len :] == -1).all()
    # Every original position appears exactly once.
    assert torch.equal(source[source >= 0].sort().values, torch.arange(num_video + text_len))
    assert torch.equal(layout.row_count, (source.view(-1, block_size) >= 0).sum(-1))
    assert int(layout.row_count.sum()) == num_video + text_len


def test_layout_is_cached_and_moves_once_per_device():
    layout = token_layout((2, 3, 4), 5, True, 16)
    assert token_layout((2, 3, 4), 5, True, 16) is layout
    assert layout.to("cpu") is layout
    meta = layout.to("meta")
    assert meta is layout.to(torch.device("meta"))
    assert meta.source_index.device.type == "meta" and meta.video_perm.device.type == "meta"
    assert (meta.video_grid, meta.num_text, meta.block_size) == (layout.video_grid, 5, 16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"video_grid": (2, 0, 2)}, "video_grid"),
        ({"video_grid": (2, 2)}, "video_grid"),
        ({"text_len": -1}, "text_len=-1"),
        ({"text_len": 1.0}, "text_len=1.0"),
        ({"text_len": True}, "text_len=True"),
        ({"block_size": 0}, "block_size=0"),
        ({"block_size": 16.0}, "block_size=16.0"),
        ({"reorder": "zorder"}, "order='zorder'"),
    ],
)
def test_layout_rejects_bad_arguments(kwargs, message):
    arguments = {"video_grid": (2, 2, 2), "text_len": 0, "text_first": False, "block_size": 16, "reorder": "hilbert"}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        token_layout(**arguments)


@given(
    grid=st.tuples(st.integers(1, 5), st.integers(1, 7), st.integers(1, 7)),
    block_size=st.sampled_from([4, 8, 16, 32]),
    reorder=st.sampled_from(["hilbert", "none"]),
)
@settings(max_examples=60)
def test_neighbor_blocks_match_brute_force(grid, block_size, reorder):
    layout = token_layout(grid, 3, False, block_size, reorder)
    frames, height, width = grid
    block_of = {}
    for position, raster in enumerate(layout.video_perm.tolist()):
        block_of[(raster // (height * width), (raster // width) % height, raster % width)] = position // block_size
    expected = torch.zeros(layout.num_video_blocks, layout.num_video_blocks, dtype=torch.bool)
    for (t, y, x), block in block_of.items():
        for dt, dy, dx in itertools.product((-1, 0, 1), repeat=3):
            other = block_of.get((t + dt, y + dy, x + dx))
            if other is not None:
                expected[block, other] = True
    mask = neighbor_block_mask(layout)
    assert torch.equal(mask, expected)
    assert torch.equal(mask, mask.T) and mask.diagonal().all()
