"""Time every stage of the Triton pipeline at real video sizes, side by side with cuDNN dense SDPA, on one GPU.

Owns the per-stage cost report of `spattn_compile.kernels.pipeline`: for each case (Wan 2.1 14B 720p: grid 21x45x80,
40 heads; HunyuanVideo 720p: grid 33x45x80 + 256 padded text tokens last, 24 heads; head dim 128, bfloat16) it times,
in one run and on the same inputs,

    reorder+pool      gather Q, K, V into the canonical layout + pooled statistics (one Triton kernel)
    block scores      hierarchical tile scores -> P_hat (Triton)
    gapr gate         GAPR's test for every block pair (Triton)
    select            per-row sort, budget / mass threshold, index lists (Triton)
    score+select      the three above, as the pipeline calls them
    rectification     block mode's R and c (torch ops on (B, H, NB, NB) tensors)
    attention         the block-sparse attention kernel on the plan, writing the original order
    pipeline          the whole `triton_sparse_attention`
    dense SDPA        `F.scaled_dot_product_attention` (cuDNN where it takes the call, else PyTorch's choice)

with `triton.testing.do_bench` (CUDA events, median), and prints milliseconds, the share of dense SDPA time, and the
peak extra memory of each stage (`torch.cuda.max_memory_allocated` over what was allocated before it). Inputs are
video-like (`spattn_compile.testing.video_attention_inputs`), generated for a few heads and repeated to the full head
count (the timing depends on the shapes, the generator's cost on the CPU grows with the heads).

Run: `python benchmarks/bench_pipeline_stages.py [--cases wan14b hunyuan] [--sparsity 0.75 0.9]` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from spattn_compile import reference
from spattn_compile.config import SparseAttentionConfig
from spattn_compile.kernels import reorder_pool as reorder_pool_module
from spattn_compile.kernels import score_select as score_select_module
from spattn_compile.kernels.block_sparse_attention import block_sparse_attention
from spattn_compile.kernels.pipeline import triton_sparse_attention
from spattn_compile.kernels.reorder_pool import reorder_pool
from spattn_compile.kernels.score_select import block_scores, gapr_gate, score_select, select_plan
from spattn_compile.layout import token_layout

CASES = {
    "wan14b": dict(grid=(21, 45, 80), heads=40, text_len=0, text_padding=0),
    "hunyuan": dict(grid=(33, 45, 80), heads=24, text_len=256, text_padding=128),
}
_GENERATED_HEADS = 4


def _inputs(case: dict, device: torch.device):
    """Video-like bf16 Q, K, V as transposed views of (B, S, H, D) buffers (a DiT's layout), and the key mask."""
    try:
        from spattn_compile.testing import video_attention_inputs
    except ImportError:
        video_attention_inputs = None
    heads = case["heads"]
    if video_attention_inputs is not None:
        generated = video_attention_inputs(
            case["grid"],
            heads=_GENERATED_HEADS,
            head_dim=128,
            text_len=case["text_len"],
            text_first=False,
            text_padding=case["text_padding"],
            dtype=torch.bfloat16,
            device=device,
        )
        tensors = (generated.query, generated.key, generated.value)
        mask = generated.attn_mask
        source = "video-like"
    else:
        seq_len = math.prod(case["grid"]) + case["text_len"]
        tensors = tuple(
            torch.randn(1, _GENERATED_HEADS, seq_len, 128, device=device, dtype=torch.bfloat16) for _ in range(3)
        )
        mask = None
        if case["text_padding"]:
            mask = torch.ones(1, 1, 1, seq_len, device=device, dtype=torch.bool)
            mask[..., seq_len - case["text_padding"] :] = False
        source = "random"
    repeat = -(-heads // _GENERATED_HEADS)
    full = [t.repeat(1, repeat, 1, 1)[:, :heads].transpose(1, 2).contiguous().transpose(1, 2) for t in tensors]
    return full, mask, source


def _bench(fn, *, warmup_ms: int = 50, rep_ms: int = 300) -> tuple[float, int]:
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


def _best_config(autotuner) -> str:
    config = getattr(autotuner, "best_config", None)
    return "n/a" if config is None else f"{config.kwargs} warps={config.num_warps} stages={config.num_stages}"


def _dense(query, key, value, mask):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        backend = "cuDNN"

        def run():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)

    except RuntimeError:
        backend = "default"

        def run():
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)

    return run, backend


