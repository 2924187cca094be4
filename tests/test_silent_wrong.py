"""No silent wrong answers (issue 18): every case here once gave a result different from what the settings promise,
with nothing said. Each test fails on the code before its fix.

- a cached plan never serves a call it does not fit: a changed key-padding mask (by contents, same shape) or softmax
  scale refreshes it;
- a plan given to `sparse_attention` is run with the settings it was selected with, or the call raises naming the
  setting;
- a latent whose channel dim is not singled out is not guessed (regional compilation reads no grid from it), and a
  reading that the model's 3-D patch embedding contradicts (even one of the same token count) is refused;
- a packed-token model whose first compiled call had no grid runs sparse inside a later `config(video_grid=...)`,
  and its warning never suggests a setting already in force;
- bad values get errors naming the argument (NumPy integers accepted where ints are).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from families import BY_NAME
from helpers import (
    SETTINGS,
    SparseSDPA,
    TinyVideoAttention,
    capture_warnings,
    compare_with_eager,
    compile_blocks,
    compile_spattn,
    compiled_graph_count,
    explain_model,
    tiny_inputs,
)
from hypothesis import given
from hypothesis import strategies as st

import spattn_compile
from spattn_compile.attention import SparseAttention
from spattn_compile.call_layout import CallLayout
from spattn_compile.config import SparseAttentionConfig
from spattn_compile.estimators import EstimatorConfig, EstimatorInputs, register_estimator, unregister_estimator
from spattn_compile.implementations import ReferenceImplementation
from spattn_compile.runtime import op
from spattn_compile.runtime.plan_cache import MaskFingerprints
from spattn_compile.testing import dit_attention_inputs, relative_error, zoo

GRID, TEXT = (3, 4, 6), 5
SEQ = 72 + TEXT


# ---------------------------------------------------------------------------------------------------------------------
# The plan cache
# ---------------------------------------------------------------------------------------------------------------------


def _run_steps(masks, *, rectify: str = "query", refresh_interval: int = 5):
    """Outputs of a compiled tiny model over steps with `masks` (one per step), the expected outputs (a fresh sparse
    call each step) and the cache column of the report."""
    model = TinyVideoAttention()
    inputs = tiny_inputs(3, 8, 12, TEXT)
    compiled = compile_spattn(model, refresh_interval=refresh_interval)
    outputs, expected = [], []
    with torch.no_grad():
        for step, mask in enumerate(masks):
            with spattn_compile.config(**SETTINGS, rectify=rectify), spattn_compile.step(step):
                outputs.append(compiled(*inputs, mask))
                with SparseSDPA(GRID, TEXT) as sparse:
                    expected.append(model(*inputs, mask))
                assert sparse.sparse_calls == 1
    caches = [r.cache for r in spattn_compile.report().records]
    return outputs, expected, caches


def _keep_first(n: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, 1, SEQ, dtype=torch.bool)
    mask[..., :n] = True
    return mask


@pytest.mark.parametrize("rectify", ["query", "none", "block"])
def test_a_cached_plan_is_not_reused_when_the_mask_contents_change(rectify):
    """Issue 18 item 1: step 0 all-True, step 1 a same-shape mask that keeps 16 keys: the plan is refreshed, and no
    query row comes out zero."""
    masks = [torch.ones(1, 1, 1, SEQ, dtype=torch.bool), _keep_first(16)]
    outputs, expected, caches = _run_steps(masks, rectify=rectify)
    assert caches == ["refresh", "refresh"]
    for out, ref in zip(outputs, expected):
        assert relative_error(out, ref) < 1e-5


def test_an_equal_mask_in_a_new_tensor_still_hits_the_cache():
    """The key names a mask by its contents, not by its tensor: an equal mask built anew each step reuses the plan,
    and a change back to an earlier mask is a change again."""
    masks = [_keep_first(40), _keep_first(40), _keep_first(40).clone(), _keep_first(30), _keep_first(40)]
    outputs, expected, caches = _run_steps(masks, refresh_interval=10)
    assert caches == ["refresh", "hit", "hit", "refresh", "refresh"]
    for out, ref in zip(outputs, expected):
        assert relative_error(out, ref) < 1e-5


def test_a_mask_changed_in_place_is_a_new_mask():
    """The same tensor object, written in place between steps, is compared again (its version counter moved)."""
    mask = _keep_first(60)
    model = TinyVideoAttention()
    inputs = tiny_inputs(3, 8, 12, TEXT)
    compiled = compile_spattn(model, refresh_interval=10)
    with torch.no_grad(), spattn_compile.config(**SETTINGS):
        with spattn_compile.step(0):
            compiled(*inputs, mask)
        mask[..., 20:] = False
        with spattn_compile.step(1):
            out = compiled(*inputs, mask)
        with SparseSDPA(GRID, TEXT):
            ref = model(*inputs, mask)
    assert [r.cache for r in spattn_compile.report().records] == ["refresh", "refresh"]
    assert relative_error(out, ref) < 1e-5


def _signature(scale: float | None, mask: torch.Tensor | None, fingerprints=None) -> tuple:
    inputs = dit_attention_inputs(GRID, heads=2, head_dim=16, text_len=TEXT, dtype=torch.float64, seed=3)
    config = SparseAttentionConfig(block_size=16, min_seq_len=0)
    call = SparseAttention(
        inputs.query, inputs.key, inputs.value, CallLayout(GRID, TEXT, False), attn_mask=mask, scale=scale,
        config=config, implementation=ReferenceImplementation(torch.float64),
    )  # fmt: skip
    return op.plan_signature(call, config, fingerprints)


def test_the_signature_holds_the_scale():
    assert _signature(None, None) != _signature(0.1, None)
    assert _signature(0.1, None) == _signature(0.1, None)


@given(st.lists(st.booleans(), min_size=SEQ, max_size=SEQ), st.integers(0, SEQ - 1))
def test_the_signature_names_masks_by_contents(bits, flip):
    """Property: equal masks (new tensors) share a signature; a mask differing in one key does not."""
    fingerprints = MaskFingerprints()
    mask = torch.tensor(bits).reshape(1, 1, 1, SEQ)
    changed = mask.clone()
    changed[..., flip] = ~changed[..., flip]
    first = _signature(None, mask, fingerprints)
    assert _signature(None, mask.clone(), fingerprints) == first
    assert _signature(None, changed, fingerprints) != first
    assert _signature(None, None, fingerprints) != first
    assert _signature(None, mask, fingerprints) == first


# ---------------------------------------------------------------------------------------------------------------------
# A plan and the settings it is run with
# ---------------------------------------------------------------------------------------------------------------------


def _qkv():
    inputs = dit_attention_inputs(GRID, heads=2, head_dim=16, text_len=TEXT, dtype=torch.float64, seed=5)
    return inputs.query, inputs.key, inputs.value


BASE = SparseAttentionConfig(block_size=16, sparsity=0.5, min_seq_len=0)
LAYOUT = dict(video_grid=GRID, text_len=TEXT)


@pytest.mark.parametrize(
    "selected, run",
    [
        ({"gapr": True}, {"gapr": False}),
        ({"rectify": "none"}, {"rectify": "query"}),
        ({"rectify": "query"}, {"rectify": "none"}),
        ({"sparsity": 0.5}, {"sparsity": 0.9}),
        ({"neighbors": False}, {"neighbors": True}),
        ({"mass_threshold": None}, {"mass_threshold": 0.9}),
    ],
)
def test_a_plan_run_with_other_settings_raises_naming_them(selected, run):
    """Issue 18 item 2: a plan is run as it was selected; a config given with it that says otherwise raises, naming
    the setting and both values."""
    q, k, v = _qkv()
    plan = spattn_compile.select_plan(q, k, v, **LAYOUT, config=dataclasses.replace(BASE, **selected))
    field = next(iter(run))
    with pytest.raises(ValueError, match=field) as error:
        spattn_compile.sparse_attention(q, k, v, **LAYOUT, config=dataclasses.replace(BASE, **run), plan=plan)
    assert repr(selected.get(field, getattr(BASE, field))) in str(error.value)
    assert repr(run[field]) in str(error.value)


def test_a_plan_run_with_its_own_settings_is_the_fresh_call():
    q, k, v = _qkv()
    for changes in ({}, {"gapr": False}, {"rectify": "none"}, {"rectify": "block"}):
        config = dataclasses.replace(BASE, **changes)
        plan = spattn_compile.select_plan(q, k, v, **LAYOUT, config=config)
        with_plan = spattn_compile.sparse_attention(q, k, v, **LAYOUT, config=config, plan=plan)
        fresh = spattn_compile.sparse_attention(q, k, v, **LAYOUT, config=config)
        torch.testing.assert_close(with_plan, fresh, rtol=0, atol=0)


def test_a_config_that_leaves_the_selection_at_its_defaults_runs_the_plan():
    """A config object passed with a plan speaks for the fields it sets away from their defaults: one that only
    chooses the rectification does not contradict a plan selected at another sparsity with its default one."""
    q, k, v = _qkv()
    plan = spattn_compile.select_plan(q, k, v, **LAYOUT, config=BASE)  # sparsity 0.5, the default is 0.75
    run = SparseAttentionConfig(block_size=16, min_seq_len=0, rectify="block")
    out = spattn_compile.sparse_attention(q, k, v, **LAYOUT, config=run, plan=plan)
    expected = spattn_compile.sparse_attention(q, k, v, **LAYOUT, config=dataclasses.replace(BASE, rectify="block"))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_plan_of_query_rectification_serves_block_rectification():
    """Block and query rectification read the same trusted blocks: a plan of one runs with the other (honoured)."""
    q, k, v = _qkv()
    plan = spattn_compile.select_plan(q, k, v, **LAYOUT, config=BASE)
    block = dataclasses.replace(BASE, rectify="block")
    out = spattn_compile.sparse_attention(q, k, v, **LAYOUT, config=block, plan=plan)
    torch.testing.assert_close(out, spattn_compile.sparse_attention(q, k, v, **LAYOUT, config=block))


def test_a_plan_under_a_config_block_that_contradicts_it_raises():
    q, k, v = _qkv()
    plan = spattn_compile.select_plan(q, k, v, **LAYOUT, config=BASE)
    with spattn_compile.config(BASE), spattn_compile.config(gapr=False):
        with pytest.raises(ValueError, match="gapr"):
            spattn_compile.sparse_attention(q, k, v, **LAYOUT, plan=plan)


def test_a_plan_from_a_mask_runs_with_any_rectification():
    """A hand-built plan records no settings: its trusted lists are the caller's, and the run's mode applies."""
    q, k, v = _qkv()
    layout = spattn_compile.layout.token_layout(GRID, TEXT, False, 16, "hilbert")
    keep = torch.eye(layout.num_blocks, dtype=torch.bool).expand(1, 2, -1, -1)
    plan = spattn_compile.SparsePlan.from_mask(keep, **LAYOUT, block_size=16)
    for rectify in ("none", "query"):
        spattn_compile.sparse_attention(
            q, k, v, **LAYOUT, config=dataclasses.replace(BASE, rectify=rectify), plan=plan
        )


# ---------------------------------------------------------------------------------------------------------------------
# Errors that name the argument
# ---------------------------------------------------------------------------------------------------------------------


def test_numpy_integers_are_accepted_where_ints_are():
    spattn_compile.set_plan_cache_limit(np.int64(1 << 20))
    spattn_compile.set_plan_cache_limit(1 << 30)
    with spattn_compile.step(np.int32(2), branch=np.int64(0)):
        pass
    assert spattn_compile.check_capability(torch.float32, np.int64(64), torch.device("cpu"))


@pytest.mark.parametrize("value", [True, 1.5, "3", -1])
def test_step_rejects_non_ints_naming_the_argument(value):
    with pytest.raises((TypeError, ValueError), match="step"):
        with spattn_compile.step(value):
            pass


def test_backend_given_a_dict_says_how_to_pass_options():
    with pytest.raises(TypeError, match="options") as error:
        spattn_compile.backend({"sparsity": 0.9})
    assert "spattn_compile.backend(sparsity=" in str(error.value)


def test_a_broadcast_batch_mask_is_a_key_padding_mask():
    """`(B, 1, 1, 1)` broadcasts to `(B, H, 1, S)` under SDPA's rules: accepted, and the result is SDPA's where every
    key is kept (True) and where none is (SDPA: NaN rows... compared as the same call with the expanded mask)."""
    q, k, v = (t.expand(2, -1, -1, -1).contiguous() for t in _qkv())
    mask = torch.tensor([True, True]).reshape(2, 1, 1, 1)
    out = spattn_compile.sparse_attention(q, k, v, **LAYOUT, config=BASE, attn_mask=mask)
    full = spattn_compile.sparse_attention(q, k, v, **LAYOUT, config=BASE, attn_mask=mask.expand(2, 1, 1, SEQ))
    torch.testing.assert_close(out, full, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_expanded_inputs_run_like_their_copies(which):
    """Stride-0 (expanded) heads are accepted as SDPA accepts them; the result equals the contiguous copy's."""
    q, k, v = _qkv()
    q, k, v = q.float(), k.float(), v.float()
    tensors = {"query": q, "key": k, "value": v}
    tensors[which] = tensors[which][:, :1].expand(-1, 2, -1, -1)
    contiguous = {name: t.contiguous() for name, t in tensors.items()}
    for impl in ("reference", "triton"):
        out = spattn_compile.sparse_attention(**tensors, **LAYOUT, config=BASE, impl=impl)
        ref = spattn_compile.sparse_attention(**contiguous, **LAYOUT, config=BASE, impl=impl)
        torch.testing.assert_close(out, ref)


