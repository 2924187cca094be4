"""The spattn backend on a tiny LTXVideoTransformer3DModel. Its latents arrive already packed as (B, S, C) tokens, so
no patch embedding shows the grid: the pass finds it in the rotary embedding, whose coordinates are a meshgrid over
(frames, height, width) flattened into the sequence and multiplied into the queries and keys."""

import pytest
import torch
from models import compare_with_eager, compile_spattn, compiled_graph_count, explain_model, ltx_video, reset_dynamo


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    reset_dynamo()
    yield
    reset_dynamo()


def test_ltx_self_attention_grid_comes_from_the_rotary_embedding():
    tiny = ltx_video(num_layers=2, text_len=7)
    inputs = tiny.make_inputs(3, 4, 6)
    report = explain_model(tiny, inputs)
    assert report.graph_break_count == 0
    assert [d.module for d in report.sparse] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    for decision in report.sparse:
        assert decision.video_grid == (3, 4, 6) and decision.text_len == 0
    assert [d.rule for d in report.dense] == ["cross_attention", "cross_attention"]
    reset_dynamo()
    compiled = compile_spattn(tiny.model)
    result = compare_with_eager(tiny, compiled, inputs, (3, 4, 6))
    print(f"\nLTX-Video: sparsity 0.75 vs dense rel err {result.dense_at_sparsity:.4f}")
    assert result.sparse_calls == 2 and result.finite
    assert result.dense_at_sparsity_0 < 1e-5
    assert result.reference_at_sparsity < 1e-5
    assert 1e-4 < result.dense_at_sparsity < 0.3
    assert compiled_graph_count() == report.graph_count == 1
    with torch.no_grad():
        compiled(**tiny.make_inputs(3, 4, 6, seed=3))
    assert compiled_graph_count() == 1
