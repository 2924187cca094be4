"""One GPU run that checks and times every variant of the block-sparse attention kernel (issue 17, attention half).

Run on the H200 from the repository root: `python benchmarks/gpu_attention_explore.py` (about 3-4 minutes, compiles
included; `--budget-s` caps it). With `OUT` set, the full results also go to `$OUT/attention_explore.md`. On a CPU,
`--smoke` runs every section at a toy size under the Triton interpreter (float16; the interpreter cannot multiply
bfloat16), to prove that the script runs; its numbers mean nothing.

Sections, in order:

(a) correctness, bf16 on the GPU: Wan 2.1 1.3B's 21x30x52 grid, 2 heads, head dims 64, 96 and 128, without and with
    256 text tokens (a third of them masked, Hunyuan-like), every rectify mode, canonical and gathered reads, every
    variant timed below, against the float64 reference (`reference.rectified_sparse_attention`); the plan keeps 10% of
    the blocks (random scores through `reference.select_blocks`), 40% of the skipped non-empty video blocks are trusted.
    Relative errors are printed; any above 1e-2 is reported as FAIL and the script exits with status 1 at the end.
(b) timing, bf16, D = 128: Wan 2.1 14B 720p (21x45x80, 40 heads) and HunyuanVideo 720p (33x45x80 + 256 text tokens,
    85 of them masked, 24 heads), densities 0.25 and 0.10, rectify none and query (40% of the skipped blocks trusted);
    cuDNN dense SDPA (no mask, the `(B, S, H, D)` inputs), FlexAttention on the same block mask (compiled once per
    shape outside the timing, canonical inputs) and each kernel variant. Variants are timed in interleaved rounds (the
    order rotates); each round takes the median of several calls timed with CUDA events after one warm-up call, with
    the L2 cache flushed before each call as `triton.testing.do_bench` does; the result is the median over rounds.
(c) head dims 64 and 96 at a CogVideoX-5B-like shape (13x30x45 + 226 text tokens; 48 heads at D = 64, 32 heads at
    D = 96, a head dim no released model uses with this grid), density 0.10, against cuDNN at the same head dim.
(d) the op's extra memory in gathered mode (peak allocated during a launch with a preallocated output, over the bytes
    of Q, K and V), then a short table, printed last.

FLOP counts: a kept (query block, key block) pair costs 4 * BS^2 * D (QK^T and PV); a virtual key of query mode costs
4 * BS * D per query block (counted as work); dense is 4 * S^2 * D per head. "% cuDNN" is our FLOP rate over cuDNN's
dense rate in the same run; "floor" is the time our FLOPs would take at cuDNN's rate. Every kernel variant is compiled
before any timing, in parallel threads when `triton.AsyncCompileMode` exists.
"""

from __future__ import annotations

import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:
    # Before torch and triton are imported: the interpreter is chosen when triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import inspect  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spattn_compile import reference  # noqa: E402
from spattn_compile.kernels import block_sparse_attention as bsa  # noqa: E402
from spattn_compile.layout import TokenLayout, token_layout  # noqa: E402
from spattn_compile.plan import SparsePlan, indices_from_mask  # noqa: E402
from spattn_compile.policies import rectification_terms  # noqa: E402
from spattn_compile.policies.rectification import block_rectification  # noqa: E402
from spattn_compile.policies.topk import select_blocks  # noqa: E402

BLOCK = 16 if SMOKE else 128
DTYPE = torch.float16 if SMOKE else torch.bfloat16
DEVICE = torch.device("cpu" if SMOKE else "cuda")
TOLERANCE = 1e-2
TRUSTED_SHARE = 0.4


