"""The public functions: `select_plan` (stages 0-2: which blocks to attend) and `sparse_attention` (attend, with a
given plan or a fresh one).

Planning is separate from attending (FlashInfer's plan / run; FlexAttention's `BlockMask`): `select_plan` returns a
`SparsePlan` that can be inspected, cached, edited or reused; `sparse_attention(..., plan=plan)` attends with it.
Without a plan `sparse_attention` selects one itself (one preparation shared by both). This module is the edge of the
library for tensors a user passes: it validates them once (`inputs.validate_attention_inputs`, naming the argument)
and hands the call to `attention.SparseAttention`, the orchestrator the compiled graphs' op uses too.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .attention import SparseAttention
from .config import SparseAttentionConfig, current_config, explicit_fields
from .implementations import Implementation, check_autograd, implementation_for
from .inputs import validate_attention_inputs
from .plan import SparsePlan
from .policies import rectification_settings

__all__ = ["select_plan", "sparse_attention"]


def _settings(config: object, impl: str, query: torch.Tensor) -> tuple[SparseAttentionConfig, Implementation]:
    """The call's settings and implementation (ValueError naming `impl` when it cannot run the call)."""
    if config is None:
        config = current_config()
    elif not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig or None, got {type(config).__name__}")
    return config, implementation_for(impl, query)


# The settings a plan is selected with, besides its layout (`SparsePlan.check_compatible`): the selection's and the
# estimator's (the blocks it keeps) and the rectification's (the trusted blocks it lists).
_SELECTION_FIELDS = ("sparsity", "estimator", "mass_threshold", "max_density", "neighbors")
_TRUST_FIELDS = ("rectify", "gapr")
_DEFAULTS = SparseAttentionConfig()


def _fields_set(config: SparseAttentionConfig) -> frozenset[str]:
    """The fields of a config object that say something: those away from their defaults. A config passed with a plan
    to choose, say, the rectification must not contradict the plan's sparsity by carrying the default one."""
    return frozenset(
        field.name
        for field in dataclasses.fields(SparseAttentionConfig)
        if getattr(config, field.name) != getattr(_DEFAULTS, field.name)
    )


def _check_plan_settings(plan: SparsePlan, config: SparseAttentionConfig, given: frozenset[str]) -> None:
    """Raise ValueError when `config` contradicts the settings `plan` was selected with (see `sparse_attention`):
    the rectification's trusted blocks always; the selection settings among `given` (the fields the caller set)."""
    if not plan.selected_with:
        return
    selected = dict(plan.selected_with)
    checked = [name for name in _SELECTION_FIELDS if name in given and name in selected]
    if all(name in selected for name in _TRUST_FIELDS):
        planned = dataclasses.replace(config, rectify=str(selected["rectify"]), gapr=bool(selected["gapr"]))
        if rectification_settings(planned).trust != rectification_settings(config).trust:
            checked += _TRUST_FIELDS
    differences = [
        f"{name}={selected[name]!r} (the plan's) vs {name}={getattr(config, name)!r} (this call's)"
        for name in checked
        if selected[name] != getattr(config, name)
    ]
    if differences:
        raise ValueError(
            "plan was selected with other settings than this call's: " + "; ".join(differences) + ". A plan is "
            "attended as it was selected: pass the config it was selected with, or select a plan with this one"
        )


