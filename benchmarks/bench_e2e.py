"""One transformer forward of real video DiTs, compiled dense (Inductor) against `backend="spattn"`, on a GPU.

Owns the end-to-end benchmark: Wan 2.1 1.3B at 480p (21 x 30 x 52 = 32,760 tokens), Wan 2.1 14B at 720p
(21 x 45 x 80 = 75,600 tokens) and HunyuanVideo 13B at 720p (33 x 45 x 80 = 118,800 video tokens + 256 text tokens,
a third of them padding), diffusers' own model classes at their published configurations with random weights, bf16,
batch 1. For each model it times, in one process, `torch.compile(model)` (Inductor, dense SDPA) and
`torch.compile(model, backend="spattn")` (Inductor as the inner compiler) at each sparsity, both on a *refresh* step
(the plan is scored and selected) and on a *cached* step (the plan comes from the plan cache), and prints per
forward: ms, speedup, the share of GPU time spent in attention (kernels classified by name from one profiled forward),
peak memory above the weights and inputs, and the output's relative error against the dense output on the same
weights. It then projects a 50-step generation (Wan: two CFG calls per step; HunyuanVideo is guidance-distilled: one)
for the library's default schedule and for a cached schedule, from the measured per-forward times.

`--layers-fraction f` builds every model with `ceil(f * L)` of its L transformer blocks (HunyuanVideo: of each block
kind): every block of a model has the same shapes and cost, and the parts outside the blocks (patch embedding,
condition embedders, output projection) take well under 1% of one block at these sizes, so the speedup of the
shortened model is that of the full one; "full ms" scales the measured time by L / layers run. Random weights make
attention more diffuse than a trained model's, so the error column is a pessimistic stand-in for quality (see
BENCHMARKS.md's fidelity table for video-like inputs).

    python benchmarks/bench_e2e.py                                   # every model, full depth (long: ~15 min)
    python benchmarks/bench_e2e.py --models wan14b-720p --layers-fraction 0.1 --sparsities 0.75 0.9
    python benchmarks/bench_e2e.py --smoke                           # tiny configs on the CPU: checks the script

`--ulysses N` (launched with `torchrun --nproc-per-node N`, one GPU per process) measures context parallelism instead:
one forward of each model on 1 GPU dense and with spattn (rank 0, the other ranks wait), then the same model with
diffusers' Ulysses attention over the N GPUs (`enable_parallelism`), dense and with spattn, each rank running the
sparse attention over the whole sequence for its N-th of the heads. It prints per variant the forward's ms (refresh
and cached steps for spattn), its speedups over 1-GPU dense and 1-GPU spattn, and the relative error of the N-GPU
output against the 1-GPU output of the same attention, then checks the targets of issue 12 (N-GPU spattn >= 0.9 N x
faster than 1-GPU spattn and >= 4x than 1-GPU dense, N-GPU vs 1-GPU sparse output <= 1e-2):

    torchrun --nproc-per-node 2 benchmarks/bench_e2e.py --ulysses 2 --models wan14b-720p --layers-fraction 0.1 \
        --sparsities 0.9
    torchrun --nproc-per-node 2 benchmarks/bench_e2e.py --ulysses 2 --smoke    # tiny Wan, gloo on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import math
import statistics
import time
from collections.abc import Callable

import torch

import spattn_compile
from spattn_compile.runtime import reset_schedule
from spattn_compile.testing import zoo
from spattn_compile.testing.benchmark import MODELS, ModelPreset, relative_error, synchronize

# A row whose slowest timed repeat took more than this many times its fastest is not printed as a measurement.
MAX_SPREAD = 2.0


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A model to benchmark: its published preset (`spattn_compile.testing.benchmark.MODELS`: config, latent size
    before patching, transformer calls per denoising step), the config keys that count its blocks and its text
    tokens (valid ones)."""

    name: str
    family: str
    preset: ModelPreset
    layer_keys: tuple[str, ...]
    text_len: int
    valid_text: int

    @property
    def config(self) -> dict:
        return self.preset.config

    @property
    def latent(self) -> tuple[int, int, int]:
        return self.preset.latent

    @property
    def calls_per_step(self) -> int:
        return self.preset.calls_per_step


