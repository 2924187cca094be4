"""`spattn_compile.testing.PlanEvaluator`: dense attention, the true block mass and the fidelity of many plans from one
pass over the partial softmax states, against the reference functions they regroup (`reference.dense_attention`,
`reference.attention_block_mass`) and against running `sparse_attention(..., plan=...)` for each plan, in float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_helpers import reference_plan

from spattn_compile import SparseAttentionConfig, SparsePlan, reference, select_plan, sparse_attention
from spattn_compile.estimators import QueryTiles, SampledRows
from spattn_compile.inputs import key_padding_valid
from spattn_compile.layout import token_layout
from spattn_compile.testing import PlanEvaluator, PlanResult, dit_attention_inputs, relative_error

F64 = torch.float64

CASES = {
    # A partial last video block, text last with padding, batch 2.
    "text_last": dict(video_grid=(3, 5, 7), text_len=13, text_first=False, text_padding=4, batch=2, block_size=16),
    # Text first, blocks of 32 with a partial last one, no mask.
    "text_first": dict(video_grid=(2, 7, 5), text_len=9, text_first=True, text_padding=0, batch=1, block_size=32),
}


def _case(name: str):
    case = CASES[name]
    inputs = dit_attention_inputs(
        case["video_grid"],
        batch=case["batch"],
        heads=2,
        head_dim=16,
        text_len=case["text_len"],
        text_first=case["text_first"],
        text_padding=case["text_padding"],
        dtype=F64,
        seed=7,
    )
    layout = token_layout(case["video_grid"], case["text_len"], case["text_first"], case["block_size"])
    return inputs, layout


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("chunk_rows", [16, 1024])
def test_dense_and_true_mass_equal_the_reference(name, chunk_rows):
    inputs, layout = _case(name)
    evaluator = PlanEvaluator(
        inputs.query, inputs.key, inputs.value, layout, attn_mask=inputs.attn_mask, chunk_rows=chunk_rows
    )
    dense = reference.dense_attention(inputs.query, inputs.key, inputs.value, inputs.attn_mask)
    assert evaluator.dense().dtype == F64
    assert relative_error(evaluator.dense(), dense) < 1e-12
    mass = reference.attention_block_mass(inputs.query, inputs.key, layout, inputs.attn_mask)
    assert relative_error(evaluator.true_mass(), mass) < 1e-12
    torch.testing.assert_close(evaluator.true_mass().sum(-1), torch.ones_like(mass[..., 0]), rtol=0, atol=1e-12)


def test_explicit_scale_is_used():
    inputs, layout = _case("text_last")
    evaluator = PlanEvaluator(inputs.query, inputs.key, inputs.value, layout, attn_mask=inputs.attn_mask, scale=0.7)
    dense = reference.dense_attention(inputs.query, inputs.key, inputs.value, inputs.attn_mask, scale=0.7)
    assert relative_error(evaluator.dense(), dense) < 1e-12
    mass = reference.attention_block_mass(inputs.query, inputs.key, layout, inputs.attn_mask, scale=0.7)
    assert relative_error(evaluator.true_mass(), mass) < 1e-12


def _plans(inputs, layout) -> dict[str, tuple[SparsePlan, str]]:
    """Plans of several estimators and densities, the oracle's, and a hand-built one, each with a rectify mode."""
    block = layout.block_size
    plans = {}
    for estimator in ("pooled", SampledRows(4), QueryTiles(16)):
        for sparsity in (0.5, 0.8):
            for rectify in ("none", "block", "query"):
                config = SparseAttentionConfig(
                    block_size=block, estimator=estimator, sparsity=sparsity, rectify=rectify, min_seq_len=0
                )
                plan = select_plan(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config)
                plans[f"{plan.estimator}-{sparsity}-{rectify}"] = (plan, rectify)
    nq = layout.num_blocks
    keep = torch.eye(nq, dtype=torch.bool).expand(1, 2, nq, nq).clone()
    keep[..., layout.num_video_blocks :] = True
    plans["diagonal-mask"] = (
        SparsePlan.from_mask(
            keep, video_grid=inputs.video_grid, text_len=inputs.text_len, text_first=inputs.text_first,
            block_size=block, trusted=torch.ones(1, 2, nq, layout.num_video_blocks, dtype=torch.bool),
        ),
        "query",
    )  # fmt: skip
    return plans