# --------------------------------------------------------------------------------------------------------------------
# Shapes, variants, budget
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    grid: tuple[int, int, int]
    heads: int
    head_dim: int
    text_len: int = 0
    text_masked: int = 0


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run the kernel: read mode, tiles, structural choices."""

    name: str
    reads: str  # "gathered" or "canonical"
    tile: bsa.TileConfig | None  # None: autotuned
    kernel: bsa.KernelVariant = bsa.KernelVariant()
    what: str = ""


def _variants(head_dim: int) -> dict[str, list[Variant]]:
    """The variants timed per rectify mode; the first of each list is the one expected to be best."""
    if SMOKE:
        tile = bsa.TileConfig(16, 16, 4, 1)
        gathered = Variant("G default", "gathered", tile, what="gathered reads")
        return {
            "none": [
                gathered,
                Variant("C default", "canonical", tile),
                Variant("C select", "canonical", tile, bsa.KernelVariant(key_mask="select")),
            ],
            "query": [gathered, Variant("G chunk32", "gathered", tile, bsa.KernelVariant(trusted_chunk=32))],
        }
    g5 = bsa.TileConfig(128, 128, 8, 5)
    c3 = bsa.TileConfig(128, 128, 8, 3)
    old = bsa.KernelVariant(key_mask="select", pooled_dtype="float32")
    default_gathered = Variant("G 128x128 s5", "gathered", g5, what="gathered reads, 3 K/V buffers (default)")
    none = [
        default_gathered,
        Variant("C 128x128 s3", "canonical", c3, what="canonical copies, masked V load"),
        Variant("old C select", "canonical", c3, old, what="previous kernel: V through registers"),
        Variant("G 128x128 s3", "gathered", c3, what="gathered, 2 K/V buffers"),
        Variant("G 64x64 w4 s5", "gathered", bsa.TileConfig(64, 64, 4, 5), what="2 programs per SM"),
        Variant("C 64x64 w4 s3", "canonical", bsa.TileConfig(64, 64, 4, 3), what="2 programs per SM"),
        Variant("G 128x64 s5", "gathered", bsa.TileConfig(128, 64, 8, 5), what="64-key steps"),
        # The autotuner's pick among the gathered candidates (each of them is checked explicitly in section a).
        Variant("G autotuned", "gathered", None, what="autotuned (timing only)"),
    ]
    query = [
        default_gathered,
        Variant("C 128x128 s3", "canonical", c3, what="canonical copies"),
        Variant("old C select f32", "canonical", c3, old, what="previous kernel: V via registers, fp32 pooled"),
        Variant("G pooled f32", "gathered", g5, bsa.KernelVariant(pooled_dtype="float32"), what="fp32 pooled K/V"),
        Variant("G chunk128", "gathered", g5, bsa.KernelVariant(trusted_chunk=128), what="128 virtual keys/step"),
        Variant("G 64x64 w4 s5", "gathered", bsa.TileConfig(64, 64, 4, 5), what="2 programs per SM"),
    ]
    if head_dim != 128:
        # Other head dims: the default and the two-programs-per-SM tiles, gathered reads only (fewer compiles).
        none, query = [none[0], none[4]], [query[0], query[5]]
    return {"none": none, "query": query}


class Budget:
    """Wall-clock budget of the run: sections ask how much is left and shrink their work."""

    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


# --------------------------------------------------------------------------------------------------------------------
# Problems: inputs, plans, launches
# --------------------------------------------------------------------------------------------------------------------


class Problem:
    """One shape's inputs: original-order `(1, S, H, D)` buffers viewed as `(1, H, S, D)` (what a DiT's projections
    give), canonical copies `(1, H, P, D)` (for canonical reads and FlexAttention), canonical key validity (padding
    rows and masked text keys False), pooled keys/values of the video blocks."""

    def __init__(self, shape: Shape, *, smooth: bool, seed: int = 0):
        self.shape = shape
        self.layout: TokenLayout = token_layout(shape.grid, shape.text_len, False, BLOCK).to(DEVICE)
        layout, heads, head_dim = self.layout, shape.heads, shape.head_dim
        generator = torch.Generator(device=DEVICE).manual_seed(seed)
        seq_len = layout.seq_len

        def sample() -> torch.Tensor:
            x = torch.randn(1, seq_len, heads, head_dim, generator=generator, device=DEVICE)
            if smooth:
                # A component constant over runs of 64 tokens, so that pooled blocks differ.
                runs = torch.randn(1, seq_len // 64 + 1, heads, head_dim, generator=generator, device=DEVICE)
                x += runs.repeat_interleave(64, 1)[:, :seq_len]
            return x.to(DTYPE).transpose(1, 2)

        self.original = (sample(), sample(), sample())
        self.canonical = tuple(reference.gather_canonical(t, layout).contiguous() for t in self.original)
        valid = torch.ones(1, 1, 1, seq_len, dtype=torch.bool, device=DEVICE)
        if shape.text_masked:
            valid[..., seq_len - shape.text_masked :] = False
        self.attn_mask = valid if shape.text_masked else None
        self.key_valid = reference.canonical_key_valid(valid[:, :, 0], layout, 1, 1, DEVICE).expand(1, heads, -1)
        self.key_valid_row = self.key_valid[0, 0]
        self.nonempty = self.key_valid.reshape(1, heads, layout.num_blocks, BLOCK).any(-1)
        self.scale = 1.0 / math.sqrt(head_dim)

    def qkv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.original)

    def plan(self, density: float, seed: int = 1) -> SparsePlan:
        """Random-score selection at `density` (text rows keep every block), and a trusted set of
        `TRUSTED_SHARE` of the skipped non-empty video blocks of every video query block."""
        layout, heads = self.layout, self.shape.heads
        nb = layout.num_video_blocks
        generator = torch.Generator(device=DEVICE).manual_seed(seed)
        scores = torch.rand(1, heads, nb, nb + 1, generator=generator, device=DEVICE)
        scores /= scores.sum(-1, keepdim=True)  # block mass shares, as the estimators give them
        keep = select_blocks(scores, layout, density=density, key_block_nonempty=self.nonempty)
        trusted = torch.zeros(1, heads, layout.num_blocks, nb, dtype=torch.bool, device=DEVICE)
        skipped = ~keep[:, :, :nb, :nb] & self.nonempty[:, :, None, :nb]
        trusted[:, :, :nb] = skipped & (torch.rand(skipped.shape, generator=generator, device=DEVICE) < TRUSTED_SHARE)
        kv_counts, kv_indices = indices_from_mask(keep)
        trusted_counts, trusted_indices = indices_from_mask(trusted)
        return SparsePlan(layout, kv_counts, kv_indices, trusted_counts, trusted_indices, scores, "random")


def _pooled(problem: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 means of the valid keys and values of each video block, and the log of their counts (the pooled
    statistics query mode reads; for timing, where only their shapes matter)."""
    layout = problem.layout
    nb = layout.num_video_blocks
    weight = problem.key_valid.float()[..., None]
    k, v = (
        t.float().mul(weight).unflatten(2, (layout.num_blocks, BLOCK)).sum(3)[:, :, :nb] for t in problem.canonical[1:]
    )
    count = problem.key_valid.float().unflatten(2, (layout.num_blocks, BLOCK)).sum(3)[:, :, :nb]
    return k / count.clamp(min=1)[..., None], v / count.clamp(min=1)[..., None], count.log()