CASES = {
    case.name: case
    for case in (
        ModelCase("wan1.3b-480p", "wan", MODELS["wan2.1-1.3b"], ("num_layers",), 512, 512),
        ModelCase("wan14b-720p", "wan", MODELS["wan2.1-14b"], ("num_layers",), 512, 512),
        ModelCase("hunyuan-720p", "hunyuan", MODELS["hunyuan-13b"], ("num_layers", "num_single_layers"), 256, 171),
    )
}
# The tiny models of the tests and examples (`spattn_compile.testing.zoo`), for `--smoke`.
SMOKE_CASES = {
    "wan-smoke": ModelCase(
        "wan-smoke",
        "wan",
        ModelPreset("WanTransformer3DModel", zoo.wan_config(num_layers=2), (3, 16, 24), 2),
        ("num_layers",),
        8,
        8,
    ),
    "hunyuan-smoke": ModelCase(
        "hunyuan-smoke",
        "hunyuan",
        ModelPreset(
            "HunyuanVideoTransformer3DModel",
            zoo.hunyuan_video_config(num_layers=1, num_single_layers=1),
            (3, 16, 24),
            1,
        ),
        ("num_layers", "num_single_layers"),
        12,
        8,
    ),
}

# CUDA kernels that compute attention: the dense SDPA backends, and spattn's pipeline (its Triton kernels; the small
# torch ops of block rectification are not counted).
_ATTENTION_KERNELS = (
    "fmha",
    "flash",
    "cudnn",
    "sdpa",
    "attention",
    "_prepare_stats",
    "_pooled_scores",
    "_probe_",
    "_gapr_gate",
    "_select_kernel",
)
# Kernels that only move data (layout copies): Inductor's fused clones and to-copies, and ATen's copy kernels.
_COPY_KERNELS = ("clone", "_to_copy", "copy_", "contiguous", "direct_copy")


def build_model(case: ModelCase, layers_fraction: float, device: str, dtype: torch.dtype):
    """The model with `ceil(fraction * L)` blocks of each kind, random weights (never zero), in eval mode."""
    import diffusers

    config = dict(case.config)
    for key in case.layer_keys:
        config[key] = max(1, math.ceil(layers_fraction * config[key]))
    cls = diffusers.WanTransformer3DModel if case.family == "wan" else diffusers.HunyuanVideoTransformer3DModel
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    # Built directly on the device and in the target dtype: a 14B model never exists in float32 on the host.
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        # diffusers zero-initialises some gates and output projections: an attention error must not hide behind one.
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.02)
    full_layers = sum(case.config[key] for key in case.layer_keys)
    run_layers = sum(config[key] for key in case.layer_keys)
    return model.eval().to(device=device, dtype=dtype), run_layers, full_layers


def make_inputs(case: ModelCase, model, device: str, dtype: torch.dtype) -> dict:
    generator = torch.Generator(device).manual_seed(0)
    config = model.config
    frames, height, width = case.latent

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    hidden = randn(1, config.in_channels, frames, height, width)
    if case.family == "wan":
        return {
            "hidden_states": hidden,
            "timestep": torch.tensor([900], device=device),
            "encoder_hidden_states": randn(1, case.text_len, config.text_dim),
            "return_dict": False,
        }
    mask = torch.zeros(1, case.text_len, dtype=torch.long, device=device)
    mask[:, : case.valid_text] = 1
    return {
        "hidden_states": hidden,
        "timestep": torch.tensor([900], device=device),
        "encoder_hidden_states": randn(1, case.text_len, config.text_embed_dim),
        "encoder_attention_mask": mask,
        "pooled_projections": randn(1, config.pooled_projection_dim),
        "guidance": torch.tensor([6000.0], device=device, dtype=dtype),
        "return_dict": False,
    }


def peak_extra_memory(fn: Callable[[], torch.Tensor], device: str) -> float:
    """GiB allocated at the peak of `fn()` above what was allocated before it (weights, inputs)."""
    if not device.startswith("cuda"):
        return float("nan")
    synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated() - before) / 2**30


@dataclasses.dataclass(frozen=True)
class Timing:
    """The timed repeats of one variant, after its warm-up: median ms and the spread (slowest / fastest)."""

    ms: float
    spread: float

    @property
    def stable(self) -> bool:
        return self.spread <= MAX_SPREAD


