"""The attention kernel's tile configurations and structural variants against cuDNN dense SDPA, side by side.

    python benchmarks/tune_attention.py                    # on a CUDA GPU (H200: about 3-4 minutes)
    python benchmarks/tune_attention.py --head-dims 64,96  # only the variants and shapes of these head dims
    python benchmarks/tune_attention.py --smoke            # the CPU: Triton interpreter, toy shapes, every step

Every variant runs through the public path's stage 3 (`SparseAttention.attend`: the rectification's inputs and the
kernel, gathered reads, default settings: query rectification) with an explicit `TileConfig` and `KernelVariant`
(`TritonImplementation(tile_config=..., variant=...)`), so the lead can adopt a winner by changing the defaults or the
autotuner's candidates (`kernels/block_sparse_attention.py`, `_CANDIDATES`). "autotuned" is the default path; its
row names the configuration the autotuner chose.

1. Correctness first: per head dim, on a small shape (7x16x24 + 77 text tokens, 26 of them padding, 2 heads; bf16),
   a plan from `select_plan` (default settings, sparsity 0.9), each variant's output against the float64 reference
   (impl "reference" on the inputs in float64) on the same plan: relative error < 1e-2.
2. Timing, per shape (Wan 2.1 14B 720p: 21x45x80, 40 heads, D = 128; HunyuanVideo 720p: 33x45x80 + 256 text tokens,
   128 of them padding, 24 heads, D = 128; CogVideoX-like 13x30x45 + 226 text tokens, D = 64 with 48 heads and D = 96
   with 32 heads), sparsity 0.9 (Wan also 0.75), the plan from `select_plan`: cuDNN dense SDPA (unmasked) and every
   variant, in interleaved rounds (rotated order; median of `time_ms` repeats per round, median over rounds) after a
   warm-up call each (compiles, autotuning). Rate: attend's FLOPs (4 * BS^2 * D per kept block pair per head; the
   virtual keys are not counted) per second over cuDNN's (4 * S^2 * D per head).

The variants and what each is for (predictions and counts: benchmarks/NOTES_attention.md, "Tuning"):
- 128x128 w8 s5 / s3: the single-program configurations (one program per SM: 212-255 registers per thread).
- "regs<=128": a register cap so that two programs of 8 warps share an SM (65,536 registers; shared memory <= 113 KB
  each): one program's softmax overlaps the other's products. 128x64 at D = 96/128 (98.5 KB), 128x128 at D = 64
  (82 KB at 4 stages; 113 KB at 5).
- 64x64 w4: two or three programs per SM, twice the L2 traffic per FLOP of 128-row tiles.
- "split" (D = 96): the head dim as 64 + 32 lanes (two products each for QK^T and PV) instead of 128 padded lanes: a
  quarter less tensor work, 48 instead of 64 accumulator registers per thread.
- "shared offsets": one row offset per gathered key for both the K and the V load (K and V rows have one stride
  here): 25 of 636 instructions per step fewer at D = 128 in the sm_90 SASS, the same buffers.

The table is printed last; the whole report goes to `$OUT/tune_attention.md` when OUT is set.
"""

from __future__ import annotations

import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:
    # Before torch and triton are imported: the interpreter is chosen when triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from spattn_compile import select_plan, sparse_attention  # noqa: E402
