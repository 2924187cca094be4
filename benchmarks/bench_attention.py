"""Speed of the block-sparse attention kernel against cuDNN dense SDPA and FlexAttention on the identical block mask.

Owns the kernel benchmark (docs/DESIGN.md): bf16, head dim 128, batch 1, at the video shapes of
Wan 2.1 1.3B (32,760 tokens, 12 heads), Wan 2.1 14B (75,600 tokens, 40 heads) and HunyuanVideo (118,800 video + 256
text tokens, a third of the text padded, 24 heads), at densities 25%, 10% and 5%. For each it times, side by side in
one process (triton.testing.do_bench medians, the variants interleaved over rounds; the median of the rounds):

    dense     cuDNN SDPA (SDPBackend.CUDNN_ATTENTION) over the S real tokens, no mask (a lower bound on dense time)
    flex      FlexAttention (torch.compile'd) with a BlockMask built from the same kv_counts / kv_indices: blocks with
              a masked key are partial blocks (mask_mod reads the key-validity vector), the others full blocks
    ours      the kernel alone, rectify "none", on the same plan and key-validity mask (text query blocks scheduled
              first, `priority_query_blocks`)
    +scatter  the same, storing through `out_index` into a (B, S, H, D) buffer (the fused inverse reorder)
    gathered  the same, reading Q, K, V from (B, S, H, D) inputs in the original order through the layout's row index
              (no canonical copies), storing as +scatter
    block     rectify "block" (epilogue R * O + c)
    query     rectify "query" with every skipped non-empty video block trusted (the most virtual keys: upper bound)
    text rows not first   (shapes with text) ours without `priority_query_blocks`
    pipeline  the whole sparse pipeline as the compiled model runs it (`attention.SparseAttention`, Triton):
              (B, S, H, D)-strided inputs in the original token order, Hilbert reorder + pooling, hierarchical
              scoring + selection at the same target density (its own plan, from the inputs' scores, so its
              density is printed), block rectification with GAPR, attention, inverse reorder into the output
    cached    the same with the plan given (a step that reuses a cached plan: no scoring or selection)

The plan: per query block, the diagonal block plus the top-scoring video key blocks of uniform random scores up to
`ceil(density * NB)` video blocks (so the density is exact), plus every text block; text query rows keep all blocks
(`policies.topk.select_blocks`). TFLOP/s count the executed work: 4 * BS^2 * D flops per kept (query block, key block)
pair per head (2 for QK^T, 2 for PV); dense counts 4 * S^2 * D per head. "of ideal" is our TFLOP/s over cuDNN's dense
TFLOP/s, i.e. (dense time * kept share of the work) / our time.

Run on a GPU: `python benchmarks/bench_attention.py [--check] [--quick] [--sweep]`. `--check` first compares our output
with FlexAttention's (all real rows) and both with an fp32 SDPA on an explicit dense mask (first query rows of one
head), as bf16 relative errors. `--sweep` also times every tile configuration of the autotuner at one shape.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataclasses  # noqa: E402

from spattn_compile import reference  # noqa: E402
from spattn_compile.attention import SparseAttention  # noqa: E402
from spattn_compile.call_layout import CallLayout  # noqa: E402
from spattn_compile.config import SparseAttentionConfig  # noqa: E402
from spattn_compile.implementations import make_implementation  # noqa: E402
from spattn_compile.kernels import block_sparse_attention as bsa  # noqa: E402
from spattn_compile.layout import token_layout  # noqa: E402
from spattn_compile.plan import SparsePlan, indices_from_mask  # noqa: E402
from spattn_compile.policies.rectification import block_rectification  # noqa: E402
from spattn_compile.policies.topk import select_blocks  # noqa: E402

# Everything runs on the GPU; a smoke test may point this at the CPU (Triton interpreter, tiny shapes).
DEVICE = "cuda"
BLOCK_SIZE = 128
HEAD_DIM = 128
# (name, video grid, heads, text tokens, padded text tokens)
SHAPES = [
    ("wan1.3b-480p", (21, 30, 52), 12, 0, 0),
    ("wan14b-720p", (21, 45, 80), 40, 0, 0),
    ("hunyuan-720p", (33, 45, 80), 24, 256, 85),
]
DENSITIES = (0.25, 0.10, 0.05)


def _estimate_ms(fn) -> float:
    """Milliseconds of one call of `fn`, after a first call that compiles / autotunes outside the timing."""
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop)


def _bench(fn, quick: bool) -> float:
    """Median milliseconds of `fn` (triton.testing.do_bench, which flushes the L2 cache between runs)."""
    import triton.testing

    estimate = _estimate_ms(fn)
    # At least ~10 timed runs, more for short kernels; warm-up of a few runs.
    rep = max(estimate * (5 if quick else 10), 60 if quick else 200)
    return triton.testing.do_bench(fn, warmup=max(3 * estimate, 25), rep=rep, return_mode="median")


def _bench_interleaved(fns: dict, quick: bool) -> dict[str, float]:
    """Median milliseconds of each function, timed in rounds (A B C, B C A, C A B, ...) so that slow drifts of the
    GPU clock (seen here: +-5% between minutes) fall on every variant alike. Each round is a do_bench median."""
    import triton.testing

    estimates = {}
    for name, fn in fns.items():
        estimates[name] = _estimate_ms(fn)
    rounds = 2 if quick else 3
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            estimate = estimates[name]
            rep = max(4 * estimate, 40 if quick else 100)
            samples[name].append(
                triton.testing.do_bench(fns[name], warmup=max(estimate, 10), rep=rep, return_mode="median")
            )
    return {name: statistics.median(values) for name, values in samples.items()}


def _measure_ceilings() -> tuple[float, float]:
    """Device-to-device copy bandwidth (GB/s, bytes read + written) and an 8192^3 bf16 matmul rate (TFLOP/s)."""
    import triton.testing

    source = torch.randn(1 << 29, device=DEVICE, dtype=torch.bfloat16)  # 1 GiB
    target = torch.empty_like(source)
    copy_ms = triton.testing.do_bench(lambda: target.copy_(source), return_mode="median")
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * (1 << 30) / copy_ms / 1e6, 2 * 8192**3 / mm_ms / 1e9


class Problem:
    """Canonical-layout inputs of one shape: q, k, v (1, H, P, D) bf16 with zero padding rows, key validity."""

    def __init__(self, name: str, grid, heads: int, text_len: int, text_padding: int, seed: int = 0):
        self.name = name
        self.layout = layout = token_layout(grid, text_len, False, BLOCK_SIZE)
        self.heads = heads
        generator = torch.Generator(device=DEVICE).manual_seed(seed)
        padded, device = layout.padded_len, torch.device(DEVICE)
        source = layout.source_index.to(device)
        self.real_rows = source >= 0

        def sample() -> torch.Tensor:
            x = torch.randn(1, heads, padded, HEAD_DIM, generator=generator, device=device, dtype=torch.bfloat16)
            return x.masked_fill(~self.real_rows[:, None], 0)

        self.q, self.k, self.v = sample(), sample(), sample()
        valid = self.real_rows.clone()
        if text_padding:
            text_end = layout.text_offset + text_len
            valid[text_end - text_padding : text_end] = False
        self.key_valid_row = valid
        self.key_valid = valid[None, None].expand(1, heads, -1)
        self.out_index = source
        self.scale = 1.0 / math.sqrt(HEAD_DIM)
        self.seq_len = layout.seq_len
        self.nonempty = self.key_valid.reshape(1, heads, layout.num_blocks, BLOCK_SIZE).any(-1)
        # The whole pipeline's inputs: original token order, (B, S, H, D) memory as a DiT's projections make them.
        self.grid, self.text_len = tuple(grid), text_len
        self.original = tuple(
            torch.randn(
                1, layout.seq_len, heads, HEAD_DIM, generator=generator, device=device, dtype=torch.bfloat16
            ).transpose(1, 2)
            for _ in range(3)
        )
        self.attn_mask = None
        if text_padding:
            self.attn_mask = torch.ones(1, 1, 1, layout.seq_len, dtype=torch.bool, device=device)
            self.attn_mask[..., layout.seq_len - text_padding :] = False

    def plan(self, density: float, seed: int = 1):
        layout = self.layout
        generator = torch.Generator(device=DEVICE).manual_seed(seed)
        nb = layout.num_video_blocks
        scores = torch.rand(1, self.heads, nb, nb + 1, generator=generator, device=DEVICE)
        keep = select_blocks(scores, layout, density=density, key_block_nonempty=self.nonempty)
        return keep


def _flex_block_mask(problem: Problem, keep: torch.Tensor):
    """FlexAttention BlockMask with the same kept blocks: full blocks where every key is valid, partial blocks
    (mask_mod reads key validity) where some key is masked."""
    from torch.nn.attention.flex_attention import BlockMask

    has_masked_key = (~problem.key_valid_row).reshape(-1, BLOCK_SIZE).any(-1)
    partial_counts, partial_indices = indices_from_mask(keep & has_masked_key)
    full_counts, full_indices = indices_from_mask(keep & ~has_masked_key)
    valid = problem.key_valid_row

    # The compiled kernel evaluates mask_mod only inside partial blocks and skips unlisted blocks, but eager
    # FlexAttention defines the mask by mask_mod alone: encode the block plan in it too, so both agree.
    def key_is_valid(b, h, q_idx, kv_idx):
        return keep[b, h, q_idx // BLOCK_SIZE, kv_idx // BLOCK_SIZE] & valid[kv_idx]

    kwargs = {}
    if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["seq_lengths"] = (problem.layout.padded_len, problem.layout.padded_len)
    return BlockMask.from_kv_blocks(
        partial_counts,
        partial_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=BLOCK_SIZE,
        mask_mod=key_is_valid,
        **kwargs,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _dense_rows_reference(problem: Problem, keep: torch.Tensor, rows: int, head: int = 0) -> torch.Tensor:
    """fp32 SDPA of the first `rows` canonical query rows of one head on the explicit dense mask of the plan."""
    allowed = keep[0, head, : rows // BLOCK_SIZE].repeat_interleave(BLOCK_SIZE, 0).repeat_interleave(BLOCK_SIZE, 1)
    allowed = allowed & problem.key_valid_row[None]
    q = problem.q[:, head : head + 1, :rows].float()
    k, v = (t[:, head : head + 1].float() for t in (problem.k, problem.v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[None, None], scale=problem.scale)


def _rectify_args(problem: Problem, keep: torch.Tensor, rectify: str) -> dict:
    """Block or query mode inputs with every skipped non-empty video block trusted; pooled statistics from the
    reference (fp32)."""
    if rectify == "none":
        return {}
    layout = problem.layout
    nb, nq = layout.num_video_blocks, layout.num_blocks
    q, k, v = (t.float() for t in (problem.q, problem.k, problem.v))
    stats = reference.pool_statistics(q, k, v, problem.key_valid, layout, BLOCK_SIZE)
    trusted = torch.zeros(1, problem.heads, nq, nb, dtype=torch.bool, device=DEVICE)
    trusted[..., :nb, :] = ~keep[..., :nb, :nb] & problem.nonempty[..., None, :nb]
    trusted_counts, trusted_indices = indices_from_mask(trusted)
    if rectify == "block":
        scores = torch.rand(1, problem.heads, nb, nb + 1, device=DEVICE)
        scores = scores / scores.sum(-1, keepdim=True)
        counts, indices = indices_from_mask(keep)
        plan = SparsePlan(layout, counts, indices, trusted_counts, trusted_indices, scores, "random")
        rescale, correction = block_rectification(plan, stats, nq)
        return {"rescale": rescale, "correction": correction}
    return {
        "trusted_counts": trusted_counts,
        "trusted_indices": trusted_indices,
        "k_block": stats.k_block.to(torch.bfloat16),
        "v_block": stats.v_block.to(torch.bfloat16),
        "k_block_log_count": stats.k_block_count.log(),
    }


def _dense_sdpa(heads: int, seq: int):
    """cuDNN SDPA over `seq` real tokens, no mask, as a callable; None (with the reason printed) if cuDNN attention
    cannot run here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, heads, seq, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    try:
        run()
    except RuntimeError as error:
        print(f"cuDNN SDPA failed: {error}")
        return None
    return run


