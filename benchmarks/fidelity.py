"""Fidelity of the sparse attention variants at equal density: relative error vs float64 dense attention, and recall.

Owns the ablation of ALGORITHMS.md's "What to measure": on video-like inputs (`spattn_compile.testing`), for each
case (grid, text, padding), seed and density, it runs every variant through the plain-PyTorch reference and reports

- relative error `||out - dense|| / ||dense||` over the whole output (float64 dense attention as ground truth);
- recall: the share of the true full-attention mass of the video queries that falls in their kept blocks (text keys
  always kept), from `reference.attention_block_mass` in the variant's own layout;
- for the rectified variants, why they help or not: the share of skipped blocks GAPR trusts, and the true and
  estimated (`P_hat`) attention mass of the trusted blocks (is block mode's `R = 1 - sum P_hat` calibrated?).

Variants (all at the same kept-block budget per query block):

| name | what changes |
|---|---|
| raster top-k | reorder none, tile = block, rectify none: plain single-level block top-k |
| + hilbert | reorder hilbert |
| + hierarchical | tile < block |
| + block rect | rectify block (GAPR-gated R and c) |
| + query rect | rectify query (trusted blocks as virtual pooled keys) |
| block rect, no GAPR | block mode compensating every skipped block |
| block rect, true R, c | block mode, R and c from the true block mass instead of `P_hat` (a diagnostic) |
| oracle | the true top blocks by full-attention mass (`build_plan(..., scores=true mass)`), no compensation |
| oracle + query rect | oracle selection, query rectification of its GAPR-trusted skipped blocks |

"block rect, true R, c" separates the error of the estimate `P_hat` from the error of applying one scalar R and
one vector c to all the queries of a block.

Run: `python benchmarks/fidelity.py` (3 seeds x 2 heads of the default ~7k-token cases: 811 s on a busy 2-core CPU);
`--cases quick` for a smoke run of seconds; `--cases real --device cuda` for Wan 1.3B's, CogVideoX's and a
HunyuanVideo-like real grid on a GPU, still in float64 (about 100 s on an H100 for 6 seeds x 4 heads). It prints a
markdown report and writes it to `--output` (default `benchmarks/fidelity_results.md`, replacing that file: keep
hand-written analysis elsewhere), after every case, so that a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from spattn_compile.config import SparseAttentionConfig
from spattn_compile.layout import token_layout
from spattn_compile.reference import (
    attention_block_mass,
    build_plan,
    canonical_key_valid,
    dense_attention,
    gather_canonical,
    key_padding_valid,
    pool_statistics,
    rectified_sparse_attention,
    scatter_canonical,
)
from spattn_compile.testing import VideoAttentionInputs, video_attention_inputs


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    video_grid: tuple[int, int, int]
    block_size: int
    tile_size: int
    text_len: int = 0
    text_first: bool = False
    text_padding: int = 0
    num_sinks: int = 2


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    reorder: str
    hierarchical: bool
    rectify: str
    gapr: bool = True
    oracle: bool = False
    true_weights: bool = False  # block mode's R and c from the true block mass instead of P_hat (a diagnostic)


VARIANTS = (
    Variant("raster top-k", "none", False, "none"),
    Variant("+ hilbert", "hilbert", False, "none"),
    Variant("+ hierarchical", "hilbert", True, "none"),
    Variant("+ block rect", "hilbert", True, "block"),
    Variant("+ query rect", "hilbert", True, "query"),
    Variant("block rect, no GAPR", "hilbert", True, "block", gapr=False),
    Variant("block rect, true R, c", "hilbert", True, "block", true_weights=True),
    Variant("oracle", "hilbert", True, "none", oracle=True),
    Variant("oracle + query rect", "hilbert", True, "query", oracle=True),
)

CASES = (
    Case("8x24x32, block 128, tile 32", (8, 24, 32), 128, 32),
    Case("8x24x32, block 128, tile 32, no sinks", (8, 24, 32), 128, 32, num_sinks=0),
    Case("6x30x40, block 64, tile 16", (6, 30, 40), 64, 16),
    Case("6x30x40 + 64 text last (16 padded), block 128, tile 32", (6, 30, 40), 128, 32, 64, False, 16),
    Case("8x24x32 + 48 text first, block 64, tile 16", (8, 24, 32), 64, 16, 48, True, 0),
)

REAL_CASES = (
    Case("Wan 1.3B 21x30x52, block 128, tile 32", (21, 30, 52), 128, 32),
    Case("Wan 1.3B 21x30x52, block 128, tile 32, no sinks", (21, 30, 52), 128, 32, num_sinks=0),
    Case("CogVideoX 11x24x40 + 226 text first, block 128, tile 32", (11, 24, 40), 128, 32, 226, True, 0),
    Case(
        "HunyuanVideo-like 9x30x52 + 256 text last (128 padded), block 128, tile 32",
        (9, 30, 52),
        128,
        32,
        256,
        False,
        128,
    ),
)

QUICK_CASES = (
    Case("4x12x16, block 64, tile 16", (4, 12, 16), 64, 16),
    Case("4x12x16 + 24 text last (8 padded), block 64, tile 16", (4, 12, 16), 64, 16, 24, False, 8),
)


CASE_SETS = {"default": CASES, "real": REAL_CASES, "quick": QUICK_CASES}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@dataclasses.dataclass
class Measurement:
    error: float
    recall: float
    density: float
    trusted_share: float = math.nan  # of the skipped non-empty video blocks
    trusted_mass_true: float = math.nan  # true mass in the trusted blocks, per query block
    trusted_mass_estimated: float = math.nan  # the same by P_hat (1 - R in block mode)
    skipped_mass_true: float = math.nan


def run_variant(
    inputs: VideoAttentionInputs,
    case: Case,
    variant: Variant,
    density: float,
    dense: torch.Tensor,
    true_mass: dict[str, torch.Tensor],
) -> Measurement:
    """One variant on one input: the whole reference pipeline (stages 0-3), with the oracle's scores if asked."""
    config = SparseAttentionConfig(
        sparsity=1.0 - density,
        block_size=case.block_size,
        tile_size=case.tile_size if variant.hierarchical else case.block_size,
        reorder=variant.reorder,
        rectify=variant.rectify,
        gapr=variant.gapr,
        min_seq_len=0,
    )
    query, key, value = inputs.query, inputs.key, inputs.value
    b, h, s, d = query.shape
    scale = 1.0 / math.sqrt(d)
    layout = token_layout(case.video_grid, case.text_len, case.text_first, case.block_size, variant.reorder)
    valid_c = canonical_key_valid(key_padding_valid(inputs.attn_mask, b, h, s), layout, b, h, query.device)
    q_c, k_c, v_c = (gather_canonical(t, layout) for t in (query, key, value))
    stats = pool_statistics(q_c, k_c, v_c, valid_c, layout, config.tile_size)
    mass = true_mass[variant.reorder]
    plan = build_plan(
        stats,
        k_c,
        valid_c,
        layout,
        scale=scale,
        density=density,
        config=config,
        scores=mass if variant.oracle else None,
    )
    if variant.true_weights:
        plan = dataclasses.replace(plan, block_scores=mass)
    out_c = rectified_sparse_attention(q_c, k_c, v_c, valid_c, plan, stats, layout, scale=scale, rectify=config.rectify)
    out = scatter_canonical(out_c, layout)

    nb = layout.num_video_blocks
    keep = plan.keep_mask()[..., :nb, :nb]
    real_rows = (layout.row_count[:nb] > 0).to(query.device)
    kept_mass = (mass[..., :nb] * keep).sum(-1) + mass[..., nb]
    result = Measurement(
        error=relative_error(out, dense),
        recall=kept_mass[..., real_rows].mean().item(),
        density=plan.density().mean().item(),
    )
    if variant.rectify != "none":
        trusted = plan.trusted_mask()[..., :nb, :]
        nonempty = valid_c[..., : nb * case.block_size].reshape(b, h, nb, case.block_size).any(-1)
        skipped = ~keep & nonempty[..., None, :]
        result.trusted_share = (trusted.sum() / skipped.sum().clamp(min=1)).item()
        result.trusted_mass_true = (mass[..., :nb] * trusted).sum(-1).mean().item()
        result.trusted_mass_estimated = (plan.block_scores[..., :nb] * trusted).sum(-1).mean().item()
        result.skipped_mass_true = (mass[..., :nb] * skipped).sum(-1).mean().item()
    return result


