"""Dynamic shapes: with torch.compile(dynamic=True) (or after Dynamo's automatic switch to dynamic shapes) one graph
serves every resolution, frame count and text length. The pass proves S == F*H*W + text_len on the symbolic sizes
(sympy, without adding guards) and passes the grid and text length to the op as graph values, so each call gets its
own grid."""

import pytest
import torch
from families import BY_NAME
from helpers import compare_with_eager, compile_blocks, compile_spattn, compiled_graph_count

import spattn_compile
from spattn_compile import backend
from spattn_compile.testing import zoo


@pytest.fixture
def rewrites(monkeypatch):
    """The decisions and rewritten code of every graph the backend compiles."""
    captured = []
    original = backend.rewrite_attention

    def recording(gm, config, graph_index=0, seeds=None):
        decisions = original(gm, config, graph_index, seeds)
        captured.append((decisions, gm.code))
        return decisions

    monkeypatch.setattr(backend, "rewrite_attention", recording)
    return captured


def _check(result):
    assert result.finite and result.sparse_calls >= 1
    assert result.dense_at_sparsity_0 < 1e-5
    assert result.reference_at_sparsity < 1e-5
    assert result.dense_at_sparsity > 1e-4


def test_wan_one_dynamic_graph_serves_every_resolution(rewrites):
    tiny = BY_NAME["wan"].build()
    compiled = compile_spattn(tiny.model, dynamic=True)
    # Batch 1 would be specialised (Dynamo treats size-1 dimensions as static), so the batches start at 2.
    for frames, height, width, batch in [(3, 8, 12, 2), (2, 10, 14, 3), (4, 6, 8, 2)]:
        inputs = tiny.make_inputs(frames, height, width, batch=batch, seed=frames)
        _check(compare_with_eager(tiny, compiled, inputs, tiny.patch_grid(frames, height, width)))
    assert compiled_graph_count() == 1
    [(decisions, code)] = rewrites
    sparse = [d for d in decisions if d.sparse]
    assert len(sparse) == 2
    for decision in sparse:
        assert all(isinstance(size, torch.SymInt) for size in decision.video_grid), decision.video_grid
        assert "min_seq_len" in decision.reason  # applied by the op, at run time
    assert code.count("torch.ops.spattn.sparse_attention.default") == 2
    assert "sym_size" in code  # the grid is read from the traced tensors, not baked in


def test_hunyuan_dynamic_text_length_and_resolution(rewrites):
    tiny = zoo.hunyuan_video(text_len=9, valid_text=6)
    compiled = compile_spattn(tiny.model, dynamic=True)
    _check(compare_with_eager(tiny, compiled, tiny.make_inputs(3, 8, 12), (3, 4, 6)))
    longer = zoo.hunyuan_video(text_len=11, valid_text=7)
    longer.model.load_state_dict(tiny.model.state_dict())
    inputs = longer.make_inputs(2, 10, 14, seed=5)
    _check(compare_with_eager(longer, compiled, inputs, (2, 5, 7)))
    assert compiled_graph_count() == 1
    [(decisions, _)] = rewrites
    assert [isinstance(d.text_len, torch.SymInt) for d in decisions if d.sparse] == [True, True]


def test_cogvideox_dynamic_text_first(rewrites):
    tiny = zoo.cogvideox(num_layers=1, text_len=7)
    compiled = compile_spattn(tiny.model, dynamic=True)
    _check(compare_with_eager(tiny, compiled, tiny.make_inputs(3, 8, 12), (3, 4, 6)))
    other = zoo.cogvideox(num_layers=1, text_len=9)
    other.model.load_state_dict(tiny.model.state_dict())
    _check(compare_with_eager(other, compiled, other.make_inputs(2, 10, 14, seed=4), (2, 5, 7)))
    assert compiled_graph_count() == 1
    [(decisions, _)] = rewrites
    assert [d.text_position for d in decisions] == ["first"]


def test_automatic_dynamic_shapes_after_a_resolution_change(rewrites):
    tiny = zoo.wan(num_layers=1)
    compiled = compile_spattn(tiny.model)  # dynamic=None: static first, dynamic after the first recompile
    for frames, height, width in [(3, 8, 12), (2, 10, 14), (4, 6, 10)]:
        inputs = tiny.make_inputs(frames, height, width, seed=height)
        _check(compare_with_eager(tiny, compiled, inputs, tiny.patch_grid(frames, height, width)))
    assert compiled_graph_count() == 2
    static, dynamic = (decisions for decisions, _ in rewrites)
    assert [d.video_grid for d in static if d.sparse] == [(3, 4, 6)]
    assert all(isinstance(size, torch.SymInt) for d in dynamic if d.sparse for size in d.video_grid)


def test_regional_blocks_take_the_grid_of_each_call():
    # compile_repeated_blocks: the blocks' graphs hold no grid; each call takes the grid the model's forward hook read
    # from its latent, at every resolution, through the static first graphs and the dynamic ones after them.
    tiny = zoo.hunyuan_video()
    eager = zoo.hunyuan_video().model
    compile_blocks(tiny.model)
    for frames, height, width in [(3, 8, 12), (2, 10, 14), (4, 6, 10)]:
        inputs = tiny.make_inputs(frames, height, width, seed=height)
        _check(compare_with_eager(tiny, tiny.model, inputs, tiny.patch_grid(frames, height, width), eager=eager))
    assert {r.kind for r in spattn_compile.report().records} == {"sparse"}