from spattn_compile.attention import SparseAttention  # noqa: E402
from spattn_compile.call_layout import CallLayout  # noqa: E402
from spattn_compile.implementations.triton import TritonImplementation  # noqa: E402
from spattn_compile.kernels.block_sparse_attention import (  # noqa: E402
    KernelVariant,
    TileConfig,
    chosen_tile_config,
    forget_tile_choices,
    lane_groups,
)
from spattn_compile.testing.benchmark import relative_error, time_ms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The shapes, inputs, cuDNN call and FLOP counts of the public-path benchmark (same --smoke switch).
import bench_attention as bench  # noqa: E402
from bench_attention import CONFIG, DEVICE, DTYPE, Problem, Shape  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run the kernel: a tile configuration (None: autotuned) and a structural variant."""

    name: str
    tile: TileConfig | None = None
    kernel: KernelVariant = KernelVariant()

    def implementation(self) -> TritonImplementation:
        tile = self.tile
        if tile is not None and SMOKE:
            # The interpreter takes tiles that divide the toy block size; warps, stages and registers mean nothing.
            tile = TileConfig(min(tile.block_m, bench.BLOCK), min(tile.block_n, bench.BLOCK), 4, 1)
        return TritonImplementation(tile_config=tile, variant=self.kernel)


_SPLIT = KernelVariant(head_lanes="split")
_SHARED = KernelVariant(row_offsets="shared")
VARIANTS: dict[int, list[Variant]] = {
    128: [
        Variant("autotuned"),
        Variant("128x128 w8 s5", TileConfig(128, 128, 8, 5)),
        Variant("128x128 w8 s5 shared offsets", TileConfig(128, 128, 8, 5), _SHARED),
        Variant("128x128 w8 s3", TileConfig(128, 128, 8, 3)),
        Variant("128x64 w8 s3 (1/SM)", TileConfig(128, 64, 8, 3)),
        Variant("128x64 w8 s3 regs<=128 (2/SM)", TileConfig(128, 64, 8, 3, 128)),
        Variant("128x64 w8 s3 regs<=128 (2/SM) shared offsets", TileConfig(128, 64, 8, 3, 128), _SHARED),
    ],
    64: [
        Variant("autotuned"),
        Variant("128x128 w8 s5", TileConfig(128, 128, 8, 5)),
        Variant("128x128 w8 s5 shared offsets", TileConfig(128, 128, 8, 5), _SHARED),
        Variant("64x64 w4 s5", TileConfig(64, 64, 4, 5)),
        Variant("128x128 w8 s4 regs<=128 (2/SM)", TileConfig(128, 128, 8, 4, 128)),
        Variant("128x128 w8 s4 regs<=128 (2/SM) shared offsets", TileConfig(128, 128, 8, 4, 128), _SHARED),
        Variant("128x128 w8 s5 regs<=128 (2/SM, 113 KB)", TileConfig(128, 128, 8, 5, 128)),
        Variant("128x64 w8 s5 regs<=128 (2/SM)", TileConfig(128, 64, 8, 5, 128)),
    ],
    96: [
        Variant("autotuned"),
        Variant("128x128 w8 s5", TileConfig(128, 128, 8, 5)),
        Variant("128x64 w8 s3 regs<=128 (2/SM)", TileConfig(128, 64, 8, 3, 128)),
        Variant("split autotuned", None, _SPLIT),
        Variant("split 128x128 w8 s5", TileConfig(128, 128, 8, 5), _SPLIT),
        Variant(
            "split 128x128 w8 s5 shared offsets",
            TileConfig(128, 128, 8, 5),
            KernelVariant(head_lanes="split", row_offsets="shared"),
        ),  # fmt: skip
        Variant("split 128x128 w8 s3", TileConfig(128, 128, 8, 3), _SPLIT),
        Variant("split 128x64 w8 s3 regs<=128 (2/SM)", TileConfig(128, 64, 8, 3, 128), _SPLIT),
    ],
}

if SMOKE:
    REPEATS, ROUNDS = 1, 1
    # Toy stand-ins: D = 32 for 128, 16 for 64, 40 (split as 32 + 16) for 96.
    HEAD_DIMS = {128: 32, 64: 16, 96: 40}
    CHECK_GRID, CHECK_TEXT = (2, 3, 5), (20, 7)
    TIMING: list[tuple[Shape, tuple[float, ...], int]] = [
        (Shape("toy D=32", (2, 3, 5), 1, 32, 20, 7), (0.75,), 128),
        (Shape("toy D=40", (2, 3, 3), 1, 40, 9, 0), (0.75,), 96),
    ]
else:
    REPEATS, ROUNDS = 3, 3
    HEAD_DIMS = {128: 128, 64: 64, 96: 96}
    CHECK_GRID, CHECK_TEXT = (7, 16, 24), (77, 26)
    TIMING = [
        (bench._shape("wan14b-720p"), (0.9, 0.75), 128),
        (bench._shape("hunyuan-720p"), (0.9,), 128),
        (Shape("cogvideox-like D=64", (13, 30, 45), 48, 64, 226, 0), (0.9,), 64),
        (Shape("cogvideox-like D=96", (13, 30, 45), 32, 96, 226, 0), (0.9,), 96),
    ]


def _call(problem: Problem, sparsity: float, variant: Variant) -> SparseAttention:
    layout = CallLayout(problem.shape.grid, problem.shape.text_len, False)
    config = dataclasses.replace(CONFIG, sparsity=sparsity)
    return SparseAttention(problem.q, problem.k, problem.v, layout, attn_mask=problem.attn_mask, scale=None,
                           config=config, implementation=variant.implementation())  # fmt: skip


def _describe(variant: Variant, head_dim: int) -> str:
    """The variant's name, with the autotuner's choice for "autotuned" rows (read right after their warm-up)."""
    name = variant.name
    if variant.tile is None and not SMOKE:
        chosen = chosen_tile_config()
        name += f" -> {chosen}" if chosen is not None else ""
    if variant.kernel.head_lanes == "split":
        name += f" [lanes {'+'.join(map(str, lane_groups(head_dim))) or 'not split'}]"
    return name


def check(lines: list[str], keys: list[int]) -> bool:
    """Section 1 for the variants of head dims `keys`; appends its report lines, returns whether every one passed."""
    lines += ["## Correctness: every variant vs float64 on the same plan", ""]
    lines += ["| head dim | variant | output rel. error | |", "|---|---|---|---|"]
    ok = True
    for key in keys:
        variants = VARIANTS[key]
        head_dim = HEAD_DIMS[key]
        shape = Shape(f"check D={head_dim}", CHECK_GRID, 2, head_dim, *CHECK_TEXT)
        problem = Problem.make(shape, seed=5)
        wide = Problem(shape, *(t.double() for t in (problem.q, problem.k, problem.v)), problem.attn_mask)
        config = dataclasses.replace(CONFIG, sparsity=0.9)
        plan = select_plan(problem.q, problem.k, problem.v, **problem.kwargs(config))
        expected = sparse_attention(wide.q, wide.k, wide.v, **wide.kwargs(config, "reference"), plan=plan)
        for variant in variants:
            out = _call(problem, 0.9, variant).run(plan)
            error = relative_error(out, expected)
            passed = bool(torch.isfinite(out).all()) and error < 1e-2
            ok &= passed
            lines.append(f"| {head_dim} | {variant.name} | {error:.2e} | {'ok' if passed else 'FAILED'} |")
    lines.append("")
    return ok


@dataclasses.dataclass
class Row:
    shape: str
    sparsity: float
    density: float
    variant: str
    ms: float
    dense_ms: float
    tflops: float
    dense_tflops: float
    spread: float  # slowest round over fastest


def _interleaved(calls: dict[str, Callable[[], object]]) -> dict[str, tuple[float, float]]:
    """Median ms over ROUNDS rounds (rotated order) of each call's median over REPEATS calls, and the spread of the
    rounds (slowest / fastest)."""
    names = list(calls)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(ROUNDS):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rounds[name].append(time_ms(lambda _, fn=calls[name]: fn(), REPEATS, DEVICE)[1])
    return {name: (statistics.median(t), max(t) / min(t)) for name, t in rounds.items()}


def measure(shape: Shape, sparsities: tuple[float, ...], key: int, start: float) -> list[Row]:
    problem = Problem.make(shape)
    dense = bench._dense(problem)
    dense()
    rows = []
    for sparsity in sparsities:
        config = dataclasses.replace(CONFIG, sparsity=sparsity)
        plan = select_plan(problem.q, problem.k, problem.v, **problem.kwargs(config))
        calls: dict[str, Callable[[], object]] = {"cuDNN dense": dense}
        # The autotuner keys its choice by the kernel's constexprs, not by shape: tune again for this one.
        forget_tile_choices()
        for variant in VARIANTS[key]:
            call = _call(problem, sparsity, variant)
            prepared = call.prepare()
            run = functools.partial(call.attend, prepared, plan)
            run()  # compiles; the autotuner times its candidates
            calls[_describe(variant, shape.head_dim)] = run
        timed = _interleaved(calls)
        dense_ms = timed.pop("cuDNN dense")[0]
        flops, dense_flops = bench._attend_flops(plan, shape.head_dim), bench._dense_flops(shape)
        density = float(plan.density().mean())
        for name, (ms, spread) in timed.items():
            rows.append(Row(shape.name, sparsity, density, name, ms, dense_ms, flops / ms / 1e9,
                            dense_flops / dense_ms / 1e9, spread))  # fmt: skip
            print(f"  {shape.name} {sparsity} {name}: {ms:.3f} ms, {rows[-1].tflops / rows[-1].dense_tflops:.1%} "
                  f"of cuDNN's rate ({time.perf_counter() - start:.0f} s)")  # fmt: skip
        del calls, plan
    del problem, dense
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(rows: list[Row]) -> list[str]:
    header = ("| shape | sparsity | density | variant | attend ms | cuDNN dense ms | attend TFLOP/s | cuDNN TFLOP/s | "
              "rate / cuDNN's | vs row 1 of the shape | round spread |")  # fmt: skip
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    first: dict[tuple[str, float], float] = {}
    for r in rows:
        base = first.setdefault((r.shape, r.sparsity), r.ms)
        lines.append(
            f"| {r.shape} | {r.sparsity} | {r.density:.3f} | {r.variant} | {r.ms:.3f} | {r.dense_ms:.2f} | "
            f"{r.tflops:.0f} | {r.dense_tflops:.0f} | {r.tflops / r.dense_tflops:.1%} | {base / r.ms:.3f}x | "
            f"{r.spread:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, toy shapes")
    parser.add_argument("--head-dims", default="128,64,96", help="comma-separated subset of 128, 64, 96")
    args = parser.parse_args(argv)
    keys = [int(d) for d in args.head_dims.split(",")]
    if not keys or any(key not in VARIANTS for key in keys):
        parser.error(f"--head-dims takes a comma-separated subset of {sorted(VARIANTS)}, got {args.head_dims!r}")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tune_attention.py needs a CUDA GPU (or --smoke)")
    start = time.perf_counter()
    import triton

    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU (Triton interpreter)"
    report = [
        f"# Attention kernel variants vs cuDNN: {device}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{datetime.date.today()}",
        "",
        f"{DTYPE}, default settings (query rectification), gathered reads; {ROUNDS} interleaved rounds of "
        f"{REPEATS} timed calls.",
        "",
    ]
    checked = check(report, keys)
    print("\n".join(report))
    print(f"correctness: {'passed' if checked else 'FAILED'} ({time.perf_counter() - start:.0f} s)")
    rows: list[Row] = []
    for shape, sparsities, key in TIMING:
        if key in keys:
            rows += measure(shape, sparsities, key, start)
    lines = table(rows)
    wall = time.perf_counter() - start
    report += ["## Timing", "", *lines, "", f"Wall time {wall:.0f} s.", ""]
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "tune_attention.md").write_text("\n".join(report) + "\n")
    print()
    print(f"correctness: {'passed' if checked else 'FAILED'}; wall time {wall:.0f} s")
    print("\n".join(lines))
    return 0 if checked and all(math.isfinite(r.ms) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
