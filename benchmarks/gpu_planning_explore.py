"""Planning on the GPU: the planning kernels without copies, checked against the float64 reference, then every
planning stage old against new beside its floor, at Wan 2.1 14B 720p and HunyuanVideo 720p.

"Old" is what `select_plan` runs today (`reorder_pool` writing canonical Q, K, V; `tile_outliers`; the two-pass
`pooled_scores`; `gapr_gate`; the sorting `select_plan`). "New" is the path the wiring will switch to:
`prepare_statistics` (one read of Q, K, V in the caller's order, statistics and the key tiles' outliers only),
`pooled_scores_one_pass` (each tile logit computed and exponentiated once; variants: float16-pair exponentials,
float8 products) and `select_plan_threshold` (bisection instead of a sort; GAPR's gate as a separate kernel or fused).

1. Correctness (bfloat16 on the GPU, 21x30x52 latent grid, D = 64 and 128, with and without text + padding mask,
   Q/K/V as transposed views of (B, S, H, D) buffers): statistics, validity and outliers against the reference; the
   scores against the float64 reference estimator; every plan equal to `reference.select_plan_reference` on the same
   scores (trusted lists up to GAPR near-ties of float32 against float64 statistics), the new selection bitwise equal
   to the old; per-head budgets; the probe estimators reading the keys through the layout. A failed check is printed
   and makes the script exit with status 1 after the timings.
2. Ceilings measured here: copy bandwidth (bytes read + written per second), bf16 matmul rate, `exp2` rates (float32
   and float16 pairs) of a Triton kernel; each stage's floor is its bytes or its FLOPs / exponentials over them.
3. Timing (`triton.testing.do_bench`, median) of each stage old and new, the planning total, and the peak extra memory
   of planning (`torch.cuda.max_memory_allocated` over what was allocated before) against the bytes of Q, K and V.

Run from the repository root on a CUDA machine: `python benchmarks/gpu_planning_explore.py` (about 3 minutes on an
H200 including compiles and autotuning; optional variants are skipped past `--budget-s`). The short table is printed
last; with `OUT` set, the full report goes to `$OUT/planning_explore.md`. `--smoke` runs every step at a toy size on
the CPU under the Triton interpreter (the tests do), with the GPU-only variants skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

if "--smoke" in sys.argv:
    # Before triton is imported anywhere: the kernels then run on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spattn_compile import reference  # noqa: E402
from spattn_compile.config import SparseAttentionConfig  # noqa: E402
from spattn_compile.estimators import PooledTiles, QueryTiles, SampledRows, estimator_for  # noqa: E402
from spattn_compile.kernels.pooled_scores import _exp2  # noqa: E402
from spattn_compile.layout import token_layout  # noqa: E402
from spattn_compile.pipeline import ReferenceStages  # noqa: E402
from spattn_compile.testing import dit_attention_inputs  # noqa: E402

TIMING_CASES = {
    "wan14b": dict(grid=(21, 45, 80), heads=40, head_dim=128, text_len=0, text_padding=0),
    "hunyuan": dict(grid=(33, 45, 80), heads=24, head_dim=128, text_len=256, text_padding=128),
}
# The first case also checks the options (float16-pair exponentials, float8 products) and the probe estimators.
CORRECTNESS_CASES = (
    dict(grid=(21, 30, 52), heads=2, head_dim=128, text_len=256, text_padding=100),
    dict(grid=(21, 30, 52), heads=4, head_dim=64, text_len=0, text_padding=0),
)
SMOKE_TIMING = {"toy": dict(grid=(2, 5, 7), heads=2, head_dim=32, text_len=13, text_padding=5)}
SMOKE_CORRECTNESS = (dict(grid=(2, 3, 5), heads=2, head_dim=16, text_len=21, text_padding=6),)
# Explicit launch configurations in the correctness checks (each compiles once; the timings autotune): prepare's
# (rows per chunk, warps) and the one-pass kernel's (BLOCK_M, BLOCK_N, warps, stages).
PREPARE_CONFIG = (32, 4)
ONE_PASS_CONFIG = (128, 32, 8, 3)
ESTIMATOR = PooledTiles(tile_size=16, outliers=True)  # the default


@dataclasses.dataclass
class Run:
    """Everything one run collects: its settings, the checks, the table rows and the report's sections."""

    smoke: bool
    device: torch.device
    dtype: torch.dtype
    block_size: int
    deadline: float
    checks: list[tuple[str, bool, str]] = dataclasses.field(default_factory=list)
    rows: list[str] = dataclasses.field(default_factory=list)
    report: list[str] = dataclasses.field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append((name, bool(ok), detail))
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)

    def time_left(self) -> bool:
        return time.time() < self.deadline

    def say(self, line: str) -> None:
        self.report.append(line)
        print(line, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


def _sbhd(tensor: torch.Tensor) -> torch.Tensor:
    """The same values as a transposed view of a (B, S, H, D) buffer, as a DiT's projections give them."""
    return tensor.transpose(1, 2).contiguous().transpose(1, 2)


def realistic_inputs(case: dict, run: Run, seed: int = 0):
    generated = dit_attention_inputs(
        case["grid"], heads=case["heads"], head_dim=case["head_dim"], text_len=case["text_len"],
        text_padding=case["text_padding"], dtype=run.dtype, device=run.device, seed=seed,
    )  # fmt: skip
    q, k, v = (_sbhd(t) for t in (generated.query, generated.key, generated.value))
    return q, k, v, generated.attn_mask


def random_inputs(case: dict, run: Run):
    """Timing inputs: random (B, S, H, D) buffers (the kernels' cost does not depend on the values), a padding mask
    over the last `text_padding` text tokens."""
    seq_len = math.prod(case["grid"]) + case["text_len"]
    shape = (1, seq_len, case["heads"], case["head_dim"])
    generator = torch.Generator(device=run.device).manual_seed(0)
    q, k, v = (
        (torch.randn(shape, generator=generator, device=run.device) + offset).to(run.dtype).transpose(1, 2)
        for offset in (0.3, -0.2, 0.5)
    )
    mask = None
    if case["text_padding"]:
        mask = torch.ones(1, 1, 1, seq_len, dtype=torch.bool, device=run.device)
        mask[..., seq_len - case["text_padding"] :] = False
    return q, k, v, mask


def _key_valid(mask, query):
    batch, heads, seq_len, _ = query.shape
    return reference.key_padding_valid(mask, batch, heads, seq_len)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return float((got.double() - want).norm() / want.norm().clamp(min=1e-300))


# --------------------------------------------------------------------------------------------------------------------
# 1. Correctness
# --------------------------------------------------------------------------------------------------------------------

STAT_FIELDS = ("q_block", "q_block_mad", "k_block", "k_block_mad", "v_block", "k_block_count", "q_tile_count",
               "k_tile_count")  # fmt: skip


def _gapr_near_ties(stats) -> torch.Tensor:
    q, dq, k, dk = (getattr(stats, n).double() for n in ("q_block", "q_block_mad", "k_block", "k_block_mad"))
    gain = (q @ k.transpose(-1, -2)).abs()
    error = (dq @ k.transpose(-1, -2)).abs() + (q @ dk.transpose(-1, -2)).abs()
    return (gain - error).abs() <= 1e-4 * (gain + error)


def _plans_agree(run: Run, name: str, plan, expected, reference_stats, *, exact_trusted: bool = False) -> None:
    """kv lists equal; trusted lists equal, or different only where GAPR's test is a near-tie."""
    same_kv = torch.equal(plan.kv_counts, expected.kv_counts) and torch.equal(plan.kv_indices, expected.kv_indices)
    nb = expected.num_video_blocks
    differs = plan.trusted_mask() != expected.trusted_mask()
    if exact_trusted:
        explained = not differs.any()
    else:
        explained = not (differs[..., :nb, :] & ~_gapr_near_ties(reference_stats)).any()
    run.check(f"{name}: kept blocks equal, trusted blocks equal up to GAPR near-ties", same_kv and explained,
              f"(kv equal {same_kv}, trusted differences {int(differs.sum())})")  # fmt: skip


def check_case(run: Run, case: dict, *, options: bool) -> None:
    from spattn_compile.estimators.pooled import tile_outliers_reference
    from spattn_compile.kernels.pooled_scores import pooled_scores_one_pass
    from spattn_compile.kernels.reorder_pool import prepare_statistics
    from spattn_compile.kernels.select import gapr_gate, select_plan, select_plan_threshold

    label = f"{'x'.join(map(str, case['grid']))} H{case['heads']} D{case['head_dim']} text {case['text_len']}"
    q, k, v, mask = realistic_inputs(case, run)
    layout = token_layout(case["grid"], case["text_len"], False, run.block_size)
    valid = _key_valid(mask, q)
    scale = case["head_dim"] ** -0.5
    tile = ESTIMATOR.tile_size
    expected = ReferenceStages(torch.float64).prepare(q, k, v, layout, valid, tile, scale)
    launch = {} if run.smoke else {"config": PREPARE_CONFIG}
    prepared = prepare_statistics(q, k, v, layout, tile_size=tile, key_valid=valid, outliers=True, **launch)

    # Validity and block statistics: exact or float32 rounding; tile means rounded to the inputs' dtype.
    exact = all(
        torch.equal(getattr(prepared, n), getattr(expected, n)) for n in ("key_valid", "key_usable", "block_non_finite")
    ) and torch.equal(prepared.key_block_count.double(), expected.key_block_count)
    run.check(f"{label}: prepare validity, counts, non-finite flags exact", exact)
    worst = max(_relative(getattr(prepared.stats, n), getattr(expected.stats, n)) for n in STAT_FIELDS)
    run.check(f"{label}: prepare block statistics", worst < 2e-6, f"(max rel. error {worst:.2e})")
    tile_bound = 8e-3 if run.dtype == torch.bfloat16 else 1e-3
    worst_tile = max(_relative(getattr(prepared.stats, n), getattr(expected.stats, n)) for n in ("q_tile", "k_tile"))
    run.check(f"{label}: prepare tile means ({prepared.stats.q_tile.dtype})", worst_tile < tile_bound,
              f"(max rel. error {worst_tile:.2e})")  # fmt: skip
    num_tiles = prepared.stats.q_tile.shape[2]
    rest, rest_count, outlier, outlier_count = tile_outliers_reference(expected.k, expected.key_usable, num_tiles, tile)
    found = prepared.outliers
    assert found is not None
    counts_equal = torch.equal(found.outlier_count.double(), outlier_count)
    same_outlier = (found.outlier.double() - outlier).abs().amax(-1) <= 1e-2 * outlier.abs().amax(-1).clamp(min=1e-6)
    # A tile whose two farthest keys are equally far up to rounding may pick either: allow 0.1% of the tiles.
    run.check(f"{label}: outliers (counts exact, same key in >= 99.9% of tiles)",
              counts_equal and float(same_outlier.double().mean()) >= 0.999,
              f"(same key in {100 * float(same_outlier.double().mean()):.3f}%)")  # fmt: skip
    agreeing = same_outlier[..., None]
    rest_error = _relative(torch.where(agreeing, found.rest_mean.double(), rest), rest)
    run.check(f"{label}: outliers' rest means", rest_error < tile_bound, f"(rel. error {rest_error:.2e})")
    del rest_count

    # Scores: the one-pass kernel against the float64 reference estimator.
    reference_scores = estimator_for(ESTIMATOR).reference(expected.estimator_inputs(), ESTIMATOR)
    source_inputs = prepared.estimator_inputs(q, k, scale)
    launch = {} if run.smoke else {"config": ONE_PASS_CONFIG}
    one_pass = pooled_scores_one_pass(source_inputs, outliers=True, **launch)
    score_bound = 3e-3 if run.dtype == torch.bfloat16 else 1e-3
    error_new = _relative(one_pass, reference_scores)
    run.check(f"{label}: one-pass scores vs float64", error_new < score_bound and torch.isfinite(one_pass).all(),
              f"(rel. error {error_new:.2e})")  # fmt: skip
    variants = {"one pass": one_pass}
    if options and not run.smoke:
        for name, variant in (("fast exp2", dict(fast_exp=True)), ("float8 products", dict(operands="float8"))):
            try:
                scores = pooled_scores_one_pass(source_inputs, outliers=True, **launch, **variant)
            except Exception as error:  # noqa: BLE001  (an option that does not compile here is a failed check)
                run.check(f"{label}: one-pass scores, {name}", False, f"(raised {type(error).__name__}: {error})")
                continue
            error = _relative(scores, reference_scores)
            variants[name] = scores
            # Options, not defaults: bounds that only catch a broken kernel; the error itself is the measurement.
            run.check(f"{label}: one-pass scores, {name}", error < 0.25 and torch.isfinite(scores).all(),
                      f"(rel. error {error:.2e})")  # fmt: skip

    # Selection: the new kernel equals the reference on the same scores and the old kernel bitwise.
    configs = [SparseAttentionConfig(sparsity=0.9, block_size=run.block_size)]
    if options:
        configs += [
            SparseAttentionConfig(sparsity=0.75, block_size=run.block_size, neighbors=True, rectify="block"),
            SparseAttentionConfig(sparsity=0.9, block_size=run.block_size, mass_threshold=0.9, max_density=0.3),
        ]
    for config in configs:
        tag = f"sparsity {config.sparsity}, neighbours {config.neighbors}, mass {config.mass_threshold}"
        gate = gapr_gate(prepared.stats, prepared.key_block_count, layout)
        common = dict(config=config, estimator="pooled", forced_blocks=prepared.block_non_finite)
        old = select_plan(one_pass, prepared.key_block_count, layout, density=config.density, gate=gate, **common)
        new = select_plan_threshold(one_pass, prepared.key_block_count, layout, density=config.density, gate=gate,
                                    **common)  # fmt: skip
        fused = select_plan_threshold(one_pass, prepared.key_block_count, layout, density=config.density,
                                      stats=prepared.stats, **common)  # fmt: skip
        want = reference.select_plan_reference(
            one_pass.double(), expected.stats, expected.key_valid, layout, density=config.density, config=config,
            estimator="pooled", forced_blocks=expected.block_non_finite,
        )  # fmt: skip
        if config.mass_threshold is None:
            _plans_agree(run, f"{label}: threshold selection vs reference ({tag})", new, want, expected.stats)
            _plans_agree(run, f"{label}: threshold selection vs sort selection ({tag})", new, old, expected.stats,
                         exact_trusted=True)  # fmt: skip
            _plans_agree(run, f"{label}: fused-gate selection vs sort selection ({tag})", fused, old, expected.stats)
        else:
            # Sums in another order (float32 trees, a float32 scan, float64): a row may differ where its cumulative
            # mass ties the threshold to rounding.
            for name, plan, other in (("reference", new, want), ("sort selection", new, old), ("fused", fused, old)):
                rows_differ = float((plan.kv_counts != other.kv_counts).double().mean())
                run.check(f"{label}: threshold selection vs {name} ({tag}), rows with another count <= 0.5%",
                          rows_differ <= 0.005, f"({100 * rows_differ:.3f}%)")  # fmt: skip

    # Per-head budgets: each head as the reference selects it at that head's budget.
    batch, heads = q.shape[:2]
    nb = layout.num_video_blocks
    if options:
        _check_per_head_budgets(run, label, one_pass, prepared, expected, layout)

    # Probe estimators reading the keys through the layout.
    for estimator in (SampledRows(rows=8), QueryTiles(tile_size=16)) if options else ():
        probe_tile = estimator.pool_tile_size(run.block_size)
        if probe_tile == tile:
            found, want_prepared = prepared, expected
        else:
            launch = {} if run.smoke else {"config": PREPARE_CONFIG}
            found = prepare_statistics(q, k, v, layout, tile_size=probe_tile, key_valid=valid, **launch)
            want_prepared = ReferenceStages(torch.float64).prepare(q, k, v, layout, valid, probe_tile, scale)
        got = _probe_kernel_scores(found.estimator_inputs(q, k, scale), estimator, run)
        want = estimator_for(estimator).reference(want_prepared.estimator_inputs(), estimator)
        error = _relative(got, want)
        run.check(f"{label}: {estimator.name} through the layout", error < score_bound, f"(rel. error {error:.2e})")
    for name, scores in variants.items():
        config = SparseAttentionConfig(sparsity=0.9, block_size=run.block_size)
        plan = select_plan_threshold(scores, prepared.key_block_count, layout, density=config.density, config=config,
                                     estimator="pooled", stats=prepared.stats)  # fmt: skip
        want = reference.select_plan_reference(
            reference_scores, expected.stats, expected.key_valid, layout, density=config.density, config=config,
            estimator="pooled",
        )  # fmt: skip
        keep, keep_want = plan.to_dense()[..., :nb, :nb], want.to_dense()[..., :nb, :nb]
        mass = (reference_scores[..., :nb] * keep).sum(-1).mean()
        mass_want = (reference_scores[..., :nb] * keep_want).sum(-1).mean()
        overlap = float((keep & keep_want).sum() / keep_want.sum())
        run.say(f"| {label} | {name} | {_relative(scores, reference_scores):.2e} | {overlap:.4f} | "
                f"{float(mass):.5f} / {float(mass_want):.5f} |")  # fmt: skip


def _check_per_head_budgets(run: Run, label: str, one_pass, prepared, expected, layout) -> None:
    from spattn_compile.kernels.select import select_plan_threshold

    batch, heads = one_pass.shape[:2]
    nb = layout.num_video_blocks
    generator = torch.Generator().manual_seed(5)
    budgets = torch.randint(1, nb + 1, (batch, heads), generator=generator, dtype=torch.int32)
    config = SparseAttentionConfig(block_size=run.block_size)
    per_head = select_plan_threshold(
        one_pass, prepared.key_block_count, layout, budget=budgets.to(run.device), config=config, estimator="pooled",
        stats=prepared.stats, forced_blocks=prepared.block_non_finite,
    )  # fmt: skip
    agree = True
    for h in range(heads):
        want = reference.select_plan_reference(
            one_pass[:, h : h + 1].double(), _head(expected.stats, h), expected.key_valid[:, h : h + 1], layout,
            density=int(budgets[0, h]) / nb, config=config, estimator="pooled",
            forced_blocks=expected.block_non_finite[:, h : h + 1],
        )  # fmt: skip
        agree &= torch.equal(per_head.kv_indices[:, h : h + 1], want.kv_indices)
    run.check(f"{label}: per-head budgets equal the reference head by head", agree)


def _probe_kernel_scores(inputs, estimator, run: Run) -> torch.Tensor:
    """The probe estimator's kernel through the layout, at one launch configuration (no autotuning: compile time)."""
    from spattn_compile.estimators.probes import _probe_rows, sampled_row_probes
    from spattn_compile.kernels.probe_scores import probe_scores

    launch = {} if run.smoke else {"config": (64, 64, 4, 3)}
    if isinstance(estimator, SampledRows):
        positions, weights = sampled_row_probes(inputs.layout, estimator.rows, inputs.q.device)
        probes = _probe_rows(inputs, positions)
    else:
        probes, weights = inputs.stats.q_tile, inputs.stats.q_tile_count
    return probe_scores(probes, weights, inputs.k, inputs.key_valid, inputs.layout, inputs.scale,
                        source_index=inputs.source_index, **launch)  # fmt: skip


def _head(stats, h: int):
    fields = [f.name for f in dataclasses.fields(stats) if f.name != "tile_size"]
    return dataclasses.replace(stats, **{name: getattr(stats, name)[:, h : h + 1] for name in fields})


# --------------------------------------------------------------------------------------------------------------------
# 2. Ceilings
# --------------------------------------------------------------------------------------------------------------------


def bench(fn: Callable[[], object], run: Run) -> float:
    """Median milliseconds of `fn` (CUDA events); one timed call on the CPU (a smoke run checks the plumbing only)."""
    if run.device.type != "cuda":
        started = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - started)
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def peak_extra(fn: Callable[[], object], run: Run) -> float:
    """Bytes allocated at the peak of `fn` above what was allocated before it (NaN on the CPU)."""
    if run.device.type != "cuda":
        return math.nan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    del out
    return float(extra)


