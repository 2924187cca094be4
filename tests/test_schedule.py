"""Unit tests of the schedule (step tracking, plan cache, adaptive density), plan reuse in the reference, and the
report's table and plot."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import reference_call

import spattn_compile
from spattn_compile.config import SparseAttentionConfig
from spattn_compile.inputs import key_padding_valid
from spattn_compile.layout import token_layout
from spattn_compile.policies import rectification_terms
from spattn_compile.reference import (
    canonical_key_valid,
    gather_canonical,
    pool_statistics,
    rectified_sparse_attention,
    scatter_canonical,
)
from spattn_compile.runtime import model_state, plan_cache, steps
from spattn_compile.runtime.binding import default_registry
from spattn_compile.runtime.model_state import record
from spattn_compile.testing import relative_error
from spattn_compile.testing.strategies import rectify_modes


def _model(name: str = "m") -> model_state.ModelState:
    """A model state known to `report()` (the backend makes these for compiled models)."""
    return default_registry().anonymous(name)


def _t(value: float, batch: int = 1) -> torch.Tensor:
    return torch.full((batch,), value)


# ---------------------------------------------------------------------------------------------------------------------
# Step tracking
# ---------------------------------------------------------------------------------------------------------------------


def _positions(tracker: steps.StepTracker, calls) -> list[tuple[int, int, int]]:
    out = []
    for timestep in calls:
        context = tracker.advance(timestep)
        out.append((context.generation, context.step, context.branch))
    return out


def test_tracker_two_calls_per_step_is_cfg_branches():
    tracker = _model("wan").tracker
    calls = [_t(999), _t(999), _t(750), _t(750), _t(500), _t(500)]
    assert _positions(tracker, calls) == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1)]


def test_tracker_one_call_per_step_and_batched_timesteps():
    tracker = _model("cogvideox").tracker
    calls = [_t(999, 2), _t(800, 2), _t(600, 2)]
    assert _positions(tracker, calls) == [(0, 0, 0), (0, 1, 0), (0, 2, 0)]


def test_tracker_per_token_timesteps_use_the_maximum():
    # Wan 2.2 TI2V expands the timestep per token and zeroes the first frame's: the step is the largest value.
    tracker = _model("ti2v").tracker
    first = torch.tensor([[0.0, 900.0, 900.0]])
    second = torch.tensor([[0.0, 700.0, 700.0]])
    assert _positions(tracker, [first, first, second]) == [(0, 0, 0), (0, 0, 1), (0, 1, 0)]


def test_tracker_larger_timestep_starts_a_new_generation_and_drops_its_plans():
    model_a, model_b = _model("model-a"), _model("model-b")
    context = model_a.tracker.advance(_t(900))
    plan = _tiny_plan()
    model_a.plan_cache.store(("attn", 0), context, "sig", plan, 0, (torch.tensor(0.5), torch.tensor(0.9)))
    model_b.plan_cache.store(("attn", 0), context, "sig", plan, 0, (torch.tensor(0.5), torch.tensor(0.9)))
    model_a.tracker.advance(_t(500))
    assert len(model_a.plan_cache) == len(model_b.plan_cache) == 1
    assert _positions(model_a.tracker, [_t(900)]) == [(1, 0, 0)]
    assert len(model_a.plan_cache) == 0, "the new generation of model-a must drop model-a's plans"
    assert len(model_b.plan_cache) == 1, "and only those"


def test_new_generation_resets_every_tracker():
    tracker = _model().tracker
    assert _positions(tracker, [_t(900), _t(800)]) == [(0, 0, 0), (0, 1, 0)]
    spattn_compile.new_generation()
    # Same timestep as before: without the explicit call this would be branch 1 of step 1.
    assert _positions(tracker, [_t(800)]) == [(1, 0, 0)]


def test_step_override_takes_precedence_and_counts_branches():
    tracker = _model().tracker
    with spattn_compile.step(0):
        assert _positions(tracker, [_t(5), _t(5)]) == [(0, 0, 0), (0, 0, 1)]
    with spattn_compile.step(1, branch=1):
        assert _positions(tracker, [_t(5), _t(5)]) == [(0, 1, 1), (0, 1, 1)]
    with spattn_compile.step(0):
        assert _positions(tracker, [None]) == [(1, 0, 0)]
    assert tracker.advance(None).source == "call_count"


def test_tracker_repeated_timestep_is_bounded_in_branches():
    tracker = _model("bench").tracker
    positions = _positions(tracker, [_t(500)] * (2 * steps.MAX_BRANCHES + 1))
    assert max(branch for _, _, branch in positions) == steps.MAX_BRANCHES - 1
    assert positions[steps.MAX_BRANCHES] == (1, 0, 0)
    assert positions[-1] == (2, 0, 0)


def test_tracker_without_timestep_counts_calls_as_steps():
    tracker = _model().tracker
    assert _positions(tracker, [None, None, None]) == [(0, 0, 0), (0, 1, 0), (0, 2, 0)]


@pytest.mark.parametrize(
    ("index", "branch", "error"), [(-1, None, ValueError), (1.0, None, TypeError), (0, -2, ValueError)]
)
def test_step_rejects_bad_arguments(index, branch, error):
    with pytest.raises(error, match="step index|branch"):
        with spattn_compile.step(index, branch=branch):
            pass


# ---------------------------------------------------------------------------------------------------------------------
# Adaptive density and the plan cache
# ---------------------------------------------------------------------------------------------------------------------


@given(
    density=st.floats(0.05, 1.0),
    decay=st.floats(0.0, 0.99),
    refresh=st.integers(0, 50),
    blocks=st.integers(1, 600),
)
def test_refresh_density_formula(density, decay, refresh, blocks):
    value = plan_cache.refresh_density(density, decay, refresh, blocks)
    assert value == max(1.0 / blocks, density - refresh * decay)
    assert 1.0 / blocks <= value <= max(density, 1.0 / blocks)
    if refresh:
        assert value <= plan_cache.refresh_density(density, decay, refresh - 1, blocks)


def test_refresh_density_follows_dfsattn_ratios():
    assert [round(plan_cache.refresh_density(0.3, 0.1, r, 100), 6) for r in range(5)] == [0.3, 0.2, 0.1, 0.01, 0.01]


def _tiny_plan(batch: int = 1, heads: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, 3 * 4 * 4, 16)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    config = SparseAttentionConfig(block_size=16, sparsity=0.5)
    return spattn_compile.select_plan(q, k, v, video_grid=(3, 4, 4), config=config, impl="reference")


def _context(step: int, generation: int = 0, branch: int = 0) -> model_state.StepContext:
    """A context of one model per test (the autouse reset forgets it between tests)."""
    models = default_registry().models()
    model = models[0] if models else _model()
    return model_state.StepContext(model, generation, step, branch, "override")


def test_cache_reuses_for_refresh_interval_steps_of_one_generation_and_signature():
    cache = plan_cache.PlanCache()
    plan = _tiny_plan()
    summary = (torch.tensor(0.5), torch.tensor(0.8))
    cache.store(("m", 0, 0), _context(4), "sig", plan, 0, summary)
    assert cache.lookup(("m", 0, 0), _context(4), "sig", 3).plan is plan
    assert cache.lookup(("m", 0, 0), _context(6), "sig", 3).plan is plan
    assert cache.lookup(("m", 0, 0), _context(7), "sig", 3) is None, "refresh_interval=3: step 7 refreshes"
    assert cache.lookup(("m", 0, 0), _context(5), "other", 3) is None, "a shape or setting change refreshes"
    assert cache.lookup(("m", 0, 0), _context(5, generation=1), "sig", 3) is None
    assert cache.lookup(("m", 0, 1), _context(5, branch=1), "sig", 3) is None, "branches never share a plan"
    assert cache.next_refresh_count(("m", 0, 0), _context(7), "sig") == 1
    assert cache.next_refresh_count(("m", 0, 0), _context(7), "other") == 0
    assert cache.next_refresh_count(("m", 0, 0), _context(7, generation=1), "sig") == 0


def test_cache_is_bounded_with_lru_eviction_and_keeps_refresh_counts():
    plan = _tiny_plan()
    summary = (torch.tensor(0.5), torch.tensor(0.8))
    size = plan_cache._plan_bytes(plan)
    cache = plan_cache.PlanCache(max_bytes=2 * size)
    for layer in range(3):
        cache.store(("m", layer, 0), _context(0), "sig", plan, 0, summary)
        assert cache.nbytes <= 2 * size
    assert len(cache) == 2
    assert cache.lookup(("m", 0, 0), _context(0), "sig", 1) is None, "the least recently used entry went first"
    assert cache.lookup(("m", 2, 0), _context(0), "sig", 1) is not None
    assert cache.next_refresh_count(("m", 0, 0), _context(1), "sig") == 1, "eviction keeps the refresh count"
    model = _model()
    model.plan_cache.store(("attn", 0), _context(0), "sig", plan, 0, summary)
    spattn_compile.set_plan_cache_limit(0)
    try:
        assert len(model.plan_cache) == 0, "the limit applies to every model's cache"
        assert _model("later").plan_cache.max_bytes == 0, "and to the models compiled later"
    finally:
        spattn_compile.set_plan_cache_limit(8 << 30)
    with pytest.raises(ValueError, match="max_bytes"):
        spattn_compile.set_plan_cache_limit(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Plan reuse in the reference: the plan is taken as given, the pooled statistics are fresh
# ---------------------------------------------------------------------------------------------------------------------


@settings(max_examples=25)
@given(
    grid=st.tuples(st.integers(1, 3), st.integers(2, 5), st.integers(2, 6)),
    text_len=st.integers(0, 20),
    text_first=st.booleans(),
    rectify=rectify_modes(),
    sparsity=st.floats(0.2, 0.9),
    masked=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_reference_reuses_a_given_plan_with_fresh_statistics(
    grid, text_len, text_first, rectify, sparsity, masked, dtype, seed
):
    g = torch.Generator().manual_seed(seed)
    seq_len = math.prod(grid) + text_len
    shape = (2, 2, seq_len, 16)
    old = [torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]
    new = [torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]
    attn_mask = None
    if masked and text_len:
        attn_mask = torch.ones(2, 1, 1, seq_len, dtype=torch.bool)
        attn_mask[0, ..., -1] = False
    config = SparseAttentionConfig(block_size=16, sparsity=sparsity, rectify=rectify)
    layout = token_layout(grid, text_len, text_first, 16, "hilbert")
    key_valid = key_padding_valid(attn_mask, 2, 2, seq_len)
    plan = reference_call(*old, attn_mask, layout, config).plan()
    reused = reference_call(*new, attn_mask, layout, config).run(plan)

    # Expected: stage 0 on the new inputs, stage 3 with the old plan.
    valid = canonical_key_valid(key_valid, layout, 2, 2, torch.device("cpu"))
    q_c, k_c, v_c = (gather_canonical(t.double(), layout) for t in new)
    stats = pool_statistics(q_c, k_c, v_c, valid, layout, 16)
    terms = rectification_terms(rectify, plan, stats)
    out_c = rectified_sparse_attention(q_c, k_c, v_c, valid, plan, layout, scale=0.25, terms=terms)
    expected = scatter_canonical(out_c, layout)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert relative_error(reused, expected) < tolerance

    fresh_call = reference_call(*new, attn_mask, layout, config)
    fresh = fresh_call.run(fresh_call.plan())
    kwargs = dict(video_grid=grid, text_len=text_len, text_first=text_first, attn_mask=attn_mask)
    short = dataclasses.replace(config, min_seq_len=0)
    through_api = spattn_compile.sparse_attention(*(t.double() for t in new), **kwargs, config=short, impl="reference")
    assert relative_error(through_api, fresh) < tolerance


def test_a_plan_of_another_shape_is_rejected():
    plan = _tiny_plan(batch=1, heads=1)
    q = torch.randn(1, 2, 48, 16)
    config = SparseAttentionConfig(block_size=16)
    with pytest.raises(ValueError, match=r"plan is for batch=1, heads=1; this call has batch=1, heads=2"):
        spattn_compile.sparse_attention(q, q, q, video_grid=(3, 4, 4), config=config, plan=plan)
    with pytest.raises(TypeError, match="plan must be a SparsePlan"):
        spattn_compile.sparse_attention(q, q, q, video_grid=(3, 4, 4), config=config, plan="plan")


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def _recorded_report():
    plan = _tiny_plan()
    kept, recall, share = plan_cache.plan_summary(plan)
    record(_context(0), 0, "dense_step", "", 1.0, 1.0)
    record(_context(1), 0, "sparse", "refresh", kept, recall, keep_share=share)
    record(_context(2), 0, "sparse", "hit", kept, recall)
    return spattn_compile.report(), plan


def test_plan_summary_matches_the_plan():
    plan = _tiny_plan(batch=2, heads=2)
    kept, recall, share = plan_cache.plan_summary(plan)
    nb = plan.num_video_blocks
    keep = plan.to_dense()[..., :nb, :nb]
    assert kept.item() == pytest.approx(plan.density().mean().item())
    expected_recall = ((plan.block_scores[..., :nb] * keep).sum(-1) + plan.block_scores[..., nb]).mean()
    assert recall.item() == pytest.approx(expected_recall.item())
    assert 0 < recall.item() <= 1 + 1e-6
    assert share.shape == (nb, nb)
    assert torch.equal(share.diagonal(), torch.ones(nb)), "the diagonal block is always kept"


def test_report_table_and_counts():
    result, plan = _recorded_report()
    assert (result.sparse_calls, result.dense_calls, result.refreshes, result.cache_hits) == (2, 1, 1, 1)
    text = str(result)
    assert "dense_step" in text and "refresh" in text and "hit" in text
    assert "3 calls: 2 sparse (1 plan refreshes, 1 cache hits), 1 dense" in text
    assert result.records[1].density == pytest.approx(plan.density().mean().item())
    spattn_compile.reset_report()
    assert spattn_compile.report().records == ()
    with pytest.raises(ValueError, match="kind must be one of"):
        record(_context(0), 0, "sparse-ish", "", 1.0, 1.0)


def test_report_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    result, _ = _recorded_report()
    path = tmp_path / "report.png"
    result.plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_plot_without_matplotlib_says_how_to_get_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    result, _ = _recorded_report()
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"spattn_compile\[plot\]"):
        result.plot("unused.png")