def _launch(problem: Problem, plan: SparsePlan, rectify, variant: Variant, out: torch.Tensor) -> bsa.AttentionLaunch:
    layout = problem.layout
    gathered = variant.reads == "gathered"
    return bsa.AttentionLaunch(
        *(problem.original if gathered else problem.canonical),
        plan.kv_counts,
        plan.kv_indices,
        problem.scale,
        BLOCK,
        problem.key_valid,
        rectify,
        layout.source_index if gathered else None,
        layout.source_index,
        out,
        layout.num_text_blocks,
        variant.tile,
        variant.kernel,
    )


def _query_rectify(plan: SparsePlan, k_block, v_block, log_count) -> bsa.QueryRectify:
    return bsa.QueryRectify(plan.trusted_counts, plan.trusted_indices, k_block, v_block, log_count)


def _work_flops(problem: Problem, plan: SparsePlan, rectify: str) -> float:
    head_dim = problem.shape.head_dim
    flops = 4.0 * float(plan.kv_counts.sum()) * BLOCK * BLOCK * head_dim
    if rectify == "query":
        flops += 4.0 * float(plan.trusted_counts.sum()) * BLOCK * head_dim
    return flops


def _dense_flops(problem: Problem) -> float:
    return 4.0 * problem.layout.seq_len**2 * problem.shape.head_dim * problem.shape.heads


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    difference, norm = (out.double() - ref.double()).norm(), ref.double().norm()
    return float(difference / norm) if norm > 0 else (0.0 if difference == 0 else math.inf)


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------