@pytest.mark.parametrize("name", list(CASES))
def test_evaluate_equals_running_each_plan(name):
    inputs, layout = _case(name)
    evaluator = PlanEvaluator(inputs.query, inputs.key, inputs.value, layout, attn_mask=inputs.attn_mask, chunk_rows=32)
    plans = _plans(inputs, layout)
    results = evaluator.evaluate(plans)
    assert list(results) == list(plans)
    dense = evaluator.dense()
    mass = evaluator.true_mass()
    nb = layout.num_video_blocks
    errors = []
    for key, (plan, rectify) in plans.items():
        result = results[key]
        assert isinstance(result, PlanResult)
        config = SparseAttentionConfig(block_size=layout.block_size, rectify=rectify, min_seq_len=0)
        out = sparse_attention(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config, plan=plan)
        error = float((out - dense).norm() / dense.norm())
        assert result.error == pytest.approx(error, rel=1e-9, abs=1e-15), key
        head_error = ((out - dense).norm(dim=(-1, -2)) / dense.norm(dim=(-1, -2))).mean(0)
        assert result.head_error == pytest.approx(tuple(head_error.tolist()), rel=1e-9), key
        keep = plan.expand_batch(inputs.query.shape[0]).to_dense()[..., :nb, :nb]
        recall = ((mass[..., :nb] * keep).sum(-1) + mass[..., nb]).mean()
        assert result.recall == pytest.approx(float(recall), rel=1e-12), key
        assert result.density == pytest.approx(float(plan.density().mean()), rel=1e-6), key
        errors.append(error)
    # The plans differ: the comparison is not of one number with itself.
    assert max(errors) > 3 * min(errors) > 0


def test_recall_of_a_plan_scored_by_true_mass_is_its_estimated_recall():
    """The oracle's plan (selected on the true block mass): PlanResult.recall is a measurement, and equals the plan's
    own `estimated_recall()` because its scores are the true mass."""
    inputs, layout = _case("text_last")
    evaluator = PlanEvaluator(inputs.query, inputs.key, inputs.value, layout, attn_mask=inputs.attn_mask)
    config = SparseAttentionConfig(block_size=16, sparsity=0.7, rectify="none", min_seq_len=0)
    truth = evaluator.true_mass()
    b, h = truth.shape[:2]
    valid = key_padding_valid(inputs.attn_mask, b, h, inputs.seq_len)
    valid_c = reference.canonical_key_valid(valid, layout, b, h, truth.device)
    stats = evaluator.stats
    oracle = reference_plan(
        truth, stats, valid_c, layout, density=config.density, config=config, estimator="oracle"
    )
    result = evaluator.evaluate({"oracle": (oracle, "none")})["oracle"]
    assert result.recall == pytest.approx(float(oracle.estimated_recall().mean()), rel=1e-6)
    # The oracle keeps at least as much true mass as any estimator's plan of the same budget.
    estimated = select_plan(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config)
    other = evaluator.evaluate({"pooled": (estimated, "none")})["pooled"]
    assert result.recall >= other.recall - 1e-12 and result.density == pytest.approx(other.density)


def test_a_batch_one_plan_is_evaluated_on_every_sample():
    inputs, layout = _case("text_last")
    evaluator = PlanEvaluator(inputs.query, inputs.key, inputs.value, layout, attn_mask=inputs.attn_mask)
    config = SparseAttentionConfig(block_size=16, sparsity=0.6, rectify="query", min_seq_len=0)
    first = dataclasses.replace(inputs, query=inputs.query[:1], key=inputs.key[:1], value=inputs.value[:1])
    plan = select_plan(first.query, first.key, first.value, **{**first.kwargs(), "attn_mask": inputs.attn_mask[:1]},
                       config=config)  # fmt: skip
    result = evaluator.evaluate({"shared": (plan, "query")})["shared"]
    out = sparse_attention(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config, plan=plan)
    dense = evaluator.dense()
    assert result.error == pytest.approx(float((out - dense).norm() / dense.norm()), rel=1e-9)
