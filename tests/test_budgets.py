"""Per-head budgets (`spattn_compile.policies.budgets`): the average density is the setting's to one block per head,
no head is below its floor, the budgets are deterministic and water-filling's split is the best one for its estimated
mass; the uniform policy selects exactly what selection always selected, and both implementations agree."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import reference_call, sparse_call, triton_implementation

from spattn_compile import SparseAttentionConfig
from spattn_compile.layout import token_layout
from spattn_compile.plan import block_budget
from spattn_compile.policies import TopK, UniformBudget, WaterFilling, selection_settings
from spattn_compile.policies.budgets import water_fill_budgets
from spattn_compile.policies.topk import head_budgets, select_blocks
from spattn_compile.testing import dit_attention_inputs


def _scores(batch: int, heads: int, nb: int, seed: int, sharpness: torch.Tensor | None = None) -> torch.Tensor:
    """Row-stochastic block scores `(B, H, NB, NB + 1)` whose heads differ in how concentrated they are."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, nb, nb + 1, generator=generator, dtype=torch.float64)
    if sharpness is None:
        sharpness = torch.rand(heads, generator=generator, dtype=torch.float64) * 6
    return (logits * sharpness[:, None, None]).softmax(-1)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 6),
    nb=st.integers(1, 24),
    density=st.floats(0.01, 1.0),
    min_share=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_water_fill_keeps_the_average_and_the_floors(batch, heads, nb, density, min_share, seed):
    scores = _scores(batch, heads, nb, seed)
    forced = torch.eye(nb, dtype=torch.bool)
    uniform = block_budget(density, nb)
    budgets = water_fill_budgets(scores, forced, uniform, min_share)
    assert budgets.dtype == torch.int32 and budgets.shape == (batch, heads)
    floor = max(1, math.ceil(min_share * uniform - 1e-9))
    assert int(budgets.min()) >= floor and int(budgets.max()) <= nb
    # The floors fit (each is at most the uniform budget), so the total is exactly the uniform one's.
    assert torch.equal(budgets.sum(-1), torch.full((batch,), heads * uniform, dtype=torch.int64))
    assert torch.equal(budgets, water_fill_budgets(scores.clone(), forced, uniform, min_share))


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 3), nb=st.integers(1, 6), density=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_water_fill_maximises_the_estimated_recall(heads, nb, density, seed):
    """Against every split of `H * uniform` blocks (each head at least its diagonal): no split holds more estimated
    mass than water-filling's."""
    scores = _scores(1, heads, nb, seed)
    forced = torch.eye(nb, dtype=torch.bool)
    uniform = block_budget(density, nb)
    budgets = water_fill_budgets(scores, forced, uniform)[0].tolist()
    # A row's mass at budget b: its diagonal and its b - 1 best other blocks (selection's order).
    video = scores[0, :, :, :nb]
    others = video.masked_fill(forced, -1.0).sort(-1, descending=True).values.clamp(min=0)
    curve = torch.cat([video.diagonal(dim1=-2, dim2=-1)[..., None], others[..., :-1]], -1).cumsum(-1).mean(-2)

    def held(split):
        return sum(float(curve[h, b - 1]) for h, b in enumerate(split))

    best = max(
        held(split)
        for split in itertools.product(range(1, nb + 1), repeat=heads)
        if sum(split) == heads * uniform
    )
    assert held(budgets) >= best - 1e-12


def test_forced_blocks_raise_the_floor():
    """A head whose rows must keep more blocks than its share (neighbours, non-finite keys) keeps at least those."""
    nb, heads = 8, 3
    scores = _scores(1, heads, nb, 0, sharpness=torch.tensor([8.0, 0.1, 0.1], dtype=torch.float64))
    forced = torch.eye(nb, dtype=torch.bool).expand(1, heads, nb, nb).clone()
    forced[0, 0, :, :5] = True
    budgets = water_fill_budgets(scores, forced, 2)
    # Rows 5-7 of head 0 keep blocks 0-4 and their diagonal: a floor of 6. The floors (6 + 1 + 1) exceed the
    # 3 * 2 blocks of the uniform budget, so every head keeps its floor.
    assert budgets.tolist() == [[6, 1, 1]]


def test_budgets_go_to_the_concentrated_heads():
    """A head whose mass sits in a few blocks per row gives its far tail to a head whose mass is spread: with the
    uniform budget at 4 of 16 blocks the diffuse head ends above 4, the concentrated one below."""
    nb = 16
    sharp = torch.zeros(1, 1, nb, nb + 1, dtype=torch.float64)
    sharp[..., :nb] = torch.eye(nb, dtype=torch.float64) * 0.9 + 0.1 / nb
    diffuse = torch.full((1, 1, nb, nb + 1), 1.0 / (nb + 1), dtype=torch.float64)
    scores = torch.cat([sharp, diffuse], 1)
    budgets = water_fill_budgets(scores, torch.eye(nb, dtype=torch.bool), 4)
    assert budgets.tolist()[0][0] < 4 < budgets.tolist()[0][1] and int(budgets.sum()) == 8


