"""The spattn backend and its attention pass on small hand-written models: registration, options, every dense rule,
the user's overrides, run-time settings without recompilation, explain and logging."""

import dataclasses
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    SETTINGS,
    SparseSDPA,
    TinyVideoAttention,
    compile_spattn,
    compiled_graph_count,
    reset_dynamo,
    tiny_inputs,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import spattn_compile
from spattn_compile.backend import BackendOptions, spattn_backend
from spattn_compile.passes import analyze_attention, rewrite_attention
from spattn_compile.testing import relative_error

# Grid 3 x 4 x 6 = 72 video tokens and 5 text tokens: 77 tokens, five 16-token video blocks (the last one partial).
FRAMES, HEIGHT, WIDTH, TEXT = 3, 8, 12, 5
GRID = (3, 4, 6)


def _explain(model, *args, **overrides):
    with torch.no_grad(), spattn_compile.config(**{**SETTINGS, **overrides}):
        return spattn_compile.explain(model, *args)


def _only(report):
    assert len(report.decisions) == 1, report
    return report.decisions[0]


# ---------------------------------------------------------------------------------------------------------------
# Registration and options
# ---------------------------------------------------------------------------------------------------------------


def test_backend_is_registered_on_import():
    assert "spattn" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("spattn") is spattn_backend


_SUBPROCESS_MODEL = """
    import sys, torch, torch.nn.functional as F
    {prelude}
    conv = torch.nn.Conv3d(4, 32, (1, 2, 2), stride=(1, 2, 2))
    def layer(video):
        x = conv(video).flatten(2).transpose(1, 2)
        q = x.unflatten(-1, (2, 16)).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q * 0.5, q)
    options = {{"compiler": "eager", "block_size": 16, "min_seq_len": 0, "sparsity": 0.5}}
    with torch.no_grad():
        out = torch.compile(layer, backend="spattn", options=options)(torch.randn(1, 4, 3, 8, 12))
    import spattn_compile
    assert torch.isfinite(out).all()
    assert "spattn" in torch._dynamo.list_backends()
    print("ok", "spattn_compile" in sys.modules)
"""


@pytest.mark.parametrize(
    "prelude",
    [
        "",  # the user never imports spattn_compile: Dynamo finds the backend through the entry point
        "torch._dynamo.list_backends(); import spattn_compile",  # entry points scanned before the import
    ],
)
def test_backend_resolves_by_name_in_a_fresh_process(prelude):
    code = textwrap.dedent(_SUBPROCESS_MODEL.format(prelude=prelude))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["ok", "True"]


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"sparsityy": 0.5}, ValueError, "sparsityy"),
        ({"compiler": 3}, TypeError, "compiler"),
        ({"compiler": "no-such-backend"}, ValueError, "no-such-backend"),
        ({"compiler": "spattn"}, ValueError, "spattn"),
        ({"compiler": "eager", "compiler_options": {"max_autotune": True}}, ValueError, "compiler_options"),
        ({"compiler_options": ["max_autotune"]}, TypeError, "compiler_options"),
        ({"compiler_options": {"triton.cudagraphs": True}}, ValueError, "cudagraphs"),
        ({"sparsity": 1.5}, ValueError, "sparsity"),
        ({"block_size": "16"}, TypeError, "block_size"),
        ({"video_grid": (3, 4)}, ValueError, "video_grid"),
        ([("sparsity", 0.5)], TypeError, "dict"),
    ],
)
def test_bad_options_raise_naming_the_option(options, error, words):
    with pytest.raises(error, match=words):
        BackendOptions.parse(options)


def test_bad_option_fails_the_compile_with_the_cause():
    model = TinyVideoAttention()
    compiled = torch.compile(model, backend="spattn", options={"compiler": "eager", "sparsityy": 0.5})
    with pytest.raises(Exception) as failure, torch.no_grad():
        compiled(*tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT))
    assert "sparsityy" in str(failure.value)


def test_reduce_overhead_is_refused_saying_what_to_use_instead():
    with pytest.raises(ValueError, match="max-autotune-no-cudagraphs") as refused:
        spattn_backend(torch.fx.symbolic_trace(torch.nn.Identity()), [], mode="reduce-overhead")
    assert "CUDA graphs" in str(refused.value)
    with pytest.raises(ValueError, match="not a torch.compile mode"):
        spattn_backend(torch.fx.symbolic_trace(torch.nn.Identity()), [], mode="max-autotuned")
    with pytest.raises(ValueError, match="needs the Inductor compiler"):
        spattn_backend(
            torch.fx.symbolic_trace(torch.nn.Identity()), [], mode="max-autotune", options={"compiler": "eager"}
        )