class Timer:
    """do_bench's method without its 5-call estimate: per call, flush L2 (write a 256 MB buffer), record CUDA events
    around the call; a round is one warm-up call and the median of `calls` timed calls. On the CPU (smoke), wall
    clock."""

    def __init__(self):
        self.flush = None if SMOKE else torch.empty(64 << 20, dtype=torch.int32, device=DEVICE)

    def round(self, fn: Callable[[], object], calls: int) -> float:
        fn()
        times = []
        for _ in range(calls):
            if self.flush is None:
                start = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - start))
                continue
            self.flush.zero_()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        return statistics.median(times)

    def interleaved(self, fns: dict[str, Callable[[], object]], rounds: int, budget_ms: float) -> dict[str, float]:
        """Median over `rounds` rotated rounds; calls per round so that a round of all functions fits `budget_ms`."""
        first = {name: self.round(fn, 1) for name, fn in fns.items()}
        per_round = sum(first.values())
        calls = max(1, min(3, int(budget_ms / max(rounds * per_round, 1e-3)) - 1))
        samples: dict[str, list[float]] = {name: [first[name]] if rounds == 1 else [] for name in fns}
        names = list(fns)
        for index in range(rounds if rounds > 1 else 0):
            for name in names[index % len(names) :] + names[: index % len(names)]:
                samples[name].append(self.round(fns[name], calls))
        return {name: statistics.median(values) for name, values in samples.items()}


def _dense_call(problem: Problem) -> Callable[[], object] | None:
    q, k, v = problem.original
    if SMOKE:
        return lambda: F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    try:
        run()
    except RuntimeError as error:
        print(f"  cuDNN SDPA unavailable ({str(error)[:120]}); dense = default SDPA backend")
        return lambda: F.scaled_dot_product_attention(q, k, v)
    return run


def _flex_call(problem: Problem, plan: SparsePlan, flex) -> Callable[[], object] | None:
    """FlexAttention on the canonical inputs with the same kept blocks: blocks holding a masked key are partial
    (mask_mod reads key validity), the others full. Without `flex` (smoke) the mask is built but not used."""
    from torch.nn.attention.flex_attention import BlockMask

    keep = plan.to_dense()
    valid = problem.key_valid_row
    partial = (~valid).reshape(-1, BLOCK).any(-1)
    partial_counts, partial_indices = indices_from_mask(keep & partial)
    full_counts, full_indices = indices_from_mask(keep & ~partial)

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, h, q_idx // BLOCK, kv_idx // BLOCK] & valid[kv_idx]

    # Older releases have no seq_lengths (they infer the lengths from the block counts).
    padded = problem.layout.padded_len
    lengths = (
        {"seq_lengths": (padded, padded)}
        if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters
        else {}
    )
    block_mask = BlockMask.from_kv_blocks(
        partial_counts, partial_indices, full_counts, full_indices, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, **lengths
    )
    q, k, v = problem.canonical
    return None if flex is None else lambda: flex(q, k, v, block_mask=block_mask, scale=problem.scale)


# --------------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------------


def _precompile(launches: list[bsa.AttentionLaunch]) -> str:
    """Compile every launch's kernel before anything is timed: in parallel threads when Triton has
    AsyncCompileMode, else one after the other."""
    start = time.perf_counter()
    mode = getattr(triton, "AsyncCompileMode", None)
    how = "sequential"
    if mode is not None and not SMOKE:
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
                with mode(pool):
                    for launch in launches:
                        bsa.compile_attention(launch)
            how = "parallel"
        except Exception as error:  # noqa: BLE001  (fall back to compiling at first use)
            print(f"  parallel compile failed ({type(error).__name__}: {str(error)[:160]}); compiling sequentially")
    if how == "sequential":
        for launch in launches:
            bsa.compile_attention(launch)
    return f"{len(launches)} launches compiled ({how}) in {time.perf_counter() - start:.1f} s"


