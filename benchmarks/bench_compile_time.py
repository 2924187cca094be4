"""Compile time of a real-size video transformer: regional (`compile_repeated_blocks`) vs whole-model compilation.

    python benchmarks/bench_compile_time.py                     # Wan 2.1 1.3B's config (30 blocks), CPU, Inductor
    python benchmarks/bench_compile_time.py --device cuda       # the same on a GPU (Triton codegen)
    python benchmarks/bench_compile_time.py --layers 2          # a 2-block toy of that config (smoke run)

It builds `diffusers.WanTransformer3DModel` with the published config of Wan 2.1 T2V 1.3B (30 blocks of width 1536,
12 heads of 128, feed-forward 8960; `examples/quickstart.py`'s preset) and random weights, and runs one forward at
a tiny token count (a 2x8x8 latent: 32 video tokens, so that the forward itself costs nothing next to the compile)
for each way of compiling it, each in a fresh process with Inductor's caches in a fresh directory (a cold compile,
as on a first run):

- `spattn whole`: `torch.compile(model, backend="spattn")`: Dynamo traces the whole model, the pass rewrites its 30
  self-attention calls, Inductor compiles the whole graph;
- `spattn regional`: `model.compile_repeated_blocks(backend="spattn")`: one block is traced and compiled, and the
  other 29 reuse its code (Dynamo guards, no recompile);
- `inductor whole` / `inductor regional`: the same with the plain Inductor backend, for the cost of the pass itself.

First call: wall time of the first forward, compilation included; second call: the next forward (the cost of the
forward itself and of the guards). Settings: `min_seq_len=0` and blocks of 16 tokens, so that the 32-token self-
attention calls are rewritten like a real video's. On a CPU Inductor generates C++/OpenMP kernels and compiles them
with the host compiler; on a GPU it generates Triton kernels (compiled in parallel worker processes, and autotuned
with `mode="max-autotune"`), so the absolute times differ; what regional compilation saves, tracing and code
generation for 29 of the 30 blocks, is the same. The table is printed last; `$OUT/compile_time.json` gets the rows
when `OUT` is set.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
VARIANTS = ("spattn regional", "spattn whole", "inductor regional", "inductor whole")
LATENT = (2, 8, 8)  # latent frames, height, width: a 2x4x4 token grid
TEXT_LEN = 8
# The spattn settings: rewrite the short calls (min_seq_len=0) into blocks of 16 tokens, as a real video's would be.
SETTINGS = {"min_seq_len": 0, "block_size": 16}


def wan_config(layers: int | None) -> dict:
    """Wan 2.1 T2V 1.3B's transformer config (from examples/quickstart.py), with `layers` blocks if given."""
    spec = importlib.util.spec_from_file_location("spattn_quickstart", REPOSITORY / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    config = dict(quickstart.PRESETS["wan2.1-1.3b"][0])
    if layers is not None:
        config["num_layers"] = layers
    return config


def run_variant(variant: str, layers: int | None, device: str, dtype: torch.dtype) -> dict:
    """Build the model, compile it as `variant` says and time its first two forwards (in this process)."""
    from diffusers import WanTransformer3DModel
    from torch._dynamo.utils import counters

    import spattn_compile  # noqa: F401  (registers the backend)

    torch.manual_seed(0)
    start = time.perf_counter()
    model = WanTransformer3DModel(**wan_config(layers)).to(device=device, dtype=dtype).eval()
    build_seconds = time.perf_counter() - start
    backend, how = variant.split()
    options = {"compiler": "inductor", **SETTINGS} if backend == "spattn" else None
    if how == "regional":
        model.compile_repeated_blocks(backend=backend, options=options)
        compiled = model
    else:
        compiled = torch.compile(model, backend=backend, options=options)
    config = model.config
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, config.in_channels, *LATENT, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, TEXT_LEN, config.text_dim, generator=generator),
    }
    inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}

    def forward() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        begin = time.perf_counter()
        with torch.no_grad():
            compiled(**inputs, return_dict=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    first, second = forward(), forward()
    row = {
        "variant": variant,
        "blocks": config.num_layers,
        "first_call_s": first,
        "second_call_s": second,
        "graphs": counters["stats"]["unique_graphs"],
        "build_s": build_seconds,
    }
    if backend == "spattn":
        sparse = spattn_compile.report().sparse_calls
        row["sparse_calls"] = sparse
    return row


def measure(variant: str, args: argparse.Namespace) -> dict:
    """`run_variant` in a fresh process whose Inductor caches are in a fresh directory (a cold compile)."""
    command = [sys.executable, __file__, "--run", variant, "--device", args.device, "--dtype", args.dtype]
    if args.layers is not None:
        command += ["--layers", str(args.layers)]
    with tempfile.TemporaryDirectory(prefix="spattn_compile_time_") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"variant": variant, "error": f"did not finish in {args.timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"variant": variant, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def table(rows: list[dict], device: str) -> str:
    lines = [
        f"| how (device {device}) | blocks | first call, compile included (s) | second call (s) | graphs |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | - | {row['error']} | - | - |")
            continue
        lines.append(
            f"| {row['variant']} | {row['blocks']} | {row['first_call_s']:.1f} | {row['second_call_s']:.2f} | "
            f"{row['graphs']} |"
        )
    timed = {row["variant"]: row["first_call_s"] for row in rows if "error" not in row}
    for backend in ("spattn", "inductor"):
        whole, regional = timed.get(f"{backend} whole"), timed.get(f"{backend} regional")
        if whole and regional:
            lines.append(f"\n{backend}: whole-model first call / regional first call = {whole / regional:.1f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, help="blocks (default: the config's 30)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # float32 on the CPU: without a bf16 matrix unit the 30 blocks' bf16 matmuls take minutes even at 32 tokens,
    # which would hide the compile time in the first call.
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed for each variant")
    parser.add_argument("--run", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.run is not None:
        print(json.dumps(run_variant(args.run, args.layers, args.device, getattr(torch, args.dtype))))
        return

    print(f"torch {torch.__version__}, device {args.device}, {args.dtype}, Wan 2.1 1.3B config")
    rows = []
    for variant in args.variants:
        row = measure(variant, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "compile_time.json").write_text(json.dumps(rows, indent=1))
    print()
    print(table(rows, args.device))


if __name__ == "__main__":
    main()