@dataclasses.dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float
    matmul_flop_per_s: float
    exp2_per_s: float
    exp2_pairs_per_s: float


def measure_ceilings(run: Run) -> Ceilings:
    if run.device.type != "cuda":
        return Ceilings(1e12, 1e14, 1e12, 2e12)
    copy_ms = _copy_ms(run)
    matmul_ms = _matmul_ms(run)
    exp_rate, pair_rate = _exp2_rates(run)
    return Ceilings(2 * (1 << 30) / (copy_ms * 1e-3), 2 * 8192**3 / (matmul_ms * 1e-3), exp_rate, pair_rate)


def _copy_ms(run: Run) -> float:
    source = torch.empty(1 << 28, dtype=torch.float32, device=run.device)  # 1 GiB
    target = torch.empty_like(source)
    return bench(lambda: target.copy_(source), run)


def _matmul_ms(run: Run) -> float:
    a = torch.randn(8192, 8192, device=run.device, dtype=torch.bfloat16)
    return bench(lambda: a @ a, run)


@triton.jit
def _exp2_loop(Out, ITERATIONS: tl.constexpr, FAST_EXP: tl.constexpr, BLOCK: tl.constexpr):
    # Independent lanes, each a chain of exponentials (the FMA between them is not the bottleneck).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = -(offs % 7).to(tl.float32) * 0.125
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(ITERATIONS):
        y = _exp2(x, FAST_EXP)
        total += y
        x = x - y * 0.001
    tl.store(Out + offs, total)


