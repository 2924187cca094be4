"""Model families: how a forward's inputs give the attention grid. The one table of per-family rules.

A block compiled on its own (regional compilation) holds no patch embedding, so the grid of its attention comes from
the model's forward: its latent and `config.patch_size` / `patch_size_t` (read by the forward hook, see
`runtime.binding`). `latent_grid` reads it the same way for every diffusers video transformer: a 5-D latent is
`(B, C, F, H, W)`, or `(B, F, C, H, W)` / `(B, F, H, W, C)` when that is where the config's channel count is (and
only then: a latent whose channel dim is not singled out is not guessed); a 6-D multi-item latent
`(B, N, C, T, H, W)` of a family whose rule says so joins its items' frames; a packed `(B, S, C)` latent takes its
sizes from the forward's `num_frames`, `height` and `width` arguments
(LTX-Video). Where the channel count does not single out one dim (it matches several, or none), `FAMILY_RULES` names
the family's channel dim.

A reading is a grid of dims, and dims are what is checked: where the model has a 3-D convolution that takes the
5-D latent as it comes (its `in_channels` are the latent's dim 1: the patch embedding of Wan, HunyuanVideo...), the
grid that convolution makes of the latent (from its kernel, stride, padding and dilation) must be the grid read, dim
by dim; a reading that disagrees (a family rule that does not fit the model, even one giving the same token count)
is refused with both grids named, so that a block compiled on its own stays dense rather than run on a misread
layout. A new family whose latent the defaults do not read is one entry of `FAMILY_RULES` (and its
test in `tests/families.py`); the compiler pass reads the grid of a whole model from the graph instead
(`passes/token_axes.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["FAMILY_RULES", "LatentRule", "latent_grid", "missing_dynamo_settings", "patch_convolutions", "rule_of"]


@dataclasses.dataclass(frozen=True)
class LatentRule:
    """How a family's forward gives its latent grid.

    channel_dim: the dim of a 5-D latent that holds the channels, when the config's channel count does not say.
    channels: the config attributes holding the channel count, in the order they are read.
    sizes: the forward's arguments that give a packed `(B, S, C)` latent's (frames, height, width).
    multi_item: a 6-D latent `(B, N, C, T, H, W)` holds N items whose frames the model joins, `(B, C, N * T, H, W)`.
    dynamo: Dynamo settings (`torch._dynamo.config` name, value) without which the family's attention breaks the
        graph and never reaches the pass, with why (`dynamo_why`): the backend cannot set them (the break happens
        before it sees a graph), so the "nothing became sparse" warning names them (`missing_dynamo_settings`).
    """

    channel_dim: int = 1
    channels: tuple[str, ...] = ("in_channels", "in_visual_dim")
    sizes: tuple[str, str, str] = ("num_frames", "height", "width")
    multi_item: bool = False
    dynamo: tuple[tuple[str, object], ...] = ()
    dynamo_why: str = ""


DEFAULT_RULE = LatentRule()
# By the prefix of the model's class name: the diffusers families whose latents are not (B, C, F, H, W).
FAMILY_RULES: dict[str, LatentRule] = {
    "CogVideoX": LatentRule(channel_dim=2),
    "ConsisID": LatentRule(channel_dim=2),
    "Kandinsky5": LatentRule(channel_dim=4),
    # (B, N, C, T, H, W) -> (B, C, N * T, H, W) before its patch embedding (transformer_joyimage.py).
    "JoyImageEditTransformer3DModel": LatentRule(multi_item=True),
    # Its attention processor selects each sample's valid text tokens with torch.nonzero in a per-sample loop: Dynamo
    # breaks the graph there unless it may trace data-dependent output shapes (the text length becomes an unbacked
    # size, which the pass proves its joint sequence with). Its latent is (B, C, F, H, W).
    "MochiTransformer3DModel": LatentRule(
        dynamo=(("capture_dynamic_output_shape_ops", True),),
        dynamo_why="its attention selects each sample's valid text tokens with torch.nonzero, where Dynamo breaks "
        "the graph, so its joint attention runs outside the compiled graphs",
    ),
}


def rule_of(model: torch.nn.Module) -> LatentRule:
    """The latent rule of the model's family (`FAMILY_RULES`, else the default)."""
    name = type(model).__name__
    return next((rule for prefix, rule in FAMILY_RULES.items() if name.startswith(prefix)), DEFAULT_RULE)


def missing_dynamo_settings(model: torch.nn.Module | None) -> tuple[str, str]:
    """(the Dynamo settings the model's family needs that are not in force, as code; why it needs them), or ("", "")."""
    if model is None:
        return "", ""
    rule = rule_of(model)
    missing = [(name, value) for name, value in rule.dynamo if getattr(torch._dynamo.config, name, None) != value]
    if not missing:
        return "", ""
    return "; ".join(f"torch._dynamo.config.{name} = {value!r}" for name, value in missing), rule.dynamo_why