def _time_density(problem: Problem, density: float, flex, dense, args, sweep: bool) -> dict:
    """Check (optionally) and time every variant on one plan; returns one table row."""
    layout = problem.layout
    keep = problem.plan(density)
    kv_counts, kv_indices = indices_from_mask(keep)
    kept_flops = 4 * int(kv_counts.sum()) * BLOCK_SIZE**2 * HEAD_DIM
    dense_flops = 4 * problem.seq_len**2 * HEAD_DIM * problem.heads
    name = f"{problem.name} d={density:.2f}"

    def ours(rectify="none", extra=None, out_index=None, out=None, tile_config=None, priority=None):
        return bsa.block_sparse_attention(
            problem.q,
            problem.k,
            problem.v,
            kv_counts,
            kv_indices,
            scale=problem.scale,
            block_size=BLOCK_SIZE,
            key_valid=problem.key_valid,
            rectify=rectify,
            out_index=out_index,
            out=out,
            priority_query_blocks=layout.num_text_blocks if priority is None else priority,
            tile_config=tile_config,
            **(extra or {}),
        )

    run_flex = None
    try:
        block_mask = _flex_block_mask(problem, keep)

        def run_flex():
            return flex(problem.q, problem.k, problem.v, block_mask=block_mask, scale=problem.scale)

        run_flex()
    except Exception as error:  # noqa: BLE001  (record why FlexAttention could not run, keep timing ours)
        print(f"{name}: FlexAttention failed: {type(error).__name__}: {error}")
        run_flex = None

    if args.check:
        mine = ours().float()
        real = problem.real_rows
        check_rows = 8 * BLOCK_SIZE
        truth = _dense_rows_reference(problem, keep, check_rows)
        line = f"check {name}: ours vs fp32 SDPA(mask) {_rel(mine[:, :1, :check_rows], truth):.2e}"
        if run_flex is not None:
            theirs = run_flex().float()
            line += f", flex vs fp32 SDPA(mask) {_rel(theirs[:, :1, :check_rows], truth):.2e}"
            line += f", ours vs flex (all real rows) {_rel(mine[:, :, real], theirs[:, :, real]):.2e}"
        print(line)

    buffer = torch.empty(1, problem.seq_len, problem.heads, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    block_args = _rectify_args(problem, keep, "block")
    query_args = _rectify_args(problem, keep, "query")
    virtual_per_row = int(query_args["trusted_counts"].sum()) / (problem.heads * layout.num_video_blocks)
    variants = {
        "ours": ours,
        "flex": run_flex,
        "dense": dense,
        "scatter": lambda: ours(out_index=problem.out_index, out=buffer.transpose(1, 2)),
        # Q, K, V read straight from the (B, S, H, D) inputs through the layout's row index: no canonical copies.
        "gathered": lambda: bsa.block_sparse_attention(
            *problem.original,
            kv_counts,
            kv_indices,
            scale=problem.scale,
            block_size=BLOCK_SIZE,
            key_valid=problem.key_valid,
            row_index=problem.out_index,
            out=buffer.transpose(1, 2),
            priority_query_blocks=layout.num_text_blocks,
        ),
        "block": lambda: ours("block", block_args),
        "query": lambda: ours("query", query_args),
    }
    pipeline_config = SparseAttentionConfig(block_size=BLOCK_SIZE, min_seq_len=0, max_density=max(0.5, density))

    call_layout = CallLayout(layout.video_grid, layout.num_text, layout.text_first)
    triton = make_implementation("triton")

    def call() -> SparseAttention:
        return SparseAttention(
            *problem.original, call_layout, attn_mask=problem.attn_mask, scale=None, config=pipeline_config,
            implementation=triton,
        )  # fmt: skip

    def pipeline():
        attention = call()
        plan = attention.plan(selection=dataclasses.replace(attention.selection, density=density))
        return attention.run(plan), plan

    _, pipeline_plan = pipeline()
    pipeline_density = float(pipeline_plan.density().mean())
    variants["pipeline"] = pipeline
    variants["cached"] = lambda: call().run(pipeline_plan)
    if layout.num_text_blocks:
        # The text query rows attend to every block: without scheduling them first they may finish last.
        variants["no_priority"] = lambda: ours(priority=0)
    times = _bench_interleaved({k: fn for k, fn in variants.items() if fn is not None}, args.quick)
    times = {k: times.get(k, math.nan) for k in variants}
    config = bsa.chosen_tile_config()
    row = {
        "shape": problem.name,
        "density": density,
        "work": kept_flops / dense_flops,
        **times,
        "ours_tflops": kept_flops / times["ours"] / 1e9,
        "flex_tflops": kept_flops / times["flex"] / 1e9,
        "dense_tflops": dense_flops / times["dense"] / 1e9,
        "pipeline_density": pipeline_density,
    }
    line = (
        f"  d={density:.2f} work {row['work']:.3f}: ours {times['ours']:.2f} ms ({row['ours_tflops']:.0f} TFLOP/s, "
        f"{config}), flex {times['flex']:.2f} ms ({row['flex_tflops']:.0f}), dense {times['dense']:.2f} ms, "
        f"+scatter {times['scatter']:.2f}, gathered reads {times['gathered']:.2f}, block {times['block']:.2f}, "
        f"query {times['query']:.2f} "
        f"({virtual_per_row:.0f} virtual keys/row)"
    )
    if "no_priority" in times:
        line += f", text rows not scheduled first {times['no_priority']:.2f}"
    line += (
        f"; pipeline {times['pipeline']:.2f} ms at video density {pipeline_density:.3f}, with a cached plan "
        f"{times['cached']:.2f} ms"
    )
    print(line)
    if sweep:
        # Diagnostic only (wrong where keys are padding): the cost of the key-validity select in the inner loop.
        no_mask_ms = _bench(
            lambda: bsa.block_sparse_attention(
                problem.q, problem.k, problem.v, kv_counts, kv_indices, scale=problem.scale, block_size=BLOCK_SIZE
            ),
            args.quick,
        )
        print(f"  without key_valid (timing only): {no_mask_ms:.3f} ms")
        print("  tile sweep (rectify none):")
        for candidate in bsa.autotune_configs():
            tile = bsa.TileConfig.of(candidate)
            if BLOCK_SIZE % tile.block_m or BLOCK_SIZE % tile.block_n:
                continue
            try:
                ms = _bench(lambda tile=tile: ours(tile_config=tile), args.quick)
                print(f"    {tile}: {ms:.3f} ms, {kept_flops / ms / 1e9:.0f} TFLOP/s")
            except Exception as error:  # noqa: BLE001  (a tile may not fit this GPU: report it and go on)
                print(f"    {tile}: failed: {type(error).__name__}: {str(error)[:200]}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, one density, short timing")
    parser.add_argument("--check", action="store_true", help="verify outputs before timing")
    parser.add_argument("--sweep", action="store_true", help="time every tile configuration at the first shape")
    parser.add_argument("--shapes", nargs="*", help="subset of shape names")
    parser.add_argument("--densities", nargs="*", type=float, help="subset of densities")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU")

    import triton
    from torch.nn.attention.flex_attention import flex_attention

    props = torch.cuda.get_device_properties(0)
    print(
        f"# {datetime.date.today()} {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"triton {triton.__version__}"
    )
    copy_gbs, mm_tflops = _measure_ceilings()
    print(f"ceilings: device copy {copy_gbs:.0f} GB/s (read+write), bf16 8192^3 matmul {mm_tflops:.0f} TFLOP/s")

    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes]
    densities = list(args.densities or DENSITIES)
    if args.quick:
        shapes, densities = shapes[:1], [0.10]

    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for index, (name, grid, heads, text_len, text_padding) in enumerate(shapes):
        problem = Problem(name, grid, heads, text_len, text_padding)
        dense = _dense_sdpa(heads, problem.seq_len)
        print(f"{name}: S={problem.seq_len} P={problem.layout.padded_len} H={heads}")
        for density in densities:
            sweep = args.sweep and index == 0 and density == densities[0]
            rows.append(_time_density(problem, density, flex, dense, args, sweep))
            torch.cuda.empty_cache()
        del problem
        torch.cuda.empty_cache()

    header = (
        "| shape | density | work | cuDNN dense ms | flex ms | ours ms | ours TFLOP/s | flex TFLOP/s | ours/flex speed "
        "| dense/ours | of ideal | +scatter ms | gathered ms | block ms | query ms | text rows not first ms "
        "| pipeline ms | pipeline density | dense/pipeline | cached-plan pipeline ms | dense/cached |"
    )
    print()
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(
            f"| {r['shape']} | {r['density']:.2f} | {r['work']:.3f} | {r['dense']:.2f} | {r['flex']:.2f} | "
            f"{r['ours']:.2f} | {r['ours_tflops']:.0f} | {r['flex_tflops']:.0f} | {r['flex'] / r['ours']:.2f}x | "
            f"{r['dense'] / r['ours']:.2f}x | {r['ours_tflops'] / r['dense_tflops']:.0%} | {r['scatter']:.2f} | "
            f"{r['gathered']:.2f} | "
            f"{r['block']:.2f} | {r['query']:.2f} | {r.get('no_priority', math.nan):.2f} | {r['pipeline']:.2f} | "
            f"{r['pipeline_density']:.3f} | {r['dense'] / r['pipeline']:.2f}x | {r['cached']:.2f} | "
            f"{r['dense'] / r['cached']:.2f}x |"
        )


if __name__ == "__main__":
    main()
