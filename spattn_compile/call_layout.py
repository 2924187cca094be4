"""Which video grid and text span an attention call has: the one place where the graph's proof, the model's forward,
the user's arguments and the `video_grid` / `text_len` / `text_position` settings meet.

One set of rules, three callers:

- the compiler pass (`passes.attention`) proves a grid and a text span from the graph, or leaves the grid to run time,
  and asks `check_settings` whether a setting contradicts what it proved;
- the op (`runtime.op`) resolves every call with `resolve_call`: the grid the graph proves, else the `video_grid`
  setting, else the grid the model's forward recorded (a block of a regionally compiled model); a call whose graph
  shows no grid at all (packed tokens, `TEXT_UNPLACED`) takes only the `video_grid` setting in force when it runs;
- the public functions (`api.py`) take the user's grid and text span through `user_layout`.

The rules: a setting that agrees with what is known is accepted, one that contradicts it raises
`LayoutOverrideError` naming both (`check_settings`); the grid and the text fill the sequence exactly,
`F * H * W + text_len == S` (`fit_text`), where a text length of `TEXT_REST` means "the tokens the grid leaves". The
canonical block layout of a resolved call is `CallLayout.token_layout`.

A graph that shows no grid for a call (its video arrives as packed tokens) still hands the call to the op, with
`TEXT_UNPLACED`: the call runs sparse on a call where the `video_grid` setting is in force, its text is the tokens the
grid leaves, placed by the `text_position` setting (without one, the grid must fill the sequence), and a grid the
model's forward recorded must agree with the setting. The forward's grid alone is not taken for such a call: its token
count matching the call's proves nothing about which tokens are the video's.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from .config import SparseAttentionConfig
from .layout import TokenLayout, token_layout

__all__ = [
    "TEXT_REST",
    "TEXT_UNPLACED",
    "CallLayout",
    "LayoutOverrideError",
    "check_settings",
    "fit_text",
    "resolve_call",
    "user_layout",
]

# The text length of a call whose text is "every token that is not video" under the grid it runs with.
TEXT_REST = -1
# The text length of a call whose graph shows neither its grid nor its text: both come from the settings in force when
# it runs (module docstring).
TEXT_UNPLACED = -2


class LayoutOverrideError(ValueError):
    """A `video_grid` / `text_len` / `text_position` setting contradicts the layout of the attention call."""


@dataclasses.dataclass(frozen=True)
class CallLayout:
    """The token layout of one attention call: the video grid (frames, height, width) in raster order, and
    `text_len` text tokens before (`text_first`) or after the video."""

    video_grid: tuple[int, int, int]
    text_len: int
    text_first: bool

    def token_layout(self, block_size: int, reorder: str) -> TokenLayout:
        """The canonical block layout of the call (cached per layout)."""
        return token_layout(self.video_grid, self.text_len, self.text_first, block_size, reorder)


def _contradiction(what: str, given: object, known: object, source: str) -> LayoutOverrideError:
    return LayoutOverrideError(
        f"spattn: {what}={given!r} contradicts {source}, which gives {what}={known!r} for this attention call; remove "
        f"the {what} setting (the value {source} gives is used without it) or set it to {known!r}"
    )


def check_settings(
    config: SparseAttentionConfig,
    *,
    video_grid: tuple[int, int, int] | None = None,
    text_len: int | None = None,
    text_first: bool | None = None,
    source: str,
) -> None:
    """Raise LayoutOverrideError when a `video_grid`, `text_len` or `text_position` setting contradicts what `source`
    gives for the call (None: not known, not checked). The text position is checked unless the text is known to be
    empty."""
    if config.video_grid is not None and video_grid is not None and tuple(config.video_grid) != tuple(video_grid):
        raise _contradiction("video_grid", tuple(config.video_grid), tuple(video_grid), source)
    if config.text_len is not None and text_len is not None and config.text_len != text_len:
        raise _contradiction("text_len", config.text_len, text_len, source)
    if config.text_position is not None and text_first is not None and text_len != 0:
        position = "first" if text_first else "last"
        if position != config.text_position:
            raise _contradiction("text_position", config.text_position, position, source)


def fit_text(video_grid: tuple[int, int, int], text_len: int, seq_len: int) -> int | str:
    """The text length with which `video_grid` fills a sequence of `seq_len` tokens (`text_len`, or the rest for
    `TEXT_REST`), or why it does not fit."""
    grid, num_video = tuple(video_grid), math.prod(video_grid)
    if text_len == TEXT_REST:
        if num_video > seq_len:
            return f"video_grid {grid} holds {num_video} tokens, more than the sequence length {seq_len}"
        return seq_len - num_video
    if num_video + text_len != seq_len:
        return (
            f"video_grid {grid} holds {num_video} tokens; with text_len={text_len} that is {num_video + text_len}, "
            f"but the sequence length is {seq_len}"
        )
    return text_len


def resolve_call(
    seq_len: int,
    graph_grid: list[int],
    graph_text_len: int,
    text_first: bool,
    config: SparseAttentionConfig,
    forward_grid: tuple[int, int, int] | None = None,
    forward_note: str = "",
) -> CallLayout | str:
    """The layout of a call of the op (module docstring), or why it has none. `graph_grid`: the grid the graph proves,
    or `[]` to take it at run time; `graph_text_len`: the text span the graph proves, or `TEXT_REST`, or
    `TEXT_UNPLACED` (no grid in the graph: the settings give the layout);
    `forward_grid`: the grid the model's forward recorded (`forward_note`: why there is none)."""
    if graph_text_len == TEXT_UNPLACED:
        return _resolve_unplaced(seq_len, config, forward_grid)
    if graph_grid:
        if len(graph_grid) != 3:
            raise ValueError(f"spattn: video_grid={graph_grid!r}: the graph passes (frames, height, width) or []")
        grid: tuple[int, int, int] = (int(graph_grid[0]), int(graph_grid[1]), int(graph_grid[2]))
        check_settings(config, video_grid=grid, source="the graph")
    elif config.video_grid is not None:
        grid = config.video_grid
        check_settings(config, video_grid=forward_grid, source="the model's forward")
    elif forward_grid is not None:
        grid = forward_grid
    else:
        return "no video grid for this call (set video_grid)" + (f": {forward_note}" if forward_note else "")
    text = fit_text(grid, graph_text_len, seq_len)
    if isinstance(text, str):
        return text
    check_settings(config, text_len=text, text_first=text_first, source="this attention call")
    return CallLayout(grid, text, text_first)