@settings(max_examples=30, deadline=None)
@given(heads=st.integers(1, 4), nb=st.integers(2, 16), density=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_a_uniform_budget_tensor_selects_what_the_uniform_budget_selects(heads, nb, density, seed):
    """The `(B, H)` budget path of `select_blocks` filled with the uniform budget is bitwise the int path's (with and
    without the mass threshold)."""
    grid = (1, 1, nb * 16)
    layout = token_layout(grid, 0, False, 16, "none")
    scores = _scores(1, heads, nb, seed)
    nonempty = torch.ones(1, heads, layout.num_blocks, dtype=torch.bool)
    uniform = torch.full((1, heads), block_budget(density, nb), dtype=torch.int32)
    for threshold in (None, 0.9):
        common = dict(density=density, key_block_nonempty=nonempty, mass_threshold=threshold, max_density=0.5)
        assert torch.equal(
            select_blocks(scores, layout, **common), select_blocks(scores, layout, **common, head_budget=uniform)
        )


def test_settings_choose_the_budget_policy():
    assert selection_settings(SparseAttentionConfig()) == TopK(0.25, None, 0.5, False, UniformBudget())
    chosen = selection_settings(SparseAttentionConfig(head_budget="water_fill")).budget
    assert chosen == WaterFilling()
    with pytest.raises(ValueError, match="head_budget='best'.*uniform"):
        SparseAttentionConfig(head_budget="best")
    layout = token_layout((1, 2, 16), 0, False, 16, "none")
    assert head_budgets(_scores(1, 2, 2, 0), layout, TopK(0.5)) is None


@pytest.mark.parametrize("text_len", [0, 9])
def test_plans_keep_the_average_density(text_len):
    """End to end through the reference orchestrator: each head's plan keeps its budget per video query block and the
    mean over heads is the setting's budget; the plan is the same on a second call (deterministic)."""
    grid = (2, 6, 8)
    inputs = dit_attention_inputs(
        grid, heads=4, head_dim=16, text_len=text_len, temperatures=(1.0, 3.0, 0.5, 2.0), seed=3, dtype=torch.float64
    )
    config = SparseAttentionConfig(sparsity=0.7, block_size=16, head_budget="water_fill", min_seq_len=0)
    layout = token_layout(grid, text_len, False, config.block_size, config.reorder)
    plans = [
        reference_call(inputs.query, inputs.key, inputs.value, None, layout, config).plan() for _ in range(2)
    ]
    assert torch.equal(plans[0].kv_indices, plans[1].kv_indices)
    nb = layout.num_video_blocks
    kept = plans[0].density() * nb  # (B, H): blocks per video query block
    assert float((kept.mean(-1) - block_budget(config.density, nb)).abs().max()) <= 1.0
    assert float(kept.min()) >= 1.0


def test_triton_implementation_selects_the_reference_plan():
    """The Triton implementation with per-head budgets gives the reference's plan for the same scores."""
    grid = (2, 4, 8)
    inputs = dit_attention_inputs(grid, heads=3, head_dim=16, temperatures=(1.0, 3.0, 0.5), seed=5)
    config = SparseAttentionConfig(sparsity=0.6, block_size=16, head_budget="water_fill", min_seq_len=0)
    layout = token_layout(grid, 0, False, config.block_size, config.reorder)
    call = sparse_call(inputs.query, inputs.key, inputs.value, None, layout, config, triton_implementation())
    plan = call.plan()
    assert call.prepared is not None
    reference = reference_call(inputs.query, inputs.key, inputs.value, None, layout, config)
    expected = reference.select(call.prepared, plan.block_scores)
    assert torch.equal(plan.to_dense(), expected.to_dense())
    assert torch.equal(plan.trusted_mask(), expected.trusted_mask())
    uniform = dataclasses.replace(config, head_budget="uniform")
    kernel_plan = sparse_call(inputs.query, inputs.key, inputs.value, None, layout, uniform, triton_implementation())
    assert float(kernel_plan.plan().density().mean()) == pytest.approx(float(plan.density().mean()), abs=1 / 8)


def test_the_budget_policy_is_part_of_the_cached_plans_key():
    """A plan cached under one budget policy is never reused under another (`runtime.op.plan_signature`)."""
    from spattn_compile.runtime import op

    grid = (2, 4, 8)
    inputs = dit_attention_inputs(grid, heads=2, head_dim=16, seed=1, dtype=torch.float64)
    layout = token_layout(grid, 0, False, 16, "hilbert")
    signatures = set()
    for budget in ("uniform", "water_fill"):
        config = SparseAttentionConfig(block_size=16, head_budget=budget, min_seq_len=0)
        call = reference_call(inputs.query, inputs.key, inputs.value, None, layout, config)
        signatures.add(op.plan_signature(call, config))
    assert len(signatures) == 2


def test_report_shows_each_heads_density_and_estimated_recall(tmp_path):
    import spattn_compile
    from spattn_compile.runtime import model_state
    from spattn_compile.runtime.binding import default_registry
    from spattn_compile.runtime.plan_cache import plan_summary
    from spattn_compile.runtime.records import head_summary

    inputs = dit_attention_inputs((4, 8, 8), heads=3, head_dim=16, temperatures=(0.3, 1.0, 4.0), seed=2)
    config = SparseAttentionConfig(block_size=16, sparsity=0.7, head_budget="water_fill")
    plan = spattn_compile.select_plan(
        inputs.query, inputs.key, inputs.value, video_grid=(4, 8, 8), config=config, impl="reference"
    )
    context = model_state.StepContext(default_registry().anonymous("perhead"), 0, 1, 0, "override")
    kept, recall, share = plan_summary(plan)
    model_state.record(
        context, 0, "sparse", "refresh", kept, recall, keep_share=share, layer="blocks.0",
        head_summary=head_summary(plan),
    )  # fmt: skip
    result = spattn_compile.report()
    ((step, density, estimated),) = result.heads.values()
    assert step == 1
    assert torch.allclose(density, plan.density()[0]) and torch.allclose(estimated, plan.estimated_recall()[0])
    assert len(set(density.tolist())) > 1, "water-filling gave these heads different densities"
    table = result.head_table()
    assert "blocks.0" in table and f"2: {density[2]:.3f}/{estimated[2]:.3f}" in table
    pytest.importorskip("matplotlib")
    result.plot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 0