def _exp2_rates(run: Run) -> tuple[float, float]:
    """exp2 results per second of a Triton kernel that does little else (float32, and float16 pairs)."""
    programs, block, iterations = 132 * 64, 1024, 256
    out = torch.empty(programs * block, device=run.device)
    rates = []
    for fast in (False, True):
        ms = bench(lambda f=fast: _exp2_loop[(programs,)](out, ITERATIONS=iterations, FAST_EXP=f, BLOCK=block), run)
        rates.append(programs * block * iterations / (ms * 1e-3))
    return rates[0], rates[1]


# --------------------------------------------------------------------------------------------------------------------
# 3. Timing
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TimingCase:
    """One timing case's inputs and the arguments every stage shares."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor | None
    layout: object
    scale: float
    config: SparseAttentionConfig

    @property
    def tile(self) -> int:
        return ESTIMATOR.tile_size


def time_old(run: Run, case: TimingCase) -> dict[str, float]:
    """Milliseconds of the stages `select_plan` runs today, and the whole of it (with its peak extra memory)."""
    from spattn_compile.kernels.pooled_scores import pooled_scores, tile_outliers
    from spattn_compile.kernels.reorder_pool import reorder_pool
    from spattn_compile.kernels.select import gapr_gate, select_plan
    from spattn_compile.kernels.stages import TritonStages

    q, k, v, valid, layout, tile = case.q, case.k, case.v, case.valid, case.layout, case.tile
    times = {"prepare": bench(lambda: reorder_pool(q, k, v, layout, tile_size=tile, key_valid=valid), run)}
    stages = TritonStages()
    prepared = stages.prepare(q, k, v, layout, valid, tile, case.scale)
    inputs = prepared.estimator_inputs()
    num_tiles = prepared.stats.q_tile.shape[2]
    times["outliers"] = bench(lambda: tile_outliers(prepared.k, prepared.key_usable, num_tiles, tile), run)
    times["scores"] = bench(lambda: pooled_scores(inputs, outliers=True), run)
    scores = pooled_scores(inputs, outliers=True)
    times["gate"] = bench(lambda: gapr_gate(prepared.stats, prepared.key_block_count, layout), run)
    gate = gapr_gate(prepared.stats, prepared.key_block_count, layout)
    times["select"] = bench(
        lambda: select_plan(
            scores, prepared.key_block_count, layout, density=case.config.density, config=case.config,
            estimator="pooled", gate=gate, forced_blocks=prepared.block_non_finite,
        ),
        run,
    )  # fmt: skip
    return times


def time_old_total(run: Run, case: TimingCase) -> tuple[float, float]:
    from spattn_compile.kernels.stages import TritonStages
    from spattn_compile.pipeline import plan_attention

    stages = TritonStages()

    def planning():
        return plan_attention(case.q, case.k, case.v, layout=case.layout, key_valid=case.valid, scale=case.scale,
                              config=case.config, stages=stages)[0]  # fmt: skip

    return bench(planning, run), peak_extra(planning, run)


def time_new(run: Run, case: TimingCase) -> tuple[dict[str, float], list[tuple[str, float]], dict[str, str]]:
    """Milliseconds of the new stages, the variants', and the configurations the autotuners chose."""
    from spattn_compile.kernels import pooled_scores as pooled_module
    from spattn_compile.kernels import reorder_pool as prepare_module
    from spattn_compile.kernels.pooled_scores import pooled_scores_one_pass
    from spattn_compile.kernels.reorder_pool import prepare_statistics
    from spattn_compile.kernels.select import gapr_gate, select_plan_threshold

    q, k, v, valid, layout, tile = case.q, case.k, case.v, case.valid, case.layout, case.tile
    times = {
        "prepare": bench(lambda: prepare_statistics(q, k, v, layout, tile_size=tile, key_valid=valid, outliers=True),
                         run),
    }  # fmt: skip
    prepared = prepare_statistics(q, k, v, layout, tile_size=tile, key_valid=valid, outliers=True)
    inputs = prepared.estimator_inputs(q, k, case.scale)
    times["scores"] = bench(lambda: pooled_scores_one_pass(inputs, outliers=True), run)
    chosen = {
        "prepare": str(getattr(prepare_module._autotuned_prepare, "best_config", None)),
        "scores": str(getattr(pooled_module._autotuned_one_pass, "best_config", None)),
    }
    scores = pooled_scores_one_pass(inputs, outliers=True)
    variants: list[tuple[str, float]] = []
    options = [
        ("one pass, float8 products", dict(operands="float8")),
        ("one pass, config (128, 32, 8, 3), 1 program per SM", dict(config=(128, 32, 8, 3), programs_per_sm=1)),
    ]
    for label, option in [] if run.smoke else options:
        _variant(run, variants, label, lambda o=option: pooled_scores_one_pass(inputs, outliers=True, **o))
    common = dict(density=case.config.density, config=case.config, estimator="pooled",
                  forced_blocks=prepared.block_non_finite)  # fmt: skip
    gate = gapr_gate(prepared.stats, prepared.key_block_count, layout)
    times["select_with_gate_tensor"] = bench(
        lambda: select_plan_threshold(scores, prepared.key_block_count, layout, gate=gate, **common), run
    )
    times["select_fused"] = bench(
        lambda: select_plan_threshold(scores, prepared.key_block_count, layout, stats=prepared.stats, **common), run
    )
    for rows in [] if run.smoke else [32]:
        _variant(run, variants, f"fused-gate selection, {rows} rows per program", lambda r=rows: select_plan_threshold(
            scores, prepared.key_block_count, layout, stats=prepared.stats, rows_per_program=r, **common))
    for rows in [] if run.smoke else [16]:
        _variant(run, variants, f"selection with a gate tensor, {rows} rows per program", lambda r=rows:
                 select_plan_threshold(scores, prepared.key_block_count, layout, gate=gate, rows_per_program=r,
                                       **common))  # fmt: skip
    return times, variants, chosen


