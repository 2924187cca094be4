"""The public path against cuDNN dense attention and FlexAttention, in one run (the issue-17 table).

    python benchmarks/bench_attention.py            # on a CUDA GPU (H200: about 4 minutes)
    python benchmarks/bench_attention.py --smoke    # the CPU: Triton interpreter, toy shapes, every step

1. Correctness first, on a small shape (9x30x45 + 77 text tokens, a third of them padding; `--smoke`: a toy one):
   the bf16 public path (`select_plan` / `sparse_attention`, impl "triton", default settings) against the float64
   reference (impl "reference" on the inputs in float64): block scores, plans (equal, or equal kept mass under the
   reference's scores where two blocks tie to the scores' rounding), the output against the reference's output on
   the same plan, and a fresh call equal to planning then attending.
2. At Wan 2.1 14B 720p (21x45x80 latent grid after patching, 75,600 tokens, 40 heads) and HunyuanVideo 720p (33x45x80
   + 256 text tokens of which 128 padding, 24 heads), D = 128, bf16, Q/K/V as (B, S, H, D) projections viewed as
   (B, H, S, D), default settings at sparsity 0.75 and 0.9, through the public API:
   - dense: cuDNN SDPA on the same tensors, no mask (Hunyuan too: its unmasked call, as the issue asks);
   - fresh: `sparse_attention(...)` (plans and attends); cached: `sparse_attention(..., plan=plan)`; planning:
     `select_plan(...)` (everything it does); their ratios to dense;
   - attend: stage 3 alone (`SparseAttention.attend` on a preparation and the plan: the rectification's inputs and the
     kernel), its TFLOP/s on the FLOPs it does (4 * BS^2 * D per kept block pair per head; the virtual keys of query
     rectification are not counted) and that rate over cuDNN's dense rate (4 * S^2 * D per head);
   - flex: FlexAttention (torch.compile'd) on the same kept blocks of canonical copies (copies not timed; blocks with a
     masked key partial), and attend's speed over it;
   - memory: the fresh call's peak allocation above its inputs and its output (the larger of planning's peak and the
     whole call's less its output), over the bytes of Q, K and V; the report also holds benchmarks/memory_model.py's
     count of every allocation and of each phase's peak at these shapes, before issue 17's memory work and now.
3. Head dims 64 and 96 (CogVideoX-like: 13x30x45 + 226 text tokens, 48 / 32 heads), sparsity 0.9: attend's rate over
   cuDNN's at that head dim.

Times are medians of repeats (`spattn_compile.testing.benchmark.time_ms`, one call each) after a warm-up call
(compiles and autotuning); the last column names the timings of a row whose repeats spread more than 2x. The table
is printed last; the whole report goes to `$OUT/bench_attention.md` when OUT is set.
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
import inspect  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from spattn_compile import reference, select_plan, sparse_attention  # noqa: E402
from spattn_compile.attention import SparseAttention  # noqa: E402
from spattn_compile.call_layout import CallLayout  # noqa: E402
from spattn_compile.config import SparseAttentionConfig  # noqa: E402
from spattn_compile.estimators import PooledTiles  # noqa: E402
from spattn_compile.implementations import make_implementation  # noqa: E402
from spattn_compile.implementations.triton import TritonImplementation  # noqa: E402
from spattn_compile.plan import SparsePlan, indices_from_mask  # noqa: E402
from spattn_compile.testing.benchmark import ATTENTION_CASES, relative_error, time_ms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_model  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    """One attention call: latent grid after patching, heads, head dim, text tokens (after the video) and how many of
    them are padding (masked keys)."""

    name: str
    grid: tuple[int, int, int]
    heads: int
    head_dim: int = 128
    text_len: int = 0
    text_padding: int = 0

    @property
    def seq_len(self) -> int:
        return math.prod(self.grid) + self.text_len


def _shape(name: str) -> Shape:
    case = ATTENTION_CASES[name]
    return Shape(name, case.grid, case.heads, case.head_dim, case.text_len, case.text_padding)


if SMOKE:
    DEVICE, DTYPE, BLOCK, REPEATS = torch.device("cpu"), torch.float16, 16, 1
    CONFIG = SparseAttentionConfig(block_size=BLOCK, estimator=PooledTiles(16), min_seq_len=0)
    CHECK_SHAPE = Shape("toy+text", (2, 3, 5), 2, 32, 20, 7)
    TIMING_SHAPES = [Shape("toy+text", (2, 3, 5), 1, 32, 20, 7)]
    HEAD_DIM_SHAPES = [Shape("toy D=24", (2, 3, 3), 1, 24, 9, 3)]
    SPARSITIES, RECTIFY_MODES = (0.75,), ("query", "none")
else:
    DEVICE, DTYPE, BLOCK, REPEATS = torch.device("cuda"), torch.bfloat16, 128, 5
    CONFIG = SparseAttentionConfig(min_seq_len=0)
    CHECK_SHAPE = Shape("9x30x45+text", (9, 30, 45), 2, 128, 77, 26)
    TIMING_SHAPES = [_shape("wan14b-720p"), _shape("hunyuan-720p")]
    HEAD_DIM_SHAPES = [
        Shape("cogvideox-like D=64", (13, 30, 45), 48, 64, 226, 0),
        Shape("cogvideox-like D=96", (13, 30, 45), 32, 96, 226, 0),
    ]
    SPARSITIES, RECTIFY_MODES = (0.75, 0.9), ("query", "block", "none")


# --------------------------------------------------------------------------------------------------------------------
# Inputs and the calls
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
    """Q, K, V `(1, H, S, D)` viewed from `(1, S, H, D)` buffers in the original token order, the key-padding mask."""

    shape: Shape
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None

    @classmethod
    def make(cls, shape: Shape, dtype: torch.dtype = DTYPE, seed: int = 0) -> Problem:
        """Noise plus a component smooth over runs of 64 tokens (so pooled blocks differ, as in a video)."""
        generator = torch.Generator(device=DEVICE).manual_seed(seed)
        seq, heads, dim = shape.seq_len, shape.heads, shape.head_dim

        def sample() -> torch.Tensor:
            smooth = torch.randn(1, seq // 64 + 1, 1, heads, dim, generator=generator, device=DEVICE)
            smooth = smooth.expand(-1, -1, 64, -1, -1).reshape(1, -1, heads, dim)[:, :seq]
            noise = torch.randn(1, seq, heads, dim, generator=generator, device=DEVICE)
            return (noise + smooth).to(dtype).transpose(1, 2)

        mask = None
        if shape.text_padding:
            mask = torch.ones(1, 1, 1, seq, dtype=torch.bool, device=DEVICE)
            mask[..., seq - shape.text_padding :] = False
        return cls(shape, sample(), sample(), sample(), mask)

    @property
    def qkv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.k, self.v))

    def kwargs(self, config: SparseAttentionConfig, impl: str = "triton") -> dict:
        return dict(
            video_grid=self.shape.grid, text_len=self.shape.text_len, attn_mask=self.attn_mask, config=config,
            impl=impl,
        )  # fmt: skip

    def call(self, config: SparseAttentionConfig, heads_per_group: int | None = None) -> SparseAttention:
        """The orchestrator of the public functions, for timing stage 3 alone (and planning by groups of
        `heads_per_group` heads; None: the implementation's choice)."""
        layout = CallLayout(self.shape.grid, self.shape.text_len, False)
        implementation = (
            make_implementation("triton") if heads_per_group is None else TritonImplementation(heads_per_group)
        )
        return SparseAttention(self.q, self.k, self.v, layout, attn_mask=self.attn_mask, scale=None, config=config,
                               implementation=implementation)  # fmt: skip


def _dense(problem: Problem) -> Callable[[], torch.Tensor]:
    """cuDNN SDPA on the problem's tensors without a mask (the default SDPA backend off CUDA or if cuDNN fails)."""
    q, k, v = problem.q, problem.k, problem.v
    if DEVICE.type != "cuda":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    try:
        run()
    except RuntimeError as error:
        print(f"  cuDNN SDPA unavailable ({str(error)[:120]}); dense = the default SDPA backend")
        return lambda: F.scaled_dot_product_attention(q, k, v)
    return run


def _flex(problem: Problem, plan: SparsePlan, flex) -> Callable[[], object] | None:
    """FlexAttention on canonical copies with the plan's kept blocks (blocks with a masked key partial, mask_mod
    reading key validity); None off CUDA."""
    if flex is None:
        return None
    from torch.nn.attention.flex_attention import BlockMask

    layout = plan.layout
    valid = torch.zeros(layout.padded_len, dtype=torch.bool, device=DEVICE)
    source = layout.to(DEVICE).source_index
    real = source >= 0
    key_ok = torch.ones(problem.shape.seq_len, dtype=torch.bool, device=DEVICE)
    if problem.attn_mask is not None:
        key_ok = problem.attn_mask.reshape(-1)
    valid[real] = key_ok[source[real]]
    keep = plan.to_dense()
    partial = (~valid).reshape(-1, layout.block_size).any(-1)
    partial_counts, partial_indices = indices_from_mask(keep & partial, torch.int32)
    full_counts, full_indices = indices_from_mask(keep & ~partial, torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, h, q_idx // layout.block_size, kv_idx // layout.block_size] & valid[kv_idx]

    parameters = inspect.signature(BlockMask.from_kv_blocks).parameters
    lengths = {"seq_lengths": (layout.padded_len,) * 2} if "seq_lengths" in parameters else {}
    block_mask = BlockMask.from_kv_blocks(
        partial_counts, partial_indices, full_counts, full_indices, BLOCK_SIZE=layout.block_size, mask_mod=mask_mod,
        **lengths,
    )  # fmt: skip
    q, k, v = (reference.gather_canonical(t, layout) for t in (problem.q, problem.k, problem.v))
    scale = problem.shape.head_dim**-0.5
    return lambda: flex(q, k, v, block_mask=block_mask, scale=scale)


# --------------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------------


# A timing whose slowest repeat took more than this many times its fastest is marked unstable in the table.
MAX_SPREAD = 2.0


def _time(fn: Callable[[], object], name: str, unstable: list[str]) -> float:
    """Median ms of `fn` after one warm-up call (compiles, autotuning); `name` joins `unstable` when the repeats
    spread more than MAX_SPREAD x."""
    fn()
    times = [time_ms(lambda _: fn(), 1, DEVICE)[1] for _ in range(REPEATS)]
    if max(times) > MAX_SPREAD * min(times):
        unstable.append(f"{name} {max(times) / min(times):.1f}x")
    return statistics.median(times)


def _peak_above(fn: Callable[[], object]) -> tuple[int, object]:
    """Bytes allocated at the peak of `fn` above what was allocated before it, and its result (CUDA only)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, result


def _peak_extra(problem: Problem, kwargs: dict) -> float:
    """Bytes of a fresh call's peak above its inputs and its output (CUDA only). The output is allocated while
    attending, after planning's peak: the peak is the larger of planning's (`select_plan` runs the same stages) and
    the whole call's less its output."""
    if DEVICE.type != "cuda":
        return math.nan
    q, k, v = problem.q, problem.k, problem.v
    planning, plan = _peak_above(lambda: select_plan(q, k, v, **kwargs))
    del plan
    whole, out = _peak_above(lambda: sparse_attention(q, k, v, **kwargs))
    assert isinstance(out, torch.Tensor)
    return max(planning, whole - out.numel() * out.element_size())


def _counted(shape: Shape) -> memory_model.Call:
    """The shape as benchmarks/memory_model.py counts it (an H200's 132 SMs; the interpreter's 2 under --smoke)."""
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count if DEVICE.type == "cuda" else 2
    return memory_model.Call(
        1, shape.heads, shape.head_dim, shape.grid, shape.text_len, shape.text_padding > 0, BLOCK, 16,
        DTYPE.itemsize, programs=2 * sms, tiles_per_item=128 if DEVICE.type == "cuda" else 16,
    )  # fmt: skip


def _attend_flops(plan: SparsePlan, head_dim: int) -> int:
    return 4 * int(plan.kv_counts.sum()) * plan.layout.block_size**2 * head_dim


def _dense_flops(shape: Shape) -> int:
    return 4 * shape.seq_len**2 * shape.head_dim * shape.heads


def check(lines: list[str]) -> bool:
    """Section 1; appends its report lines, returns whether every check passed."""
    shape = CHECK_SHAPE
    problem = Problem.make(shape, seed=3)
    wide = Problem(shape, *(t.double() for t in (problem.q, problem.k, problem.v)), problem.attn_mask)
    lines += [f"## Correctness: {shape.name}, H={shape.heads}, D={shape.head_dim}, {DTYPE} vs float64", ""]
    lines += ["| sparsity | rectify | score rel. error | rows with another plan | kept mass deficit | output rel. "
              "error | fresh == plan + run | by heads == all heads | |", "|" + "---|" * 9]  # fmt: skip
    ok = True
    for sparsity in SPARSITIES:
        for rectify in RECTIFY_MODES:
            config = dataclasses.replace(CONFIG, sparsity=sparsity, rectify=rectify)
            plan = select_plan(problem.q, problem.k, problem.v, **problem.kwargs(config))
            want = select_plan(wide.q, wide.k, wide.v, **wide.kwargs(config, "reference"))
            score_error = relative_error(plan.block_scores, want.block_scores)
            nb = plan.layout.num_video_blocks
            truth = want.block_scores.double()[..., :nb]
            mass = (truth * plan.to_dense()[..., :nb, :nb]).sum(-1)
            mass_want = (truth * want.to_dense()[..., :nb, :nb]).sum(-1)
            deficit = float((mass_want - mass).max())
            rows_differ = float((plan.to_dense() != want.to_dense()).any(-1).double().mean())
            out = sparse_attention(problem.q, problem.k, problem.v, **problem.kwargs(config), plan=plan)
            expected = sparse_attention(wide.q, wide.k, wide.v, **wide.kwargs(config, "reference"), plan=plan)
            out_error = relative_error(out, expected)
            fresh = sparse_attention(problem.q, problem.k, problem.v, **problem.kwargs(config))
            same = bool(torch.equal(fresh, out))
            # Planning one head at a time (the big shapes plan by groups of heads) gives the same plan, bit for bit.
            by_heads = problem.call(config, heads_per_group=1)
            grouped = by_heads.plan()
            grouped_same = all(
                torch.equal(getattr(grouped, name), getattr(plan, name))
                for name in ("block_scores", "kv_counts", "kv_indices", "trusted_counts", "trusted_indices")
            ) and bool(torch.equal(by_heads.run(grouped), fresh))
            # Plans may differ where two blocks' scores tie to the scores' rounding: the kept mass may not.
            score_max_error = float((plan.block_scores.double() - want.block_scores).abs().max())
            passed = score_error < 1e-2 and deficit <= 4 * score_max_error + 1e-6 and out_error < 1e-2 and same
            passed &= grouped_same
            ok &= passed
            lines.append(
                f"| {sparsity} | {rectify} | {score_error:.2e} | {rows_differ:.2%} | {deficit:.1e} | {out_error:.2e} "
                f"| {same} | {grouped_same} | {'ok' if passed else 'FAILED'} |"
            )
    lines.append("")
    return ok


@dataclasses.dataclass
class Row:
    shape: str
    sparsity: float
    density: float
    dense: float
    fresh: float
    cached: float
    planning: float
    attend: float
    attend_tflops: float
    dense_tflops: float
    flex: float
    memory: float
    unstable: list[str]  # timings whose repeats spread more than MAX_SPREAD x


def measure(problem: Problem, sparsity: float, flex) -> Row:
    """Section 2 for one shape and sparsity."""
    shape = problem.shape
    config = dataclasses.replace(CONFIG, sparsity=sparsity)
    kwargs = problem.kwargs(config)
    q, k, v = problem.q, problem.k, problem.v
    unstable: list[str] = []
    dense_ms = _time(_dense(problem), "dense", unstable)
    plan = select_plan(q, k, v, **kwargs)
    fresh_ms = _time(lambda: sparse_attention(q, k, v, **kwargs), "fresh", unstable)
    cached_ms = _time(lambda: sparse_attention(q, k, v, **kwargs, plan=plan), "cached", unstable)
    planning_ms = _time(lambda: select_plan(q, k, v, **kwargs), "planning", unstable)
    call = problem.call(config)
    prepared = call.prepare()
    attend_ms = _time(lambda: call.attend(prepared, plan), "attend", unstable)
    flex_call = _flex(problem, plan, flex)
    flex_ms = _time(flex_call, "flex", unstable) if flex_call is not None else math.nan
    del flex_call
    memory = _peak_extra(problem, kwargs) / problem.qkv_bytes
    return Row(
        shape.name, sparsity, float(plan.density().mean()), dense_ms, fresh_ms, cached_ms, planning_ms, attend_ms,
        _attend_flops(plan, shape.head_dim) / attend_ms / 1e9, _dense_flops(shape) / dense_ms / 1e9, flex_ms, memory,
        unstable,
    )  # fmt: skip


def measure_rate(problem: Problem, sparsity: float) -> Row:
    """Section 3: attend's rate and cuDNN's at one head dim."""
    config = dataclasses.replace(CONFIG, sparsity=sparsity)
    unstable: list[str] = []
    dense_ms = _time(_dense(problem), "dense", unstable)
    plan = select_plan(problem.q, problem.k, problem.v, **problem.kwargs(config))
    call = problem.call(config)
    prepared = call.prepare()
    attend_ms = _time(lambda: call.attend(prepared, plan), "attend", unstable)
    shape = problem.shape
    nan = math.nan
    return Row(
        shape.name, sparsity, float(plan.density().mean()), dense_ms, nan, nan, nan, attend_ms,
        _attend_flops(plan, shape.head_dim) / attend_ms / 1e9, _dense_flops(shape) / dense_ms / 1e9, nan, nan,
        unstable,
    )  # fmt: skip


def table(rows: list[Row]) -> list[str]:
    header = (
        "| shape | sparsity | density | cuDNN dense ms | fresh ms | dense/fresh | cached ms | dense/cached | "
        "planning ms | planning / dense | attend ms | attend TFLOP/s | cuDNN TFLOP/s | attend rate / cuDNN's | "
        "flex ms | flex / attend | peak extra memory / QKV | unstable timings (repeats > 2x apart) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.sparsity} | {r.density:.3f} | {r.dense:.2f} | {r.fresh:.2f} | {r.dense / r.fresh:.2f}x "
            f"| {r.cached:.2f} | {r.dense / r.cached:.2f}x | {r.planning:.2f} | {r.planning / r.dense:.1%} | "
            f"{r.attend:.2f} | {r.attend_tflops:.0f} | {r.dense_tflops:.0f} | {r.attend_tflops / r.dense_tflops:.0%} "
            f"| {r.flex:.2f} | {r.flex / r.attend:.2f}x | {r.memory:.1%} | {', '.join(r.unstable) or '-'} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, toy shapes")
    parser.parse_args(argv)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU (or --smoke)")
    start = time.perf_counter()
    import triton

    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU (Triton interpreter)"
    report = [
        f"# Public path vs cuDNN and FlexAttention: {device}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{datetime.date.today()}",
        "",
        "Default settings (pooled estimator with outliers, query rectification with GAPR), min_seq_len 0.",
        "",
    ]
    checked = check(report)
    print("\n".join(report))
    print(f"correctness: {'passed' if checked else 'FAILED'} ({time.perf_counter() - start:.0f} s)")

    flex = None
    if DEVICE.type == "cuda":
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for shape in TIMING_SHAPES:
        problem = Problem.make(shape)
        for sparsity in SPARSITIES:
            rows.append(measure(problem, sparsity, flex))
            print(f"  {shape.name} sparsity {sparsity}: {rows[-1]} ({time.perf_counter() - start:.0f} s)")
        del problem
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    for shape in HEAD_DIM_SHAPES:
        problem = Problem.make(shape)
        rows.append(measure_rate(problem, 0.9))
        print(f"  {shape.name}: {rows[-1]} ({time.perf_counter() - start:.0f} s)")
        del problem

    lines = table(rows)
    report += ["## Timing", "", *lines, "", f"Wall time {time.perf_counter() - start:.0f} s.", ""]
    report += ["## Memory, counted (benchmarks/memory_model.py; tile means and scratch: one group's are live)", ""]
    report += memory_model.table({shape.name: _counted(shape) for shape in TIMING_SHAPES})
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "bench_attention.md").write_text("\n".join(report) + "\n")
    print()
    print(f"correctness: {'passed' if checked else 'FAILED'}")
    print("\n".join(lines))
    return 0 if checked else 1


if __name__ == "__main__":
    sys.exit(main())
