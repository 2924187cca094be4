"""Every family of `families.py` in both compile modes (issue 18), with the `eager` inner compiler: what goes sparse,
or the stated reason it stays dense.

`tests/test_backend_families.py` compiles each family whole and, where the class has `_repeated_blocks`, with
`compile_repeated_blocks`. This file adds what that leaves out: the families without `_repeated_blocks` (diffusers
refuses `compile_repeated_blocks` for them, naming the attribute) compiled block by block by hand, as
`compile_repeated_blocks` would (`block.compile(...)`), and the families that need a Dynamo setting (Mochi) in both
modes. Each test checks the decisions (`explain`), the compiled output against the eager model (dense at sparsity
0, sparse SDPA on the family's grid otherwise) and the report's layers.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from families import BY_NAME, Family, families
from helpers import SETTINGS, capture_warnings, compare_with_eager, compile_spattn, explain_model, reset_dynamo

import spattn_compile

# Mochi's rotary embedding runs under `torch.autocast(device, torch.float32)`, which torch refuses on the CPU with a
# warning (it computes in float32 anyway): diffusers' code on a CPU, not a problem of the test.
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype is not supported:UserWarning")


def _dynamo(family: Family) -> contextlib.AbstractContextManager:
    return torch._dynamo.config.patch(**dict(family.dynamo)) if family.dynamo else contextlib.nullcontext()


def _compile_blocks_by_hand(model: torch.nn.Module, family: Family) -> None:
    for block in getattr(model, family.blocks):
        block.compile(backend="spattn", options={"compiler": "eager", **SETTINGS})


def _check(family: Family, report: spattn_compile.ExplainReport, grid_from: str, blocks_only: bool = False) -> None:
    """The decisions are the family's (`blocks_only`: those of its compiled blocks, the rest runs eagerly)."""
    expected = [(m, d) for m, d in family.expected if not blocks_only or m.startswith(f"{family.blocks}.")]
    assert [(d.module, "sparse" if d.sparse else d.rule) for d in report.decisions] == expected, report
    for decision in report.sparse:
        assert decision.video_grid == family.grid and decision.grid_from == grid_from, decision
        assert decision.text_position == family.text_position, decision
    for decision in report.dense:
        assert decision.reason, decision


def _check_run(family: Family, result, report: spattn_compile.Report) -> None:
    assert result.finite and result.dense_at_sparsity_0 < 1e-5
    assert result.sparse_calls == len(family.sparse_modules)
    assert result.reference_at_sparsity < 1e-5 and result.dense_at_sparsity > 1e-4
    assert {layer.split("#")[0] for layer in report.layers()} == set(family.sparse_modules), report.layers()


@pytest.mark.parametrize("family", families(regional=False, every=True))
def test_family_without_repeated_blocks_compiled_block_by_block(family: Family):
    """diffusers refuses `compile_repeated_blocks` (no `_repeated_blocks`); each transformer block compiled on its own
    takes the grid of the model's forward: the family's self-attention runs sparse, the rest stays dense."""
    tiny, eager = family.build(), family.build().model
    inputs = tiny.make_inputs(*family.latent, batch=2)
    with pytest.raises(ValueError, match="_repeated_blocks"):  # diffusers' stated reason
        tiny.model.compile_repeated_blocks(backend="spattn")
    with _dynamo(family):
        _compile_blocks_by_hand(tiny.model, family)
        _check(family, explain_model(tiny.model, inputs), "context", blocks_only=True)
        reset_dynamo()
        _compile_blocks_by_hand(tiny.model, family)
        if not family.sparse_modules:  # nothing to make sparse: the compiled blocks give the eager output
            with torch.no_grad(), spattn_compile.config(**SETTINGS):
                torch.testing.assert_close(tiny.model(**inputs)[0], eager(**inputs)[0], rtol=1e-5, atol=1e-5)
            assert not spattn_compile.report().sparse_calls
            return
        result = compare_with_eager(tiny, tiny.model, inputs, family.grid, eager=eager)
    _check_run(family, result, spattn_compile.report())


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in families(every=True) if f.values[0].dynamo])
def test_family_needing_dynamo_settings_compiled_whole(family: Family):
    """Mochi: with `capture_dynamic_output_shape_ops`, the per-sample `torch.nonzero` loop traces into one graph (the
    valid text length is an unbacked size) and each sample's joint attention runs sparse; without it, Dynamo breaks
    the graph at the `nonzero` and the joint attention never reaches the pass (docs/COMPATIBILITY.md)."""
    tiny, eager = family.build(), family.build().model
    inputs = tiny.make_inputs(*family.latent, batch=2)
    without = explain_model(tiny.model, inputs)
    assert without.graph_break_count >= 1 and not without.sparse
    assert all("nonzero" in reason for reason in without.break_reasons), without.break_reasons
    with _dynamo(family):
        report = explain_model(tiny.model, inputs)
        assert report.graph_break_count == 0, report.break_reasons
        _check(family, report, "graph")
        # One call per sample (the batch is 2), both the same layer.
        assert [d.layer_index for d in report.sparse] == [0, 0]
        result = compare_with_eager(tiny, compile_spattn(tiny.model), inputs, family.grid, eager=eager)
    _check_run(family, result, spattn_compile.report())


def test_a_family_compiled_without_the_dynamo_setting_it_needs_warns_naming_it(caplog):
    """Mochi compiled without `capture_dynamic_output_shape_ops`: only its time embedding's pooler (cross-attention)
    reaches the pass; the one warning names the Dynamo setting, not "compile without the backend"."""
    family = BY_NAME["mochi"]
    tiny = family.build()
    compiled = compile_spattn(tiny.model)
    with torch.no_grad(), capture_warnings(caplog) as warnings:
        for _ in range(3):
            compiled(**tiny.make_inputs(*family.latent))
    assert len(warnings) == 1, warnings
    assert "torch._dynamo.config.capture_dynamic_output_shape_ops = True" in warnings[0], warnings[0]
    assert "torch.nonzero" in warnings[0] and "compile without" not in warnings[0], warnings[0]
