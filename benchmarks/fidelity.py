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
- `trained`: Q, K, V captured from the trained video DiT of `benchmarks/quality/` (`--input PATH`, written by
  `benchmarks/quality/run_all.py`; format in `benchmarks/quality/capture.py`): each captured (step, layer) call is a
  case; besides the tables above, how concentrated each head's true attention mass is (per head: the oracle's recall
  at 5 / 10 / 25% density, the normalised entropy of the block mass, the diagonal block's mass, the largest share one
  key block takes from all queries, and the mass-weighted distance to the key blocks in frames and in tokens).

`--budgets` (any suite but drift) compares the per-head budget policies (`head_budget`,
`spattn_compile.policies.budgets`) at the default estimator and rectification instead of the estimators: per case,
density and head, the error as a multiple of the oracle's for each budget policy (`uniform`, `water_fill`, `residual`,
`calibrated`, or those of `--budget-policies`; from the estimate, and from the true mass: what an exact step would
choose), each head's kept density, and the estimated recall (`SparsePlan.estimated_recall`) and the calibrated one
(`policies.budgets.calibrated_recall`) against the true recall, per head and as the distribution over the suite's
heads of the true missing mass over the estimated one.

Run: `python benchmarks/fidelity.py --suite hard --device cuda` (tables printed last, also written to `--output`;
`--json PATH` writes the rows too).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
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
from spattn_compile.policies.budgets import calibrated_recall
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
    # Stage 0 at the block size: the block statistics GAPR's gate (and the residual budget) reads.
    call.plan(estimator=PooledTiles(tile_size=call.layout.block_size, outliers=False))
    assert call.prepared is not None
    selection = dataclasses.replace(call.selection, density=density)
    return select_plan_reference(
        true_mass, call.prepared.stats, call.prepared.key_valid, call.layout, selection=selection,
        trust=call.rectification.trust, estimator=label, scale=call.scale,
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


BUDGETS = ("uniform", "water_fill", "residual", "calibrated")


def _budget_plans(inputs, layout, evaluator, densities, defaults: SparseAttentionConfig, budgets=BUDGETS):
    """name -> (plan, rectify, density, estimator name) for the budget study: the uniform oracle without rectification
    (the reference of every ratio) and, per budget policy of `budgets`, the default estimator's plan and the true
    mass's."""
    plans = {}
    mass = evaluator.true_mass()
    for density in densities:
        config = dataclasses.replace(defaults, sparsity=1 - density, rectify="none", mass_threshold=None)
        plans[f"oracle|none|{density}"] = (
            _oracle(_reference_call(inputs, layout, config), mass, density, "oracle"), "none", density, "oracle"
        )  # fmt: skip
        for budget in budgets:
            config = dataclasses.replace(defaults, sparsity=1 - density, head_budget=budget, mass_threshold=None)
            call = _reference_call(inputs, layout, config)
            plans[f"{budget}|{defaults.rectify}|{density}"] = (call.plan(), defaults.rectify, density, "")
            exact = _oracle(call, mass, density, "exact")
            plans[f"{budget} from true mass|{defaults.rectify}|{density}"] = (exact, defaults.rectify, density, "")
    return plans


def run_case(
    case: Case, grid, device, seed, densities, defaults, inspect=None, budgets=False, policies=BUDGETS
) -> list[dict]:
    """The case's rows; `inspect(case, layout, evaluator)`, when given, runs on the case's evaluator afterwards.
    `budgets`: the budget study's variants (`_budget_plans`, of the budget `policies`) instead of the estimators'."""
    inputs = case.make(grid, device, seed)
    layout = token_layout(grid, inputs.text_len, inputs.text_first, defaults.block_size, defaults.reorder)
    evaluator = PlanEvaluator(inputs.query, inputs.key, inputs.value, layout, attn_mask=inputs.attn_mask)
    if budgets:
        plans = _budget_plans(inputs, layout, evaluator, densities, defaults, policies)
    else:
        plans = _plans(inputs, layout, evaluator, densities, ("none", "block", "query"), defaults)
    results = evaluator.evaluate({name: (plan, rectify) for name, (plan, rectify, _, _) in plans.items()})
    if inspect is not None:
        inspect(case, layout, evaluator)
    mass = evaluator.true_mass()
    rows = []
    for name, result in results.items():
        label, rectify, density = name.split("|")
        estimator = ESTIMATORS.get(label)
        plan = plans[name][0]
        oracle = results[f"oracle|none|{density}"]
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
                estimated_recall=float(plan.estimated_recall().mean()),
                head_x_oracle=[e / o for e, o in zip(result.head_error, oracle.head_error)],
                head_density=plan.density().mean(0).tolist(),
                head_recall=plan.estimated_recall().mean(0).tolist(),
                # The recall `MissingMassCalibration` predicts from the same estimate (policies.budgets).
                head_calibrated_recall=calibrated_recall(plan).mean(0).tolist(),
                # The same measure on the true block mass: each head's true recall.
                head_true_recall=dataclasses.replace(plan, block_scores=mass).estimated_recall().mean(0).tolist(),
            )
        )
    return rows