def select_plan(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None = None,
    *,
    video_grid: tuple[int, int, int],
    text_len: int = 0,
    text_first: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    config: SparseAttentionConfig | None = None,
    impl: str = "auto",
) -> SparsePlan:
    """Choose the key blocks each query block attends to (stages 0-2), without attending.

    Args: as `sparse_attention` (`value` is optional: selection reads only queries and keys). The plan is selected at
    `config.density` with `config.estimator` (plus `config.mass_threshold`, `max_density`, `neighbors`) and lists
    the blocks rectification compensates for `config.rectify` / `config.gapr`.

    Returns:
        a `SparsePlan` over the canonical layout of (`video_grid`, `text_len`, `text_first`, `config.block_size`,
        `config.reorder`), for `(B, H)` of the inputs, on their device. Attend with it with
        `sparse_attention(query, key, value, ..., plan=plan)`.
    """
    value = key if value is None else value
    layout, checked_scale = validate_attention_inputs(
        query, key, value, video_grid=video_grid, text_len=text_len, text_first=text_first, attn_mask=attn_mask,
        scale=scale,
    )  # fmt: skip
    config, implementation = _settings(config, impl, query)
    if query.shape[0] == 0:
        raise ValueError(f"query has an empty batch dimension: {tuple(query.shape)}; there is nothing to plan")
    call = SparseAttention(query, key, value, layout, attn_mask=attn_mask, scale=checked_scale, config=config,
                           implementation=implementation)  # fmt: skip
    selected_with = tuple((name, getattr(config, name)) for name in (*_SELECTION_FIELDS, *_TRUST_FIELDS))
    return dataclasses.replace(call.plan(), selected_with=selected_with)


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    video_grid: tuple[int, int, int],
    text_len: int = 0,
    text_first: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    config: SparseAttentionConfig | None = None,
    impl: str = "auto",
    plan: SparsePlan | None = None,
) -> torch.Tensor:
    """Block-sparse, rectified self-attention over a video token grid, with SDPA's layout and semantics.

    Args:
        query, key, value: `(B, H, S, D)`, one float dtype and device. `S = F*Hh*W + text_len`.
        video_grid: `(F, Hh, W)`, the latent grid; the video tokens are in raster order (t, y, x) in the sequence.
        text_len: number of text tokens, placed after the video (`text_first=False`) or before it.
        attn_mask: optional boolean key-padding mask broadcastable (SDPA's rules) to `(B, H, 1, S)`; True keeps a key.
        scale: softmax scale, `1/sqrt(D)` by default.
        config: settings; `spattn_compile.current_config()` by default.
        impl: "auto" (Triton on CUDA, the reference on the CPU), "triton" (on the CPU: the Triton interpreter,
            `TRITON_INTERPRET=1` must be set before triton is imported), or "reference".
        plan: a `SparsePlan` from `select_plan` (or `SparsePlan.from_mask`) for this call's layout and `(B, H)` (a
            batch-1 plan applies to every sample). None: select one now, at `config.density`. A plan is attended as
            it was selected, so settings given with it must agree with those `select_plan` used, else ValueError
            naming each: `rectify` and `gapr` always (they decide which skipped blocks the plan lists for
            rectification; "block" and "query" read the same ones), and `sparsity`, `estimator`, `mass_threshold`,
            `max_density` and `neighbors` when given (set away from their defaults in `config`, or set in an
            enclosing `spattn_compile.config` block). A plan built by hand (`from_mask`) records no settings: its
            trusted lists are used as given.

    Returns:
        `(B, H, S, D)` in the dtype and memory order of `query`. Without a plan, sequences shorter than
        `config.min_seq_len` get exact dense attention. A batch of 0 gives an empty output, as SDPA does.
    """
    layout, checked_scale = validate_attention_inputs(
        query, key, value, video_grid=video_grid, text_len=text_len, text_first=text_first, attn_mask=attn_mask,
        scale=scale,
    )  # fmt: skip
    given = _fields_set(config) if isinstance(config, SparseAttentionConfig) else explicit_fields()
    config, implementation = _settings(config, impl, query)
    batch, heads, seq_len, _ = query.shape
    if plan is not None:
        if not isinstance(plan, SparsePlan):
            raise TypeError(f"plan must be a SparsePlan or None, got {type(plan).__name__}")
        plan.check_compatible(batch, heads, layout.token_layout(config.block_size, config.reorder), query.device)
        _check_plan_settings(plan, config, given)
    if batch == 0 or (plan is None and seq_len < config.min_seq_len):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=checked_scale)
    check_autograd(impl, query, key, value)
    call = SparseAttention(query, key, value, layout, attn_mask=attn_mask, scale=checked_scale, config=config,
                           implementation=implementation)  # fmt: skip
    return call.run(call.plan() if plan is None else plan)