@dataclasses.dataclass
class CheckCase:
    problem: Problem
    plan: SparsePlan
    rectify_name: str
    rectify: bsa.BlockRectify | bsa.QueryRectify | None
    expected: torch.Tensor  # float64, original order
    variants: list[Variant]


def _check_cases(head_dims: tuple[int, ...]) -> list[CheckCase]:
    """Section (a)'s cases: per head dim and text setting, one plan and the float64 reference of each rectify mode."""
    cases = []
    grid = (2, 3, 5) if SMOKE else (21, 30, 52)
    for head_dim in head_dims:
        for text_len, masked in ((0, 0), (40, 13) if SMOKE else (256, 85)):
            name = "x".join(map(str, grid)) + ("+text" if text_len else "") + f" D={head_dim}"
            shape = Shape(name, grid, 1 if SMOKE else 2, head_dim, text_len, masked)
            problem = Problem(shape, smooth=True, seed=head_dim + text_len)
            plan = problem.plan(0.10, seed=head_dim)
            q64, k64, v64 = (t.double() for t in problem.canonical)
            stats = reference.pool_statistics(q64, k64, v64, problem.key_valid, problem.layout, BLOCK)
            variants = _variants(head_dim)
            for rectify in ("none", "block", "query"):
                terms = rectification_terms(rectify, plan, stats)
                expected = reference.rectified_sparse_attention(
                    q64, k64, v64, problem.key_valid, plan, problem.layout, scale=problem.scale, terms=terms
                )
                bundle: bsa.BlockRectify | bsa.QueryRectify | None = None
                if rectify == "block":
                    rescale, correction = block_rectification(plan, stats, problem.layout.num_blocks)
                    bundle = bsa.BlockRectify(rescale.float(), correction.float())
                if rectify == "query":
                    log_count = stats.k_block_count.log().float()
                    bundle = _query_rectify(plan, stats.k_block.float(), stats.v_block.float(), log_count)
                # Every variant that is timed; block mode (an epilogue only) with the defaults of both read modes.
                chosen = [v for v in variants["query" if rectify == "query" else "none"] if v.tile is not None]
                if rectify == "block":
                    chosen = [chosen[0], *[v for v in chosen if v.reads == "canonical"][:1]]
                cases.append(
                    CheckCase(
                        problem, plan, rectify, bundle, reference.scatter_canonical(expected, problem.layout), chosen
                    )
                )
    return cases


def _check(cases: list[CheckCase]) -> tuple[list[str], bool]:
    lines, ok = [], True
    for case in cases:
        problem = case.problem
        for variant in case.variants:
            out = torch.full_like(problem.original[0], math.nan)
            bsa.launch_attention(_launch(problem, case.plan, case.rectify, variant, out))
            error = _relative_error(out, case.expected)
            passed = error < TOLERANCE and not out.isnan().any()
            ok &= passed
            lines.append(
                f"| {problem.shape.name} | {case.rectify_name} | {variant.name} | {error:.2e} | "
                f"{'ok' if passed else 'FAIL'} |"
            )
    return lines, ok


@dataclasses.dataclass
class Row:
    shape: str
    density: float
    rectify: str
    variant: str
    ms: float
    tflops: float
    of_cudnn: float
    x_flex: float
    floor_ms: float
    what: str