def _resolve_unplaced(
    seq_len: int, config: SparseAttentionConfig, forward_grid: tuple[int, int, int] | None
) -> CallLayout | str:
    """The layout of a call whose graph shows no grid (`TEXT_UNPLACED`, module docstring), or why it has none."""
    if config.video_grid is None:
        return (
            "no video grid in the graph (packed tokens) and no video_grid setting in force: set "
            "spattn_compile.config(video_grid=(frames, height, width)) around the call"
        )
    grid = config.video_grid
    check_settings(config, video_grid=forward_grid, source="the model's forward")
    text = fit_text(grid, TEXT_REST if config.text_len is None else config.text_len, seq_len)
    if isinstance(text, str):
        return text
    if text and config.text_position is None:
        return (
            f"video_grid {tuple(grid)} leaves {text} of the {seq_len} tokens, and where that text sits is unknown: "
            "set text_position"
        )
    return CallLayout(grid, text, text > 0 and config.text_position == "first")


def _as_int(name: str, value: object) -> int:
    """A Python int from an int-like value (Python or NumPy integer, not bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} has type {type(value).__name__}: expected an int")
    return int(value)


def user_layout(video_grid: object, text_len: object, text_first: object, seq_len: int) -> CallLayout:
    """The layout a caller of `select_plan` / `sparse_attention` gives, validated: TypeError / ValueError naming the
    argument (NumPy integers are accepted wherever ints are)."""
    if not isinstance(video_grid, (tuple, list)) or len(video_grid) != 3:
        raise ValueError(f"video_grid must be three positive ints (frames, height, width), got {video_grid!r}")
    frames, height, width = (_as_int("video_grid entry", v) for v in video_grid)
    grid = (frames, height, width)
    if min(grid) < 1:
        raise ValueError(f"video_grid must be three positive ints (frames, height, width), got {video_grid!r}")
    text = _as_int("text_len", text_len)
    if text < 0:
        raise ValueError(f"text_len must be an int >= 0, got {text_len!r}")
    if not isinstance(text_first, bool):
        raise TypeError(f"text_first must be a bool, got {type(text_first).__name__}")
    fitted = fit_text(grid, text, seq_len)
    if isinstance(fitted, str):
        raise ValueError(fitted)
    return CallLayout(grid, text, text_first)
