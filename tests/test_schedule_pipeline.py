"""The schedule through whole denoising loops of tiny diffusers models compiled with the spattn backend: warm-up steps
are dense (latents equal the dense loop's), cached steps reuse plans, refresh steps select again at the decayed
density, CFG branches never share a plan, a second generation starts fresh, and the report counts what happened."""

from __future__ import annotations

import pytest
import torch
from helpers import SETTINGS, compile_blocks, compile_spattn, compiled_graph_count

import spattn_compile
from spattn_compile.attention import SparseAttention
from spattn_compile.plan import SparsePlan
from spattn_compile.runtime.binding import default_registry, reset_schedule
from spattn_compile.runtime.model_state import current_step
from spattn_compile.testing import relative_error, zoo


class PlanCounter:
    """Counts the op's attention calls (`attention.SparseAttention.run`) with a plan just selected (`plan()` of the same
    call) and those with a cached one, per branch."""

    def __init__(self, monkeypatch):
        self.selected: list[tuple[int, int]] = []  # (step, branch)
        self.reused: list[tuple[int, int, int]] = []  # (step, branch, id of the plan)
        self.plans: dict[int, set[int]] = {}  # branch -> ids of the plans selected for it
        self._alive: list[object] = []  # holds every plan and call, so that no id is reused by a later one
        fresh: dict[int, SparsePlan] = {}  # id of a call -> the plan its plan() returned
        original_plan, original_run = SparseAttention.plan, SparseAttention.run

        def plan(call, **kwargs):
            result = original_plan(call, **kwargs)
            fresh[id(call)] = result
            self._alive += [call, result]
            return result

        def run(call, plan):
            context = current_step()
            if plan is fresh.get(id(call)):
                self.selected.append((context.step, context.branch))
                self.plans.setdefault(context.branch, set()).add(id(plan))
            else:
                self.reused.append((context.step, context.branch, id(plan)))
            return original_run(call, plan)

        monkeypatch.setattr(SparseAttention, "plan", plan)
        monkeypatch.setattr(SparseAttention, "run", run)


def _scheduler(steps: int):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler


def _wan_cfg_loop(model, tiny, steps: int = 4, guidance: float = 5.0, seed: int = 0) -> list[torch.Tensor]:
    """Wan's pipeline loop: two transformer calls per step (conditional, then unconditional)."""
    inputs = tiny.make_inputs(seed=seed)
    cond = inputs["encoder_hidden_states"]
    uncond = torch.randn(cond.shape, generator=torch.Generator().manual_seed(seed + 1))
    latents = inputs["hidden_states"]
    scheduler = _scheduler(steps)
    trajectory = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            timestep = t.expand(latents.shape[0])
            noise_cond = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond, return_dict=False)
            noise_uncond = model(
                hidden_states=latents, timestep=timestep, encoder_hidden_states=uncond, return_dict=False
            )
            noise = noise_uncond[0] + guidance * (noise_cond[0] - noise_uncond[0])
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            trajectory.append(latents)
    return trajectory


# exact_plan_steps=0: these tests count plan refreshes and reuse; the exact plan of the last dense step has its own.
SCHEDULE = dict(sparsity=0.5, dense_steps=2, refresh_interval=2, density_decay=0.2, exact_plan_steps=0)
# A whole-model compile (`torch.compile(model)`) and regional compilation (`model.compile_repeated_blocks`).
HOW = pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])


def _compile(build, regional: bool, **options):
    """(compiled model, eager model with the same weights): regional compilation changes the model in place."""
    tiny = build()
    if regional:
        return compile_blocks(tiny.model, **options), build().model
    return compile_spattn(tiny.model, **options), tiny.model


