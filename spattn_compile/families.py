"""Model families: how a forward's inputs give the attention grid. The one table of per-family rules.

A block compiled on its own (regional compilation) holds no patch embedding, so the grid of its attention comes from
the model's forward: its latent and `config.patch_size` / `patch_size_t` (read by the forward hook, see
`runtime.binding`). `latent_grid` reads it the same way for every diffusers video transformer: a 5-D latent is
`(B, C, F, H, W)`, or `(B, F, C, H, W)` / `(B, F, H, W, C)` when that is where the config's channel count is; a
packed `(B, S, C)` latent takes its sizes from the forward's `num_frames`, `height` and `width` arguments
(LTX-Video). Where the channel count does not single out one dim (it matches several, or none), `FAMILY_RULES` names
the family's channel dim. A new family whose latent the defaults do not read is one entry of `FAMILY_RULES` (and its
test in `tests/families.py`); the compiler pass reads the grid of a whole model from the graph instead
(`passes/token_axes.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["FAMILY_RULES", "LatentRule", "latent_grid", "rule_of"]


@dataclasses.dataclass(frozen=True)
class LatentRule:
    """How a family's forward gives its latent grid.

    channel_dim: the dim of a 5-D latent that holds the channels, when the config's channel count does not say.
    channels: the config attributes holding the channel count, in the order they are read.
    sizes: the forward's arguments that give a packed `(B, S, C)` latent's (frames, height, width).
    """

    channel_dim: int = 1
    channels: tuple[str, ...] = ("in_channels", "in_visual_dim")
    sizes: tuple[str, str, str] = ("num_frames", "height", "width")


DEFAULT_RULE = LatentRule()
# By the prefix of the model's class name: the diffusers families whose latents are not (B, C, F, H, W).
FAMILY_RULES: dict[str, LatentRule] = {
    "CogVideoX": LatentRule(channel_dim=2),
    "ConsisID": LatentRule(channel_dim=2),
    "Kandinsky5": LatentRule(channel_dim=4),
}


def rule_of(model: torch.nn.Module) -> LatentRule:
    """The latent rule of the model's family (`FAMILY_RULES`, else the default)."""
    name = type(model).__name__
    return next((rule for prefix, rule in FAMILY_RULES.items() if name.startswith(prefix)), DEFAULT_RULE)


def _size(value: object) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def latent_grid(model: torch.nn.Module, arguments: Mapping[str, Any]) -> tuple[tuple[int, int, int] | None, str]:
    """The attention grid (frames, height, width) of a forward of `model` with `arguments` (its forward's arguments by
    name; see the module docstring), or (None, why not)."""
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
        matches = [d for d in (1, 2, 4) if latent.shape[d] == channels]
        channel_dim = matches[0] if len(matches) == 1 else rule.channel_dim
        sizes = [latent.shape[d] for d in range(1, 5) if d != channel_dim]
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
    return (frames, height, width), ""