def _time_shape(shape: Shape, densities, timer: Timer, budget: Budget, flex, rounds: int) -> list[Row]:
    problem = Problem(shape, smooth=False)
    layout = problem.layout
    print(f"{shape.name}: S={layout.seq_len} P={layout.padded_len} H={shape.heads} D={shape.head_dim}")
    k_block, v_block, log_count = _pooled(problem)
    out = torch.empty_like(problem.original[0])
    variants = _variants(shape.head_dim)
    plans = {density: problem.plan(density) for density in densities}
    launches = {
        (density, rectify, variant.name): _launch(
            problem,
            plan,
            _query_rectify(plan, k_block, v_block, log_count) if rectify == "query" else None,
            variant,
            out,
        )
        for density, plan in plans.items()
        for rectify, chosen in variants.items()
        for variant in chosen
    }
    print("  " + _precompile(list(launches.values())))
    dense = _dense_call(problem)
    dense_ms = None
    rows = []
    for density, plan in plans.items():
        left = budget.left()
        if left < 20 and density != densities[0]:
            print(f"  d={density}: skipped, {left:.0f} s of the budget left")
            continue
        fns: dict[str, Callable[[], object]] = {}
        if dense is not None and dense_ms is None:
            fns["dense"] = dense
        flex_fn = _flex_call(problem, plan, flex)
        if flex_fn is not None:
            flex_fn()  # compiles once per shape, outside the timing
            fns["flex"] = flex_fn
        for (d, rectify, name), launch in launches.items():
            if d == density:
                fns[f"{rectify}|{name}"] = lambda launch=launch: bsa.launch_attention(launch)
        share = max(5.0, min(60.0, left / 3)) * 1e3
        times = timer.interleaved(fns, rounds if left > 60 else 1, share)
        dense_ms = times.get("dense", dense_ms)
        dense_rate = _dense_flops(problem) / dense_ms if dense_ms else math.nan
        flex_ms = times.get("flex", math.nan)
        for key, ms in times.items():
            if "|" not in key:
                continue
            rectify, name = key.split("|")
            work = _work_flops(problem, plan, rectify)
            rate = work / ms
            what = next(v.what for v in variants[rectify] if v.name == name)
            rows.append(
                Row(
                    shape.name,
                    density,
                    rectify,
                    name,
                    ms,
                    rate / 1e9,
                    rate / dense_rate,
                    flex_ms / ms if rectify == "none" else math.nan,
                    work / dense_rate,
                    what,
                )
            )
        if bsa.chosen_tile_config() is not None:
            print(f"  autotuned: {bsa.chosen_tile_config()}")
        print(
            f"  d={density}: dense {dense_ms or math.nan:.2f} ms, flex {flex_ms:.2f} ms; "
            + ", ".join(f"{r.rectify}/{r.variant} {r.ms:.2f}" for r in rows if r.density == density)
        )
    del problem, launches
    if not SMOKE:
        torch.cuda.empty_cache()
    return rows


