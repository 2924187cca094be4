"""Time every stage of the Triton pipeline, for every estimator, at real video sizes, beside cuDNN dense SDPA.

Owns the per-stage cost report of `attention.SparseAttention` with the Triton implementation. For each case (Wan 2.1
14B 720p: grid 21x45x80, 40 heads; HunyuanVideo 720p: grid 33x45x80 + 256 text tokens last, 128 of them padding,
24 heads; head dim 128, bfloat16, Q/K/V as transposed views of (B, S, H, D) buffers like a DiT's) it times, in one
run and on the same inputs (`spattn_compile.testing.dit_attention_inputs`, a few heads repeated to the full count):

    dense SDPA        `F.scaled_dot_product_attention` (cuDNN where it takes the call)
    prepare           the pooled statistics at the estimator's tile (one Triton kernel, one read of Q, K, V, no copies)
    scores            the estimator's kernel(s) -> P_hat
    select            GAPR's gate + the per-row selection (Triton)
    estimate+select   scores + select (the issue's "estimation + selection")
    attention         the block-sparse attention kernel on the plan (default rectify)
    pipeline          the whole call, fresh plan; cached: the same with a given plan

with `triton.testing.do_bench` (CUDA events, median), and prints milliseconds, the share of the dense time and the peak
extra memory. The table is printed last.

Run: `python benchmarks/bench_pipeline_stages.py [--cases wan14b hunyuan] [--sparsity 0.9]` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spattn_compile.attention import SparseAttention  # noqa: E402
from spattn_compile.call_layout import CallLayout  # noqa: E402
from spattn_compile.config import SparseAttentionConfig  # noqa: E402
from spattn_compile.estimators import EstimatorConfig, PooledTiles, QueryTiles, SampledRows  # noqa: E402
from spattn_compile.implementations import make_implementation  # noqa: E402
from spattn_compile.testing import dit_attention_inputs  # noqa: E402

CASES = {
    "wan14b": dict(grid=(21, 45, 80), heads=40, text_len=0, text_padding=0),
    "hunyuan": dict(grid=(33, 45, 80), heads=24, text_len=256, text_padding=128),
}
ESTIMATORS: tuple[EstimatorConfig, ...] = (
    PooledTiles(tile_size=16, outliers=True),
    PooledTiles(tile_size=32, outliers=True),
    QueryTiles(tile_size=16),
    QueryTiles(tile_size=32),
    SampledRows(rows=8),
    SampledRows(rows=4),
    PooledTiles(tile_size=32, outliers=False),
)
_GENERATED_HEADS = 4


def case_inputs(case: dict, device: torch.device):
    generated = dit_attention_inputs(
        case["grid"],
        heads=_GENERATED_HEADS,
        head_dim=128,
        text_len=case["text_len"],
        text_padding=case["text_padding"],
        dtype=torch.bfloat16,
        device=device,
    )
    repeat = -(-case["heads"] // _GENERATED_HEADS)
    tensors = (generated.query, generated.key, generated.value)
    full = [t.repeat(1, repeat, 1, 1)[:, : case["heads"]].transpose(1, 2).contiguous().transpose(1, 2) for t in tensors]
    return full, generated.attn_mask


def _bench(fn, *, warmup_ms: int = 50, rep_ms: int = 200) -> tuple[float, int]:
    """Median milliseconds of `fn` and its peak memory above what was allocated before it (bytes)."""
    import triton

    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return ms, extra


def _dense(query, key, value, mask):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)

    try:
        cudnn()
        return cudnn, "cuDNN"
    except RuntimeError:
        return (lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask)), "default"


def _label(estimator: EstimatorConfig) -> str:
    fields = ", ".join(f"{f.name}={getattr(estimator, f.name)}" for f in dataclasses.fields(estimator))
    return f"{estimator.name}({fields})"


def _call(inputs, mask, case: dict, config: SparseAttentionConfig) -> SparseAttention:
    """The orchestrator of the case's call with the Triton implementation."""
    layout = CallLayout(tuple(case["grid"]), case["text_len"], False)
    return SparseAttention(
        *inputs, layout, attn_mask=mask, scale=None, config=config, implementation=make_implementation("triton")
    )