def _variant(run: Run, variants: list[tuple[str, float]], label: str, fn: Callable[[], object]) -> None:
    """Time an optional variant; a variant past the time budget is skipped, one that fails is reported, not fatal
    (these are the options whose compilation on the device's Triton is not proven by the interpreter)."""
    if not run.time_left():
        run.say(f"(skipped {label}: past the time budget)")
        return
    try:
        variants.append((label, bench(fn, run)))
    except Exception as error:  # noqa: BLE001  (report and go on: the timings of the rest still count)
        run.say(f"(variant {label} failed: {type(error).__name__}: {str(error)[:300]})")


def time_new_total(run: Run, case: TimingCase) -> tuple[float, float]:
    from spattn_compile.kernels.pooled_scores import pooled_scores_one_pass
    from spattn_compile.kernels.reorder_pool import prepare_statistics
    from spattn_compile.kernels.select import select_plan_threshold

    def planning():
        found = prepare_statistics(case.q, case.k, case.v, case.layout, tile_size=case.tile, key_valid=case.valid,
                                   outliers=True)  # fmt: skip
        estimate = pooled_scores_one_pass(found.estimator_inputs(case.q, case.k, case.scale), outliers=True)
        return select_plan_threshold(estimate, found.key_block_count, case.layout, stats=found.stats,
                                     density=case.config.density, config=case.config, estimator="pooled",
                                     forced_blocks=found.block_non_finite)  # fmt: skip

    return bench(planning, run), peak_extra(planning, run)