# ---------------------------------------------------------------------------------------------------------------------
# Reading the latent grid of a forward (regional compilation)
# ---------------------------------------------------------------------------------------------------------------------


class _Video(torch.nn.Module):
    """A model of a family missing from `FAMILY_RULES`, whose config has `in_channels` and patch (1, 2, 2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.config = type("Config", (), {"patch_size": (1, 2, 2), "in_channels": channels})()


@given(
    st.integers(1, 6), st.integers(1, 5).map(lambda n: 2 * n), st.integers(1, 5).map(lambda n: 2 * n),
    st.integers(1, 8), st.sampled_from([1, 2, 4]),
)  # fmt: skip
def test_a_latent_is_read_right_or_not_at_all(frames, height, width, channels, channel_dim):
    """Property: a 5-D latent with its channels in dim 1, 2 or 4 gives its true grid, or no grid with a reason that
    names the fix; never another grid (issue 18 item 3: a channels-last latent whose channel count matches another
    dim was read as (T, W, C)-shaped)."""
    from spattn_compile.families import latent_grid

    sizes = [frames, height, width]
    shape = [1, *sizes]
    shape.insert(channel_dim, channels)
    if channel_dim == 4:  # (B, F, H, W, C)
        shape = [1, frames, height, width, channels]
    grid, why = latent_grid(_Video(channels), {"hidden_states": torch.zeros(shape)})
    if grid is None:
        assert "FAMILY_RULES" in why and "video_grid" in why
    else:
        assert grid == (frames, height // 2, width // 2), (shape, grid)


def test_a_channels_last_latent_matching_another_dim_is_not_guessed():
    from spattn_compile.families import latent_grid

    grid, why = latent_grid(_Video(4), {"hidden_states": torch.zeros(1, 4, 8, 12, 4)})
    assert grid is None and "cannot be read unambiguously" in why
    assert latent_grid(_Video(4), {"hidden_states": torch.zeros(1, 3, 8, 12, 4)}) == ((3, 4, 6), "")
    # (B, C, F, H, W) with C == F: both readings give the same grid.
    assert latent_grid(_Video(4), {"hidden_states": torch.zeros(1, 4, 4, 8, 12)}) == ((4, 4, 6), "")


def test_a_reading_that_its_patch_embedding_contradicts_is_refused_naming_both_grids(monkeypatch):
    """A family rule that does not fit the model (Wan's channels-first latent read as channels-last): with W == C the
    reading (4, 2, 12) holds as many tokens as the true grid (4, 12, 2); the 3-D patch embedding's grid refuses it."""
    from spattn_compile.families import FAMILY_RULES, LatentRule, latent_grid

    tiny = BY_NAME["wan"].build()
    inputs = tiny.make_inputs(4, 24, 4)
    monkeypatch.setitem(FAMILY_RULES, "WanTransformer3DModel", LatentRule(channel_dim=1))
    assert latent_grid(tiny.model, inputs) == ((4, 12, 2), "")
    monkeypatch.setitem(FAMILY_RULES, "WanTransformer3DModel", LatentRule(channel_dim=4))
    grid, why = latent_grid(tiny.model, inputs)
    assert grid is None and "(4, 2, 12)" in why and "(4, 12, 2)" in why and "FAMILY_RULES" in why, why


def test_a_misread_grid_of_the_same_token_count_stays_dense_under_regional_compilation(monkeypatch):
    """Regional compilation with the misread of the test above: a count check would pass (96 tokens either way) and
    the blocks would run sparse on the wrong layout. The grid is compared by dims: no grid, the blocks stay dense and
    explain says why; a video_grid setting (the true grid) makes them sparse."""
    from spattn_compile.families import FAMILY_RULES, LatentRule

    monkeypatch.setitem(FAMILY_RULES, "WanTransformer3DModel", LatentRule(channel_dim=4))
    family = BY_NAME["wan"]
    tiny, eager = family.build(), family.build().model
    inputs = tiny.make_inputs(4, 24, 4)
    compile_blocks(tiny.model)
    report = explain_model(tiny.model, inputs)
    self_attention = [d for d in report.decisions if d.module.endswith("attn1")]
    assert len(self_attention) == 2 and not any(d.sparse for d in report.decisions)
    for decision in self_attention:
        assert decision.rule == "no_grid" and "(4, 2, 12)" in decision.reason and "(4, 12, 2)" in decision.reason
    with torch.no_grad(), spattn_compile.config(**SETTINGS, sparsity=0.75):
        torch.testing.assert_close(tiny.model(**inputs)[0], eager(**inputs)[0], rtol=1e-5, atol=1e-5)
    assert {r.kind for r in spattn_compile.report().records} == {"no_grid"}
    result = compare_with_eager(tiny, tiny.model, inputs, (4, 12, 2), eager=eager, video_grid=(4, 12, 2))
    assert result.sparse_calls == 2 and result.reference_at_sparsity < 1e-5 and result.dense_at_sparsity > 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# A custom estimator's scores; dense_layers naming a layer the model lacks (issue 18 item 5)
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Misshapen(EstimatorConfig):
    name = "misshapen_for_test"


def _misshapen(inputs: EstimatorInputs, settings: _Misshapen) -> torch.Tensor:
    nb = inputs.layout.num_video_blocks
    b, h = inputs.q.shape[:2]
    return torch.full((b, h, nb, nb), 1.0 / nb, device=inputs.q.device)  # the text column is missing


def test_an_estimator_returning_misshapen_scores_is_refused_where_it_returns():
    register_estimator(_Misshapen, reference=_misshapen, kernel=_misshapen)
    try:
        q, k, v = _qkv()
        config = dataclasses.replace(BASE, estimator="misshapen_for_test")
        with pytest.raises(ValueError, match=r"misshapen_for_test.*\(1, 2, 5, 5\).*\(1, 2, 5, 6\)"):
            spattn_compile.select_plan(q, k, v, **LAYOUT, config=config)
    finally:
        unregister_estimator(_Misshapen)


def test_dense_layers_naming_a_missing_layer_raises():
    model = TinyVideoAttention()
    inputs = tiny_inputs(3, 8, 12, TEXT)
    compiled = compile_spattn(model)
    with torch.no_grad(), spattn_compile.config(**SETTINGS, dense_layers=(3,)):
        compiled(*inputs)  # the first forward: the layers are not all known yet
        with pytest.raises(ValueError, match=r"dense_layers=\(3,\).*\[3\].*1 sparse-capable"):
            compiled(*inputs)
    with torch.no_grad(), spattn_compile.config(**SETTINGS, dense_layers=(0,)):
        compiled(*inputs)
    assert spattn_compile.report().records[-1].kind == "dense_layer"


# ---------------------------------------------------------------------------------------------------------------------
# Warnings that name what to do (issue 18 item 4 and the nothing-sparse reason)
# ---------------------------------------------------------------------------------------------------------------------


def _packed_ltx_inputs(tiny: zoo.TinyModel, grid: tuple[int, int, int], batch: int = 1) -> dict:
    """LTX-Video's inputs as LTXConditionPipeline passes them: packed tokens and their rotary coordinates
    (`video_coords`), without `num_frames`, `height` and `width`: neither the graph nor the forward shows the grid."""
    inputs = tiny.make_inputs(*grid, batch=batch)
    for name in ("num_frames", "height", "width"):
        del inputs[name]
    axes = torch.meshgrid(*(torch.arange(size, dtype=torch.float32) for size in grid), indexing="ij")
    inputs["video_coords"] = torch.stack(axes).flatten(1).unsqueeze(0).repeat(batch, 1, 1)
    return inputs


@pytest.mark.parametrize(
    "settings, forward_grid, expected",
    [
        ({}, None, "no video_grid setting"),
        ({"video_grid": GRID}, None, "text_position"),  # 5 tokens of text, placed nowhere
        ({"video_grid": GRID, "text_position": "first"}, None, CallLayout(GRID, TEXT, True)),
        ({"video_grid": GRID, "text_position": "last", "text_len": 4}, None, "text_len=4"),
        ({"video_grid": (3, 4, 7), "text_position": "last"}, None, "(3, 4, 7) holds 84 tokens"),
        ({"video_grid": GRID, "text_position": "last"}, GRID, CallLayout(GRID, TEXT, False)),
        ({"video_grid": GRID, "text_position": "last"}, (3, 6, 4), spattn_compile.LayoutOverrideError),
    ],
)
def test_a_call_without_a_grid_in_its_graph_takes_only_the_setting(settings, forward_grid, expected):
    """`call_layout.TEXT_UNPLACED`: the grid and the text's place come from the settings in force; a grid the forward
    read must agree with the setting (dims, not the token count), and is never taken alone."""
    from spattn_compile.call_layout import TEXT_UNPLACED, resolve_call

    config = SparseAttentionConfig(**settings)
    if expected is spattn_compile.LayoutOverrideError:
        with pytest.raises(spattn_compile.LayoutOverrideError, match=r"video_grid=\(3, 4, 6\).*\(3, 6, 4\)"):
            resolve_call(SEQ, [], TEXT_UNPLACED, False, config, forward_grid)
        return
    resolved = resolve_call(SEQ, [], TEXT_UNPLACED, False, config, forward_grid)
    if isinstance(expected, CallLayout):
        assert resolved == expected
    else:
        assert isinstance(resolved, str) and expected in resolved, resolved
    # The forward's grid alone is not taken.
    assert isinstance(resolve_call(72, [], TEXT_UNPLACED, False, SparseAttentionConfig(), GRID), str)


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_a_packed_token_model_compiled_without_a_grid_runs_sparse_where_one_is_set(caplog, regional):
    """LTX-Video with `video_coords` compiled by a call without a grid: that call is dense and recorded as such; the
    calls inside `config(video_grid=...)` run sparse, equal to sparse SDPA on that grid, with no recompile and no
    warning; a call without the setting is dense again."""
    family = BY_NAME["ltx_video"]
    tiny, eager = family.build(), family.build().model
    inputs = _packed_ltx_inputs(tiny, family.grid)
    report = explain_model(tiny.model, inputs)
    assert [(d.module, d.rule) for d in report.decisions] == [
        (module, "cross_attention" if "attn2" in module else "no_grid") for module, _ in family.expected
    ]
    assert all("video_grid" in d.reason for d in report.decisions if d.rule == "no_grid")
    compiled = compile_blocks(tiny.model) if regional else compile_spattn(tiny.model)
    with torch.no_grad(), capture_warnings(caplog) as warnings:
        with spattn_compile.config(**SETTINGS):
            torch.testing.assert_close(compiled(**inputs)[0], eager(**inputs)[0], rtol=1e-5, atol=1e-5)
        graphs = compiled_graph_count()
        result = compare_with_eager(tiny, compiled, inputs, family.grid, eager=eager, video_grid=family.grid)
        with spattn_compile.config(**SETTINGS):
            torch.testing.assert_close(compiled(**inputs)[0], eager(**inputs)[0], rtol=1e-5, atol=1e-5)
    assert result.sparse_calls == 2 and result.reference_at_sparsity < 1e-5 and result.dense_at_sparsity > 1e-4
    assert result.dense_at_sparsity_0 < 1e-5
    assert compiled_graph_count() == graphs, "the grid is read when the op runs: no recompile"
    kinds = [r.kind for r in spattn_compile.report().records]
    assert kinds == ["no_grid"] * 2 + ["sparse"] * 4 + ["no_grid"] * 2, kinds
    assert spattn_compile.report().layers() == family.sparse_modules
    assert not warnings, warnings


def test_a_grid_in_force_that_fits_no_call_is_said_without_suggesting_it(caplog):
    """Packed tokens and a video_grid setting that does not fit the sequence: the warning says the setting is in
    force and does not fit; it never suggests setting it."""
    model = TinyVideoAttention(patch_embed=False)
    inputs = tiny_inputs(3, 8, 12, TEXT, packed=True)
    compiled = compile_spattn(model)
    with torch.no_grad(), capture_warnings(caplog) as warnings:
        with spattn_compile.config(**SETTINGS):
            compiled(*inputs)
        with spattn_compile.config(**SETTINGS, video_grid=GRID):  # 72 + 5 text tokens, text_position not given
            for _ in range(3):
                compiled(*inputs)
    assert len(warnings) == 1, warnings
    assert "video_grid=(3, 4, 6) is in force" in warnings[0] and "text_position" in warnings[0], warnings[0]
    assert "set the latent token grid" not in warnings[0]
    with torch.no_grad(), spattn_compile.config(**SETTINGS, video_grid=GRID, text_position="last"):
        with SparseSDPA(GRID, TEXT):
            expected = model(*inputs)
        out = compiled(*inputs)
    assert relative_error(out, expected) < 1e-5
    assert [r.kind for r in spattn_compile.report().records] == ["no_grid"] * 4 + ["sparse"]


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_a_run_time_grid_contradicting_the_forwards_raises_naming_both(regional):
    """LTX-Video given `num_frames`, `height` and `width` with `video_coords`: its forward hook reads the grid; a
    video_grid setting of the same token count but other dims contradicts it and raises, whether the grid reaches
    the calls from the forward (regional) or only from the setting (whole: the graph shows none)."""
    family = BY_NAME["ltx_video"]
    tiny = family.build()
    inputs = _packed_ltx_inputs(tiny, family.grid)
    inputs.update(num_frames=3, height=4, width=6)
    compiled = compile_blocks(tiny.model) if regional else compile_spattn(tiny.model)
    with torch.no_grad(), spattn_compile.config(**SETTINGS):
        compiled(**inputs)
        with spattn_compile.config(video_grid=(3, 6, 4)), pytest.raises(spattn_compile.LayoutOverrideError) as error:
            compiled(**inputs)
    assert "video_grid=(3, 6, 4)" in str(error.value) and "(3, 4, 6)" in str(error.value)


def test_a_key_padding_mask_of_one_key_column_is_sparse_in_a_compiled_model():
    """A `(B, 1, 1, 1)` boolean mask broadcasts over the keys (SDPA's rules): the pass keeps it as a key-padding
    mask."""
    model = TinyVideoAttention()
    inputs = tiny_inputs(3, 8, 12, TEXT)
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    decision = explain_model(model, {"video": inputs[0], "text": inputs[1], "attn_mask": mask}).decisions[0]
    assert decision.sparse, decision.reason
    with torch.no_grad(), spattn_compile.config(**SETTINGS, sparsity=0.5):
        with SparseSDPA(GRID, TEXT):
            reference = model(*inputs, mask)
        out = compile_spattn(model)(*inputs, mask)
    assert relative_error(out, reference) < 1e-5


def test_the_nothing_sparse_warning_names_the_self_attentions_reason():
    """Cross-attention calls outnumbering the self-attention's: the warning names the self-attention's reason."""
    from spattn_compile.runtime.model_state import ModelState, nothing_sparse_message

    state = ModelState("Model")
    state.note_decisions([_Decision("cross_attention")] * 3 + [_Decision("no_grid")])
    message = nothing_sparse_message(state)
    assert "'no_grid'" in message and "video_grid" in message


@dataclasses.dataclass
class _Decision:
    rule: str
    sparse: bool = False
    grid_from: str = ""


# ---------------------------------------------------------------------------------------------------------------------
# Dense where it could be sparse: complex rotary embeddings
# ---------------------------------------------------------------------------------------------------------------------


class _ComplexRotary(torch.nn.Module):
    """Packed video tokens `(B, 72, 4)` whose grid (3, 4, 6) shows only in a complex rotary embedding applied with
    `view_as_complex` / `view_as_real` (Lumina- / Mochi-style), or its real-valued twin."""

    def __init__(self, complex_valued: bool) -> None:
        super().__init__()
        self.complex_valued = complex_valued
        self.tokens, self.qkv = torch.nn.Linear(4, 32), torch.nn.Linear(32, 96)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.tokens(video)).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        f, h, w = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), torch.arange(6.0), indexing="ij")
        angles = (f + h * 0.5 + w * 0.25)[..., None] * torch.arange(1.0, 9.0)
        if self.complex_valued:
            freqs = torch.polar(torch.ones_like(angles), angles).reshape(72, 8)

            def rotate(t: torch.Tensor) -> torch.Tensor:
                pairs = torch.view_as_complex(t.float().reshape(*t.shape[:-1], 8, 2))
                return torch.view_as_real(pairs * freqs).flatten(3).type_as(t)
        else:
            cos = angles.cos().reshape(72, 8).repeat_interleave(2, -1)
            sin = angles.sin().reshape(72, 8).repeat_interleave(2, -1)

            def rotate(t: torch.Tensor) -> torch.Tensor:
                return t * cos + t.flip(-1) * sin

        return F.scaled_dot_product_attention(rotate(q), rotate(k), v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("complex_valued", [False, True])
def test_a_grid_seen_only_through_a_complex_rotary_embedding_is_read(complex_valued):
    model = _ComplexRotary(complex_valued)
    video = torch.randn(1, 72, 4, generator=torch.Generator().manual_seed(0))
    decision = explain_model(model, {"video": video}).decisions[0]
    assert decision.sparse and decision.video_grid == (3, 4, 6), decision.reason
    with torch.no_grad(), spattn_compile.config(**SETTINGS, sparsity=0.5):
        with SparseSDPA((3, 4, 6)) as expected:
            reference = model(video)
        out = compile_spattn(model)(video)
    assert expected.sparse_calls == 1
    assert relative_error(out, reference) < 1e-5
    assert relative_error(out, model(video)) > 1e-4  # sparse, not dense


class _FrameModulated(torch.nn.Module):
    """Packed tokens with a per-frame modulation reshape `(F, H*W)` and a rotary table over `(F, H, W)` (3, 4, 6)."""

    def __init__(self, rotary_grid: tuple[int, int, int] = (3, 4, 6)) -> None:
        super().__init__()
        self.rotary_grid = rotary_grid
        self.tokens, self.qkv, self.modulation = torch.nn.Linear(4, 32), torch.nn.Linear(32, 96), torch.nn.Linear(1, 32)

    def forward(self, video: torch.Tensor, per_frame: torch.Tensor) -> torch.Tensor:
        x = self.tokens(video)
        x = (x.unflatten(1, (3, 24)) * (1 + self.modulation(per_frame)[:, :, None])).flatten(1, 2)
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        f, h, w = torch.meshgrid(*(torch.arange(float(n)) for n in self.rotary_grid), indexing="ij")
        angles = (f + h * 0.5 + w * 0.25)[..., None] * torch.arange(1.0, 9.0)
        cos = angles.cos().reshape(72, 8).repeat_interleave(2, -1)
        sin = angles.sin().reshape(72, 8).repeat_interleave(2, -1)
        q, k = (t * cos + t.flip(-1) * sin for t in (q, k))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def test_a_per_frame_reshape_agreeing_with_the_rotary_grid_is_not_ambiguous():
    model = _FrameModulated()
    inputs = {"video": torch.randn(1, 72, 4), "per_frame": torch.randn(1, 3, 1)}
    decision = explain_model(model, inputs).decisions[0]
    assert decision.sparse and decision.video_grid == (3, 4, 6), decision.reason
    with torch.no_grad(), spattn_compile.config(**SETTINGS, sparsity=0.5):
        with SparseSDPA((3, 4, 6)) as expected:
            reference = model(**inputs)
        out = compile_spattn(model)(**inputs)
    assert expected.sparse_calls == 1 and relative_error(out, reference) < 1e-5


def test_a_per_frame_reshape_that_disagrees_with_the_rotary_grid_stays_dense():
    """(3, 24) against a rotary over (6, 3, 4): 24 is no product of consecutive factors; nothing is guessed."""
    decision = explain_model(
        _FrameModulated((6, 3, 4)), {"video": torch.randn(1, 72, 4), "per_frame": torch.randn(1, 3, 1)}
    ).decisions[0]
    assert not decision.sparse and decision.rule == "ambiguous_grid"


def test_a_multi_item_latent_is_read_for_its_family():
    """JoyImage's 6-D latent `(B, N, C, T, H, W)` joins its items' frames: grid `(N * T, H / 2, W / 2)`; another
    family's 6-D latent is not guessed."""
    from diffusers.models.transformers.transformer_joyimage import JoyImageEditTransformer3DModel

    from spattn_compile.families import latent_grid

    model = JoyImageEditTransformer3DModel(
        in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=8, num_layers=1, rope_dim_list=[4, 6, 6]
    )
    latent = torch.zeros(1, 2, 4, 3, 8, 12)
    assert latent_grid(model, {"hidden_states": latent}) == ((6, 4, 6), "")
    assert latent_grid(model, {"hidden_states": latent[:, :, :3]})[0] is None  # 3 channels, not 4
    assert latent_grid(_Video(4), {"hidden_states": latent})[0] is None


def test_a_multi_item_model_runs_sparse_on_its_grid_under_regional_compilation():
    """Issue 18: the 6-D multi-item latent under `compile_repeated_blocks`: the blocks run sparse on the grid
    (N * T, H / 2, W / 2), equal to sparse SDPA on that grid in eager mode."""
    from diffusers.models.transformers.transformer_joyimage import JoyImageEditTransformer3DModel
    from helpers import compile_blocks

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return JoyImageEditTransformer3DModel(
            in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=8, num_layers=1, rope_dim_list=[4, 6, 6]
        ).eval()

    eager, compiled = build(), compile_blocks(build())
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 2, 4, 3, 8, 12, generator=g), timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 5, 8, generator=g), return_dict=False,
    )  # fmt: skip
    with torch.no_grad(), spattn_compile.config(**SETTINGS, sparsity=0.5):
        out = compiled(**inputs)[0]
        with SparseSDPA((6, 4, 6), 5) as expected:
            reference = eager(**inputs)[0]
    assert [r.kind for r in spattn_compile.report().records] == ["sparse"]
    assert expected.sparse_calls == 1 and relative_error(out, reference) < 1e-5