def render_budgets(rows: list[dict]) -> str:
    """The budget study's tables: per case and density, each variant's error as a multiple of the oracle's, its
    true and estimated recall, and per head the multiple and the kept density."""
    lines = [
        "## Per-head budgets: error as a multiple of the oracle's (uniform oracle, no rectification), per head",
        "",
        "`x oracle`: the call's error over the oracle's; `heads`: each head's error over the oracle's head error "
        "(kept density in brackets); `recall`: true share of the mass in the kept blocks; `est`: the plan's "
        "`estimated_recall` (from the scores it was selected on); `from true mass`: the budget and blocks chosen on "
        "the exact block mass (what an exact step does).",
        "",
        "| case | density | variant | x oracle | heads: x oracle (density) | recall | est |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["variant"] == "oracle":
            continue
        heads = ", ".join(f"{x:.2f} ({d:.2f})" for x, d in zip(r["head_x_oracle"], r["head_density"]))
        lines.append(
            f"| {r['case']} | {r['density']:.0%} | {r['variant']} | {r['error'] / r['oracle_error']:.2f} | {heads} | "
            f"{r['recall']:.4f} | {r['estimated_recall']:.4f} |"
        )
    estimated = [r for r in rows if r["variant"] == "uniform"]
    if estimated:
        gaps = [r["estimated_recall"] - r["recall"] for r in estimated]
        lines += [
            "",
            f"Estimated minus true recall of the default plan (uniform budget) over {len(gaps)} (case, density): "
            f"mean {sum(gaps) / len(gaps):+.4f}, min {min(gaps):+.4f}, max {max(gaps):+.4f}.",
            "",
            "Per head (default plan, uniform budget): estimated recall minus true recall, and the true missing mass "
            "over the estimated one (`1 - recall`), before and after the calibration (`calibrated_recall`).",
            "",
            "| case | density | est - true, per head | true / estimated missing mass | true / calibrated |",
            "|---|---|---|---|---|",
        ]
        before, after = [], []
        for r in estimated:
            pairs = list(zip(r["head_recall"], r["head_true_recall"]))
            gap = ", ".join(f"{e - t:+.4f}" for e, t in pairs)
            ratios = [(1 - t) / max(1 - e, 1e-12) for e, t in pairs]
            calibrated = [
                (1 - t) / max(1 - c, 1e-12) for c, t in zip(r["head_calibrated_recall"], r["head_true_recall"])
            ]
            before += ratios
            after += calibrated
            lines.append(
                f"| {r['case']} | {r['density']:.0%} | {gap} | {', '.join(f'{x:.2f}' for x in ratios)} | "
                f"{', '.join(f'{x:.2f}' for x in calibrated)} |"
            )
        lines += [
            "",
            f"True over estimated missing mass over the {len(before)} (case, density, head): "
            f"{_spread(before)}; calibrated: {_spread(after)}.",
        ]
    return "\n".join(lines)


def _spread(ratios: list[float]) -> str:
    """min, 10th percentile, median, 90th percentile and max of `ratios`, and the rms of their logarithm."""
    values = torch.tensor(ratios, dtype=torch.float64).clamp(min=1e-12)
    points = torch.quantile(values, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)).tolist()
    rms = float(values.log().square().mean().sqrt())
    return "min {:.2f}, p10 {:.2f}, median {:.2f}, p90 {:.2f}, max {:.2f}".format(*points) + f" (rms log {rms:.2f})"


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


