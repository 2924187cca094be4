"""Every model family of `families.py` through the spattn backend: what the pass decides (explain), the compiled
model against eager attention (dense at sparsity 0, the sparse reference otherwise), regional compilation with
`compile_repeated_blocks` (one decision and one report row per block), and on a GPU the Triton path end to end."""

from __future__ import annotations

import logging

import pytest
import torch
from families import BY_NAME, Family, families
from helpers import (
    SETTINGS,
    compare_with_eager,
    compile_blocks,
    compile_spattn,
    compiled_graph_count,
    explain_model,
    reset_dynamo,
)

import spattn_compile
from spattn_compile.families import latent_grid
from spattn_compile.runtime.binding import forward_arguments
from spattn_compile.testing import relative_error


def _check_decisions(family: Family, report: spattn_compile.ExplainReport, grid_from: str) -> None:
    assert [(d.module, "sparse" if d.sparse else d.rule) for d in report.decisions] == list(family.expected), report
    for decision in report.sparse:
        assert decision.video_grid == family.grid and decision.grid_from == grid_from, decision
        assert decision.text_len == family.text_len and decision.text_position == family.text_position, decision
    # Layers are numbered in the model, in execution order, whatever graph or block they are compiled in.
    assert [d.layer_index for d in report.sparse] == list(range(len(family.sparse_modules)))
    for decision in report.dense:
        assert decision.reason, decision


@pytest.mark.parametrize("family", families())
def test_family_decisions(family: Family):
    tiny = family.build()
    report = explain_model(tiny.model, tiny.make_inputs(*family.latent))
    assert report.graph_break_count == family.graph_breaks, report.break_reasons
    # HunyuanVideo 1.5's blocks are compiled on their own after its graph break: their grid comes from the forward.
    _check_decisions(family, report, "context" if family.graph_breaks else "graph")


@pytest.mark.parametrize("family", families())
def test_family_latent_grid_from_the_forward_arguments(family: Family):
    # What the forward hook of a regionally compiled model reads: the attention grid, from the latent's shape and the
    # model's patch sizes, whatever the family's latent layout (channels first, second or last, or packed tokens).
    tiny = family.build()
    arguments = forward_arguments(tiny.model, (), tiny.make_inputs(*family.latent))
    assert latent_grid(tiny.model, arguments) == (family.grid, "")


def test_latent_grid_says_why_it_has_none():
    grid, note = latent_grid(torch.nn.Linear(2, 2), {"hidden_states": torch.zeros(1, 4, 3, 8, 8)})
    assert grid is None and "no config.patch_size" in note
    tiny = BY_NAME["ltx_video"].build()
    grid, note = latent_grid(tiny.model, {"hidden_states": torch.zeros(1, 72, 4)})
    assert grid is None and "num_frames, height and width" in note


@pytest.mark.parametrize("family", families(sparse=True))
def test_family_compiled_matches_eager(family: Family):
    tiny = family.build()
    inputs = tiny.make_inputs(*family.latent, batch=2)
    result = compare_with_eager(tiny, compile_spattn(tiny.model), inputs, family.grid)
    print(f"\n{family}: sparsity 0.75 vs dense rel err {result.dense_at_sparsity:.4f}")
    assert result.sparse_calls == len(family.sparse_modules) and result.finite
    assert result.dense_at_sparsity_0 < 1e-5
    assert result.reference_at_sparsity < 1e-5
    assert 1e-4 < result.dense_at_sparsity < 0.5  # sparse, not dense: the test can tell them apart
    report = spattn_compile.report()
    assert report.layers() == family.sparse_modules
    assert set(report.models) == {type(tiny.model).__name__}


@pytest.mark.parametrize("family", families(regional=True))
def test_family_regional_compilation(family: Family):
    tiny = family.build()
    inputs = tiny.make_inputs(*family.latent, batch=2)
    eager = family.build().model  # the same weights, never compiled
    compile_blocks(tiny.model)
    _check_decisions(family, explain_model(tiny.model, inputs), "context")
    reset_dynamo()
    compile_blocks(tiny.model)
    result = compare_with_eager(tiny, tiny.model, inputs, family.grid, eager=eager)
    assert result.sparse_calls == len(family.sparse_modules) and result.finite
    assert result.dense_at_sparsity_0 < 1e-5
    assert result.reference_at_sparsity < 1e-5
    assert result.dense_at_sparsity > 1e-4
    # One report row per block and call: every block is a layer of its own, named by its module path.
    report = spattn_compile.report()
    assert report.layers() == family.sparse_modules
    assert [r.layer_index for r in report.records[: len(family.sparse_modules)]] == list(
        range(len(family.sparse_modules))
    )
    assert {(r.step, r.branch) for r in report.records} == {(0, 0), (0, 1)}, "one forward is one call, not one block"