@HOW
def test_wan_cfg_loop_warmup_cache_refresh_and_report(monkeypatch, regional):
    tiny = zoo.wan(num_layers=2)
    layers, branches, steps = 2, 2, 5
    compiled, eager = _compile(zoo.wan, regional, **SCHEDULE)
    counter = PlanCounter(monkeypatch)
    sparse = _wan_cfg_loop(compiled, tiny, steps)
    dense = _wan_cfg_loop(eager, tiny, steps)

    # Warm-up: steps 0 and 1 are dense, so the latents equal the dense loop's; the sparse steps then differ.
    for index in range(SCHEDULE["dense_steps"]):
        assert relative_error(sparse[index], dense[index]) < 1e-5, index
    assert relative_error(sparse[2], dense[2]) > 1e-4, "step 2 is sparse and must change the result"

    # refresh_interval=2: plans are selected at steps 2 and 4, reused at step 3, for each layer and branch.
    assert sorted(counter.selected) == sorted((s, b) for s in (2, 4) for b in range(branches) for _ in range(layers))
    assert sorted((s, b) for s, b, _ in counter.reused) == sorted(
        (3, b) for b in range(branches) for _ in range(layers)
    )
    # The two CFG branches never share a plan: each reuse takes a plan selected for its own branch.
    assert not counter.plans[0] & counter.plans[1]
    for _, branch, plan_id in counter.reused:
        assert plan_id in counter.plans[branch]

    result = spattn_compile.report()
    assert result.dense_calls == SCHEDULE["dense_steps"] * branches * layers
    assert result.refreshes == len(counter.selected)
    assert result.cache_hits == len(counter.reused)
    assert result.sparse_calls == (steps - SCHEDULE["dense_steps"]) * branches * layers
    assert {(r.step, r.branch) for r in result.records} == {(s, b) for s in range(steps) for b in range(branches)}
    # The adaptive ratio: density 0.5 at the first refresh, 0.3 at the second (5 video blocks: 3 then 2 kept).
    by_step = {r.step: r.density for r in result.records if r.kind == "sparse" and r.cache == "refresh"}
    assert by_step == {2: pytest.approx(3 / 5), 4: pytest.approx(2 / 5)}
    assert all(0 < r.recall <= 1 + 1e-6 for r in result.records)
    assert "dense_step" in str(result)
    # One row per block and call, each block a layer of its own, in the model's order.
    assert result.layers() == ("blocks.0.attn1", "blocks.1.attn1")
    assert [(r.layer_index, r.layer) for r in result.records[:2]] == [(0, "blocks.0.attn1"), (1, "blocks.1.attn1")]


@HOW
def test_dense_layers_are_the_models_layers(regional):
    tiny = zoo.wan(num_layers=2)
    compiled, _ = _compile(zoo.wan, regional)
    with torch.no_grad(), spattn_compile.config(dense_layers=(1,)):
        compiled(**tiny.make_inputs())
    records = spattn_compile.report().records
    assert [(r.layer, r.kind) for r in records] == [("blocks.0.attn1", "sparse"), ("blocks.1.attn1", "dense_layer")]


@HOW
def test_two_experts_switching_at_a_step_boundary_keep_their_own_plans_and_steps(monkeypatch, regional):
    # Wan 2.2 A14B: a high-noise expert runs the first steps, a low-noise expert (same class) the others.
    tiny = zoo.wan(num_layers=2)
    high, _ = _compile(zoo.wan, regional, sparsity=0.5, refresh_interval=4)
    low, _ = _compile(zoo.wan, regional, sparsity=0.5, refresh_interval=4)
    counter = PlanCounter(monkeypatch)
    boundary, steps = 2, 4

    def experts(**kwargs):
        t = float(kwargs["timestep"].max())
        return (high if t >= timesteps[boundary - 1] else low)(**kwargs)

    timesteps = [float(t) for t in _scheduler(steps).timesteps]
    for _generation in range(2):
        _wan_cfg_loop(experts, tiny, steps)
    assert compiled_graph_count() == 1, "Dynamo shares one graph between the experts: the state follows the weights"

    result = spattn_compile.report()
    assert result.models == ("WanTransformer3DModel", "WanTransformer3DModel#1")
    for model in result.models:
        records = [r for r in result.records if r.model == model]
        # Each expert counts its own steps (2 per generation, 2 CFG branches) and its own generations.
        assert {(r.generation, r.step, r.branch) for r in records} == {
            (g, s, b) for g in range(2) for s in range(boundary) for b in range(2)
        }, model
        first_step = [r.cache for r in records if r.step == 0]
        assert first_step == ["refresh"] * len(first_step), f"{model} must not reuse the other expert's plans"
        assert [r.cache for r in records if r.step == 1] == ["hit"] * (2 * 2 * 2)
    assert spattn_compile.report().layers() == ("blocks.0.attn1", "blocks.1.attn1")
    # Every reuse takes a plan selected by the same expert, at the same layer and branch.
    assert len(counter.reused) == 2 * 2 * 2 * 2