@pytest.mark.parametrize("mode", ["max-autotune", "max-autotune-no-cudagraphs"])
def test_autotune_modes_compile_without_cuda_graphs(mode):
    from torch._inductor import list_mode_options

    from spattn_compile.backend import _inner_compiler

    compile_inner = _inner_compiler(BackendOptions(), mode)
    patches = compile_inner.keywords["config_patches"]
    assert patches["triton.cudagraphs"] is False
    assert all(patches[key] == value for key, value in list_mode_options(mode).items() if key != "triton.cudagraphs")


def test_backend_with_preset_options_validates_them_at_once():
    backend = spattn_compile.backend(compiler="eager", sparsity=0.5)
    assert isinstance(backend, spattn_compile.backend.SpattnBackend)
    assert backend.preset == {"compiler": "eager", "sparsity": 0.5}
    with pytest.raises(ValueError, match="sparsityy"):
        spattn_compile.backend(sparsityy=0.5)
    with pytest.raises(ValueError, match="SparseAttentionConfig.sparsity"):
        spattn_compile.backend(sparsity=1.5)


def test_max_autotune_mode_with_settings_through_the_backend_callable():
    # torch.compile takes mode= or options=, not both: the settings ride on the backend (Inductor, max-autotune).
    model = TinyVideoAttention()
    inputs = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT)
    compiled = torch.compile(model, backend=spattn_compile.backend(**SETTINGS, sparsity=0.75), mode="max-autotune")
    with torch.no_grad():
        out = compiled(*inputs)
        with spattn_compile.config(**SETTINGS, sparsity=0.75), SparseSDPA(GRID, TEXT) as reference:
            expected = model(*inputs)
        with spattn_compile.config(sparsity=0.0):  # run-time settings still apply
            exact = compiled(*inputs)
    assert reference.sparse_calls == 1 and relative_error(out, expected) < 1e-4
    assert relative_error(exact, model(*inputs)) < 1e-4
    assert relative_error(out, exact) > 1e-4
    assert compiled_graph_count() == 1


def test_settings_from_config_reach_a_model_compiled_with_a_mode():
    # The other way with mode=: scope the settings; the compile-time ones (min_seq_len) are read at the first call.
    model = TinyVideoAttention()
    inputs = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT)
    backend = spattn_compile.backend(compiler="eager")
    with torch.no_grad(), spattn_compile.config(**SETTINGS, sparsity=0.75):
        out = torch.compile(model, backend=backend)(*inputs)
        with SparseSDPA(GRID, TEXT):
            expected = model(*inputs)
    assert relative_error(out, expected) < 1e-5 and relative_error(out, model(*inputs)) > 1e-4


def test_options_are_defaults_that_runtime_settings_override():
    parsed = BackendOptions.parse({"compiler": "eager", "sparsity": 0.9, "rectify": "query", "min_seq_len": 0})
    library = spattn_compile.SparseAttentionConfig()
    assert parsed.compose(library) == dataclasses.replace(library, sparsity=0.9, rectify="query", min_seq_len=0)
    with spattn_compile.config(sparsity=0.5, gapr=False) as runtime:
        composed = parsed.compose(runtime)
    assert (composed.sparsity, composed.rectify, composed.gapr, composed.min_seq_len) == (0.5, "query", False, 0)
    # A run-time value equal to the library default still wins, because it was set explicitly.
    with spattn_compile.config(sparsity=library.sparsity) as runtime:
        assert parsed.compose(runtime).sparsity == library.sparsity
    with spattn_compile.config(gapr=False) as runtime:
        assert BackendOptions.parse({"compiler": "eager"}).compose(runtime) is runtime


# ---------------------------------------------------------------------------------------------------------------
# Which calls become sparse
# ---------------------------------------------------------------------------------------------------------------


def _positional(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, mask)


def _keyword(q, k, v, mask):
    return F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask, dropout_p=0.0, is_causal=False)


def _functional_module(q, k, v, mask):
    return torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)


