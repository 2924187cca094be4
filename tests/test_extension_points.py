"""docs/DESIGN.md's "Where to add" table, verified by adding one of each here, in the test only: a rectification mode,
a selection policy, an estimator and a model family's latent rule. Each works end to end (the settings validate, the
reference and the Triton implementation run it, the fidelity evaluator and the compiled model take it) without a
change anywhere else; each is removed again at the end of its test."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from kernel_helpers import poisoned_allocations, sparse_call, triton_implementation

from spattn_compile import SparseAttentionConfig, sparse_attention
from spattn_compile.estimators import EstimatorConfig, EstimatorInputs, register_estimator, unregister_estimator
from spattn_compile.families import FAMILY_RULES, LatentRule, latent_grid
from spattn_compile.implementations import ReferenceImplementation
from spattn_compile.layout import token_layout
from spattn_compile.plan import SparsePlan, indices_from_mask
from spattn_compile.policies import (
    KernelRectification,
    RectificationConfig,
    RectificationTerms,
    SelectionConfig,
    SelectionInputs,
    Trust,
    register_rectification,
    register_selection,
    unregister_rectification,
    unregister_selection,
)
from spattn_compile.policies.rectification import trusted_blocks
from spattn_compile.testing import PlanEvaluator, dit_attention_inputs, relative_error

GRID, TEXT = (2, 5, 7), 9


def _inputs(dtype=torch.float32):
    inputs = dit_attention_inputs(GRID, heads=2, head_dim=16, text_len=TEXT, dtype=dtype, seed=1)
    return inputs.query, inputs.key, inputs.value


# --------------------------------------------------------------------------------------------------------------------
# A rectification mode: one module (settings, reference terms, kernel arguments, registration) and its tests
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HalfQueryRectification(RectificationConfig):
    """Query mode whose virtual keys stand for half their block (multiplicity n/2): expressible by the attention
    kernel's query mode, so it needs no kernel of its own."""

    name = "half_query"


def _half_terms(plan: SparsePlan, stats, settings: HalfQueryRectification) -> RectificationTerms:
    return RectificationTerms(
        virtual_keys=stats.k_block,
        virtual_log_weights=stats.k_block_count.log() - math.log(2),
        virtual_values=stats.v_block,
        virtual_allowed=plan.trusted_mask(),
    )


def _half_kernel(plan: SparsePlan, stats, settings: HalfQueryRectification) -> KernelRectification:
    arguments = {
        "trusted_counts": plan.trusted_counts,
        "trusted_indices": plan.trusted_indices,
        "k_block": stats.k_block,
        "v_block": stats.v_block,
        "k_block_log_count": stats.k_block_count.log() - math.log(2),
    }
    return KernelRectification("query", arguments)


@pytest.fixture
def half_query():
    register_rectification(HalfQueryRectification, reference=_half_terms, kernel=_half_kernel)
    yield
    unregister_rectification(HalfQueryRectification)


def test_a_new_rectification_mode_runs_everywhere(half_query):
    config = SparseAttentionConfig(block_size=16, sparsity=0.6, rectify="half_query", min_seq_len=0)
    q, k, v = _inputs()
    kwargs = dict(video_grid=GRID, text_len=TEXT, config=config)
    reference = sparse_attention(*(t.double() for t in (q, k, v)), **kwargs, impl="reference")
    with poisoned_allocations():
        triton = sparse_attention(q, k, v, **kwargs, impl="triton")
    assert relative_error(triton, reference) < 1e-5
    query_mode = sparse_attention(*(t.double() for t in (q, k, v)), **kwargs | {"config": dataclasses.replace(
        config, rectify="query")}, impl="reference")  # fmt: skip
    assert relative_error(reference, query_mode) > 1e-6, "the new mode is not query mode"
    # The fidelity evaluator combines the new mode's terms like any other's.
    layout = token_layout(GRID, TEXT, False, 16)
    evaluator = PlanEvaluator(*(t.double() for t in (q, k, v)), layout)
    plan = sparse_call(*(t.double() for t in (q, k, v)), None, layout, config, ReferenceImplementation()).plan()
    result = evaluator.evaluate({"half": (plan, "half_query")})["half"]
    expected = sparse_attention(*(t.double() for t in (q, k, v)), **kwargs, impl="reference", plan=plan)
    assert result.error == pytest.approx(relative_error(expected, evaluator.dense()), rel=1e-9)


def test_an_unregistered_mode_is_not_a_setting():
    with pytest.raises(ValueError, match="rectify='half_query'"):
        SparseAttentionConfig(rectify="half_query")