def test_second_generation_starts_fresh(monkeypatch):
    tiny = zoo.wan(num_layers=1)
    compiled = compile_spattn(tiny.model, **SCHEDULE)
    counter = PlanCounter(monkeypatch)
    first = _wan_cfg_loop(compiled, tiny, 4)
    second = _wan_cfg_loop(compiled, tiny, 4)
    # The first step's timestep is larger than the last one's: a new generation, dense warm-up, no stale plan.
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    generations = {(r.generation, r.step) for r in spattn_compile.report().records}
    assert generations == {(g, s) for g in (0, 1) for s in range(4)}
    assert len(counter.selected) == 2 * 2 and len(counter.reused) == 2 * 2
    reused_ids = [plan_id for _, _, plan_id in counter.reused]
    assert len(set(reused_ids[:2]) & set(reused_ids[2:])) == 0, "generation 1 must not reuse generation 0's plans"


def test_cogvideox_batched_cfg_is_one_branch_per_step():
    tiny = zoo.cogvideox(num_layers=1)
    compiled = compile_spattn(tiny.model, sparsity=0.5, dense_steps=1, refresh_interval=3, exact_plan_steps=0)
    inputs = tiny.make_inputs(batch=2)
    with torch.no_grad():
        for t in (900, 700, 500):
            compiled(**{**inputs, "timestep": torch.full((2,), t)})
    result = spattn_compile.report()
    assert [(r.step, r.branch, r.kind, r.cache) for r in result.records] == [
        (0, 0, "dense_step", ""),
        (1, 0, "sparse", "refresh"),
        (2, 0, "sparse", "hit"),
    ]


@HOW
def test_hunyuan_one_call_per_step_and_explicit_steps(regional):
    tiny = zoo.hunyuan_video()
    compiled, _ = _compile(zoo.hunyuan_video, regional, sparsity=0.5, refresh_interval=1)
    inputs = tiny.make_inputs()
    with torch.no_grad():
        for t in (900, 800):
            compiled(**{**inputs, "timestep": torch.full((1,), t)})
        # The explicit override: a constant timestep, steps named by the caller.
        for index in range(2):
            with spattn_compile.step(index):
                compiled(**inputs)
    records = spattn_compile.report().records
    layers = 2  # one dual-stream and one single-stream block
    per_call = [(r.generation, r.step, r.branch, r.cache) for r in records[::layers]]
    assert per_call == [(0, 0, 0, "refresh"), (0, 1, 0, "refresh"), (1, 0, 0, "refresh"), (1, 1, 0, "refresh")]
    assert len(records) == 4 * layers


@HOW
def test_reset_schedule_forgets_the_models_of_compiled_graphs(regional):
    tiny = zoo.wan(num_layers=1)
    compiled, _ = _compile(lambda: zoo.wan(num_layers=1), regional, sparsity=0.5, refresh_interval=10)
    inputs = tiny.make_inputs()
    with torch.no_grad():
        compiled(**inputs)
        reset_schedule()  # the graphs stay compiled; their models' states go
        compiled(**{**inputs, "timestep": torch.full((1,), 100)})
    records = spattn_compile.report().records
    assert [(r.model, r.generation, r.step, r.cache) for r in records] == [("WanTransformer3DModel", 0, 0, "refresh")]
    assert compiled_graph_count() == 1