def summarize(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summary_table(
    results: dict[str, dict[float, dict[str, list[Measurement]]]],
    cases: tuple[Case, ...],
    densities: list[float],
    field: str,
    title: str,
) -> list[str]:
    """One row per (case, density), one column per variant: the mean of `field` over seeds."""
    # Rectification does not change the kept blocks, so recall needs only the unrectified variants.
    names = [v.name for v in VARIANTS if field != "recall" or v.rectify == "none"]
    lines = [f"## {title}", "", "| case | density | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for case in cases:
        if case.name not in results:
            continue
        for density in densities:
            rows = results[case.name][density]
            cells = [f"{statistics.mean(getattr(m, field) for m in rows[name]):.3f}" for name in names]
            lines.append(f"| {case.name} | {density:.0%} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def render_report(
    results: dict[str, dict[float, dict[str, list[Measurement]]]],
    cases: tuple[Case, ...],
    header: str,
    densities: list[float],
) -> str:
    """The markdown report of the cases measured so far."""
    lines = [
        "# Fidelity of sparse attention variants at equal density",
        "",
        header,
        "",
        "- **error**: `||out - dense|| / ||dense||` over the whole output, dense = float64 SDPA.",
        "- **recall**: share of the video queries' true attention mass inside their kept blocks (text always kept).",
        "- **density**: kept video key blocks / video blocks, averaged over video query blocks (the budget plus the "
        "forced diagonal; equal for all variants of a row by construction).",
        "- **trusted**: share of the skipped (non-empty) blocks GAPR trusts; **T mass true / est.**: attention mass "
        "of the trusted blocks per query block, true and as estimated by `P_hat` (block mode rescales the sparse "
        "output by `R = 1 - est.`); **skipped mass**: true mass of all skipped blocks.",
        "",
    ]
    lines += summary_table(results, cases, densities, "error", "Relative error (mean over seeds)")
    lines += summary_table(results, cases, densities, "recall", "Recall (mean over seeds)")
    for case in cases:
        if case.name not in results:
            continue
        for density in densities:
            rows = results[case.name][density]
            lines += [
                f"## {case.name}: density {density:.0%}",
                "",
                "| variant | error | recall | density | trusted | T mass true | T mass est. | skipped mass |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for variant in VARIANTS:
                ms = rows[variant.name]
                cells = [
                    summarize([m.error for m in ms]),
                    summarize([m.recall for m in ms]),
                    f"{statistics.mean(m.density for m in ms):.3f}",
                ]
                if variant.rectify == "none":
                    cells += ["", "", "", ""]
                else:
                    cells += [
                        summarize([m.trusted_share for m in ms]),
                        summarize([m.trusted_mass_true for m in ms]),
                        summarize([m.trusted_mass_estimated for m in ms]),
                        summarize([m.skipped_mass_true for m in ms]),
                    ]
                lines.append(f"| {variant.name} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per case")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.10, 0.25])
    parser.add_argument(
        "--cases",
        choices=sorted(CASE_SETS),
        default="default",
        help="default: ~7k-token grids (CPU); real: real model grids (use a GPU); quick: a smoke run of seconds",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("fidelity_results.md"))
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)
    cases = CASE_SETS[args.cases]
    seeds = range(args.seeds)
    device = torch.device(args.device)
    command = " ".join(["python benchmarks/fidelity.py", *(sys.argv[1:] if argv is None else argv)])
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{platform.machine()} CPU ({torch.get_num_threads()} threads)"

    started = time.perf_counter()
    # results[case][density][variant] -> one Measurement per seed
    results: dict[str, dict[float, dict[str, list[Measurement]]]] = {}
    for done, case in enumerate(cases, start=1):
        per_density = {density: {variant.name: [] for variant in VARIANTS} for density in args.densities}
        for seed in seeds:
            inputs = video_attention_inputs(
                case.video_grid,
                heads=args.heads,
                head_dim=args.head_dim,
                text_len=case.text_len,
                text_first=case.text_first,
                text_padding=case.text_padding,
                num_sinks=case.num_sinks,
                dtype=torch.float64,
                device=device,
                seed=seed,
            )
            dense = dense_attention(inputs.query, inputs.key, inputs.value, inputs.attn_mask)
            true_mass = {
                reorder: attention_block_mass(
                    inputs.query,
                    inputs.key,
                    token_layout(case.video_grid, case.text_len, case.text_first, case.block_size, reorder),
                    inputs.attn_mask,
                )
                for reorder in ("none", "hilbert")
            }
            for density in args.densities:
                for variant in VARIANTS:
                    per_density[density][variant.name].append(
                        run_variant(inputs, case, variant, density, dense, true_mass)
                    )
            print(f"[{time.perf_counter() - started:6.1f}s] {case.name}, seed {seed}", file=sys.stderr)
        results[case.name] = per_density
        header = (
            f"Measured {datetime.date.today().isoformat()} with `{command}` on {device_name}, torch "
            f"{torch.__version__}, float64; {len(seeds)} seed(s) per case, batch 1, {args.heads} heads, head dim "
            f"{args.head_dim}, inputs from `spattn_compile.testing.video_attention_inputs` (default peakedness; 2 "
            "sinks unless the case says otherwise). Mean ± standard deviation over seeds. "
            f"Wall time {time.perf_counter() - started:.0f} s"
            + ("." if done == len(cases) else f", {done} of {len(cases)} cases so far.")
        )
        # Written after every case, so that a run stopped early keeps what it measured.
        args.output.write_text(render_report(results, cases, header, args.densities) + "\n")
        if args.json is not None:
            raw = {
                name: {
                    str(density): {variant: [dataclasses.asdict(m) for m in ms] for variant, ms in by_variant.items()}
                    for density, by_variant in per_case.items()
                }
                for name, per_case in results.items()
            }
            args.json.write_text(json.dumps({"header": header, "results": raw}, indent=1))
    print(render_report(results, cases, header, args.densities))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
