"""Where the time of one sparse attention call goes: every GPU kernel of `attention.SparseAttention`, by name.

`bench_pipeline_stages.py` times the stages as a user sees them; this profiles the kernels underneath them with
`torch.profiler` (CUDA activity), at Wan 2.1 14B 720p (grid 21x45x80, 75,600 tokens, 40 heads, head dim 128, bf16,
Q/K/V as transposed views of (B, S, H, D) buffers, `spattn_compile.testing.dit_attention_inputs`), for a fresh plan
and for a cached one, beside cuDNN dense SDPA measured in the same run. It prints, per estimator, one line per kernel:
calls, total milliseconds per pipeline call and share of the dense time; the summary table is printed last.

Run: `python benchmarks/profile_pipeline.py [--sparsity 0.9] [--repeats 5]` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_pipeline_stages import CASES, case_inputs  # noqa: E402

from spattn_compile.attention import SparseAttention  # noqa: E402
from spattn_compile.call_layout import CallLayout  # noqa: E402
from spattn_compile.config import SparseAttentionConfig  # noqa: E402
from spattn_compile.estimators import EstimatorConfig, PooledTiles  # noqa: E402
from spattn_compile.implementations import make_implementation  # noqa: E402

CASE = CASES["wan14b"]
GRID = CASE["grid"]
HEADS = CASE["heads"]


def _inputs(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bench_pipeline_stages' Wan 14B 720p inputs (no mask at this case)."""
    (query, key, value), _ = case_inputs(CASE, device)
    return query, key, value


def _kernel_times(fn, repeats: int) -> dict[str, tuple[int, float]]:
    """Per kernel name: (launches per call, milliseconds per call), from `repeats` profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = totals[event.name[:60]]
        entry[0] += 1
        entry[1] += event.device_time / 1000.0
    return {name: (int(count) // repeats, ms / repeats) for name, (count, ms) in totals.items()}


def _dense_ms(query, key, value) -> float:
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def dense():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(query, key, value)

    return triton.testing.do_bench(dense, warmup=50, rep=300, return_mode="median")


def profile_estimator(inputs, estimator: EstimatorConfig, sparsity: float, repeats: int, dense_ms: float) -> list[str]:
    query, key, value = inputs
    config = SparseAttentionConfig(sparsity=sparsity, estimator=estimator)
    triton = make_implementation("triton")

    def call() -> SparseAttention:
        scale = 1.0 / math.sqrt(query.shape[-1])
        return SparseAttention(
            query, key, value, CallLayout(GRID, 0, False), attn_mask=None, scale=scale, config=config,
            implementation=triton,
        )  # fmt: skip

    def fresh() -> torch.Tensor:
        attention = call()
        return attention.run(attention.plan())

    plan = call().plan()
    lines = []
    for label, fn in (
        ("fresh plan", fresh),
        ("cached plan", lambda: call().run(plan)),
    ):
        times = _kernel_times(fn, repeats)
        total = sum(ms for _, ms in times.values())
        lines.append(f"\n### {estimator}, {label}: {total:.2f} ms of kernels ({dense_ms / total:.2f}x dense)\n")
        lines.append("| kernel | launches | ms | % of dense |")
        lines.append("|---|---|---|---|")
        for name, (count, ms) in sorted(times.items(), key=lambda item: -item[1][1]):
            lines.append(f"| `{name}` | {count} | {ms:.3f} | {100 * ms / dense_ms:.2f}% |")
        print("\n".join(lines[-3 - len(times) :]), flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiles", type=int, nargs="+", default=[16, 32])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_pipeline needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    inputs = _inputs(torch.device("cuda"))
    dense_ms = _dense_ms(*inputs)
    report = [f"dense cuDNN SDPA: {dense_ms:.2f} ms (S={inputs[0].shape[2]}, H={HEADS}, D=128, bf16)"]
    for tile in args.tiles:
        report += profile_estimator(inputs, PooledTiles(tile_size=tile, outliers=True), args.sparsity, args.repeats,
                                    dense_ms)  # fmt: skip
        torch.cuda.empty_cache()
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