@pytest.mark.parametrize("attention", [_positional, _keyword, _functional_module])
@pytest.mark.parametrize("text_first", [False, True])
def test_joint_attention_is_rewritten_with_the_inferred_grid(attention, text_first):
    model = TinyVideoAttention(attention, text_first=text_first)
    decision = _only(_explain(model, *tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT)))
    assert decision.sparse, decision
    assert decision.video_grid == GRID and decision.grid_from == "graph"
    assert decision.text_len == TEXT and decision.text_position == ("first" if text_first else "last")
    assert decision.layer_index == 0 and decision.query_shape == (1, 2, 77, 16)


def _cross(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k[:, :, :20], v[:, :, :20])


def _causal(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _dropout(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)


def _grouped_query(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)


def _three_dimensional(q, k, v, mask):
    return F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)).unflatten(0, q.shape[:2])


def _full_mask(q, k, v, mask):
    keep = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def _float_mask(q, k, v, mask):
    bias = torch.zeros(1, 1, 1, q.shape[2], device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _value_head_dim(q, k, v, mask):
    half = F.scaled_dot_product_attention(q, k, v[..., :8])
    return torch.cat([half, half], dim=-1)


@pytest.mark.parametrize(
    "attention, rule",
    [
        (_cross, "cross_attention"),
        (_causal, "causal"),
        (_dropout, "dropout"),
        (_grouped_query, "gqa"),
        (_three_dimensional, "shape"),
        (_value_head_dim, "shape"),
        (_full_mask, "mask"),
        (_float_mask, "mask"),
    ],
)
def test_unsupported_attention_stays_dense_with_the_reason(attention, rule):
    model = TinyVideoAttention(attention)
    inputs = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT)
    decision = _only(_explain(model, *inputs))
    assert not decision.sparse and decision.rule == rule and decision.reason, decision
    assert decision.layer_index is None
    if rule == "dropout":
        return  # random: no output to compare
    with torch.no_grad():
        expected = model(*inputs)
        out = compile_spattn(model, sparsity=0.75)(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_that_needs_autograd_stays_dense():
    model = TinyVideoAttention()
    inputs = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT)
    with spattn_compile.config(**SETTINGS):
        decision = _only(spattn_compile.explain(model, *inputs))  # grad mode on, parameters require grad
    assert not decision.sparse and decision.rule == "autograd" and "no_grad" in decision.reason
    out = compile_spattn(model, compiler="aot_eager")(*inputs)
    out.square().sum().backward()
    torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-5)
    assert model.qkv.weight.grad is not None and torch.isfinite(model.qkv.weight.grad).all()


def test_short_sequences_stay_dense_at_compile_time():
    model = TinyVideoAttention()
    decision = _only(_explain(model, *tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT), min_seq_len=78))
    assert not decision.sparse and decision.rule == "short" and "77 < min_seq_len=78" in decision.reason
    assert decision.video_grid == GRID  # inference still reports what it found
    assert _only(_explain(model, *tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT), min_seq_len=77)).sparse


def test_key_padding_mask_is_kept_and_applied():
    model = TinyVideoAttention(_keyword)
    video, text = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT, batch=2)
    mask = torch.ones(2, 1, 1, 77, dtype=torch.bool)
    mask[0, ..., -2:] = False  # padded text keys of the first sample
    mask[1, ..., 10:14] = False  # and some video keys of the second
    decision = _only(_explain(model, video, text, mask))
    assert decision.sparse and decision.video_grid == GRID
    with torch.no_grad(), spattn_compile.config(**SETTINGS, sparsity=0.5):
        with SparseSDPA(GRID, TEXT) as reference:
            expected = model(video, text, mask)
        out = compile_spattn(model)(video, text, mask)
    assert reference.sparse_calls == 1
    assert relative_error(out, expected) < 1e-5
    assert relative_error(out, model(video, text, mask)) > 1e-4  # sparse, not dense: the test can tell them apart


def test_model_without_attention_compiles_unchanged():
    model = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 1), torch.nn.Flatten(2), torch.nn.Linear(96, 5))
    video = torch.randn(2, 4, 1, 8, 12)
    graph_module = torch.fx.symbolic_trace(model)
    code = graph_module.code
    assert rewrite_attention(graph_module, spattn_compile.SparseAttentionConfig(**SETTINGS)) == []
    assert graph_module.code == code
    with torch.no_grad():
        torch.testing.assert_close(compile_spattn(model)(video), model(video), rtol=0, atol=0)
    assert _explain(model, video).decisions == ()


