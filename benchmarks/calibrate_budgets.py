"""Why the estimator's missing mass is off, per head, and the fit of `policies.budgets.MissingMassCalibration`.

For every case of the hard and smooth suites (`benchmarks/fidelity.py`) and of generators outside both (`OUTSIDE`),
per seed, density and head, with the default estimator and the uniform budget, the missing mass (the share of the
video queries' attention outside the kept blocks and text, averaged over the video query blocks) at the plan's kept
blocks, measured four ways, all in float64:

- **estimated**: from the plan's block scores (`1 - SparsePlan.estimated_recall()`);
- **true**: from the exact block mass;
- **pooled queries**: tile-mean queries (the estimator's) against every exact key, a softmax per query tile;
- **pooled keys**: every exact query against the estimator's key summaries (tile means without the outlier, with
  `log n` multiplicities, and the outliers) and the exact text keys.

If the estimate's gap to the truth came from the keys' summaries, `pooled keys` would sit near the estimate; if it
came from the tile-mean queries, `pooled queries` would. Then it fits `log true = intercept + power * log estimated
+ top_share * T` (least squares; `T`: the head's mean largest share of a row's estimated video mass) on the smooth
suite and the hard cases of `FIT_HARD`, and prints the distribution of true over predicted missing mass on the fit
cases and on the held-out ones, for the uncalibrated estimate, the library's `MissingMassCalibration()` and the refit.

Run: `python benchmarks/calibrate_budgets.py --grid 8 24 40 --seeds 2` (about 25 s per case and seed on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
from fidelity import HARD, SMOOTH, Case, _dit, _reference_call

from spattn_compile.config import SparseAttentionConfig
from spattn_compile.estimators.pooled import tile_outliers_reference
from spattn_compile.layout import token_layout
from spattn_compile.policies.budgets import MissingMassCalibration, calibrated_missing, top_share
from spattn_compile.testing import PlanEvaluator

OUTSIDE = (
    Case("outside: temperature 1.5", _dit(temperatures=1.5)),
    Case("outside: temperature 3, no sinks", _dit(temperatures=3.0, num_sinks=0)),
    Case("outside: heterogeneity 0.5, temperatures 2.5-1", _dit(temperatures=(2.5, 2.0, 1.5, 1.0), heterogeneity=0.5)),
    Case("outside: content heads, temperatures 1-2", _dit(head_kinds="content", temperatures=(1.0, 2.0, 1.5, 1.25))),
)
FIT_HARD = ("moderate heads, 4 sinks", "2x sharper heads, 4 sinks", "256 text last, 128 padded")


def _block_mass(weights_logits, query_weight, query_block, key_column, num_blocks):
    """`(B, H, NB, NB + 1)`: per query block, the mean over its query rows (weighted by `query_weight (B, H, R)`, rows
    of block `query_block (R,)`) of each row's softmax over `weights_logits (B, H, R, M)` summed per key column
    `key_column (M,)` (video blocks, then NB for text)."""
    probabilities = torch.softmax(weights_logits, -1).nan_to_num(0.0)
    b, h, rows, _ = probabilities.shape
    per_column = torch.zeros(b, h, rows, num_blocks + 1, dtype=probabilities.dtype)
    per_column.index_add_(-1, key_column, probabilities)
    mass = torch.zeros(b, h, num_blocks, num_blocks + 1, dtype=probabilities.dtype)
    mass.index_add_(2, query_block, per_column * query_weight[..., None])
    total = torch.zeros(b, h, num_blocks, dtype=probabilities.dtype)
    total.index_add_(2, query_block, query_weight)
    return mass / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]


def _missing(mass: torch.Tensor, keep: torch.Tensor, nb: int) -> torch.Tensor:
    """`(H,)`: the mass outside the kept video blocks and text, averaged over the video query blocks (batch 0)."""
    return (1 - ((mass[..., :nb] * keep).sum(-1) + mass[..., nb])).mean(-1)[0]


def pooled_masses(call, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The block mass of (tile-mean queries, exact keys) and of (exact queries, the estimator's key summaries)."""
    prepared = call.prepared
    q, k, key_valid, scale = prepared.q.double(), prepared.k.double(), prepared.key_valid, prepared.scale
    nb, bs, tile = layout.num_video_blocks, layout.block_size, call.estimator.tile_size
    rows, b, h = nb * bs, q.shape[0], q.shape[1]
    tiles = rows // tile
    real = (layout.source_index[:rows] >= 0).double().expand(b, h, rows)
    exact_columns = (torch.arange(k.shape[-2]) // bs).clamp(max=nb)
    exact_bias = torch.zeros(b, h, k.shape[-2], dtype=torch.float64).masked_fill(~key_valid, -math.inf)
    q_video = q[..., :rows, :]
    q_tile = (q_video * real[..., None]).reshape(b, h, tiles, tile, -1).sum(-2)
    tile_count = real.reshape(b, h, tiles, tile).sum(-1)
    q_tile = q_tile / tile_count.clamp(min=1)[..., None]
    tile_block = torch.arange(tiles) // (bs // tile)
    pooled_queries = _block_mass(
        scale * q_tile @ k.transpose(-1, -2) + exact_bias[..., None, :], tile_count, tile_block, exact_columns, nb
    )
    rest, rest_count, outlier, outlier_count = tile_outliers_reference(k, key_valid, tiles, tile)
    text = k[..., layout.text_offset :, :]
    keys = torch.cat([rest, outlier, text], -2)
    bias = torch.cat([rest_count.log(), outlier_count.log(), exact_bias[..., layout.text_offset :]], -1)
    columns = torch.cat([tile_block, tile_block, torch.full((text.shape[-2],), nb)])
    pooled_keys = _block_mass(
        scale * q_video @ keys.transpose(-1, -2) + bias[..., None, :], real, torch.arange(rows) // bs, columns, nb
    )
    return pooled_queries, pooled_keys


def measure(case: Case, suite: str, grid, seed: int, densities, defaults: SparseAttentionConfig) -> list[dict]:
    inputs = case.make(grid, "cpu", seed)
    layout = token_layout(grid, inputs.text_len, inputs.text_first, defaults.block_size, defaults.reorder)
    true_mass = PlanEvaluator(inputs.query, inputs.key, inputs.value, layout, attn_mask=inputs.attn_mask).true_mass()
    nb = layout.num_video_blocks
    rows = []
    for density in densities:
        config = dataclasses.replace(defaults, sparsity=1 - density, mass_threshold=None)
        call = _reference_call(inputs, layout, config)
        plan = call.plan()
        keep = plan.to_dense()[..., :nb, :nb].double()
        pooled_queries, pooled_keys = pooled_masses(call, layout)
        measured = {
            "estimated": _missing(plan.block_scores.double(), keep, nb),
            "true": _missing(true_mass, keep, nb),
            "pooled_queries": _missing(pooled_queries, keep, nb),
            "pooled_keys": _missing(pooled_keys, keep, nb),
        }
        share = top_share(plan.block_scores)[0]
        for head in range(share.shape[0]):
            row = dict(suite=suite, case=case.name, seed=seed, density=density, head=head, top_share=float(share[head]))
            rows.append(row | {name: float(value[head]) for name, value in measured.items()})
    return rows


def fit(rows: list[dict]) -> MissingMassCalibration:
    """Least squares of `log true` on `[1, log estimated, top share]`; the library's clamps."""
    design = torch.tensor([[1.0, math.log(r["estimated"]), r["top_share"]] for r in rows], dtype=torch.float64)
    target = torch.tensor([math.log(r["true"]) for r in rows], dtype=torch.float64)
    intercept, power, slope = torch.linalg.lstsq(design, target[:, None]).solution[:, 0].tolist()
    return dataclasses.replace(MissingMassCalibration(), intercept=intercept, power=power, top_share=slope)


def predicted(rows: list[dict], calibration: MissingMassCalibration | None) -> list[float]:
    """True missing mass over the prediction of `calibration` (None: over the estimate)."""
    if calibration is None:
        return [r["true"] / r["estimated"] for r in rows]
    estimated = torch.tensor([r["estimated"] for r in rows], dtype=torch.float64)
    concentration = torch.tensor([r["top_share"] for r in rows], dtype=torch.float64)
    value = calibrated_missing(estimated, concentration, calibration)
    return [r["true"] / float(v) for r, v in zip(rows, value)]


def spread(ratios: list[float]) -> str:
    values = torch.tensor(ratios, dtype=torch.float64)
    points = torch.quantile(values, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)).tolist()
    return " | ".join(f"{p:.2f}" for p in points) + f" | {float(values.log().square().mean().sqrt()):.2f}"