def _quality():
    """`benchmarks/quality/` on the import path: the trained suite's file format and block geometry live there."""
    folder = str(Path(__file__).resolve().parent / "quality")
    if folder not in sys.path:
        sys.path.insert(0, folder)


def trained_cases(path: Path) -> tuple[tuple[int, int, int], tuple[Case, ...]]:
    """The captured calls of `path` as cases (float64 on the requested device), and their grid."""
    _quality()
    from capture import load_capture

    payload = load_capture(path)
    grid = tuple(payload["video_grid"])
    text_len, text_first = payload["text_len"], payload["text_first"]

    def maker(call: dict) -> Callable[..., VideoAttentionInputs]:
        def make(_grid, device, _seed):
            q, k, v = (call[name].to(device, torch.float64) for name in ("query", "key", "value"))
            return VideoAttentionInputs(q, k, v, None, grid, text_len, text_first)

        return make

    cases = tuple(Case(f"step {call['step']} layer {call['layer']}", maker(call)) for call in payload["calls"])
    return grid, cases


HEAD_DENSITIES = (0.05, 0.10, 0.25)


def head_statistics(case: Case, layout, evaluator: PlanEvaluator) -> list[dict]:
    """How concentrated each head's true block mass is, averaged over the video query blocks (module docstring)."""
    _quality()
    from baselines import block_geometry

    mass = evaluator.true_mass()  # (B, H, NB, NB + 1)
    nb = layout.num_video_blocks
    video, text = mass[..., :nb], mass[..., nb]
    occupied = (layout.row_count[:nb] > 0).to(mass.device)
    ranked = video.sort(dim=-1, descending=True).values.cumsum(-1)
    centres, _ = block_geometry(layout.video_grid, layout.block_size, layout.reorder)
    centres = centres.to(mass.device, mass.dtype)
    offset = centres[:, None, :] - centres[None, :, :]
    frames, space = offset[..., 0].abs(), offset[..., 1:].norm(dim=-1)
    share = video / video.sum(-1, keepdim=True).clamp(min=torch.finfo(mass.dtype).tiny)
    entropy = -(share * share.clamp(min=1e-300).log()).sum(-1) / math.log(nb)

    def per_head(values: torch.Tensor) -> torch.Tensor:  # (B, H, NB) -> (H,)
        return values[..., occupied].mean(dim=(0, -1))

    columns = dict(
        **{f"top {d:.0%}": per_head(ranked[..., math.ceil(d * nb - 1e-9) - 1] + text) for d in HEAD_DENSITIES},
        entropy=per_head(entropy),
        diagonal=per_head(video.diagonal(dim1=-2, dim2=-1)),
        largest_key_block=video[..., occupied, :].mean(-2).amax(-1).mean(0),
        frames=per_head((video * frames).sum(-1)),
        tokens=per_head((video * space).sum(-1)),
    )
    heads = mass.shape[1]
    return [dict(case=case.name, head=h, **{k: float(v[h]) for k, v in columns.items()}) for h in range(heads)]


