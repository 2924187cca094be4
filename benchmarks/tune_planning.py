"""Launch configurations of the planning kernels, timed side by side at real sizes, and what rectification costs.

Owns the measurement behind the autotuning candidates of `kernels/statistics.py` (`_PREPARE_CANDIDATES`) and
`kernels/pooled_scores.py` (`_CANDIDATES`): for each case of `bench_pipeline_stages.py` (Wan 2.1 14B 720p, HunyuanVideo
720p; bf16, D = 128, Q/K/V as transposed views of (B, S, H, D) buffers), it runs

- `prepare_statistics(..., outliers=True)` at every (rows per chunk, warps) in `PREPARE_CONFIGS`, checks every output
  against the first configuration's (same statistics up to float32 summation order: relative error <= 1e-4 on block
  statistics and counts, bf16 rounding on the tile means) and times it;
- `pooled_scores(..., outliers=True)` at every (BLOCK_M, BLOCK_N, warps, stages) x programs per SM in `SCORE_CONFIGS`,
  checked against the first configuration's scores (relative error <= 1e-4) and timed;
- the attention stage (`SparseAttention.attend`) with each rectification mode on that mode's own plan, and the
  kept and trusted block counts, so that the cost of rectification is separated from the kernel's rate.

Times are `triton.testing.do_bench` medians (CUDA events). A configuration that fails to compile or to run is listed
with its error, not dropped. The table is printed last.

Run: `python benchmarks/tune_planning.py [--cases wan14b hunyuan]` on a CUDA machine (~2 min).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_pipeline_stages import CASES, _call, case_inputs  # noqa: E402

from spattn_compile.config import SparseAttentionConfig  # noqa: E402
from spattn_compile.kernels.pooled_scores import pooled_scores  # noqa: E402
from spattn_compile.kernels.statistics import prepare_statistics  # noqa: E402

PREPARE_CONFIGS = [(16, 2), (16, 1), (16, 4), (16, 8), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8), (64, 16), (128, 8),
                   (128, 16)]  # fmt: skip
SCORE_CONFIGS = [
    ((128, 16, 8, 2), 2),
    ((128, 32, 8, 3), 1),
    ((128, 32, 8, 2), 1),
    ((128, 16, 8, 3), 2),
    ((128, 16, 8, 2), 3),
    ((128, 16, 4, 2), 2),
    ((64, 16, 4, 2), 4),
    ((64, 32, 4, 2), 2),
    ((128, 64, 8, 2), 1),
]


def _bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    ok = torch.isfinite(a) & torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return float("inf")
    return float((a[ok] - b[ok]).norm() / b[ok].norm().clamp_min(1e-30))


def _prepared_tensors(found) -> dict[str, torch.Tensor]:
    out = {"key_valid": found.key_valid, "key_usable": found.key_usable, "key_block_count": found.key_block_count}
    for name in ("q_block", "k_block", "v_block", "q_block_mad", "k_block_mad", "q_tile", "k_tile"):
        out[name] = getattr(found.stats, name)
    for name in ("rest_mean", "rest_count", "outlier", "outlier_count"):
        out[name] = getattr(found.outliers, name)
    return out


def _compare(found, reference) -> float:
    worst = 0.0
    got, want = _prepared_tensors(found), _prepared_tensors(reference)
    for name, tensor in want.items():
        if tensor.dtype == torch.bool:
            worst = max(worst, 0.0 if torch.equal(got[name], tensor) else float("inf"))
        else:
            worst = max(worst, _rel(got[name], tensor))
    return worst


def run_case(name: str, case: dict, sparsity: float) -> list[str]:
    started = time.time()
    (query, key, value), mask = case_inputs(case, torch.device("cuda"))
    config = SparseAttentionConfig(sparsity=sparsity)
    call = _call((query, key, value), mask, case, config)
    layout, key_valid = call.layout, call.key_valid
    tile = config.estimator.pool_tile_size(config.block_size)
    print(f"# {name}: built in {time.time() - started:.0f} s", flush=True)
    lines = [f"\n## {name}: prepare_statistics (tile {tile}, outliers)\n", "| rows, warps | ms | max rel. error | |",
             "|---|---|---|---|"]  # fmt: skip

    def prepare(cfg):
        return prepare_statistics(query, key, value, layout, tile_size=tile, key_valid=key_valid, outliers=True,
                                  config=cfg)  # fmt: skip

    reference = prepare(PREPARE_CONFIGS[0])
    best = None
    for cfg in PREPARE_CONFIGS:
        try:
            error = _compare(prepare(cfg), reference)
            ms = _bench(lambda cfg=cfg: prepare(cfg))
        except Exception as exc:  # noqa: BLE001 - a configuration that cannot compile is a result
            lines.append(f"| {cfg} | - | - | {type(exc).__name__}: {str(exc)[:80]} |")
            continue
        ok = error <= 1e-2
        lines.append(f"| {cfg} | {ms:.3f} | {error:.1e} | {'ok' if ok else 'DIFFERS'} |")
        print(lines[-1], flush=True)
        if ok and (best is None or ms < best[1]):
            best = (cfg, ms)
    lines.append(f"\nautotuned: {_bench(lambda: prepare(None)):.3f} ms; best fixed: {best}")

    inputs = reference.estimator_inputs(query, key, call.scale)
    lines += [f"\n## {name}: pooled_scores (outliers)\n", "| BLOCK_M, BLOCK_N, warps, stages | programs/SM | ms | "
              "rel. error | |", "|---|---|---|---|---|"]  # fmt: skip
    first, per_sm = SCORE_CONFIGS[0]
    want = pooled_scores(inputs, outliers=True, config=first, programs_per_sm=per_sm)
    for cfg, per_sm in SCORE_CONFIGS:
        try:
            got = pooled_scores(inputs, outliers=True, config=cfg, programs_per_sm=per_sm)
            error = _rel(got, want)
            score = functools.partial(pooled_scores, inputs, outliers=True, config=cfg, programs_per_sm=per_sm)
            ms = _bench(score)
        except Exception as exc:  # noqa: BLE001
            lines.append(f"| {cfg} | {per_sm} | - | - | {type(exc).__name__}: {str(exc)[:80]} |")
            continue
        lines.append(f"| {cfg} | {per_sm} | {ms:.3f} | {error:.1e} | {'ok' if error <= 1e-4 else 'DIFFERS'} |")
        print(lines[-1], flush=True)
    del want, inputs, reference
    torch.cuda.empty_cache()

    lines += [f"\n## {name}: attend by rectification (each mode's own plan, sparsity {sparsity})\n",
              "| rectify | gapr | attend ms | kept blocks | trusted blocks |", "|---|---|---|---|---|"]  # fmt: skip
    for rectify, gapr in (("none", False), ("block", True), ("query", False), ("query", True)):
        variant = _call((query, key, value), mask, case, SparseAttentionConfig(sparsity=sparsity, rectify=rectify,
                                                                               gapr=gapr))  # fmt: skip
        plan = variant.plan()
        prepared = variant.prepare()
        ms = _bench(lambda variant=variant, prepared=prepared, plan=plan: variant.attend(prepared, plan))
        trusted = getattr(plan, "trusted_counts", None)
        trusted_sum = int(trusted.sum()) if trusted is not None else 0
        lines.append(f"| {rectify} | {gapr} | {ms:.2f} | {int(plan.kv_counts.sum())} | {trusted_sum} |")
        print(lines[-1], flush=True)
        del plan, prepared, variant
        torch.cuda.empty_cache()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_planning needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    report = []
    for name in args.cases:
        report += run_case(name, CASES[name], args.sparsity)
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
