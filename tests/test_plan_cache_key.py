"""A cached plan never outlives a change of anything it was selected with.

The op caches plans under `runtime.op.plan_signature` (the call's `attention.PlanKey` and the schedule's density
decay). For every field of `SparseAttentionConfig`, changed alone: when it changes the plan a call selects, it must
change the signature, or the cache would serve the stale plan. The fields are enumerated from the dataclass, so a new
setting cannot be forgotten; a mutation test shows that the check catches a signature that misses `sparsity`; and a
compiled model refreshes its cached plan within `refresh_interval` when `sparsity` changes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import SETTINGS, SparseSDPA, TinyVideoAttention, compile_spattn, tiny_inputs

import spattn_compile
from spattn_compile.attention import PlanKey, SparseAttention
from spattn_compile.call_layout import CallLayout
from spattn_compile.config import SparseAttentionConfig
from spattn_compile.estimators import SampledRows
from spattn_compile.implementations import ReferenceImplementation
from spattn_compile.runtime import op
from spattn_compile.testing import dit_attention_inputs, relative_error

GRID, TEXT = (3, 8, 8), 7
# Selection settings under which every selection knob matters: the mass threshold grows rows above the budget and the
# max density bounds that growth; query rectification with GAPR trusts some skipped blocks and not others.
BASE = SparseAttentionConfig(block_size=16, sparsity=0.75, mass_threshold=0.9, max_density=0.5, min_seq_len=0)
# One other valid value of every field (the call's own layout for the layout overrides).
ALTERNATIVES: dict[str, object] = {
    "sparsity": 0.5,
    "block_size": 32,
    "estimator": SampledRows(rows=4),
    "mass_threshold": None,
    "max_density": 1.0,
    "reorder": "none",
    "rectify": "none",
    "gapr": False,
    "neighbors": True,
    "head_budget": "water_fill",
    "dense_steps": 2,
    "dense_layers": (0,),
    "refresh_interval": 3,
    "exact_plan_steps": 0,
    "density_decay": 0.1,
    "min_seq_len": 4096,
    "video_grid": GRID,
    "text_len": TEXT,
    "text_position": "last",
}
# Fields that must change the plan on these inputs (so that the check below is not vacuous for them).
SELECTION_FIELDS = {
    "sparsity",
    "block_size",
    "estimator",
    "mass_threshold",
    "max_density",
    "reorder",
    "rectify",
    "gapr",
    "neighbors",
}


def _inputs():
    inputs = dit_attention_inputs(GRID, heads=2, head_dim=16, text_len=TEXT, dtype=torch.float64, seed=3)
    return inputs.query, inputs.key, inputs.value


def _call(config: SparseAttentionConfig, qkv) -> SparseAttention:
    return SparseAttention(
        *qkv, CallLayout(GRID, TEXT, False), attn_mask=None, scale=None, config=config,
        implementation=ReferenceImplementation(torch.float64),
    )  # fmt: skip


def _same_plan(a, b) -> bool:
    return (
        a.layout == b.layout
        and torch.equal(a.kv_counts, b.kv_counts)
        and torch.equal(a.kv_indices, b.kv_indices)
        and torch.equal(a.trusted_counts, b.trusted_counts)
        and torch.equal(a.trusted_indices, b.trusted_indices)
    )


def stale_plans() -> tuple[list[str], set[str]]:
    """(fields whose change gives another plan under the same cache signature, fields whose change gives another
    plan), each field changed alone from `BASE`."""
    qkv = _inputs()
    base = _call(BASE, qkv)
    base_plan, base_signature = base.plan(), op.plan_signature(base, BASE)
    stale, changing = [], set()
    for field, value in ALTERNATIVES.items():
        config = dataclasses.replace(BASE, **{field: value})
        call = _call(config, qkv)
        if not _same_plan(call.plan(), base_plan):
            changing.add(field)
            if op.plan_signature(call, config) == base_signature:
                stale.append(field)
    return stale, changing


def test_every_field_is_tried():
    assert set(ALTERNATIVES) == {f.name for f in dataclasses.fields(SparseAttentionConfig)}
    for field, value in ALTERNATIVES.items():
        assert getattr(BASE, field) != value, field


def test_no_cached_plan_outlives_a_change_of_a_setting_that_changes_the_plan():
    stale, changing = stale_plans()
    assert stale == []
    assert SELECTION_FIELDS <= changing, f"these settings did not change the plan here: {SELECTION_FIELDS - changing}"


def test_the_check_catches_a_signature_that_misses_sparsity(monkeypatch):
    """The mutation of adding `sparsity` to the settings a plan is not keyed by: the check above fails on it."""
    original = SparseAttention.plan_key

    def without_sparsity(call: SparseAttention) -> PlanKey:
        key = original(call)
        return dataclasses.replace(key, selection=dataclasses.replace(key.selection, density=0.0))

    monkeypatch.setattr(SparseAttention, "plan_key", without_sparsity)
    stale, _ = stale_plans()
    assert stale == ["sparsity"]


def test_a_compiled_model_refreshes_its_plan_when_sparsity_changes():
    """Within `refresh_interval` a cached plan is reused; a new `sparsity` refreshes it (and the output is the new
    sparsity's)."""
    model = TinyVideoAttention()
    inputs = tiny_inputs(3, 8, 12, 5)
    grid = (3, 4, 6)
    compiled = compile_spattn(model, refresh_interval=10)
    outputs = {}
    with torch.no_grad():
        for step, sparsity in enumerate((0.75, 0.75, 0.25)):
            with spattn_compile.config(**SETTINGS, sparsity=sparsity), spattn_compile.step(step):
                outputs[step] = compiled(*inputs)
                with SparseSDPA(grid, 5) as expected:
                    reference = model(*inputs)
            assert expected.sparse_calls == 1
            assert relative_error(outputs[step], reference) < 1e-5, (step, sparsity)
    caches = [r.cache for r in spattn_compile.report().records]
    assert caches == ["refresh", "hit", "refresh"]
    assert relative_error(outputs[2], outputs[0]) > 1e-4


@pytest.mark.parametrize("field", ["rectify", "gapr", "density_decay"])
def test_settings_the_plan_is_run_with_are_in_the_signature(field):
    """The rectification mode (a plan lists the trusted blocks of its mode) and the density decay (the density of the
    next refreshes) are part of the signature even where the plan itself is the same."""
    qkv = _inputs()
    changed = dataclasses.replace(BASE, **{field: {"rectify": "block", "gapr": False, "density_decay": 0.2}[field]})
    assert op.plan_signature(_call(BASE, qkv), BASE) != op.plan_signature(_call(changed, qkv), changed)