def time_case(run: Run, name: str, spec: dict, ceilings: Ceilings) -> None:
    q, k, v, mask = random_inputs(spec, run)
    batch, heads, seq_len, head_dim = q.shape
    layout = token_layout(spec["grid"], spec["text_len"], False, run.block_size)
    case = TimingCase(q, k, v, _key_valid(mask, q), layout, head_dim**-0.5,
                      SparseAttentionConfig(sparsity=0.9, block_size=run.block_size))  # fmt: skip
    tile = case.tile
    qkv_bytes = 3 * q.numel() * q.element_size()
    nb, nt = layout.num_video_blocks, layout.num_video_blocks * layout.block_size // tile
    pairs = batch * heads
    text_keys = layout.num_text_blocks * layout.block_size
    run.say(f"\n## {name}: grid {spec['grid']} + {spec['text_len']} text ({spec['text_padding']} padded), S={seq_len}, "
            f"H={heads}, D={head_dim}, {str(q.dtype)[6:]}, (B, S, H, D) buffers; Q+K+V {qkv_bytes / 2**30:.2f} GiB; "
            f"{nb} video blocks, {nt} tiles of {tile}\n")  # fmt: skip

    if run.time_left():
        old = time_old(run, case)
    else:  # the totals below still compare the two paths
        run.say("(the old path's per-stage timings skipped: past the time budget)")
        old = dict.fromkeys(("prepare", "outliers", "scores", "gate", "select"), math.nan)
    _empty_cache(run)
    old_total_ms, old_peak = time_old_total(run, case)
    _empty_cache(run)
    try:
        new, variants, chosen = time_new(run, case)
        _empty_cache(run)
        new_total_ms, new_peak = time_new_total(run, case)
    except Exception:  # noqa: BLE001  (the old path's timings are still worth printing)
        run.check(f"{name}: the new path runs", False, "(raised:)\n" + traceback.format_exc())
        nan = math.nan
        new = dict.fromkeys(("prepare", "scores", "select_fused", "select_with_gate_tensor"), nan)
        variants, chosen, new_total_ms, new_peak = [], {"prepare": "?", "scores": "?"}, nan, nan
    _empty_cache(run)

    # Floors: bytes over the measured copy rate (which counts bytes read and written), FLOPs over the matmul rate,
    # exponentials over the exp2 rate.
    masked_rows = spec["text_padding"] / seq_len  # masked keys' K and V rows are not read
    read_once = qkv_bytes * (1 - masked_rows * 2 / 3)
    prepare_floor = 1e3 * read_once / ceilings.copy_bytes_per_s
    old_prepare_floor = 1e3 * 2 * qkv_bytes / ceilings.copy_bytes_per_s
    logits = pairs * nt * (2 * nt + text_keys)
    product_floor = 1e3 * 2 * head_dim * logits / ceilings.matmul_flop_per_s
    exp_floor = 1e3 * logits / ceilings.exp2_per_s
    scores_floor = max(product_floor, exp_floor)
    select_bytes = 4 * pairs * (nb * (nb + 1) + layout.num_blocks * (layout.num_blocks + nb))
    select_floor = 1e3 * select_bytes / ceilings.copy_bytes_per_s
    outliers_floor = 1e3 * pairs * nt * tile * head_dim * q.element_size() / ceilings.copy_bytes_per_s
    rows = [
        ("prepare (old: reorder + pool; new: statistics only)", old["prepare"], new["prepare"], prepare_floor,
         f"old floor {old_prepare_floor:.2f} ms (copies written); new config {chosen['prepare']}"),
        ("key tile outliers", old["outliers"], 0.0, outliers_floor, "new: in prepare's pass"),
        ("pooled scores (old: incl. outliers)", old["scores"], new["scores"], scores_floor,
         f"{logits / 1e9:.2f} G logits: products {product_floor:.2f} ms, exp2 {exp_floor:.2f} ms; new config "
         f"{chosen['scores']}"),
        ("GAPR gate", old["gate"], 0.0, 0.0, "new: in the selection"),
        ("selection (new: threshold search, fused gate)", old["select"], new["select_fused"], select_floor,
         f"threshold search with a gate tensor {new['select_with_gate_tensor']:.3f} ms (+ the gate)"),
        ("planning, end to end", old_total_ms, new_total_ms, prepare_floor + scores_floor + select_floor,
         f"peak extra memory {old_peak / qkv_bytes:.1%} -> {new_peak / qkv_bytes:.1%} of Q+K+V"),
    ]  # fmt: skip
    run.say("| stage | old ms | new ms | floor ms | new / floor | note |")
    run.say("|---|---|---|---|---|---|")
    for stage, old_ms, new_ms, floor_ms, note in rows:
        ratio = f"{new_ms / floor_ms:.1f}x" if floor_ms > 0 and new_ms > 0 else ""
        new_text = "failed" if math.isnan(new_ms) else f"{new_ms:.3f}" if new_ms > 0 else "(fused)"
        run.say(f"| {stage} | {old_ms:.3f} | {new_text} | {floor_ms:.3f} | {ratio} | {note} |")
    run.say("")
    run.say(f"peak extra memory of planning: old {old_peak / 2**20:.0f} MiB ({old_peak / qkv_bytes:.1%} of Q+K+V), "
            f"new {new_peak / 2**20:.0f} MiB ({new_peak / qkv_bytes:.1%})")  # fmt: skip
    for label, ms in variants:
        run.say(f"- variant: {label}: {ms:.3f} ms")
    run.rows.append(f"| {name} | {old_total_ms:.2f} | {new_total_ms:.2f} | {new['prepare']:.2f} | "
                    f"{new['scores']:.2f} | {new['select_fused']:.3f} | {old_peak / qkv_bytes:.1%} -> "
                    f"{new_peak / qkv_bytes:.1%} |")  # fmt: skip


