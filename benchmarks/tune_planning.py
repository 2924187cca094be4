"""Launch variants of the planning kernels, checked and timed side by side, each stage against its floor.

Owns the measurement behind the autotuning candidates and launch options of the planning kernels
(`kernels/statistics.py`, `kernels/pooled_scores.py`, `kernels/select.py`; benchmarks/NOTES_pipeline.md). One run:

1. ceilings measured on the device: HBM copy rate, bf16 matmul rate, `exp2` rate (a Triton kernel of dependent
   `exp2`s);
2. correctness first, on HunyuanVideo 720p's layout with 2 heads (bf16; a toy shape in float16 under the
   interpreter): every variant of every stage
   against the float64 reference (`ReferenceImplementation(torch.float64)` statistics, `pooled_scores_reference`),
   the selection variants against the default launch's plan (itself tested against the reference), bit for bit;
3. per case (Wan 2.1 14B 720p, HunyuanVideo 720p, bf16, D = 128, as in `bench_pipeline_stages.py`): planning as
   `select_plan` runs it (`SparseAttention.plan`, autotuned defaults), then each stage's variants with its floor:
   - prepare (`prepare_statistics(..., outliers=True, config=PrepareLaunch)`): floor = Q, K, V read once at the copy
     rate;
   - pooled scores (`pooled_scores(..., config=ScoreLaunch, programs_per_sm=)`): floor = max(tensor cores, exp2) for
     each logit once;
   - selection (`select_plan(rows_per_program=, num_warps=)`) and GAPR's gate (`gapr_gate(config=)`): floor = scores
     read and plan lists written at the copy rate.

Times are medians of `triton.testing.do_bench` (CUDA events). A variant that fails to compile or run is listed with
its error; a variant whose check failed is timed but marked. The table is printed last (and written to
`$OUT/tune_planning.md` when OUT is set). `--attend` adds the attention stage per rectification mode.

Run: `python benchmarks/tune_planning.py` on the H200 (~3-4 min, mostly Triton compiles); `--smoke` runs everything
at a toy size on the CPU under the Triton interpreter (no timings worth reading; it proves the script runs). Variants
are flags, e.g. `--prepare 16,1 16,1,r 16,1,s 16,1,r,168` (chunk, warps, flags r = read the keys again and s = split
into a Q launch and a K, V launch, register cap), `--scores 128,16,8,3@2 64,16,4,2,f@2` (BLOCK_M, BLOCK_N, warps,
stages, f = fused key sets, @ programs per SM), `--select 4,4 1,1` (rows per program, warps), `--gate 64,4 32,4`
(tile, warps).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_pipeline_stages import CASES, _call, case_inputs  # noqa: E402

from spattn_compile.config import SparseAttentionConfig  # noqa: E402
from spattn_compile.estimators import PooledTiles  # noqa: E402
from spattn_compile.estimators.pooled import pooled_scores_reference  # noqa: E402
from spattn_compile.implementations.reference import ReferenceImplementation  # noqa: E402
from spattn_compile.kernels.pooled_scores import ScoreLaunch, pooled_scores  # noqa: E402
from spattn_compile.kernels.select import gapr_gate, select_plan  # noqa: E402
from spattn_compile.kernels.statistics import PrepareLaunch, prepare_statistics  # noqa: E402
from spattn_compile.plan import block_budget  # noqa: E402
from spattn_compile.policies.topk import TopK  # noqa: E402
from spattn_compile.testing import dit_attention_inputs  # noqa: E402

# The current fastest first (results/2026-12-03-h200/session3/tune.log), then the variants.
PREPARE = ["16,1", "16,1,r", "16,1,s", "16,2,rs", "16,1,r,168"]
SCORES = ["128,16,8,3@2", "64,32,4,2@2", "64,16,4,2,f@2", "64,16,4,3,f@2", "128,8,8,2,f@2", "64,16,4,2,f@3"]
SELECT = ["4,4", "1,1", "2,1", "2,2", "8,4"]
GATE = ["64,4", "32,4", "64,8", "32,2"]
SMOKE_CASE = dict(grid=(4, 8, 8), heads=2, text_len=13, text_padding=4)
# HunyuanVideo 720p's layout and mask with 2 heads: its kernels' specialisations are the Hunyuan case's, so the checks
# compile nothing twice (the run is compile-bound).
CHECK_CASE = dict(CASES["hunyuan"], heads=2)


def parse_prepare(text: str) -> PrepareLaunch:
    """`chunk,warps[,flags[,maxnreg]]`: flags r (read the keys again), s (split: a Q launch and a K, V launch)."""
    parts = text.split(",")
    flags = parts[2] if len(parts) > 2 else ""
    return PrepareLaunch(int(parts[0]), int(parts[1]), "r" in flags, int(parts[3]) if len(parts) > 3 else None,
                         "s" in flags)  # fmt: skip


def parse_scores(text: str) -> tuple[ScoreLaunch, int]:
    launch, _, per_sm = text.partition("@")
    parts = launch.split(",")
    return ScoreLaunch(*(int(p) for p in parts[:4]), len(parts) > 4 and parts[4] == "f"), int(per_sm or 2)


def parse_pair(text: str) -> tuple[int, int]:
    first, second = text.split(",")
    return int(first), int(second)


class Timer:
    """Medians of CUDA-event timings on the GPU; one wall-clock run under the interpreter (the script's smoke test)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn) -> float:
        if self.device.type != "cuda":
            started = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - started)
        import triton

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        return float("inf")
    ok = torch.isfinite(want)
    return float((got[ok] - want[ok]).norm() / want[ok].norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------------------------
# Ceilings
# --------------------------------------------------------------------------------------------------------------------


def _exp2_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def exp2_chain(X, Y, STEPS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs)
        for _ in range(STEPS):
            x = tl.math.exp2(x) * -0.5  # stays in (-0.5, 0]: no overflow, no denormals
        tl.store(Y + offs, x)

    return exp2_chain


def ceilings(device: torch.device, timer: Timer, smoke: bool) -> dict[str, float]:
    """Copy rate (bytes/s, read + write), bf16 matmul rate (FLOP/s) and exp2 rate (1/s), measured here."""
    n = 1 << (12 if smoke else 29)
    src = torch.ones(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * src.element_size() / (timer(lambda: dst.copy_(src)) * 1e-3)
    size = 64 if smoke else 8192
    dtype = torch.float32 if smoke else torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    matmul = 2 * size**3 / (timer(lambda: a @ a) * 1e-3)
    steps, block = (4, 64) if smoke else (256, 1024)
    programs = 4 if smoke else 132 * 64
    x = torch.zeros(programs * block, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    kernel = _exp2_kernel()
    exp2 = x.numel() * steps / (timer(lambda: kernel[(programs,)](x, y, STEPS=steps, BLOCK=block)) * 1e-3)
    return {"copy": copy, "matmul": matmul, "exp2": exp2}


# --------------------------------------------------------------------------------------------------------------------
# Correctness first
# --------------------------------------------------------------------------------------------------------------------


def _inputs(case: dict, device: torch.device, dtype: torch.dtype, head_dim: int):
    generated = dit_attention_inputs(case["grid"], heads=case["heads"], head_dim=head_dim, text_len=case["text_len"],
                                     text_padding=case["text_padding"], dtype=dtype, device=device)  # fmt: skip
    return (generated.query, generated.key, generated.value), generated.attn_mask


def check_variants(args, device: torch.device, dtype: torch.dtype) -> tuple[list[str], set[str]]:
    """Each variant against the float64 reference (statistics, scores) or the default launch (selection, gate);
    returns the report lines and the labels of variants that failed."""
    case = SMOKE_CASE if args.smoke else CHECK_CASE
    (query, key, value), mask = _inputs(case, device, dtype, 32 if args.smoke else 128)
    config = SparseAttentionConfig(sparsity=args.sparsity)
    estimator = PooledTiles(16, outliers=True)
    call = _call((query, key, value), mask, case, config)
    layout, valid, scale = call.layout, call.key_valid, call.scale
    as64 = [t.double() for t in (query, key, value)]
    ref = ReferenceImplementation(torch.float64).prepare(*as64, layout, valid, 16, scale, False)
    want_scores = pooled_scores_reference(ref.estimator_inputs(), estimator)
    lines = [f"\n## Checks: grid {case['grid']} + {case['text_len']} text, {case['heads']} heads, {dtype}\n",
             "| stage | variant | rel. error / result | |", "|---|---|---|---|"]  # fmt: skip
    failed: set[str] = set()

    def record(stage: str, label: str, value: str, ok: bool) -> None:
        lines.append(f"| {stage} | {label} | {value} | {'ok' if ok else 'FAILED'} |")
        print(lines[-1], flush=True)
        if not ok:
            failed.add(f"{stage} {label}")

    # Statistics: float32 sums; tile means rounded to the 16-bit dtype.
    tile_bound, block_bound = (2e-2, 1e-4)
    default_found = None
    for text in args.prepare:
        try:
            found = prepare_statistics(query, key, value, layout, tile_size=16, key_valid=valid, outliers=True,
                                       config=parse_prepare(text))  # fmt: skip
            errors = {n: _rel(getattr(found.stats, n), getattr(ref.stats, n)) for n in
                      ("q_block", "k_block", "v_block", "q_block_mad", "k_block_mad", "q_tile", "k_tile")}  # fmt: skip
            worst_tile = max(errors["q_tile"], errors["k_tile"])
            worst_block = max(v for n, v in errors.items() if not n.endswith("tile"))
            exact = torch.equal(found.key_usable, ref.key_usable) and torch.equal(
                found.key_block_count.double(), ref.key_block_count.double())  # fmt: skip
            if default_found is None:
                default_found = found
            same_outliers = default_found.outliers is not None and found.outliers is not None and all(
                _rel(getattr(found.outliers, n), getattr(default_found.outliers, n)) <= 1e-6
                for n in ("rest_mean", "outlier", "rest_count", "outlier_count"))  # fmt: skip
            ok = worst_tile <= tile_bound and worst_block <= block_bound and exact and same_outliers
            record("prepare", text, f"tiles {worst_tile:.1e}, blocks {worst_block:.1e}, counts exact {exact}, "
                   f"outliers as the first {same_outliers}", ok)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a variant that cannot compile is a result
            record("prepare", text, f"{type(exc).__name__}: {str(exc)[:100]}", False)
    assert default_found is not None, "no prepare variant ran"
    inputs = default_found.estimator_inputs(query, key, scale)
    for text in args.scores:
        launch, per_sm = parse_scores(text)
        try:
            got = pooled_scores(inputs, outliers=True, config=launch, programs_per_sm=per_sm)
            error = _rel(got, want_scores)
            record("scores", text, f"{error:.1e} (bound 2e-2)", error <= 2e-2 and bool(torch.isfinite(got).all()))
        except Exception as exc:  # noqa: BLE001
            record("scores", text, f"{type(exc).__name__}: {str(exc)[:100]}", False)
    scores = pooled_scores(inputs, outliers=True)
    stats, count = default_found.stats, default_found.key_block_count
    gate = gapr_gate(stats, count, layout)
    for text in args.gate:
        try:
            same = torch.equal(gapr_gate(stats, count, layout, config=parse_pair(text)), gate)
            record("gate", text, f"equal to (64, 4): {same}", same)
        except Exception as exc:  # noqa: BLE001
            record("gate", text, f"{type(exc).__name__}: {str(exc)[:100]}", False)
    selection = _selection_kwargs(config, layout, default_found, gate)
    expected = select_plan(scores, count, layout, **selection)
    for text in args.select:
        rows, warps = parse_pair(text)
        try:
            plan = select_plan(scores, count, layout, **selection, rows_per_program=rows, num_warps=warps)
            same = all(torch.equal(getattr(plan, n), getattr(expected, n))
                       for n in ("kv_counts", "kv_indices", "trusted_counts", "trusted_indices"))  # fmt: skip
            record("select", text, f"plan equal to the default launch's: {same}", same)
        except Exception as exc:  # noqa: BLE001
            record("select", text, f"{type(exc).__name__}: {str(exc)[:100]}", False)
    return lines, failed


def _selection_kwargs(config: SparseAttentionConfig, layout, prepared, gate) -> dict:
    """The selection kernel's arguments at the config's settings with a uniform budget (per-head budget policies
    change which blocks, not the kernel's work)."""
    topk = TopK.from_config(config)
    return dict(budget=block_budget(topk.density, layout.num_video_blocks), estimator="tune",
                mass_threshold=topk.mass_threshold, max_density=topk.max_density, neighbors=topk.neighbors,
                trusted=True, gate=gate, forced_blocks=prepared.block_non_finite)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Timings at real sizes
# --------------------------------------------------------------------------------------------------------------------


def run_case(name: str, case: dict, args, device: torch.device, timer: Timer, ceiling: dict, failed: set[str]):
    started = time.time()
    if args.smoke:
        (query, key, value), mask = _inputs(case, device, torch.float16, 32)
    else:
        (query, key, value), mask = case_inputs(case, device)
    config = SparseAttentionConfig(sparsity=args.sparsity)
    call = _call((query, key, value), mask, case, config)
    layout, valid, scale = call.layout, call.key_valid, call.scale
    batch, heads, seq_len, head_dim = query.shape
    print(f"# {name}: S={seq_len}, H={heads}, built in {time.time() - started:.0f} s", flush=True)
    rows: list[tuple[str, str, float, float]] = []  # (stage, variant, ms, floor ms)

    def timed(stage: str, label: str, fn, floor_ms: float) -> None:
        mark = " (check FAILED)" if f"{stage} {label}" in failed else ""
        try:
            ms = timer(fn)
        except Exception as exc:  # noqa: BLE001 - a variant that cannot compile is a result
            print(f"{name} {stage} {label}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            rows.append((stage, label + f" [{type(exc).__name__}]", float("nan"), floor_ms))
            return
        rows.append((stage, label + mark, ms, floor_ms))
        print(f"{name} {stage} {label}{mark}: {ms:.3f} ms (floor {floor_ms:.3f})", flush=True)

    # Floors.
    nb, nq = layout.num_video_blocks, layout.num_blocks
    nt = nb * (layout.block_size // 16)
    qkv_bytes = 3 * query.numel() * query.element_size()
    prepare_floor = 1e3 * qkv_bytes / (ceiling["copy"] / 2)  # read once: half a copy's bytes
    logits = batch * heads * nt * (2 * nt + layout.num_text)
    scores_floor = 1e3 * max(2 * head_dim * logits / ceiling["matmul"], logits / ceiling["exp2"])
    scores_bytes = batch * heads * nb * (nb + 1) * 4
    plan_bytes = batch * heads * nq * (nq + nb) * 2 + 2 * batch * heads * nq * 4
    select_floor = 1e3 * (scores_bytes + plan_bytes) / (ceiling["copy"] / 2)
    gate_floor = 1e3 * (batch * heads * (4 * nb * head_dim * 4 + nb * nb)) / (ceiling["copy"] / 2)
    plan_floor = prepare_floor + scores_floor + select_floor + gate_floor

    timed("planning", "select_plan (call.plan, defaults)", lambda: call.plan(), plan_floor)

    def prepare(launch):
        return prepare_statistics(query, key, value, layout, tile_size=16, key_valid=valid, outliers=True,
                                  config=launch)  # fmt: skip

    timed("prepare", "autotuned", lambda: prepare(None), prepare_floor)
    for text in args.prepare:
        timed("prepare", text, lambda text=text: prepare(parse_prepare(text)), prepare_floor)
    found = prepare(None)
    inputs = found.estimator_inputs(query, key, scale)
    timed("scores", "autotuned", lambda: pooled_scores(inputs, outliers=True), scores_floor)
    for text in args.scores:
        launch, per_sm = parse_scores(text)
        timed("scores", text, lambda launch=launch, per_sm=per_sm: pooled_scores(
            inputs, outliers=True, config=launch, programs_per_sm=per_sm), scores_floor)  # fmt: skip
    scores = pooled_scores(inputs, outliers=True)
    stats, count = found.stats, found.key_block_count
    for text in args.gate:
        timed("gate", text, lambda text=text: gapr_gate(stats, count, layout, config=parse_pair(text)), gate_floor)
    gate = gapr_gate(stats, count, layout)
    selection = _selection_kwargs(config, layout, found, gate)
    for text in args.select:
        rows_per, warps = parse_pair(text)
        timed("select", text, lambda rows_per=rows_per, warps=warps: select_plan(
            scores, count, layout, **selection, rows_per_program=rows_per, num_warps=warps), select_floor)  # fmt: skip

    lines = [f"\n## {name}: grid {case['grid']} + {case['text_len']} text, S={seq_len}, H={heads}, D={head_dim}, "
             f"{query.dtype}, sparsity {args.sparsity}\n",
             "| stage | variant | ms | floor ms | x floor |", "|---|---|---|---|---|"]  # fmt: skip
    best: dict[str, tuple[float, str]] = {}
    for stage, label, ms, floor_ms in rows:
        lines.append(f"| {stage} | {label} | {ms:.3f} | {floor_ms:.3f} | {ms / floor_ms:.1f} |")
        if ms == ms and "FAILED" not in label and "[" not in label and ms < best.get(stage, (float("inf"), ""))[0]:
            best[stage] = (ms, label)
    stages = [s for s in ("prepare", "scores", "gate", "select") if s in best]
    total = sum(best[s][0] for s in stages)
    lines.append(f"\nbest per stage: {', '.join(f'{s} {best[s][0]:.3f} ({best[s][1]})' for s in stages)}; sum "
                 f"{total:.3f} ms against the floor {plan_floor:.3f} ms")  # fmt: skip
    if args.attend:
        lines += attend_rows(call, (query, key, value), mask, case, args.sparsity, timer)
    return lines


def attend_rows(call, inputs, mask, case: dict, sparsity: float, timer: Timer) -> list[str]:
    """The attention stage with each rectification mode on that mode's own plan (what rectification costs)."""
    lines = [f"\n### attend by rectification (each mode's own plan, sparsity {sparsity})\n",
             "| rectify | gapr | attend ms | kept blocks | trusted blocks |", "|---|---|---|---|---|"]  # fmt: skip
    for rectify, gapr in (("none", False), ("block", True), ("query", False), ("query", True)):
        variant = _call(inputs, mask, case, SparseAttentionConfig(sparsity=sparsity, rectify=rectify, gapr=gapr))
        plan = variant.plan()
        prepared = variant.prepare()
        ms = timer(lambda variant=variant, prepared=prepared, plan=plan: variant.attend(prepared, plan))
        trusted = int(plan.trusted_counts.sum())
        lines.append(f"| {rectify} | {gapr} | {ms:.2f} | {int(plan.kv_counts.sum())} | {trusted} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--prepare", nargs="+", default=PREPARE, help="chunk,warps[,flags r s[,maxnreg]]")
    parser.add_argument("--scores", nargs="+", default=SCORES, help="BLOCK_M,BLOCK_N,warps,stages[,f][@per SM]")
    parser.add_argument("--select", nargs="+", default=SELECT, help="rows per program,warps")
    parser.add_argument("--gate", nargs="+", default=GATE, help="tile,warps")
    parser.add_argument("--attend", action="store_true", help="also time attending per rectification mode")
    parser.add_argument("--smoke", action="store_true", help="toy size on the CPU under the Triton interpreter")
    args = parser.parse_args(argv)
    import triton

    if args.smoke:
        device = torch.device("cpu")
        args.prepare, args.select, args.gate = args.prepare[:4], args.select[:3], args.gate[:2]
        args.scores = [s for s in args.scores if parse_scores(s)[0].warps == 4][:2] + ["16,16,4,1,f@2"]
    elif not torch.cuda.is_available():
        print("tune_planning needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 1
    else:
        device = torch.device("cuda")
    started = time.time()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    header = f"device: {name}, torch {torch.__version__}, triton {triton.__version__}"
    print(header, flush=True)
    timer = Timer(device)
    ceiling = ceilings(device, timer, args.smoke)
    ceiling_line = (f"ceilings measured: copy {ceiling['copy'] / 1e12:.2f} TB/s (read + write), bf16 matmul "
                    f"{ceiling['matmul'] / 1e12:.0f} TFLOP/s, exp2 {ceiling['exp2'] / 1e12:.2f} T/s")  # fmt: skip
    print(ceiling_line, flush=True)
    report, failed = check_variants(args, device, torch.float16 if args.smoke else torch.bfloat16)
    cases = {"smoke": SMOKE_CASE} if args.smoke else {n: CASES[n] for n in args.cases}
    for case_name, case in cases.items():
        report += run_case(case_name, case, args, device, timer, ceiling, failed)
    report.append(f"\nfailed checks: {sorted(failed) or 'none'}; wall {time.time() - started:.0f} s")
    text = "\n".join([header, ceiling_line, *report])
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "tune_planning.md").write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
