"""The spattn backend on a tiny HunyuanVideoTransformer3DModel: the joint [video, text] attentions of the dual- and
single-stream blocks become sparse with the padded text masked out; the token refiner's text-only attention (a full
(B, 1, T, T) mask) stays dense."""

import pytest
import torch
from models import compare_with_eager, compile_spattn, compiled_graph_count, explain_model, hunyuan_video, reset_dynamo


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    reset_dynamo()
    yield
    reset_dynamo()


@pytest.fixture(scope="module")
def tiny():
    return hunyuan_video(num_layers=1, num_single_layers=1, text_len=9, valid_text=6)


def test_hunyuan_joint_attention_is_rewritten_and_the_refiner_is_not(tiny):
    inputs = tiny.make_inputs(3, 8, 12)
    report = explain_model(tiny, inputs)
    assert report.graph_break_count == 0
    assert [d.module for d in report.sparse] == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    for decision in report.sparse:
        assert decision.video_grid == (3, 4, 6) and decision.grid_from == "graph"
        assert decision.text_len == 9 and decision.text_position == "last"
    assert [(d.module, d.rule) for d in report.dense] == [
        ("context_embedder.token_refiner.refiner_blocks.0.attn", "mask")
    ]
    reset_dynamo()
    with torch.no_grad():
        compile_spattn(tiny.model)(**inputs)
    assert compiled_graph_count() == report.graph_count


def test_hunyuan_outputs_match_eager_attention(tiny):
    inputs = tiny.make_inputs(3, 8, 12, batch=2)
    inputs["encoder_attention_mask"][1, 4:] = 0  # the second prompt is shorter: per-sample key padding
    compiled = compile_spattn(tiny.model)
    result = compare_with_eager(tiny, compiled, inputs, (3, 4, 6))
    print(f"\nHunyuanVideo: sparsity 0.75 vs dense rel err {result.dense_at_sparsity:.4f}")
    assert result.sparse_calls == 2 and result.finite
    assert result.dense_at_sparsity_0 < 1e-5
    assert result.reference_at_sparsity < 1e-5
    assert 1e-4 < result.dense_at_sparsity < 0.3
    assert compiled_graph_count() == 1