def _size(value: object) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _channel_dim(
    model: torch.nn.Module, shape: tuple[int, ...], channels: object, rule: LatentRule
) -> int | str:
    """The channel dim of a 5-D latent of `shape`, or why it cannot be told. A family of `FAMILY_RULES` names it (and
    the config's channel count, when known, must be there); otherwise it is the dim among 1, 2 and 4 that holds the
    channel count, and when several do, only if every reading gives the same grid (`(B, C, F, H, W)` with `C == F`).
    Nothing is guessed: a misread latent of the same token count would run sparse on the wrong grid."""
    name = type(model).__name__
    if rule is not DEFAULT_RULE:
        if channels is not None and shape[rule.channel_dim] != channels:
            return (
                f"{name}'s latent {shape} has {shape[rule.channel_dim]} entries in dim {rule.channel_dim}, where its "
                f"family keeps the {channels} channels"
            )
        return rule.channel_dim
    matches = [d for d in (1, 2, 4) if shape[d] == channels]
    readings = {tuple(shape[d] for d in range(1, 5) if d != match) for match in matches}
    if len(readings) == 1:
        return matches[0]
    where = f"dims {matches} all hold" if matches else "no dim among 1, 2 and 4 holds"
    return (
        f"{name}'s latent {shape} cannot be read unambiguously ({where} the channel count {channels!r} of its config): "
        "add its family to spattn_compile.families.FAMILY_RULES, or set video_grid"
    )


def patch_convolutions(model: torch.nn.Module) -> tuple[torch.nn.Conv3d, ...]:
    """The model's 3-D convolutions: the candidates for its patch embedding (module docstring)."""
    return tuple(m for m in model.modules() if isinstance(m, torch.nn.Conv3d))


def _convolved_grid(convolutions: Sequence[torch.nn.Conv3d], shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """The grid that the convolutions taking a `(B, C, F, H, W)` latent of `shape` as it comes make of it, when they
    agree (None: no convolution takes it, or they disagree)."""
    grids: set[tuple[int, ...]] = set()
    for conv in convolutions:
        padding = conv.padding
        if conv.in_channels != shape[1] or isinstance(padding, str):
            continue
        sizes = zip(shape[2:], conv.kernel_size, conv.stride, padding, conv.dilation)
        grids.add(tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in sizes))
    if len(grids) != 1:
        return None
    frames, height, width = next(iter(grids))
    return frames, height, width


def latent_grid(
    model: torch.nn.Module, arguments: Mapping[str, Any], convolutions: Sequence[torch.nn.Conv3d] | None = None
) -> tuple[tuple[int, int, int] | None, str]:
    """The attention grid (frames, height, width) of a forward of `model` with `arguments` (its forward's arguments by
    name; see the module docstring), or (None, why not). `convolutions`: the model's `patch_convolutions` (computed
    when not given), against which the reading of a 5-D latent is checked."""
    config = getattr(model, "config", None)
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, int):
        patch_t = getattr(config, "patch_size_t", None) or 1
        patch = (patch_t, patch, patch)
    elif isinstance(patch, (tuple, list)) and len(patch) == 2:
        patch = (1, *patch)
    if not (isinstance(patch, (tuple, list)) and len(patch) == 3 and all(isinstance(p, int) for p in patch)):
        return None, f"{type(model).__name__} has no config.patch_size to turn its latent into the attention grid"
    latent = arguments.get("hidden_states")
    if latent is None and arguments:
        latent = next(iter(arguments.values()))
    if not isinstance(latent, torch.Tensor):
        return None, f"{type(model).__name__}'s first argument is not a latent tensor"
    rule = rule_of(model)
    if latent.dim() == 5:
        channels = next((value for name in rule.channels if (value := getattr(config, name, None))), None)
        channel_dim = _channel_dim(model, tuple(latent.shape), channels, rule)
        if isinstance(channel_dim, str):
            return None, channel_dim
        sizes = [latent.shape[d] for d in range(1, 5) if d != channel_dim]
    elif latent.dim() == 6 and rule.multi_item:
        channels = next((value for name in rule.channels if (value := getattr(config, name, None))), None)
        _, items, latent_channels, frames, height, width = latent.shape
        if channels is not None and latent_channels != channels:
            shape = tuple(latent.shape)
            return None, f"{type(model).__name__}'s 6-D latent {shape} has no {channels} channels in dim 2"
        sizes = [items * frames, height, width]
    elif latent.dim() == 3:
        given = [_size(arguments.get(name)) for name in rule.sizes]
        sizes = [size for size in given if size is not None]
        if len(sizes) != 3:
            return None, (
                f"{type(model).__name__}'s latent is packed {tuple(latent.shape)} and its forward has no "
                f"{', '.join(rule.sizes[:2])} and {rule.sizes[2]} to give its grid"
            )
    else:
        return None, f"{type(model).__name__}'s latent has shape {tuple(latent.shape)}, not a video's"
    frames, height, width = (int(size) // step for size, step in zip(sizes, patch))
    if min(frames, height, width) < 1:
        return None, f"latent {tuple(latent.shape)} is smaller than the patch {tuple(patch)}"
    grid = (frames, height, width)
    if latent.dim() == 5:
        convolved = _convolved_grid(patch_convolutions(model) if convolutions is None else convolutions, latent.shape)
        if convolved is not None and convolved != grid:
            return None, (
                f"{type(model).__name__}'s latent {tuple(latent.shape)} reads as the grid {grid}, but its 3-D patch "
                f"embedding makes the grid {convolved} of it: the reading does not fit this model (fix its entry in "
                "spattn_compile.families.FAMILY_RULES), or set video_grid"
            )
    return grid, ""
