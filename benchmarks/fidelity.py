"""Fidelity of block selection against the oracle at equal density: every estimator, rectification and threshold.

Owns the study on which the selection defaults are chosen (docs/DESIGN.md, "Choosing the defaults"). For each case
of a suite it builds one attention call, computes dense attention and the true block mass in float64 (one pass, with
`spattn_compile.testing.PlanEvaluator`), and for each variant selects a plan with the plain-PyTorch reference (float64)
and measures

- **error**: `||out - dense|| / ||dense||` over the whole output; **x oracle**: that error over the oracle's (the true
  top blocks per query block at the same budget, no rectification);
- **recall**: the share of the video queries' true attention mass inside their kept blocks (text always kept);
- **density**: kept video key blocks / video blocks; **cost**: the estimator's dense-`QK^T` share (probes per block
  over the block size; the pooled estimator ~`2 / tile^2`).

Suites:
- `hard` (`dit_attention_inputs`: token-scale heterogeneity, head kinds, temperatures, sinks, padded text): where
  decisions are made. Default grid: Wan 2.1 1.3B's 21x30x52 (use a GPU: `--device cuda`); `--grid 8 24 40` on a CPU.
- `smooth` (`video_attention_inputs`, block-smooth content): the regression set of the first version.
- `drift`: consecutive denoising steps (`dit_attention_inputs(step=s, drift=...)`): does a plan from the true mass of
  step 0 (what the last dense step measures) stay better than a fresh estimate, and for how many steps?

Run: `python benchmarks/fidelity.py --suite hard --device cuda` (tables printed last, also written to `--output`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from spattn_compile.attention import SparseAttention
from spattn_compile.call_layout import CallLayout
from spattn_compile.config import SparseAttentionConfig
from spattn_compile.estimators import EstimatorConfig, PooledTiles, QueryTiles, SampledRows
from spattn_compile.implementations import ReferenceImplementation
from spattn_compile.layout import TokenLayout, token_layout
from spattn_compile.plan import SparsePlan
from spattn_compile.policies import Trust
from spattn_compile.policies.topk import select_plan_reference
from spattn_compile.testing import PlanEvaluator, VideoAttentionInputs, dit_attention_inputs, video_attention_inputs
from spattn_compile.testing.benchmark import ATTENTION_CASES


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make: Callable[..., VideoAttentionInputs]  # (grid, device, seed) -> inputs


def _dit(**kwargs) -> Callable[..., VideoAttentionInputs]:
    def make(grid, device, seed):
        return dit_attention_inputs(
            grid, heads=4, head_dim=128, dtype=torch.float64, device=device, seed=seed, **kwargs
        )

    return make


def _smooth(**kwargs) -> Callable[..., VideoAttentionInputs]:
    def make(grid, device, seed):
        return video_attention_inputs(
            grid, heads=4, head_dim=128, dtype=torch.float64, device=device, seed=seed, **kwargs
        )

    return make


HARD = (
    Case("moderate heads, 4 sinks", _dit()),
    Case("moderate heads, no sinks", _dit(num_sinks=0)),
    Case("2x sharper heads, 4 sinks", _dit(temperatures=2.0)),
    Case("2x sharper local heads", _dit(head_kinds=("spatial", "temporal"), temperatures=2.0)),
    Case("temperatures 1-2.5, heterogeneity 2", _dit(temperatures=(1.0, 1.5, 2.0, 2.5), heterogeneity=2.0)),
    Case("256 text last, 128 padded", _dit(text_len=256, text_padding=128, temperatures=(1.0, 1.5, 2.0, 1.0))),
    Case("226 text first", _dit(text_len=226, text_first=True)),
)
SMOOTH = (
    Case("smooth, 2 sinks", _smooth(num_sinks=2)),
    Case("smooth, no sinks", _smooth(num_sinks=0)),
    Case("smooth, 64 text last (16 padded)", _smooth(text_len=64, text_padding=16)),
)
ESTIMATORS: dict[str, EstimatorConfig] = {
    "pooled 32 (v1)": PooledTiles(tile_size=32, outliers=False),
    "pooled 32 + outliers": PooledTiles(tile_size=32, outliers=True),
    "pooled 16 + outliers": PooledTiles(tile_size=16, outliers=True),
    "query tiles 32": QueryTiles(tile_size=32),
    "query tiles 16": QueryTiles(tile_size=16),
    "sampled rows 4": SampledRows(rows=4),
    "sampled rows 8": SampledRows(rows=8),
    "sampled rows 16": SampledRows(rows=16),
}


def _cost(estimator: EstimatorConfig, block_size: int) -> float:
    probes = estimator.query_probes_per_block(block_size)
    if probes:
        return probes / block_size
    tile = estimator.pool_tile_size(block_size)
    return (2 if getattr(estimator, "outliers", False) else 1) / tile**2


def _reference_call(inputs, layout: TokenLayout, config: SparseAttentionConfig) -> SparseAttention:
    """One call of `inputs` over `layout` with the float64 reference implementation."""
    call_layout = CallLayout(layout.video_grid, layout.num_text, layout.text_first)
    return SparseAttention(
        inputs.query, inputs.key, inputs.value, call_layout, attn_mask=inputs.attn_mask, scale=None, config=config,
        implementation=ReferenceImplementation(torch.float64),
    )  # fmt: skip


def _oracle(call: SparseAttention, true_mass: torch.Tensor, density: float, label: str) -> SparsePlan:
    """The plan of the true block mass at `density` (the call's selection and rectification settings otherwise)."""
    # Stage 0 at the block size: the block statistics GAPR's gate reads.
    call.plan(estimator=PooledTiles(tile_size=call.layout.block_size, outliers=False))
    assert call.prepared is not None
    selection = dataclasses.replace(call.selection, density=density)
    return select_plan_reference(
        true_mass, call.prepared.stats, call.prepared.key_valid, call.layout, selection=selection,
        trust=call.rectification.trust, estimator=label,
    )  # fmt: skip


def _plans(inputs, layout, evaluator, densities, rectify_modes, defaults: SparseAttentionConfig):
    """name -> (plan, rectify, density, estimator name)."""
    plans = {}
    mass = evaluator.true_mass()
    for density in densities:
        for rectify in rectify_modes:
            config = dataclasses.replace(defaults, sparsity=1 - density, rectify=rectify, mass_threshold=None)
            call = _reference_call(inputs, layout, config)
            plans[f"oracle|{rectify}|{density}"] = (_oracle(call, mass, density, "oracle"), rectify, density, "oracle")
            for label, estimator in ESTIMATORS.items():
                plans[f"{label}|{rectify}|{density}"] = (call.plan(estimator=estimator), rectify, density, label)
        threshold = dataclasses.replace(defaults, sparsity=1 - density, mass_threshold=0.95, max_density=0.5)
        plan = _reference_call(inputs, layout, threshold).plan()
        plans[f"default + mass_threshold 0.95|{defaults.rectify}|{density}"] = (plan, defaults.rectify, density, "")
    return plans


def run_case(case: Case, grid, device, seed, densities, defaults) -> list[dict]:
    inputs = case.make(grid, device, seed)
    layout = token_layout(grid, inputs.text_len, inputs.text_first, defaults.block_size, defaults.reorder)
    evaluator = PlanEvaluator(inputs.query, inputs.key, inputs.value, layout, attn_mask=inputs.attn_mask)
    plans = _plans(inputs, layout, evaluator, densities, ("none", "block", "query"), defaults)
    results = evaluator.evaluate({name: (plan, rectify) for name, (plan, rectify, _, _) in plans.items()})
    rows = []
    for name, result in results.items():
        label, rectify, density = name.split("|")
        estimator = ESTIMATORS.get(label)
        rows.append(
            dict(
                case=case.name,
                variant=label,
                rectify=rectify,
                density=float(density),
                error=result.error,
                oracle_error=results[f"oracle|none|{density}"].error,
                recall=result.recall,
                kept=result.density,
                cost=_cost(estimator, layout.block_size) if estimator is not None else math.nan,
            )
        )
    return rows


def render(rows: list[dict], densities, defaults: SparseAttentionConfig) -> str:
    lines = []
    cases = list(dict.fromkeys(r["case"] for r in rows))
    variants = list(dict.fromkeys((r["variant"], r["rectify"]) for r in rows))
    lines += ["## Error as a multiple of the oracle's (oracle: true top blocks, no rectification)", ""]
    header = "| variant | rectify | cost | " + " | ".join(f"{c} {d:.0%}" for c in cases for d in densities) + " |"
    lines += [header, "|" + "---|" * (3 + len(cases) * len(densities))]
    for variant, rectify in variants:
        cells = []
        for case in cases:
            for density in densities:
                match = [r for r in rows if (r["case"], r["variant"], r["rectify"], r["density"]) ==
                         (case, variant, rectify, density)]  # fmt: skip
                cells.append(f"{match[0]['error'] / match[0]['oracle_error']:.2f}" if match else "")
        cost = [r["cost"] for r in rows if r["variant"] == variant]
        cost_cell = f"{cost[0]:.2%}" if cost and not math.isnan(cost[0]) else ""
        lines.append(f"| {variant} | {rectify} | {cost_cell} | " + " | ".join(cells) + " |")
    lines += ["", "## Error, recall and kept density", ""]
    lines += ["| case | density | variant | rectify | error | x oracle | recall | kept |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['density']:.0%} | {r['variant']} | {r['rectify']} | {r['error']:.4f} | "
            f"{r['error'] / r['oracle_error']:.2f} | {r['recall']:.4f} | {r['kept']:.3f} |"
        )
    return "\n".join(lines)


def run_drift(grid, device, defaults: SparseAttentionConfig, steps: int, drifts, densities) -> str:
    """Plans from the true mass of step 0 (a dense step's exact mass) and from step 0's estimate, reused at later
    steps, against a fresh estimate at each step; errors as multiples of that step's oracle."""
    lines = [
        "## Drift: reusing a plan across denoising steps",
        "",
        "Error at step s as a multiple of step s's oracle (no rectification in the oracle), default estimator and "
        f"rectify={defaults.rectify!r}. `exact@0`: the plan of step 0's true block mass (what the last dense step "
        "measures); `estimate@0`: step 0's estimated plan; `fresh`: a new estimate at step s.",
        "",
        "| drift / step | density | " + " | ".join(f"s={s}" for s in range(steps + 1)) + " |",
        "|---|---|" + "---|" * (steps + 1),
    ]
    for drift in drifts:
        per_step = []
        for s in range(steps + 1):
            inputs = dit_attention_inputs(
                grid, heads=4, head_dim=128, temperatures=(1.0, 1.5, 2.0, 1.0), step=s, drift=drift,
                dtype=torch.float64, device=device,
            )  # fmt: skip
            layout = token_layout(grid, 0, False, defaults.block_size, defaults.reorder)
            per_step.append((inputs, layout, PlanEvaluator(inputs.query, inputs.key, inputs.value, layout)))
        for density in densities:
            config = dataclasses.replace(defaults, sparsity=1 - density)
            base_inputs, layout, base_evaluator = per_step[0]
            base = _reference_call(base_inputs, layout, config)
            estimate0 = base.plan()
            exact0 = select_plan_reference(
                base_evaluator.true_mass(), base.prepared.stats, base.prepared.key_valid, layout,
                selection=dataclasses.replace(base.selection, density=density), trust=base.rectification.trust,
                estimator="exact",
            )  # fmt: skip
            series: dict[str, list[str]] = {"exact@0": [], "estimate@0": [], "fresh": []}
            for inputs, _, evaluator in per_step:
                step_call = _reference_call(inputs, layout, config)
                fresh = step_call.plan()
                oracle = select_plan_reference(
                    evaluator.true_mass(), step_call.prepared.stats, step_call.prepared.key_valid, layout,
                    selection=dataclasses.replace(step_call.selection, density=density),
                    trust=Trust(compensate=False, gapr=False), estimator="oracle",
                )  # fmt: skip
                # The reused plans' block scores are step 0's; block mode reads them, as the cache does.
                plans: dict[str, tuple[SparsePlan, str]] = {
                    "oracle": (oracle, "none"),
                    "exact@0": (exact0, config.rectify),
                    "estimate@0": (estimate0, config.rectify),
                    "fresh": (fresh, config.rectify),
                }
                results = evaluator.evaluate(plans)
                for name in series:
                    series[name].append(f"{results[name].error / results['oracle'].error:.2f}")
            for name, cells in series.items():
                lines.append(f"| {drift} {name} | {density:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=["hard", "smooth", "drift"], default="hard")
    parser.add_argument("--grid", type=int, nargs=3, default=ATTENTION_CASES["wan1.3b-480p"].grid)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.10])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--cases", type=int, nargs="*", default=None, help="indices of the suite's cases to run")
    parser.add_argument("--steps", type=int, default=6, help="drift suite: steps after step 0")
    parser.add_argument("--drifts", type=float, nargs="+", default=[0.03, 0.1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    grid = tuple(args.grid)
    defaults = SparseAttentionConfig()
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (
        f"# Fidelity, suite `{args.suite}`\n\nMeasured {datetime.date.today().isoformat()} with `python "
        f"benchmarks/fidelity.py {' '.join(sys.argv[1:] if argv is None else argv)}` on {name}, torch "
        f"{torch.__version__}, float64; grid {grid}, 4 heads, head dim 128, block {defaults.block_size}; defaults: "
        f"estimator {defaults.estimator}, rectify {defaults.rectify!r}."
    )
    if args.suite == "drift":
        report = header + "\n\n" + run_drift(grid, device, defaults, args.steps, args.drifts, args.densities)
    else:
        suite = HARD if args.suite == "hard" else SMOOTH
        cases = suite if args.cases is None else tuple(suite[i] for i in args.cases)
        rows: list[dict] = []
        for case in cases:
            for seed in range(args.seeds):
                rows += run_case(case, grid, device, seed, args.densities, defaults)
                print(f"[{time.perf_counter() - started:6.0f} s] {case.name}, seed {seed}", file=sys.stderr, flush=True)
                report = header + f"\n\nWall time {time.perf_counter() - started:.0f} s.\n\n"
                report += render(rows, args.densities, defaults)
                if args.output is not None:
                    args.output.write_text(report + "\n")
    if args.output is not None:
        args.output.write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