def test_explaining_a_regional_model_is_not_one_of_its_forwards():
    tiny = zoo.wan(num_layers=1)
    compiled, _ = _compile(lambda: zoo.wan(num_layers=1), True)
    inputs = tiny.make_inputs()
    with torch.no_grad():
        compiled(**inputs)
        with spattn_compile.config(**SETTINGS):
            assert spattn_compile.explain(compiled, **inputs).regional
        compiled(**inputs)  # the same timestep: the second CFG branch of step 0, explain or not
    records = spattn_compile.report().records
    assert [(r.step, r.branch) for r in records] == [(0, 0), (0, 1)]


def test_direct_calls_have_no_step_context_and_are_not_recorded():
    q = torch.randn(1, 2, 72, 16)
    with spattn_compile.config(**SETTINGS, dense_steps=100):
        out = torch.ops.spattn.sparse_attention(q, q, q, [3, 4, 6], 0, False, None, None, 0)
        expected = spattn_compile.sparse_attention(q, q, q, video_grid=(3, 4, 6), impl="reference")
    assert torch.equal(out, expected), "dense_steps needs a step: outside a compiled model the call is sparse"
    assert spattn_compile.report().records == ()
    assert default_registry().models() == [], "no model state, no cached plan"


def test_wan_pipeline_end_to_end():
    pytest.importorskip("transformers", reason="diffusers' WanPipeline needs transformers")
    make_pipeline = zoo.wan_pipeline
    tiny = zoo.wan(num_layers=2)
    g = torch.Generator().manual_seed(0)
    embeds = dict(
        prompt_embeds=torch.randn(1, 7, 32, generator=g), negative_prompt_embeds=torch.randn(1, 7, 32, generator=g)
    )

    def run(pipe):
        latents = []

        def keep(_pipe, _step, _timestep, kwargs):
            latents.append(kwargs["latents"].clone())
            return kwargs

        pipe(
            **embeds,
            height=64,
            width=96,
            num_frames=9,
            num_inference_steps=4,
            guidance_scale=5.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(1),
            callback_on_step_end=keep,
        )
        return latents

    dense = run(make_pipeline(tiny.model))
    sparse = run(make_pipeline(compile_spattn(tiny.model, **SCHEDULE)))
    assert len(sparse) == 4
    for index in range(SCHEDULE["dense_steps"]):
        assert relative_error(sparse[index], dense[index]) < 1e-5
    assert relative_error(sparse[2], dense[2]) > 1e-4
    result = spattn_compile.report()
    assert {(r.step, r.branch) for r in result.records} == {(s, b) for s in range(4) for b in range(2)}
    assert (result.refreshes, result.cache_hits) == (2 * 2, 2 * 2)


def test_last_dense_step_seeds_the_exact_plan_for_the_first_sparse_steps(monkeypatch):
    """dense_steps=2, exact_plan_steps=2: step 1 (the last dense one) measures the true block mass; steps 2 and 3
    reuse that plan (its scores are the true mass: estimator "exact"), step 4 selects afresh."""
    tiny = zoo.cogvideox(num_layers=1)
    compiled = compile_spattn(tiny.model, sparsity=0.5, dense_steps=2, exact_plan_steps=2)
    counter = PlanCounter(monkeypatch)
    inputs = tiny.make_inputs(batch=2)
    with torch.no_grad():
        for t in (900, 800, 700, 600, 500):
            compiled(**{**inputs, "timestep": torch.full((2,), t)})
    result = spattn_compile.report()
    assert [(r.step, r.kind, r.cache) for r in result.records] == [
        (0, "dense_step", ""),
        (1, "dense_step", "exact"),
        (2, "sparse", "hit"),
        (3, "sparse", "hit"),
        (4, "sparse", "refresh"),
    ]
    assert [step for step, _ in counter.selected] == [4], "steps 2 and 3 select no plan"
    assert len({plan_id for _, _, plan_id in counter.reused}) == 1
    assert [r.estimator for r in result.records] == ["", "exact", "exact", "exact", "pooled"]
    # The exact plan's recall is measured: the true mass of every row in its kept blocks.
    assert 0 < result.records[2].recall <= 1 + 1e-6
