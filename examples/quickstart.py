"""Quickstart: compile a Wan-style diffusers transformer with the `spattn` backend and compare it with dense attention.

    python examples/quickstart.py                          # small random model, CPU, well under a minute
    python examples/quickstart.py --config wan2.1-1.3b --device cuda --weights /path/to/Wan2.1-T2V-1.3B-Diffusers

It builds a `diffusers.WanTransformer3DModel` (a small random config by default; `--config` takes a preset name or a
JSON file of model config; `--weights` a local checkpoint directory, never the hub), prints what the backend does to
every attention call (`spattn_compile.explain`), then runs one denoiser forward pass with dense attention (the eager
model) and with `torch.compile(model, backend="spattn")`, and prints the relative error of the output and the time
of both. Next to the error it prints the error of the oracle selection on the same call: the same compiled model and
density, with the true top blocks (`SampledRows(rows=block_size)` scores every query row, so its block scores are
the exact attention mass), so that the estimate's error has something to be compared with. The inner compiler is
Inductor on CUDA and eager on the CPU, where the sparse attention runs as the plain-PyTorch reference and Inductor's
first compile would cost more than the whole demo; `--compiler` overrides it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import spattn_compile
from spattn_compile.estimators import SampledRows

# Published transformer configs of the Wan 2.1 Diffusers checkpoints, and the latent size (frames, height, width)
# of their usual video: 81 frames at 480p (1.3B) or 720p (14B), VAE stride (4, 8, 8).
PRESETS = {
    "small": (
        {
            "patch_size": (1, 2, 2),
            "num_attention_heads": 4,
            "attention_head_dim": 32,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 64,
            "freq_dim": 64,
            "ffn_dim": 256,
            "num_layers": 2,
        },
        (5, 32, 48),
    ),
    "wan2.1-1.3b": (
        {
            "patch_size": (1, 2, 2),
            "num_attention_heads": 12,
            "attention_head_dim": 128,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 4096,
            "freq_dim": 256,
            "ffn_dim": 8960,
            "num_layers": 30,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": 1e-6,
            "rope_max_seq_len": 1024,
        },
        (21, 60, 104),
    ),
    "wan2.1-14b": (
        {
            "patch_size": (1, 2, 2),
            "num_attention_heads": 40,
            "attention_head_dim": 128,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 4096,
            "freq_dim": 256,
            "ffn_dim": 13824,
            "num_layers": 40,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": 1e-6,
            "rope_max_seq_len": 1024,
        },
        (21, 90, 160),
    ),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="small", help=f"a preset ({', '.join(PRESETS)}) or a JSON config file")
    parser.add_argument("--weights", type=Path, help="local WanTransformer3DModel checkpoint directory")
    parser.add_argument("--latent", type=int, nargs=3, metavar=("F", "H", "W"), help="latent frames, height, width")
    parser.add_argument("--text-len", type=int, default=32, help="text tokens (cross-attention only, in Wan)")
    parser.add_argument("--sparsity", type=float, default=0.75, help="share of video key blocks each block skips")
    parser.add_argument("--rectify", default=None, choices=("none", "block", "query"), help="default: the library's")
    parser.add_argument("--block-size", type=int, help="tokens per block (default: 64 for 'small', else 128)")
    parser.add_argument(
        "--estimator",
        default=None,
        help="block-importance estimator: 'pooled', 'query_tiles' or 'sampled_rows' (default: the library's)",
    )
    parser.add_argument("--min-seq-len", type=int, help="shorter sequences stay dense (default: 0 for 'small')")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bf16 on CUDA, else fp32")
    parser.add_argument("--compiler", choices=("auto", "inductor", "eager", "aot_eager"), default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes of each model")
    return parser.parse_args()


def load_model(args: argparse.Namespace, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    if args.weights is not None:
        # A pipeline directory keeps the transformer in a subfolder; a transformer directory is used as it is.
        subfolder = "transformer" if (args.weights / "transformer").is_dir() else None
        model = WanTransformer3DModel.from_pretrained(
            args.weights, subfolder=subfolder, torch_dtype=dtype, local_files_only=True
        )
        latent = PRESETS.get(args.config, PRESETS["wan2.1-1.3b"])[1]
    else:
        if args.config in PRESETS:
            config, latent = PRESETS[args.config]
        else:
            config = json.loads(Path(args.config).read_text())
            config = {k: v for k, v in config.items() if not k.startswith("_")}
            latent = PRESETS["wan2.1-1.3b"][1]
        torch.manual_seed(0)
        model = WanTransformer3DModel(**config)
        if dtype != torch.float32:
            model = model.to(dtype)
    return model.eval().to(args.device), tuple(args.latent or latent)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def timed(fn, repeats: int, device: str) -> tuple[torch.Tensor, float]:
    """The output of `fn()` and its mean wall time in seconds over `repeats` calls (after the caller's warm-up)."""
    out = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeats


def main() -> None:
    args = parse_args()
    small = args.config == "small" and args.weights is None
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device != "cpu" else torch.float32)
    settings = {
        "sparsity": args.sparsity,
        # The small demo has ~1.5k video tokens: small blocks, and no minimum length, so that attention is sparse.
        "block_size": args.block_size or (64 if small else 128),
        "min_seq_len": args.min_seq_len if args.min_seq_len is not None else (0 if small else 2048),
    }
    if args.estimator is not None:
        settings["estimator"] = args.estimator
    if args.rectify is not None:
        settings["rectify"] = args.rectify
    compiler = args.compiler if args.compiler != "auto" else ("inductor" if args.device != "cpu" else "eager")

    model, (frames, height, width) = load_model(args, dtype)
    config = model.config
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, config.in_channels, frames, height, width, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, args.text_len, config.text_dim, generator=generator),
    }
    inputs = {k: v.to(args.device, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    patch = config.patch_size
    grid = (frames // patch[0], height // patch[1], width // patch[2])

    print(f"model: WanTransformer3DModel ({args.config}), {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M")
    print(f"input: latent {frames}x{height}x{width} -> video grid {grid} = {math.prod(grid)} tokens, {dtype}")
    print(f"settings: {settings}, inner compiler {compiler!r}, device {args.device}")
    print()

    with torch.no_grad(), spattn_compile.config(**settings):
        print(spattn_compile.explain(model, **inputs))
    print()

    compiled = torch.compile(model, backend="spattn", options={"compiler": compiler, **settings})
    with torch.no_grad():
        start = time.perf_counter()
        compiled(**inputs)
        compile_seconds = time.perf_counter() - start
        model(**inputs)  # warm-up of the eager model
        dense, dense_seconds = timed(lambda: model(**inputs).sample, args.repeats, args.device)
        sparse, sparse_seconds = timed(lambda: compiled(**inputs).sample, args.repeats, args.device)
        # The oracle: the same call, selecting the true top blocks (every query row scored exactly).
        with spattn_compile.config(estimator=SampledRows(rows=settings["block_size"])):
            oracle = compiled(**inputs).sample

    error, oracle_error = relative_error(sparse, dense), relative_error(oracle, dense)
    finite = bool(torch.isfinite(sparse).all())
    estimator = settings.get("estimator", spattn_compile.current_config().estimator)
    print(f"relative error of the output vs dense attention, at sparsity {args.sparsity} (finite: {finite}):")
    rows = {f"selection by the estimate ({estimator})": error, "oracle selection (true top blocks)": oracle_error}
    width = max(len(label) for label in rows)
    for label, value in rows.items():
        print(f"  {label:{width}s}  {value:.4f}")
    print(f"  the estimate's error is {error / oracle_error:.2f}x the oracle's")
    if args.weights is None:
        print("  (random weights attend almost uniformly, so any selection is close to the oracle: BENCHMARKS.md,")
        print("  'Selection fidelity against the oracle', measures it on inputs with the structure of a trained DiT)")
    print(f"{'dense (eager model)':24s} {dense_seconds * 1e3:9.1f} ms per forward")
    print(f"{'spattn (' + compiler + ')':24s} {sparse_seconds * 1e3:9.1f} ms per forward")
    ratio = dense_seconds / sparse_seconds
    print(f"ratio dense / spattn: {ratio:.2f}x (the first spattn call, compilation included: {compile_seconds:.1f} s)")
    if args.device == "cpu":
        print("(on the CPU the sparse op runs its plain-PyTorch reference, so it is not expected to be faster)")


if __name__ == "__main__":
    main()
