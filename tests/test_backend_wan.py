"""The spattn backend on a tiny WanTransformer3DModel: video-only self-attention becomes sparse, cross-attention to
the text stays dense; outputs match eager attention (dense at sparsity 0, the sparse reference otherwise), also at a
new resolution and through Inductor."""

import pytest
import torch
from models import (
    compare_with_eager,
    compile_spattn,
    compiled_graph_count,
    explain_model,
    reset_dynamo,
    wan,
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    reset_dynamo()
    yield
    reset_dynamo()


@pytest.fixture(scope="module")
def tiny():
    return wan(num_layers=2)


def test_wan_self_attention_is_rewritten_and_cross_attention_is_not(tiny):
    inputs = tiny.make_inputs(3, 8, 12)
    report = explain_model(tiny, inputs)
    assert report.graph_break_count == 0
    assert [d.module for d in report.sparse] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert [d.layer_index for d in report.sparse] == [0, 1]
    for decision in report.sparse:
        assert decision.video_grid == (3, 4, 6) and decision.grid_from == "graph"
        assert decision.text_len == 0 and decision.text_position is None
    assert [(d.module, d.rule) for d in report.dense] == [
        ("blocks.0.attn2", "cross_attention"),
        ("blocks.1.attn2", "cross_attention"),
    ]
    reset_dynamo()
    with torch.no_grad():
        compile_spattn(tiny.model)(**inputs)
    assert compiled_graph_count() == report.graph_count  # the rewrite adds no graph break


def test_wan_outputs_match_eager_attention(tiny):
    inputs = tiny.make_inputs(3, 8, 12, batch=2)
    compiled = compile_spattn(tiny.model, compiler="aot_eager")
    result = compare_with_eager(tiny, compiled, inputs, (3, 4, 6))
    print(f"\nWan: sparsity 0.75 vs dense rel err {result.dense_at_sparsity:.4f}")
    assert result.sparse_calls == 2 and result.finite
    assert result.dense_at_sparsity_0 < 1e-5
    assert result.reference_at_sparsity < 1e-5
    assert 1e-4 < result.dense_at_sparsity < 0.3
    assert compiled_graph_count() == 1  # sparsity changed at run time: no recompilation


def test_wan_new_resolution_recompiles_with_the_new_grid(tiny):
    compiled = compile_spattn(tiny.model, dynamic=False)
    first = compare_with_eager(tiny, compiled, tiny.make_inputs(3, 8, 12), (3, 4, 6))
    second = compare_with_eager(tiny, compiled, tiny.make_inputs(2, 10, 8, seed=1), (2, 5, 4))
    for result in (first, second):
        assert result.sparse_calls == 2 and result.dense_at_sparsity_0 < 1e-5 and result.reference_at_sparsity < 1e-5
    assert compiled_graph_count() == 2  # static shapes: the new size fails the guards and recompiles
    again = compare_with_eager(tiny, compiled, tiny.make_inputs(3, 8, 12, seed=2), (3, 4, 6))
    assert again.reference_at_sparsity < 1e-5 and compiled_graph_count() == 2  # the first graph is reused


@pytest.mark.slow
def test_wan_through_inductor(tiny):
    inputs = tiny.make_inputs(3, 8, 12)
    compiled = compile_spattn(tiny.model, compiler="inductor")
    result = compare_with_eager(tiny, compiled, inputs, (3, 4, 6), sparsity=0.6, rectify="query")
    print(f"\nWan (Inductor): sparsity 0.6 vs dense rel err {result.dense_at_sparsity:.4f}")
    assert result.sparse_calls == 2 and result.finite
    assert result.dense_at_sparsity_0 < 1e-4
    assert result.reference_at_sparsity < 1e-4
    assert result.dense_at_sparsity > 1e-4
    assert compiled_graph_count() == 1