def time_warm(
    fn: Callable[[int], torch.Tensor], repeats: int, device: str, warm: int = 2
) -> tuple[torch.Tensor, Timing]:
    """Call `fn(0)`, ..., `fn(warm - 1)` untimed (compiles, autotuning, the plan a cached step reuses, and the first
    step of each kind: a cached step can compile its own branch on its first call), then time `fn(warm)`, ...,
    `fn(warm + repeats - 1)`, synchronising before and after each; returns the last output and the `Timing`."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for step in range(warm):
        fn(step)
    synchronize(device)
    times, out = [], None
    for step in range(warm, warm + repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn(step)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    assert out is not None
    return out, Timing(statistics.median(times), max(times) / max(min(times), 1e-9))


def _ms_cell(ms: float, timing: Timing, whose: str = "") -> str:
    """The ms column, or why no time is printed (`whose`: the timing's variant when it is not the row's own)."""
    if timing.stable:
        return f"{ms:.1f}"
    return f"unstable ({whose + ' ' if whose else ''}repeats spread {timing.spread:.1f}x > {MAX_SPREAD:.0f}x)"


def attention_profile(
    fn: Callable[[], torch.Tensor], device: str, top: int
) -> tuple[float, list[tuple[str, float]], tuple[int, float]]:
    """Share of GPU kernel time in attention kernels during `fn()`, the `top` kernels by total time (ms), and the
    launches and milliseconds of data-movement (copy) kernels."""
    if not device.startswith("cuda"):
        return float("nan"), [], (0, 0.0)
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    totals: dict[str, float] = {}
    copies, copy_ms = 0, 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.device_time_total / 1e3
            if any(k in event.name.lower() for k in _COPY_KERNELS):
                copies += 1
                copy_ms += event.device_time_total / 1e3
    everything = sum(totals.values())
    attention = sum(ms for name, ms in totals.items() if any(k in name.lower() for k in _ATTENTION_KERNELS))
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return attention / max(everything, 1e-9), ranked, (copies, copy_ms)


@dataclasses.dataclass
class Row:
    model: str
    variant: str
    ms: float
    full_ms: float
    speedup: float
    attention_share: float
    peak_gib: float
    error: float
    density: float
    timing: Timing


def run_case(case: ModelCase, args: argparse.Namespace, rows: list[Row], projections: list[str]) -> None:
    device, dtype = args.device, getattr(torch, args.dtype)
    model, run_layers, full_layers = build_model(case, args.layers_fraction, device, dtype)
    inputs = make_inputs(case, model, device, dtype)
    scale_to_full = full_layers / run_layers
    print(f"\n== {case.name}: {run_layers} of {full_layers} blocks, latent {case.latent}, text {case.text_len}")

    def forward(compiled):
        with torch.no_grad():
            return compiled(**inputs)[0]

    # Dense: Inductor on the unmodified model.
    torch._dynamo.reset()
    dense_model = torch.compile(model, **({"backend": "eager"} if args.smoke else {}))
    start = time.perf_counter()
    forward(dense_model)
    synchronize(device)
    print(f"dense compile + first forward: {time.perf_counter() - start:.1f} s")
    dense_out, dense_timing = time_warm(lambda i: forward(dense_model), args.repeats, device, warm=1)
    dense_ms = dense_timing.ms
    dense_peak = peak_extra_memory(lambda: forward(dense_model), device)
    dense_share, dense_top, dense_copies = attention_profile(lambda: forward(dense_model), device, args.top)
    print(f"dense: {dense_copies[0]} copy kernels per forward ({dense_copies[1]:.2f} ms)")
    rows.append(
        Row(
            case.name,
            "dense (Inductor)",
            dense_ms,
            dense_ms * scale_to_full,
            1.0,
            dense_share,
            dense_peak,
            0.0,
            1.0,
            dense_timing,
        )  # fmt: skip
    )
    if dense_top:
        print("dense top kernels (ms): " + "; ".join(f"{name[:60]} {ms:.1f}" for name, ms in dense_top))
    dense_out = dense_out.float()
    dense_model = None  # frees Inductor's buffers before the sparse model compiles

    torch._dynamo.reset()
    reset_schedule()
    options = {"compiler": "eager" if args.smoke else "inductor"}
    if args.smoke:
        options.update(min_seq_len=0, block_size=32)
    sparse_model = torch.compile(model, backend="spattn", options=options)
    with torch.no_grad():
        print(spattn_compile.explain(model, **inputs))

    for sparsity in args.sparsities:
        timings = {}
        for mode, refresh_interval in (("refresh", 1), ("cached", 10**6)):
            reset_schedule()
            spattn_compile.reset_report()
            with spattn_compile.config(sparsity=sparsity, refresh_interval=refresh_interval, dense_steps=0):

                def at_step(i: int) -> torch.Tensor:
                    with spattn_compile.step(i):
                        return forward(sparse_model)

                start = time.perf_counter()
                first = at_step(0)  # compiles on the first pass; selects the plan that "cached" then reuses
                synchronize(device)
                if mode == "refresh" and sparsity == args.sparsities[0]:
                    print(f"spattn compile + first forward: {time.perf_counter() - start:.1f} s")
                # Step 1 is warm-up too: the first step of its kind (a refresh, or the first cache hit).
                out, timing = time_warm(lambda i: at_step(i + 1), args.repeats, device, warm=1)
                ms = timing.ms
                peak = peak_extra_memory(functools.partial(at_step, args.repeats + 2), device)
                share, top, copies = attention_profile(functools.partial(at_step, args.repeats + 3), device, args.top)
                print(f"  {copies[0]} copy kernels per forward ({copies[1]:.2f} ms; dense: {dense_copies[0]})")
                records = spattn_compile.report().records
                sparse = [r for r in records if r.kind == "sparse"]
                hits = sum(r.cache == "hit" for r in sparse)
                density = statistics.fmean(float(r.density) for r in sparse) if sparse else 1.0
            error = relative_error(first.float(), dense_out)
            timings[mode] = timing
            rows.append(
                Row(
                    case.name,
                    f"spattn {sparsity:.2f} {mode}",
                    ms,
                    ms * scale_to_full,
                    dense_ms / ms,
                    share,
                    peak,
                    error,
                    density,
                    timing,
                )
            )
            print(f"sparsity {sparsity} {mode}: {len(sparse)} sparse calls, {hits} cache hits, density {density:.3f}")
            if top:
                print("  top kernels (ms): " + "; ".join(f"{name[:60]} {t:.1f}" for name, t in top))
        projections.extend(project_generation(case, sparsity, dense_timing, timings, scale_to_full))
    sparse_model = model = None
    torch._dynamo.reset()
    reset_schedule()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# --ulysses N: 1 GPU against N GPUs with diffusers' Ulysses context parallelism
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class UlyssesRow:
    variant: str
    gpus: int
    ms: float
    full_ms: float
    error: float  # against the 1-GPU output of the same attention (dense or spattn at this sparsity)
    timing: Timing


def start_ulysses(degree: int, smoke: bool) -> tuple[int, str]:
    """Join the torchrun group (NCCL, one GPU per process; gloo on the CPU for --smoke): (rank, device)."""
    import os

    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != degree:
        raise SystemExit(
            f"--ulysses {degree} needs {degree} processes: torchrun --nproc-per-node {degree} "
            f"benchmarks/bench_e2e.py --ulysses {degree} ... (WORLD_SIZE is {world_size})"
        )
    if smoke:
        # diffusers 0.42 places a context-parallel model on `rank % torch.accelerator.device_count()`, which is 0 on
        # a CPU-only machine; the smoke run gives the mesh itself, so the device diffusers computes is never used.
        if not torch.cuda.is_available():
            torch.accelerator.device_count = lambda: 1
        dist.init_process_group("gloo")
        return dist.get_rank(), "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    # Long: the other ranks wait while rank 0 compiles and times the 1-GPU variants.
    dist.init_process_group("nccl", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), f"cuda:{local_rank}"


def run_ulysses(case: ModelCase, args: argparse.Namespace, rank: int, rows: list[UlyssesRow]) -> None:
    """The four variants of `--ulysses` for one model (module docstring); rows are filled on rank 0."""
    import logging

    import torch.distributed as dist
    from diffusers.models._modeling_parallel import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    device, dtype, degree = args.device, getattr(torch, args.dtype), args.ulysses
    model, run_layers, full_layers = build_model(case, args.layers_fraction, device, dtype)
    heads = model.config.num_attention_heads
    if heads % degree:
        raise SystemExit(f"--ulysses {degree} must divide {case.name}'s {heads} attention heads")
    inputs = make_inputs(case, model, device, dtype)
    scale = full_layers / run_layers
    inner = "eager" if args.smoke else "inductor"
    options = {"compiler": inner, **({"min_seq_len": 0, "block_size": 32} if args.smoke else {})}
    if rank == 0:
        print(f"\n== {case.name} on {degree} GPUs: {run_layers} of {full_layers} blocks, latent {case.latent}")

    def forward(compiled) -> torch.Tensor:
        with torch.no_grad():
            return compiled(**inputs)[0]

    def spattn_times(compiled) -> tuple[torch.Tensor, Timing, Timing]:
        """(output of the refresh step, a refresh step's timing, a cached step's) at the active settings."""
        timings: dict[str, Timing] = {}
        out = None
        for mode, refresh_interval in (("refresh", 1), ("cached", 10**6)):
            reset_schedule()
            with spattn_compile.config(refresh_interval=refresh_interval, dense_steps=0):

                def at_step(i: int) -> torch.Tensor:
                    with spattn_compile.step(i):
                        return forward(compiled)

                first = at_step(0)
                out = first if mode == "refresh" else out
                _, timings[mode] = time_warm(lambda i: at_step(i + 1), args.repeats, device, warm=1)
        assert out is not None
        return out, timings["refresh"], timings["cached"]

    def dense_compile(module):
        return torch.compile(module, **({"backend": "eager"} if args.smoke else {}))

    # 1 GPU: rank 0 alone, on the unmodified model.
    single: dict[str, torch.Tensor] = {}
    if rank == 0:
        torch._dynamo.reset()
        compiled = dense_compile(model)
        single["dense"], timing = time_warm(lambda i: forward(compiled), args.repeats, device)
        rows.append(UlyssesRow("dense", 1, timing.ms, timing.ms * scale, 0.0, timing))
        for sparsity in args.sparsities:
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="spattn", options=options)
            with spattn_compile.config(sparsity=sparsity):
                out, refresh, cached = spattn_times(compiled)
            single[f"spattn {sparsity:.2f}"] = out
            rows.append(UlyssesRow(f"spattn {sparsity:.2f} refresh", 1, refresh.ms, refresh.ms * scale, 0.0, refresh))
            rows.append(UlyssesRow(f"spattn {sparsity:.2f} cached", 1, cached.ms, cached.ms * scale, 0.0, cached))
        compiled = None
        torch._dynamo.reset()
    dist.barrier()

    # N GPUs: diffusers' Ulysses attention, with README's settings against diffusers' own graph breaks (Dynamo skips
    # the hooks' warning_once; one uncompiled forward fills the hooks' signature cache).
    mesh = init_device_mesh(device.split(":")[0], (1, degree), mesh_dim_names=("ring", "ulysses"))
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, mesh=mesh))
    warning_once = getattr(logging.Logger, "warning_once", None)
    if warning_once is not None:
        torch._dynamo.config.ignore_logger_methods.add(warning_once)
    forward(model)

    def error(out: torch.Tensor, key: str) -> float:
        return relative_error(out.float(), single[key].float()) if rank == 0 else float("nan")

    torch._dynamo.reset()
    compiled = dense_compile(model)
    out, timing = time_warm(lambda i: forward(compiled), args.repeats, device)
    if rank == 0:
        rows.append(UlyssesRow("dense", degree, timing.ms, timing.ms * scale, error(out, "dense"), timing))
    for sparsity in args.sparsities:
        torch._dynamo.reset()
        reset_schedule()
        compiled = torch.compile(model, backend="spattn", options=options)
        with spattn_compile.config(sparsity=sparsity):
            out, refresh, cached = spattn_times(compiled)
        records = spattn_compile.report().records
        sparse = [r for r in records if r.kind == "sparse" and r.heads is not None]
        if not sparse:
            raise SystemExit(f"rank {rank}: no attention call ran sparse under Ulysses:\n{spattn_compile.report()}")
        if rank == 0:
            held = sparse[0].heads
            print(f"spattn {sparsity}: rank 0 ran {len(sparse)} sparse calls over heads {held} of {heads}")
            label = f"spattn {sparsity:.2f}"
            refresh_error = error(out, label)
            rows.append(UlyssesRow(f"{label} refresh", degree, refresh.ms, refresh.ms * scale, refresh_error, refresh))
            rows.append(UlyssesRow(f"{label} cached", degree, cached.ms, cached.ms * scale, float("nan"), cached))
    compiled = None
    torch._dynamo.reset()
    reset_schedule()


def print_ulysses(rows: list[UlyssesRow], degree: int, header: str) -> None:
    """The table of `--ulysses` and the targets of issue 12."""
    by = {(r.variant, r.gpus): r for r in rows}
    print(f"\n{header}")
    print("| variant | GPUs | ms | full-depth ms | vs 1-GPU dense | vs 1-GPU same variant | rel. error vs 1 GPU |")
    print("|---|---|---|---|---|---|---|")
    dense_1 = by[("dense", 1)]
    for r in rows:
        same = by.get((r.variant, 1))
        error = "-" if r.gpus == 1 or math.isnan(r.error) else f"{r.error:.2e}"
        if not (r.timing.stable and dense_1.timing.stable and (same is None or same.timing.stable)):
            first = next(x for x in (r, dense_1, same) if x is not None and not x.timing.stable)
            whose = "" if first is r else f"{first.variant} on {first.gpus} GPU"
            print(f"| {r.variant} | {r.gpus} | {_ms_cell(r.ms, first.timing, whose)} | - | - | - | {error} |")
            continue
        versus = "-" if same is None or r.gpus == 1 else f"{same.ms / r.ms:.2f}x"
        print(
            f"| {r.variant} | {r.gpus} | {r.ms:.1f} | {r.full_ms:.0f} | {dense_1.ms / r.ms:.2f}x | {versus} | {error} |"
        )
    for r in rows:
        if r.gpus != degree or not r.variant.endswith("refresh"):
            continue
        one = by[(r.variant, 1)]
        if not (r.timing.stable and one.timing.stable and dense_1.timing.stable):
            print(f"UNSTABLE {r.variant}: a timing's repeats spread more than {MAX_SPREAD:.0f}x; no verdict")
            continue
        checks = (
            (f"{r.variant}: {degree} GPUs vs 1 GPU spattn", one.ms / r.ms, 0.9 * degree, "x faster"),
            (f"{r.variant}: {degree} GPUs vs 1 GPU dense", dense_1.ms / r.ms, 4.0, "x faster"),
        )
        for label, value, target, unit in checks:
            print(f"{'PASS' if value >= target else 'FAIL'} {label}: {value:.2f}{unit} (target >= {target:.1f})")
        status = "PASS" if r.error <= 1e-2 else "FAIL"
        print(f"{status} {r.variant}: {degree} GPUs vs 1 GPU sparse output: {r.error:.2e} (target <= 1e-2)")


def project_generation(
    case: ModelCase, sparsity: float, dense: Timing, timings: dict[str, Timing], scale: float, steps: int = 50
) -> list[str]:
    """50-step generation time (s) at full depth: under the default schedule and under a cached one (refresh every
    5 steps), from per-forward times (`dense` already at full depth, `timings` scaled by `scale`); steps before
    `dense_steps` cost a dense forward. No projection from an unstable timing."""
    unstable = [t for t in (dense, *timings.values()) if not t.stable]
    if unstable:
        return [f"| {case.name} | {sparsity:.2f} | unstable timings (repeats spread {unstable[0].spread:.1f}x > "
                f"{MAX_SPREAD:.0f}x): no projection | - | - | - |"]  # fmt: skip
    dense_ms = dense.ms * scale
    lines = []
    defaults = spattn_compile.SparseAttentionConfig()
    for label, dense_steps, refresh_interval in (
        ("default schedule", defaults.dense_steps, defaults.refresh_interval),
        ("refresh every 5 steps", defaults.dense_steps, 5),
    ):
        total = 0.0
        for step_index in range(steps):
            if step_index < dense_steps:
                total += dense_ms
            elif (step_index - dense_steps) % refresh_interval == 0:
                total += timings["refresh"].ms * scale
            else:
                total += timings["cached"].ms * scale
        total *= case.calls_per_step
        dense_total = dense_ms * steps * case.calls_per_step
        lines.append(
            f"| {case.name} | {sparsity:.2f} | {label} (dense_steps={dense_steps}, refresh_interval="
            f"{refresh_interval}) | {dense_total / 1e3:.1f} | {total / 1e3:.1f} | {dense_total / total:.2f}x |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(CASES), help=f"subset of {list(CASES)}")
    parser.add_argument("--sparsities", nargs="*", type=float, default=[0.75, 0.9])
    parser.add_argument("--layers-fraction", type=float, default=1.0, help="share of each model's blocks to build")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per variant (median)")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per profiled forward")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU, eager inner compiler")
    parser.add_argument("--ulysses", type=int, default=1, help="GPUs of Ulysses context parallelism (torchrun)")
    args = parser.parse_args()
    if args.ulysses < 1:
        parser.error(f"--ulysses must be >= 1, got {args.ulysses}")
    if args.ulysses > 1:
        return main_ulysses(parser, args)
    if not 0 < args.layers_fraction <= 1:
        parser.error(f"--layers-fraction must be in (0, 1], got {args.layers_fraction}")
    if args.smoke:
        # Two repeats: the spread check runs too.
        args.device, args.dtype, args.repeats = "cpu", "float32", 2
        cases = list(SMOKE_CASES.values())
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke)")
        args.device = "cuda"
        unknown = set(args.models) - set(CASES)
        if unknown:
            parser.error(f"unknown models {sorted(unknown)}; choose from {list(CASES)}")
        cases = [CASES[name] for name in args.models]

    import diffusers
    import triton

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    header = (
        f"{device_name}, torch {torch.__version__}, triton {triton.__version__}, diffusers {diffusers.__version__}, "
        f"{args.dtype}, {datetime.date.today()}, layers fraction {args.layers_fraction}"
    )
    rows: list[Row] = []
    projections: list[str] = []
    for case in cases:
        run_case(case, args, rows, projections)

    print(f"\n{header}")
    print(
        "| model | variant | ms | full-depth ms | speedup | attention share | peak extra GiB | rel. error | density |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    dense_timing = {r.model: r.timing for r in rows if r.variant.startswith("dense")}
    for r in rows:
        # A speedup needs both timings: a row is printed only when its own and its model's dense repeats agree.
        if not (r.timing.stable and dense_timing[r.model].stable):
            own = not r.timing.stable
            timing, whose = (r.timing, "") if own else (dense_timing[r.model], "dense")
            print(f"| {r.model} | {r.variant} | {_ms_cell(r.ms, timing, whose)} | - | - | - | - | {r.error:.3f} | "
                  f"{r.density:.3f} |")  # fmt: skip
            continue
        print(
            f"| {r.model} | {r.variant} | {r.ms:.1f} | {r.full_ms:.0f} | {r.speedup:.2f}x | {r.attention_share:.0%} "
            f"| {r.peak_gib:.2f} | {r.error:.3f} | {r.density:.3f} |"
        )
    print("\n| model | sparsity | schedule | dense 50 steps s | spattn 50 steps s | speedup |")
    print("|---|---|---|---|---|---|")
    for line in projections:
        print(line)


def main_ulysses(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--ulysses N` (module docstring): Wan models only (diffusers has context-parallel plans for Wan, none for
    HunyuanVideo)."""
    import torch.distributed as dist

    if args.smoke:
        cases = [SMOKE_CASES["wan-smoke"]]
        args.dtype, args.repeats = "float32", 1
    else:
        if not torch.cuda.is_available():
            parser.error("--ulysses needs CUDA GPUs (or --smoke)")
        unknown = set(args.models) - set(CASES)
        if unknown:
            parser.error(f"unknown models {sorted(unknown)}; choose from {list(CASES)}")
        cases = [CASES[name] for name in args.models]
    without_plan = [case.name for case in cases if case.family != "wan"]
    if without_plan:
        parser.error(f"--ulysses: diffusers has no context-parallel plan for {without_plan}; choose Wan models")
    rank, args.device = start_ulysses(args.ulysses, args.smoke)
    import diffusers

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    header = (
        f"{args.ulysses} x {device_name}, torch {torch.__version__}, diffusers {diffusers.__version__}, {args.dtype}, "
        f"{datetime.date.today()}, layers fraction {args.layers_fraction}"
    )
    for case in cases:
        rows: list[UlyssesRow] = []
        run_ulysses(case, args, rank, rows)
        if rank == 0:
            print_ulysses(rows, args.ulysses, f"{header}, {case.name}")
    dist.destroy_process_group()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