# --------------------------------------------------------------------------------------------------------------------
# A selection policy: one module and its tests (a config field choosing it is the caller's to add)
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Banded(SelectionConfig):
    """Keep the key blocks within `width` of the diagonal (in the canonical order) and every text block."""

    name = "banded"
    width: int = 1


def _banded(inputs: SelectionInputs, settings: Banded, trust: Trust) -> SparsePlan:
    layout = inputs.layout
    nb, nq = layout.num_video_blocks, layout.num_blocks
    index = torch.arange(nq, device=inputs.scores.device)
    keep = ((index[:, None] - index[None, :]).abs() <= settings.width) | (index[None, :] >= nb) | (index[:, None] >= nb)
    nonempty = inputs.key_block_count > 0
    keep = keep & nonempty[..., None, :]
    counts, indices = indices_from_mask(keep)
    trusted_counts, trusted_indices = indices_from_mask(trusted_blocks(keep, inputs.stats, layout, trust))
    return SparsePlan(layout, counts, indices, trusted_counts, trusted_indices, inputs.scores, inputs.estimator)


@pytest.fixture
def banded():
    # The same function is the reference and, here, the kernel handler: plain torch ops run on either device.
    register_selection(Banded, reference=_banded, kernel=_banded)
    yield
    unregister_selection(Banded)


def test_a_new_selection_policy_runs_on_both_implementations(banded):
    config = SparseAttentionConfig(block_size=16, rectify="query", min_seq_len=0)
    q, k, v = _inputs()
    layout = token_layout(GRID, TEXT, False, 16)
    reference = sparse_call(*(t.double() for t in (q, k, v)), None, layout, config, ReferenceImplementation())
    triton = sparse_call(q, k, v, None, layout, config, triton_implementation())
    plans = [call.plan(selection=Banded(width=1)) for call in (reference, triton)]
    assert torch.equal(plans[0].kv_indices, plans[1].kv_indices)
    assert relative_error(triton.run(plans[1]), reference.run(plans[0])) < 1e-5
    nb = layout.num_video_blocks
    assert (plans[0].kv_counts[..., :nb] <= 3 + layout.num_text_blocks).all()


# --------------------------------------------------------------------------------------------------------------------
# An estimator: one module and its tests
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Nearby(EstimatorConfig):
    """Scores a key block by its closeness to the query block in the canonical order (no data read)."""

    name = "nearby"


def _nearby(inputs: EstimatorInputs, settings: Nearby) -> torch.Tensor:
    nb = inputs.layout.num_video_blocks
    b, h = inputs.q.shape[:2]
    index = torch.arange(nb, device=inputs.q.device, dtype=torch.float32)
    closeness = 1.0 / (1.0 + (index[:, None] - index[None, :]).abs())
    scores = torch.cat([closeness, torch.zeros(nb, 1, device=inputs.q.device)], -1)
    return (scores / scores.sum(-1, keepdim=True)).expand(b, h, nb, nb + 1).contiguous()


@pytest.fixture
def nearby():
    register_estimator(Nearby, reference=_nearby, kernel=_nearby)
    yield
    unregister_estimator(Nearby)


def test_a_new_estimator_is_a_setting_and_runs_on_both_implementations(nearby):
    config = SparseAttentionConfig(block_size=16, sparsity=0.5, estimator="nearby", min_seq_len=0)
    assert config.estimator == Nearby()
    q, k, v = _inputs()
    kwargs = dict(video_grid=GRID, text_len=TEXT, config=config)
    reference = sparse_attention(*(t.double() for t in (q, k, v)), **kwargs, impl="reference")
    triton = sparse_attention(q, k, v, **kwargs, impl="triton")
    assert relative_error(triton, reference) < 1e-5


# --------------------------------------------------------------------------------------------------------------------
# A model family's latent rule: one entry of `families.FAMILY_RULES` and its test
# --------------------------------------------------------------------------------------------------------------------


class ChannelsLastVideoModel(torch.nn.Module):
    """A model whose 5-D latent is (B, F, H, W, C) and whose config does not give its channel count."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"patch_size": (1, 2, 2)})()

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return hidden_states


def test_a_new_family_rule_is_one_table_entry(monkeypatch):
    model = ChannelsLastVideoModel()
    arguments = {"hidden_states": torch.zeros(1, 3, 8, 12, 4), "timestep": torch.zeros(1)}
    assert latent_grid(model, arguments)[0] == (8, 6, 2), "the default rule reads dim 1 as the channels"
    monkeypatch.setitem(FAMILY_RULES, "ChannelsLastVideo", LatentRule(channel_dim=4))
    assert latent_grid(model, arguments) == ((3, 4, 6), "")