def _time_stages(query, key, value, mask, case: dict, config: SparseAttentionConfig, row) -> tuple[float, int, object]:
    """Time each stage at one setting; `row(stage, ms, extra_bytes)` records a line. Returns the pipeline's time, its
    peak extra memory and the plan."""
    batch, heads, seq_len, head_dim = query.shape
    scale = 1.0 / math.sqrt(head_dim)
    density = config.density
    layout = token_layout(case["grid"], case["text_len"], False, config.block_size, config.reorder)
    device_layout = layout.to(query.device)
    valid = reference.key_padding_valid(mask, batch, heads, seq_len)

    def pool():
        return reorder_pool(query, key, value, layout, tile_size=config.tile_size, key_valid=valid)

    row("reorder+pool", *_bench(pool))
    pooled = pool()
    row("  block scores", *_bench(lambda: block_scores(pooled.stats, pooled.k, pooled.key_valid, layout, scale)))
    row("  gapr gate", *_bench(lambda: gapr_gate(pooled.stats, pooled.key_block_count, layout)))
    scores = block_scores(pooled.stats, pooled.k, pooled.key_valid, layout, scale)
    gate = gapr_gate(pooled.stats, pooled.key_block_count, layout)
    row(
        "  select",
        *_bench(lambda: select_plan(scores, pooled.key_block_count, layout, density=density, config=config, gate=gate)),
    )

    def plan_fn():
        return score_select(
            pooled.stats,
            pooled.k,
            pooled.key_valid,
            pooled.key_block_count,
            layout,
            scale=scale,
            density=density,
            config=config,
        )

    row("score+select", *_bench(plan_fn))
    plan = plan_fn()
    rectification = {}
    if config.rectify == "block":
        row(
            "rectification (R, c)",
            *_bench(lambda: reference.block_rectification(plan, pooled.stats, layout.num_blocks)),
        )
        rescale, correction = reference.block_rectification(plan, pooled.stats, layout.num_blocks)
        rectification = {"rescale": rescale, "correction": correction}
    elif config.rectify == "query":
        rectification = {
            "trusted_counts": plan.trusted_counts,
            "trusted_indices": plan.trusted_indices,
            "k_block": pooled.stats.k_block,
            "v_block": pooled.stats.v_block,
            "k_block_log_count": pooled.stats.k_block_count.log(),
        }
    out = torch.empty_like(query)

    def attention_fn():
        return block_sparse_attention(
            pooled.q,
            pooled.k,
            pooled.v,
            plan.kv_counts,
            plan.kv_indices,
            scale=scale,
            block_size=layout.block_size,
            key_valid=pooled.key_valid,
            rectify=config.rectify,
            out_index=device_layout.source_index,
            out=out,
            **rectification,
        )

    row("attention kernel", *_bench(attention_fn))

    def pipeline_fn():
        return triton_sparse_attention(
            query,
            key,
            value,
            video_grid=case["grid"],
            text_len=case["text_len"],
            text_first=False,
            attn_mask=mask,
            scale=None,
            config=config,
        )

    ms, extra = _bench(pipeline_fn)
    row("**pipeline**", ms, extra)
    return ms, extra, plan


def run_case(name: str, case: dict, sparsities: list[float], rectify: str) -> list[str]:
    started = time.time()
    (query, key, value), mask, source = _inputs(case, torch.device("cuda"))
    batch, heads, seq_len, head_dim = query.shape
    print(
        f"# {name}: grid {case['grid']}, text {case['text_len']} (padding {case['text_padding']}), S={seq_len}, "
        f"H={heads}, D={head_dim}, bf16, {source} inputs ({time.time() - started:.0f} s to build)",
        flush=True,
    )
    dense_fn, backend = _dense(query, key, value, mask)
    dense_ms, dense_mem = _bench(dense_fn)
    canonical_bytes = 3 * query.numel() * query.element_size()
    lines = [
        f"\n## {name}: S={seq_len}, H={heads}, D={head_dim}, bf16, {source} inputs, rectify {rectify}; "
        f"dense SDPA ({backend}) {dense_ms:.2f} ms\n",
        "| sparsity | stage | ms | % of dense | peak extra memory (MiB) |",
        "|---|---|---|---|---|",
    ]

    def recorder(sparsity):
        def row(stage, ms, extra):
            line = f"| {sparsity} | {stage} | {ms:.3f} | {100 * ms / dense_ms:.2f}% | {extra / 2**20:.1f} |"
            lines.append(line)
            print(line, flush=True)

        return row

    recorder("-")(f"dense SDPA ({backend})", dense_ms, dense_mem)
    for sparsity in sparsities:
        config = SparseAttentionConfig(sparsity=sparsity, rectify=rectify)
        ms, extra, plan = _time_stages(query, key, value, mask, case, config, recorder(sparsity))
        nb = plan.num_video_blocks
        kept = float(plan.density().mean())
        trusted = float(plan.trusted_counts[..., :nb].float().mean() / nb)
        note = (
            f"sparsity {sparsity}: kept density {kept:.3f}, trusted share {trusted:.3f}; autotuned reorder+pool "
            f"{_best_config(reorder_pool_module._autotuned_reorder_pool)}, block scores "
            f"{_best_config(score_select_module._autotuned_scores)}; pipeline extra memory "
            f"{extra / 2**20:.0f} MiB vs {canonical_bytes / 2**20:.0f} MiB for the canonical Q, K, V copies; "
            f"speed-up over dense {dense_ms / ms:.2f}x"
        )
        lines.append(f"\n{note}\n")
        print(note, flush=True)
        del plan
        torch.cuda.empty_cache()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.75, 0.9])
    parser.add_argument("--rectify", default="block", choices=["none", "block", "query"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_pipeline_stages needs a CUDA GPU", file=sys.stderr)
        return 1
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    report = []
    for name in args.cases:
        report += run_case(name, CASES[name], args.sparsity, args.rectify)
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
