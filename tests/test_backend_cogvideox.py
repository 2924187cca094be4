"""The spattn backend on tiny CogVideoXTransformer3DModels: joint attention over [text, video] (text first). The 1.0
patch embedding is a conv2d over batch*frames whose frame count comes from a reshape; the 1.5 one patches frames
pairwise with a reshape and a linear layer. Both grids must be found from the graph alone."""

import pytest
from models import cogvideox, compare_with_eager, compile_spattn, compiled_graph_count, explain_model, reset_dynamo


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    reset_dynamo()
    yield
    reset_dynamo()


@pytest.mark.parametrize("patch_size_t, frames, grid", [(None, 3, (3, 4, 6)), (2, 4, (2, 4, 6))])
def test_cogvideox_joint_attention_is_rewritten(patch_size_t, frames, grid):
    tiny = cogvideox(num_layers=2, text_len=8, patch_size_t=patch_size_t)
    inputs = tiny.make_inputs(frames, 8, 12)
    report = explain_model(tiny, inputs)
    assert report.graph_break_count == 0 and report.dense == ()
    assert [d.module for d in report.sparse] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    for decision in report.sparse:
        assert decision.video_grid == grid and decision.grid_from == "graph"
        assert decision.text_len == 8 and decision.text_position == "first"
    reset_dynamo()
    compiled = compile_spattn(tiny.model)
    result = compare_with_eager(tiny, compiled, inputs, grid)
    print(f"\nCogVideoX (patch_size_t={patch_size_t}): sparsity 0.75 vs dense rel err {result.dense_at_sparsity:.4f}")
    assert result.sparse_calls == 2 and result.finite
    assert result.dense_at_sparsity_0 < 1e-5
    assert result.reference_at_sparsity < 1e-5
    assert 1e-4 < result.dense_at_sparsity < 0.3
    assert compiled_graph_count() == report.graph_count == 1