def render(rows: list[dict], refit: MissingMassCalibration) -> str:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        held_in = r["suite"] == "smooth" or (r["suite"] == "hard" and r["case"] in FIT_HARD)
        groups.setdefault(f"{r['suite']} ({'fit' if held_in else 'held out'})", []).append(r)
    default = MissingMassCalibration()
    lines = [
        "## Where the estimate's missing mass goes wrong",
        "",
        "Per (case, seed, density, head), each measure's missing mass over the estimated one at the default plan's "
        "kept blocks: min / p10 / median / p90 / max / rms of the log.",
        "",
        "| group | n | true / estimated | pooled queries / estimated | pooled keys / estimated |",
        "|---|---|---|---|---|",
    ]
    for name, members in sorted(groups.items()):
        measures = ("true", "pooled_queries", "pooled_keys")
        cells = [spread([r[m] / r["estimated"] for r in members]).replace(" | ", " / ") for m in measures]
        lines.append(f"| {name} | {len(members)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Calibration: true missing mass over the predicted one",
        "",
        f"Library defaults: {default}. Refit here (fit groups only): intercept {refit.intercept:.3f}, power "
        f"{refit.power:.3f}, top_share {refit.top_share:.3f}.",
        "",
        "| group | n | uncalibrated: min / p10 / median / p90 / max / rms log | library calibration | refit |",
        "|---|---|---|---|---|",
    ]
    for name, members in sorted(groups.items()):
        cells = [spread(predicted(members, c)).replace(" | ", " / ") for c in (None, default, refit)]
        lines.append(f"| {name} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, nargs=3, default=[8, 24, 40])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.10])
    parser.add_argument("--suites", nargs="+", default=["smooth", "hard", "outside"])
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    defaults, grid = SparseAttentionConfig(), tuple(args.grid)
    started = time.perf_counter()
    rows: list[dict] = []
    for suite in args.suites:
        cases = {"smooth": SMOOTH, "hard": HARD, "outside": OUTSIDE}[suite]
        seeds = 1 if suite == "outside" else args.seeds
        for case in cases:
            for seed in range(seeds):
                rows += measure(case, suite, grid, seed, args.densities, defaults)
                print(f"[{time.perf_counter() - started:6.0f} s] {case.name}, seed {seed}", file=sys.stderr, flush=True)
    fit_rows = [r for r in rows if r["suite"] == "smooth" or (r["suite"] == "hard" and r["case"] in FIT_HARD)]
    refit = fit(fit_rows) if len(fit_rows) >= 3 else MissingMassCalibration()
    report = (
        f"# Missing-mass calibration\n\nMeasured {datetime.date.today().isoformat()} with `python "
        f"benchmarks/calibrate_budgets.py {' '.join(sys.argv[1:] if argv is None else argv)}` on the CPU, torch "
        f"{torch.__version__}, float64; grid {grid}, 4 heads, head dim 128, defaults {defaults.estimator}, "
        f"rectify {defaults.rectify!r}; wall time {time.perf_counter() - started:.0f} s.\n\n" + render(rows, refit)
    )
    if args.output is not None:
        args.output.write_text(report + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