def _time_estimator(inputs, mask, case: dict, config: SparseAttentionConfig) -> tuple[float, float, float, int]:
    """Milliseconds of prepare, scores and select for `config.estimator`, and the scores' peak extra memory."""
    call = _call(inputs, mask, case, config)
    tile = config.estimator.pool_tile_size(config.block_size)
    outliers = config.estimator.reads_tile_outliers
    prepare_ms, _ = _bench(lambda: call.prepare(tile, outliers))
    prepared = call.prepare(tile, outliers)
    scores_ms, scores_mem = _bench(lambda: call.estimate(prepared))
    scores = call.estimate(prepared)
    select_ms, _ = _bench(lambda: call.select(prepared, scores, label="x"))
    return prepare_ms, scores_ms, select_ms, scores_mem


def run_case(name: str, case: dict, sparsity: float, rectify: str) -> list[str]:
    started = time.time()
    (query, key, value), mask = case_inputs(case, torch.device("cuda"))
    batch, heads, seq_len, head_dim = query.shape
    print(f"# {name}: S={seq_len}, H={heads}, D={head_dim} ({time.time() - started:.0f} s to build)", flush=True)
    dense_fn, backend = _dense(query, key, value, mask)
    dense_ms, _ = _bench(dense_fn)
    lines = [
        f"\n## {name}: grid {case['grid']} + {case['text_len']} text ({case['text_padding']} padded), S={seq_len}, "
        f"H={heads}, D=128, bf16; sparsity {sparsity}, rectify {rectify}; dense SDPA ({backend}) {dense_ms:.2f} ms\n",
        "| estimator | prepare ms | scores ms | select ms | estimate+select ms | % of dense | scores extra MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for estimator in ESTIMATORS:
        config = SparseAttentionConfig(sparsity=sparsity, rectify=rectify, estimator=estimator)
        prepare_ms, scores_ms, select_ms, scores_mem = _time_estimator((query, key, value), mask, case, config)
        total = scores_ms + select_ms
        line = (
            f"| {_label(estimator)} | {prepare_ms:.2f} | {scores_ms:.2f} | {select_ms:.2f} | {total:.2f} | "
            f"{100 * total / dense_ms:.2f}% | {scores_mem / 2**20:.0f} |"
        )
        lines.append(line)
        print(line, flush=True)
        torch.cuda.empty_cache()

    config = SparseAttentionConfig(sparsity=sparsity, rectify=rectify)
    inputs = (query, key, value)

    def pipeline():
        call = _call(inputs, mask, case, config)
        return call.run(call.plan())

    plan = _call(inputs, mask, case, config).plan()
    pipeline_ms, pipeline_mem = _bench(pipeline)
    # The plan carries its layout.
    cached_ms, _ = _bench(lambda: _call(inputs, mask, case, config).run(plan))
    call = _call(inputs, mask, case, config)
    prepared = call.prepare()
    attention_ms, _ = _bench(lambda: call.attend(prepared, plan))
    lines += [
        "",
        f"default estimator {_label(config.estimator)}: kept density {float(plan.density().mean()):.3f}; "
        f"attention kernel {attention_ms:.2f} ms ({dense_ms / attention_ms:.2f}x dense); whole pipeline "
        f"{pipeline_ms:.2f} ms ({dense_ms / pipeline_ms:.2f}x dense, peak extra {pipeline_mem / 2**30:.2f} GiB); "
        f"with a cached plan {cached_ms:.2f} ms ({dense_ms / cached_ms:.2f}x dense)",
    ]
    print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--rectify", default=SparseAttentionConfig().rectify, choices=["none", "block", "query"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_pipeline_stages needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    report = []
    for name in args.cases:
        report += run_case(name, CASES[name], args.sparsity, args.rectify)
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