def test_nothing_sparse_logs_one_warning_with_the_reason_and_the_fix(caplog):
    family = BY_NAME["sana_video"]
    tiny = family.build()
    inputs = tiny.make_inputs(*family.latent)
    compiled = compile_spattn(tiny.model)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="spattn_compile"):
        for _ in range(3):
            out = compiled(**inputs)[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "SanaVideoTransformer3DModel" in warnings[0] and "'cross_attention'" in warnings[0]
    assert "Fix:" in warnings[0]
    with torch.no_grad():
        torch.testing.assert_close(out, tiny.model(**inputs)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_too_short_for_the_default_min_seq_len_warns_once(caplog, regional):
    tiny = BY_NAME["wan"].build()
    inputs = tiny.make_inputs()
    options = {"min_seq_len": 2048}
    compiled = compile_blocks(tiny.model, **options) if regional else compile_spattn(tiny.model, **options)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="spattn_compile"):
        compiled(**inputs)
        assert not [r for r in caplog.records if r.levelno == logging.WARNING], "one forward is not enough to know"
        for _ in range(2):
            compiled(**inputs)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'short'" in warnings[0] and "min_seq_len" in warnings[0], warnings


def test_a_model_with_sparse_calls_does_not_warn(caplog):
    tiny = BY_NAME["hunyuan_video"].build()
    compile_blocks(tiny.model)  # the token refiner's graph has only a dense call; the model has sparse ones
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="spattn_compile"):
        for _ in range(3):
            tiny.model(**tiny.make_inputs())
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------------------------------------------
# On a GPU: the Triton pipeline end to end, in every family
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
@pytest.mark.parametrize("family", families(sparse=True))
def test_family_triton_end_to_end(family: Family, regional: bool):
    if regional and not family.regional:
        pytest.skip(f"{family} has no _repeated_blocks")
    tiny = family.build()
    eager = family.build().model.cuda()
    tiny.model.cuda()
    inputs = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in tiny.make_inputs(*family.latent, batch=2).items()
    }
    compiled = compile_blocks(tiny.model) if regional else compile_spattn(tiny.model)
    with torch.no_grad(), spattn_compile.config(**SETTINGS, sparsity=0.5):
        out = compiled(**inputs)[0]
        with spattn_compile.config(sparsity=0.0):
            exact = compiled(**inputs)[0]
        dense = eager(**inputs)[0]
    # Triton in float32 against the reference of the same plan: the reference tests pin the kernels; here the whole
    # compiled model runs them, so the outputs are finite, exact at sparsity 0 and sparse otherwise.
    assert torch.isfinite(out).all()
    assert relative_error(exact, dense) < 1e-3
    assert relative_error(out, dense) > 1e-4
    report = spattn_compile.report()
    assert report.sparse_calls and report.layers() == family.sparse_modules
    assert compiled_graph_count() >= 1


# ---------------------------------------------------------------------------------------------------------------
# Resolutions and the Inductor inner compiler (one family stands for all)
# ---------------------------------------------------------------------------------------------------------------


def test_new_resolution_recompiles_with_the_new_grid():
    tiny = BY_NAME["wan"].build()
    compiled = compile_spattn(tiny.model, dynamic=False)
    first = compare_with_eager(tiny, compiled, tiny.make_inputs(3, 8, 12), (3, 4, 6))
    second = compare_with_eager(tiny, compiled, tiny.make_inputs(2, 10, 8, seed=1), (2, 5, 4))
    for result in (first, second):
        assert result.sparse_calls == 2 and result.dense_at_sparsity_0 < 1e-5 and result.reference_at_sparsity < 1e-5
    assert compiled_graph_count() == 2  # static shapes: the new size fails the guards and recompiles
    again = compare_with_eager(tiny, compiled, tiny.make_inputs(3, 8, 12, seed=2), (3, 4, 6))
    assert again.reference_at_sparsity < 1e-5 and compiled_graph_count() == 2  # the first graph is reused


@pytest.mark.slow
def test_wan_through_inductor():
    tiny = BY_NAME["wan"].build()
    inputs = tiny.make_inputs(3, 8, 12)
    compiled = compile_spattn(tiny.model, compiler="inductor")
    result = compare_with_eager(tiny, compiled, inputs, (3, 4, 6), sparsity=0.6, rectify="query")
    print(f"\nWan (Inductor): sparsity 0.6 vs dense rel err {result.dense_at_sparsity:.4f}")
    assert result.sparse_calls == 2 and result.finite
    assert result.dense_at_sparsity_0 < 1e-4
    assert result.reference_at_sparsity < 1e-4
    assert result.dense_at_sparsity > 1e-4
    assert compiled_graph_count() == 1


@pytest.mark.gpu
def test_max_autotune_on_cuda_keeps_the_run_time_settings():
    # mode="max-autotune" would turn on CUDA graphs, whose replay skips the op's Python; spattn compiles without them,
    # so a run-time setting still changes the output and every call is recorded.
    tiny = BY_NAME["wan"].build()
    tiny.model.cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in tiny.make_inputs(batch=2).items()}
    compiled = torch.compile(tiny.model, backend=spattn_compile.backend(**SETTINGS), mode="max-autotune")
    with torch.no_grad():
        outputs = []
        for sparsity in (0.0, 0.5, 0.0):
            with spattn_compile.config(sparsity=sparsity):
                outputs.append(compiled(**inputs)[0])
        dense = tiny.model(**inputs)[0]
    assert relative_error(outputs[0], dense) < 1e-3 and relative_error(outputs[2], dense) < 1e-3
    assert relative_error(outputs[1], dense) > 1e-4
    assert len(spattn_compile.report().records) == 3 * len(BY_NAME["wan"].sparse_modules)