def render_heads(heads: list[dict]) -> str:
    lines = [
        "## Per-head concentration of the true attention mass",
        "",
        "Per head, averaged over video query blocks: `top d`: the share of a query block's mass in its best "
        "`ceil(d * NB)` key blocks (the oracle's recall at density d); `entropy`: of the block mass, over `log NB`; "
        "`diagonal`: the mass on the query's own block; `largest key block`: the largest share one key block takes "
        "of all queries' mass (a sink); `frames` / `tokens`: the mass-weighted distance of the key blocks' centres "
        "in frames and in spatial tokens.",
        "",
        "| call | head | " + " | ".join(f"top {d:.0%}" for d in HEAD_DENSITIES)
        + " | entropy | diagonal | largest key block | frames | tokens |",
        "|---|---|" + "---|" * (len(HEAD_DENSITIES) + 5),
    ]
    for row in heads:
        lines.append(
            f"| {row['case']} | {row['head']} | "
            + " | ".join(f"{row[f'top {d:.0%}']:.3f}" for d in HEAD_DENSITIES)
            + f" | {row['entropy']:.3f} | {row['diagonal']:.3f} | {row['largest_key_block']:.3f} | "
            f"{row['frames']:.2f} | {row['tokens']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=["hard", "smooth", "drift", "trained"], default="hard")
    parser.add_argument("--input", type=Path, default=None, help="trained suite: the captured-attention file")
    parser.add_argument("--block-size", type=int, default=None, help="default: the library's")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting new cases after this")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows (and head statistics) as JSON")
    parser.add_argument("--grid", type=int, nargs=3, default=ATTENTION_CASES["wan1.3b-480p"].grid)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.10])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--cases", type=int, nargs="*", default=None, help="indices of the suite's cases to run")
    parser.add_argument("--steps", type=int, default=6, help="drift suite: steps after step 0")
    parser.add_argument("--drifts", type=float, nargs="+", default=[0.03, 0.1])
    parser.add_argument("--budgets", action="store_true", help="compare the per-head budget policies (docstring)")
    parser.add_argument("--budget-policies", nargs="+", default=list(BUDGETS), choices=BUDGETS,
                        help="with --budgets: which policies (default: all)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    grid = tuple(args.grid)
    defaults = SparseAttentionConfig()
    if args.block_size is not None:
        defaults = dataclasses.replace(defaults, block_size=args.block_size)
    started = time.perf_counter()
    trained: tuple[Case, ...] = ()
    if args.suite == "trained":
        if args.input is None:
            parser.error("--suite trained needs --input PATH (a file written by benchmarks/quality/run_all.py)")
        grid, trained = trained_cases(args.input)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (
        f"# Fidelity, suite `{args.suite}`\n\nMeasured {datetime.date.today().isoformat()} with `python "
        f"benchmarks/fidelity.py {' '.join(sys.argv[1:] if argv is None else argv)}` on {name}, torch "
        f"{torch.__version__}, float64; grid {grid}, "
        + ("the captured heads" if trained else "4 heads, head dim 128")
        + f", block {defaults.block_size}; defaults: estimator {defaults.estimator}, rectify {defaults.rectify!r}."
    )
    rows: list[dict] = []
    heads: list[dict] = []
    if args.suite == "drift":
        report = header + "\n\n" + run_drift(grid, device, defaults, args.steps, args.drifts, args.densities)
    else:
        suite = {"hard": HARD, "smooth": SMOOTH, "trained": trained}[args.suite]
        cases = suite if args.cases is None else tuple(suite[i] for i in args.cases)
        seeds = 1 if args.suite == "trained" else args.seeds
        inspect = (lambda *a: heads.extend(head_statistics(*a))) if args.suite == "trained" else None
        report = header + "\n\nNo case ran."
        for number, case in enumerate(cases):
            if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
                report += f"\n\nTime guard (--max-minutes {args.max_minutes}): {len(cases) - number} of {len(cases)} "
                report += "cases not run."
                break
            for seed in range(seeds):
                rows += run_case(
                    case, grid, device, seed, args.densities, defaults, inspect, args.budgets, args.budget_policies
                )
                print(f"[{time.perf_counter() - started:6.0f} s] {case.name}, seed {seed}", file=sys.stderr, flush=True)
                report = header + f"\n\nWall time {time.perf_counter() - started:.0f} s.\n\n"
                report += render_budgets(rows) if args.budgets else render(rows, args.densities, defaults)
                if heads:
                    report += "\n\n" + render_heads(heads)
                if args.output is not None:
                    args.output.write_text(report + "\n")
    if args.output is not None:
        args.output.write_text(report + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(dict(suite=args.suite, rows=rows, heads=heads), indent=1) + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