class TokenProbe(torch.nn.Module):
    """Self-attention over whatever token sequence `tokens(self, video, text)` builds (B, S, 32)."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens
        self.patch = torch.nn.Conv3d(4, 32, (1, 2, 2), stride=(1, 2, 2))
        self.patch2d = torch.nn.Conv2d(4, 32, 2, stride=2)
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, video, text):
        x = self.tokens(self, video, text)
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


def _video_tokens(probe, video):
    return probe.patch(video).flatten(2).transpose(1, 2)


_PROBES = {
    # A position table for a 3 x 6 x 4 grid multiplied into tokens of a 3 x 4 x 6 grid: two claims, no guess.
    "conflicting grids": (
        lambda m, v, t: _video_tokens(m, v) * torch.arange(72.0).reshape(3, 6, 4).flatten()[None, :, None],
        "meets",
    ),
    "text on both sides": (lambda m, v, t: torch.cat([t, _video_tokens(m, v), t], dim=1), "both sides"),
    "two videos": (lambda m, v, t: torch.cat([_video_tokens(m, v), _video_tokens(m, v)], dim=1), "holds 2 grids"),
    "image tokens": (lambda m, v, t: m.patch2d(v[:, :, 0]).flatten(2).transpose(1, 2), "has 2 dimensions"),
}


@pytest.mark.parametrize("probe", list(_PROBES))
def test_ambiguous_token_layouts_stay_dense(probe):
    tokens, words = _PROBES[probe]
    video, _ = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT)
    text = torch.randn(1, TEXT, 32)
    decision = _only(_explain(TokenProbe(tokens), video, text))
    assert not decision.sparse and decision.rule == "ambiguous_grid" and words in decision.reason, decision.reason


def test_image_tokens_become_sparse_with_a_one_frame_grid():
    video, _ = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT)
    model = TokenProbe(_PROBES["image tokens"][0])
    decision = _only(_explain(model, video, torch.randn(1, TEXT, 32), video_grid=(1, 4, 6)))
    assert decision.sparse and decision.video_grid == (1, 4, 6) and decision.text_len == 0


# ---------------------------------------------------------------------------------------------------------------
# User overrides of the grid and text span
# ---------------------------------------------------------------------------------------------------------------


def test_packed_tokens_need_the_grid_from_the_config():
    model = TinyVideoAttention(patch_embed=False)
    inputs = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT, packed=True)
    assert _only(_explain(model, *inputs)).rule == "no_grid"
    partial = _only(_explain(model, *inputs, video_grid=GRID))
    assert partial.rule == "override_mismatch" and "text_position" in partial.reason
    decision = _only(_explain(model, *inputs, video_grid=GRID, text_position="last"))
    assert decision.sparse and decision.grid_from == "config"
    assert (decision.video_grid, decision.text_len, decision.text_position) == (GRID, TEXT, "last")
    with torch.no_grad(), spattn_compile.config(**SETTINGS, sparsity=0.75):
        with SparseSDPA(GRID, TEXT) as reference:
            expected = model(*inputs)
        out = compile_spattn(model, video_grid=GRID, text_len=TEXT, text_position="last")(*inputs)
    assert reference.sparse_calls == 1 and relative_error(out, expected) < 1e-5


@pytest.mark.parametrize(
    "overrides",
    [
        {"video_grid": GRID},
        {"text_len": TEXT},
        {"text_position": "last"},
        {"video_grid": GRID, "text_len": TEXT, "text_position": "last"},
    ],
)
def test_overrides_consistent_with_the_graph_are_accepted(overrides):
    model = TinyVideoAttention()
    inputs = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT)
    decision = _only(_explain(model, *inputs, **overrides))
    assert decision.sparse and decision.grid_from == "graph", decision
    assert (decision.video_grid, decision.text_len, decision.text_position) == (GRID, TEXT, "last")
    compiled = compile_spattn(model)  # compiled without them, given at run time: same layout, accepted
    with torch.no_grad(), spattn_compile.config(**SETTINGS, **overrides, sparsity=0.75):
        with SparseSDPA(GRID, TEXT):
            expected = model(*inputs)
        out = compiled(*inputs)
        assert relative_error(out, expected) < 1e-5
    assert relative_error(out, model(*inputs)) > 1e-4


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"video_grid": (3, 6, 4)}, ("video_grid=(3, 6, 4)", "(3, 4, 6)")),  # the same token count, another grid
        ({"video_grid": (3, 4, 7)}, ("video_grid=(3, 4, 7)", "(3, 4, 6)")),
        ({"video_grid": (2, 4, 6), "text_len": 29}, ("video_grid=(2, 4, 6)", "(3, 4, 6)")),
        ({"text_len": 4}, ("text_len=4", "5")),
        ({"text_position": "first"}, ("text_position='first'", "'last'")),
    ],
)
def test_overrides_contradicting_the_graph_raise_naming_both(overrides, words):
    model = TinyVideoAttention()
    inputs = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT)
    with pytest.raises(spattn_compile.LayoutOverrideError) as analysed:
        _explain(model, *inputs, **overrides)
    with pytest.raises(Exception) as compiled_with:  # Dynamo wraps what the backend raises
        with torch.no_grad():
            compile_spattn(model, **overrides)(*inputs)
    reset_dynamo()
    compiled = compile_spattn(model)
    with torch.no_grad():
        compiled(*inputs)
        with spattn_compile.config(**overrides), pytest.raises(spattn_compile.LayoutOverrideError) as at_run_time:
            compiled(*inputs)
    for error in (analysed, compiled_with, at_run_time):
        assert all(word in str(error.value) for word in words), str(error.value)


def test_per_call_grids_across_resolutions_under_automatic_dynamic_shapes():
    # Packed tokens: no grid in the graph, so the user names it per call; the op reads it when it runs, so the one
    # dynamic graph that Dynamo makes at the second resolution serves the third one too.
    model = TinyVideoAttention(patch_embed=False)
    compiled = compile_spattn(model, text_position="last")
    for frames, height, width in [(3, 8, 12), (2, 10, 14), (4, 6, 10)]:
        inputs = tiny_inputs(frames, height, width, TEXT, packed=True, seed=frames)
        grid = (frames, height // 2, width // 2)
        with torch.no_grad(), spattn_compile.config(**SETTINGS, sparsity=0.75, video_grid=grid):
            with SparseSDPA(grid, TEXT) as reference:
                expected = model(*inputs)
            out = compiled(*inputs)
            assert reference.sparse_calls == 1 and relative_error(out, expected) < 1e-5, grid
            assert relative_error(out, model(*inputs)) > 1e-4, grid
    assert compiled_graph_count() == 2
    assert [r.kind for r in spattn_compile.report().records] == ["sparse"] * 3


def test_a_run_time_grid_that_does_not_fit_the_call_leaves_it_dense():
    model = TinyVideoAttention(patch_embed=False)
    inputs = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT, packed=True)
    compiled = compile_spattn(model, text_position="last", dynamic=True)
    with torch.no_grad(), spattn_compile.config(video_grid=GRID):
        compiled(*inputs)
        with spattn_compile.config(video_grid=(4, 4, 6)):  # 96 video tokens: more than the 77-token sequence
            out = compiled(*inputs)
    torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-5)
    assert [r.kind for r in spattn_compile.report().records] == ["sparse", "no_grid"]


# ---------------------------------------------------------------------------------------------------------------
# Settings at run time
# ---------------------------------------------------------------------------------------------------------------


def test_runtime_settings_apply_without_recompiling():
    model = TinyVideoAttention()
    inputs = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT, batch=2)
    compiled = compile_spattn(model)
    variants = [
        {"sparsity": 0.0},
        {"sparsity": 0.75},
        {"sparsity": 0.75, "rectify": "block"},
        {"sparsity": 0.75, "rectify": "none"},
        {"sparsity": 0.5, "reorder": "none", "gapr": False},
    ]
    outputs = []
    with torch.no_grad():
        dense = model(*inputs)
        for variant in variants:
            with spattn_compile.config(**SETTINGS, **variant):
                with SparseSDPA(GRID, TEXT):
                    expected = model(*inputs)
                out = compiled(*inputs)
            assert relative_error(out, expected) < 1e-5, variant
            outputs.append(out)
    assert compiled_graph_count() == 1
    assert relative_error(outputs[0], dense) < 1e-5  # sparsity 0 keeps every block: dense attention
    for earlier, later in zip(outputs, outputs[1:]):
        assert relative_error(later, earlier) > 1e-4  # each setting really changed the computation


def test_compile_options_are_the_models_defaults():
    model = TinyVideoAttention()
    inputs = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT)
    compiled = compile_spattn(model, sparsity=0.75, rectify="query")
    with torch.no_grad():
        out_default = compiled(*inputs)
        with spattn_compile.config(sparsity=0.5):
            out_override = compiled(*inputs)
        with spattn_compile.config(**SETTINGS, sparsity=0.75, rectify="query"), SparseSDPA(GRID, TEXT):
            expected_default = model(*inputs)
        with spattn_compile.config(**SETTINGS, sparsity=0.5, rectify="query"), SparseSDPA(GRID, TEXT):
            expected_override = model(*inputs)
    assert relative_error(out_default, expected_default) < 1e-5
    assert relative_error(out_override, expected_override) < 1e-5
    assert relative_error(out_override, out_default) > 1e-4
    assert compiled_graph_count() == 1


def test_dense_layers_are_read_at_run_time():
    model = TinyVideoAttention()
    inputs = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT)
    compiled = compile_spattn(model, sparsity=0.75)
    with torch.no_grad():
        sparse = compiled(*inputs)
        with spattn_compile.config(dense_layers=(0,)):
            dense = compiled(*inputs)
        assert relative_error(dense, model(*inputs)) < 1e-5
    assert relative_error(sparse, dense) > 1e-4
    assert compiled_graph_count() == 1


def test_lowering_min_seq_len_below_a_dense_call_warns(caplog):
    model = TinyVideoAttention()
    inputs = tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT)
    compiled = compile_spattn(model, min_seq_len=100)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="spattn_compile"):
        compiled(*inputs)
        assert not caplog.records
        with spattn_compile.config(min_seq_len=10):
            out = compiled(*inputs)
    assert any("stay dense until a recompile" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# explain and logging
# ---------------------------------------------------------------------------------------------------------------


def test_explain_prints_a_table():
    report = _explain(TinyVideoAttention(_cross), *tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT))
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["graph", "node", "module", "attention"]
    assert "dense: cross_attention" in text and "query length 77 != key length 20" in text
    assert "0 of 1 attention calls sparse" in text and "0 graph break(s)" in text
    report = _explain(TinyVideoAttention(), *tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT))
    assert "3x4x6 (graph)" in str(report) and "5 last" in str(report)
    assert len(report.sparse) == 1 and report.dense == ()


def test_decisions_are_logged(caplog):
    graph_module = torch.fx.symbolic_trace(TinyVideoAttention(_causal))
    with caplog.at_level(logging.INFO, logger="spattn_compile"):
        decisions = rewrite_attention(graph_module, spattn_compile.SparseAttentionConfig(**SETTINGS))
    # symbolic_trace records no shapes: the pass sees no tensors and says so, instead of guessing.
    assert [d.rule for d in decisions] == ["shape"]
    assert any("stays dense [shape]" in r.getMessage() for r in caplog.records)
    model = TinyVideoAttention()
    with caplog.at_level(logging.INFO, logger="spattn_compile"), torch.no_grad():
        compile_spattn(model)(*tiny_inputs(FRAMES, HEIGHT, WIDTH, TEXT))
    assert any("-> sparse attention, layer 0, video grid (3, 4, 6)" in r.getMessage() for r in caplog.records)


def test_analyze_rejects_a_bad_config():
    with pytest.raises(TypeError, match="SparseAttentionConfig"):
        analyze_attention(torch.fx.Graph(), {"sparsity": 0.5})


# ---------------------------------------------------------------------------------------------------------------
# Property: any grid, text span, batch and head count
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=20)
@given(
    frames=st.integers(1, 4),
    height=st.integers(1, 5),
    width=st.integers(1, 5),
    text_len=st.integers(0, 9),
    text_first=st.booleans(),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    sparsity=st.sampled_from([0.0, 0.5, 0.8]),
)
def test_inferred_layout_and_output_for_any_shape(frames, height, width, text_len, text_first, batch, heads, sparsity):
    # A grid needs two extents above 1: a single token or a line of tokens has no 3-D structure to find.
    assume(sum(size > 1 for size in (frames, height, width)) >= 2)
    reset_dynamo()
    model = TinyVideoAttention(text_first=text_first, heads=heads)
    inputs = tiny_inputs(frames, 2 * height, 2 * width, text_len, batch=batch, seed=frames + 7 * text_len)
    grid = (frames, height, width)
    decision = _only(_explain(model, *inputs))
    assert decision.sparse and decision.video_grid == grid, decision
    assert decision.text_len == text_len
    assert decision.text_position == (None if text_len == 0 else "first" if text_first else "last")
    with torch.no_grad(), spattn_compile.config(**SETTINGS, sparsity=sparsity):
        with SparseSDPA(grid, text_len, text_first):
            expected = model(*inputs)
        out = compile_spattn(model)(*inputs)
    assert relative_error(out, expected) < 1e-5