def _empty_cache(run: Run) -> None:
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (Triton interpreter)")
    parser.add_argument("--cases", nargs="+", default=list(TIMING_CASES), choices=list(TIMING_CASES))
    parser.add_argument("--budget-s", type=float, default=170.0, help="skip optional variants past this many seconds")
    args = parser.parse_args(argv)
    started = time.time()
    if args.smoke:
        run = Run(True, torch.device("cpu"), torch.float16, 16, started + args.budget_s)
        timing, correctness = SMOKE_TIMING, SMOKE_CORRECTNESS
    else:
        if not torch.cuda.is_available():
            print("gpu_planning_explore needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 1
        run = Run(False, torch.device("cuda"), torch.bfloat16, 128, started + args.budget_s)
        timing = {name: TIMING_CASES[name] for name in args.cases}
        correctness = CORRECTNESS_CASES
    device_name = torch.cuda.get_device_name() if run.device.type == "cuda" else "CPU (Triton interpreter)"
    run.say(f"# Planning kernels: {device_name}, torch {torch.__version__}, triton {triton.__version__}, "
            f"{time.strftime('%Y-%m-%d')}\n")  # fmt: skip
    run.say("## Correctness\n")
    run.say("| case | scores | rel. error vs float64 | overlap of kept blocks with the reference's at 10% | "
            "reference mass kept / reference plan's |")  # fmt: skip
    run.say("|---|---|---|---|---|")
    for index, case in enumerate(correctness):
        try:
            check_case(run, case, options=index == 0)
        except Exception:  # noqa: BLE001  (a crash is a failed check; the timings still run)
            run.check(f"correctness case {case}", False, "(raised:)\n" + traceback.format_exc())
        _empty_cache(run)
    run.say(f"\n(correctness: {time.time() - started:.0f} s)")

    ceilings = measure_ceilings(run)
    run.say(f"\n## Ceilings measured: copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s (read + write), bf16 matmul "
            f"{ceilings.matmul_flop_per_s / 1e12:.0f} TFLOP/s, exp2 {ceilings.exp2_per_s / 1e12:.2f} T/s (float32), "
            f"{ceilings.exp2_pairs_per_s / 1e12:.2f} T/s (float16 pairs)")  # fmt: skip
    for name, case in timing.items():
        time_case(run, name, case, ceilings)
        _empty_cache(run)

    failed = [(name, detail) for name, ok, detail in run.checks if not ok]
    table = [
        "",
        f"# Summary ({time.time() - started:.0f} s; {len(run.checks) - len(failed)}/{len(run.checks)} checks passed)",
        "| case | planning old ms | planning new ms | prepare ms | scores ms | select (fused gate) ms | peak memory "
        "of Q+K+V, old -> new |",
        "|---|---|---|---|---|---|---|",
        *run.rows,
    ]
    if failed:
        table += ["", "CORRECTNESS FAILED:"] + [f"- {name} {detail}" for name, detail in failed]
    run.report += table
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "planning_explore.md").write_text("\n".join(run.report) + "\n")
    print("\n".join(table), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