def _extra_memory(shape: Shape) -> str:
    """Peak memory the gathered launch allocates beyond its inputs and a preallocated output."""
    if SMOKE:
        return "not measured on the CPU"
    problem = Problem(shape, smooth=False)
    plan = problem.plan(0.10)
    k_block, v_block, log_count = _pooled(problem)
    out = torch.empty_like(problem.original[0])
    launch = _launch(problem, plan, _query_rectify(plan, k_block, v_block, log_count), _variants(128)["query"][0], out)
    bsa.launch_attention(launch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    bsa.launch_attention(launch)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    return (
        f"{shape.name}, gathered reads, rectify query: {extra / 2**20:.1f} MiB extra = "
        f"{extra / problem.qkv_bytes():.2%} of Q+K+V ({problem.qkv_bytes() / 2**30:.2f} GiB)"
    )


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU under the Triton interpreter")
    parser.add_argument("--budget-s", type=float, default=230.0, help="wall-clock budget of the whole run")
    parser.add_argument("--out", type=Path, default=None, help="markdown output (default: $OUT/attention_explore.md)")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    if not SMOKE and not torch.cuda.is_available():
        raise SystemExit("gpu_attention_explore.py needs a CUDA GPU (or --smoke)")
    device = "CPU (interpreter, smoke)" if SMOKE else torch.cuda.get_device_name()
    header = (
        f"# Attention kernel variants, {datetime.date.today()}, {device}, torch {torch.__version__}, "
        f"triton {triton.__version__}"
    )
    print(header)
    report = [header, ""]

    print("(a) correctness, bf16 vs float64 reference")
    cases = _check_cases((64, 96, 128) if not SMOKE else (24,))
    print(
        "  "
        + _precompile(
            [
                _launch(c.problem, c.plan, c.rectify, v, torch.empty_like(c.problem.original[0]))
                for c in cases
                for v in c.variants
            ]
        )
    )
    check_lines, all_ok = _check(cases)
    del cases
    table = ["| case | rectify | variant | rel. error | |", "|---|---|---|---|---|", *check_lines]
    print("\n".join(table))
    report += ["## (a) Correctness (bf16 vs float64 reference, tolerance 1e-2)", "", *table, ""]
    print(f"  {budget.elapsed():.0f} s elapsed")

    flex = None
    if not SMOKE:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    timer = Timer()
    rows: list[Row] = []
    print("(b) timing, D=128")
    densities = (0.25,) if SMOKE else (0.25, 0.10)
    rounds = 1 if SMOKE else 3
    timing_shapes = [
        Shape("wan14b-720p", (21, 45, 80), 40, 128),
        Shape("hunyuan-720p", (33, 45, 80), 24, 128, 256, 85),
    ]
    if SMOKE:
        timing_shapes = [Shape("toy+text", (2, 3, 5), 1, 32, 20, 7)]
    for shape in timing_shapes:
        rows += _time_shape(shape, densities, timer, budget, flex, rounds)
        print(f"  {budget.elapsed():.0f} s elapsed")

    print("(c) head dims 64 and 96")
    cog = [
        Shape("cogvideox5b-like D=64", (13, 30, 45), 48, 64, 226),
        Shape("cogvideox-grid D=96", (13, 30, 45), 32, 96, 226),
    ]
    if SMOKE:
        cog = [Shape("toy D=96", (2, 3, 5), 1, 96, 10)]
    for shape in cog:
        if budget.left() < 15:
            print(f"  {shape.name}: skipped, {budget.left():.0f} s left")
            continue
        rows += _time_shape(shape, (0.10,), timer, budget, None, rounds)

    print("(d) memory")
    memory = _extra_memory(timing_shapes[0])
    print("  " + memory)

    full = [
        "| shape | density | rectify | variant | ms | TFLOP/s | % cuDNN | x Flex | floor ms | what |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    full += [
        f"| {r.shape} | {r.density:.2f} | {r.rectify} | {r.variant} | {r.ms:.3f} | {r.tflops:.0f} | "
        f"{r.of_cudnn:.0%} | {r.x_flex:.2f} | {r.floor_ms:.3f} | {r.what} |"
        for r in rows
    ]
    report += ["## (b, c) Timing", "", *full, "", "## (d) Memory", "", memory, ""]
    report.append(f"Wall time {budget.elapsed():.0f} s.")
    out_path = args.out or (Path(os.environ["OUT"]) / "attention_explore.md" if os.environ.get("OUT") else None)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text("\n".join(report) + "\n")
    # The short table, printed last: the default variant and the best one per point.
    print()
    print("| shape | d | rectify | default ms | % cuDNN | x Flex | x old kernel | best variant | best % cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in dict.fromkeys((r.shape, r.density, r.rectify) for r in rows):
        point = [r for r in rows if (r.shape, r.density, r.rectify) == key]
        default, best = point[0], max(point, key=lambda r: r.tflops)
        old = [r.ms / default.ms for r in point if r.variant.startswith("old")]
        print(
            f"| {key[0]} | {key[1]:.2f} | {key[2]} | {default.ms:.2f} | {default.of_cudnn:.0%} | "
            f"{default.x_flex:.2f} | {old[0] if old else math.nan:.2f} | {best.variant} | {best.of_cudnn:.0%} |"
        )
    print(f"correctness: {'all ok' if all_ok else 'FAILURES above'}; {memory}; wall {budget.elapsed():.0f} s")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
