"""Everything of the quality benchmark in one command: train, evaluate, capture, fidelity on the capture; the table
is printed last.

    python benchmarks/quality/run_all.py --out "$OUT"            # one H200: ~8.5 minutes (README.md: the arithmetic)
    python benchmarks/quality/run_all.py --out /tmp/q --smoke    # the same code at a toy size on the CPU (~2 min)

Writes to `--out` (at most 8 files): `loss.png`, `samples.gif`, `samples.png`, `psnr_vs_density.png`,
`results.json`, `results.md`, `fidelity_trained.md`, and `checkpoint.pt` when it is at most 15 MiB. The checkpoint
(with `config.json` and its sha256), the captured attention and the fidelity JSON go to `--runs-dir` (git-ignored).
Each phase has a time guard (`--train-minutes`, `--eval-minutes`, `--recall-minutes`, `--fidelity-minutes`) so the
whole run fits one device call; results are written as they come, so a time-out still leaves them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKPOINT_LIMIT = 15 * 2**20
# Time guards in minutes: (one H200, --smoke on a shared CPU, what they bound). README.md has the arithmetic.
GUARDS = {
    "train": (3.4, 10.0, "training"),
    "eval": (4.5, 10.0, "the sampling runs"),
    "recall": (0.35, 5.0, "recall on the captured calls"),
    "fidelity": (0.4, 5.0, "fidelity.py on the captured calls: no new case after this"),
}


def _load_fidelity():
    path = HERE.parent / "fidelity.py"
    spec = importlib.util.spec_from_file_location("fidelity", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _reported(log, what: str):
    """Run a late phase so that its failure is printed but leaves the results of the earlier ones (and the table)."""
    try:
        yield
    except Exception:
        log(f"{what} FAILED:\n{traceback.format_exc()}")


def fidelity_cases(calls: list[dict], layers: int) -> list[int]:
    """Indices of the captured calls the float64 fidelity tables run on: the first, middle and last layer at the middle
    captured step, and the middle layer at the first and last captured steps."""
    steps = sorted({call["step"] for call in calls})
    if not steps:
        return []
    middle_step, middle_layer = steps[len(steps) // 2], layers // 2
    wanted = [(middle_step, 0), (middle_step, middle_layer), (middle_step, layers - 1)]
    wanted += [(steps[0], middle_layer), (steps[-1], middle_layer)]
    index = {(call["step"], call["layer"]): i for i, call in enumerate(calls)}
    return list(dict.fromkeys(index[key] for key in wanted if key in index))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs-dir", type=Path, default=HERE / "runs")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, a few steps: checks the whole path on a CPU")
    parser.add_argument("--checkpoint", type=Path, default=None, help="evaluate this checkpoint instead of training")
    for phase, (full, smoke, what) in GUARDS.items():
        parser.add_argument(
            f"--{phase}-minutes", type=float, default=None, help=f"{what} (default {full}; smoke {smoke})"
        )
    parser.add_argument("--metric-workers", type=int, default=None, help="processes for PSNR / SSIM (default 4)")
    args = parser.parse_args(argv)
    for phase, (full, smoke, _) in GUARDS.items():
        name = f"{phase}_minutes"
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    started = time.perf_counter()

    import evaluate as ev
    import torch
    import train as tr
    from model import ModelConfig

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out, runs_dir = args.out, args.runs_dir
    out.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quality/run_all.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    if args.smoke:
        model_config, train_config = tr.SMOKE_MODEL, tr.SMOKE_TRAIN
        eval_config = ev.EvalConfig(
            num_videos=2, steps=3, block_size=32, min_seq_len=0, metric_workers=2, capture_steps=(0.0, 1.0)
        )
    else:
        model_config, train_config, eval_config = ModelConfig(), tr.TrainConfig(), ev.EvalConfig()
    train_config = dataclasses.replace(train_config, max_minutes=args.train_minutes)
    eval_config = dataclasses.replace(eval_config, max_minutes=args.eval_minutes, recall_minutes=args.recall_minutes)
    if args.metric_workers is not None:
        eval_config = dataclasses.replace(eval_config, metric_workers=args.metric_workers)

    # 1. Train (or load).
    train_summary = None
    if args.checkpoint is None:
        model, result = tr.train(model_config, train_config, device, checkpoint_dir=runs_dir, log=log)
        train_summary = result.summary()
        tr.plot_losses(
            result, out / "loss.png",
            title=f"WanTransformer3DModel, {model_config.layers} layers, flow matching ({sum(result.steps_run)} steps)",
        )  # fmt: skip
        if result.checkpoint_bytes is not None and result.checkpoint_bytes <= CHECKPOINT_LIMIT:
            shutil.copy(result.checkpoint, out / "checkpoint.pt")
        log(f"training done: {json.dumps({k: train_summary[k] for k in ('steps_run', 'seconds', 'stopped_early')})}")
    else:
        model, model_config = tr.load_checkpoint(args.checkpoint, device)
    size = train_config.stages[-1].size

    # 2. Evaluate (sampling runs, capture, recall on the capture).
    figures = ev.speedup_figures()

    def write(evaluation) -> None:
        payload = dict(command=command, train=train_summary, model_config=dataclasses.asdict(model_config))
        payload |= ev.to_json(evaluation, figures)
        ev.write_json(out / "results.json", payload)
        header = ev.header_lines(command, device, train_summary, model_config, evaluation)
        (out / "results.md").write_text(ev.to_markdown(evaluation, figures, header) + "\n")

    capture_path = runs_dir / "captured_attention.pt"
    evaluation, kept = ev.evaluate(
        model, model_config, eval_config, size, device, capture_path=capture_path, write=write, log=log
    )
    write(evaluation)
    with _reported(log, "the plot and the sample pictures"):
        ev.plot_psnr(evaluation, out / "psnr_vs_density.png", title=f"Trained Wan, {evaluation.grid} tokens")
        ev.save_sample_pictures(
            kept, ev.class_names(eval_config.num_videos, model_config.num_classes), out / "samples.gif",
            out / "samples.png", caption=f"spattn default, sparsity {eval_config.focus_sparsity}",
        )  # fmt: skip
    log("evaluation written")

    # 3. The fidelity tables on the captured attention (float64), a few calls.
    cases = fidelity_cases(evaluation.captured, model_config.layers)
    fidelity_args = [
        "--suite", "trained", "--input", str(capture_path), "--device", str(device),
        "--output", str(out / "fidelity_trained.md"), "--json", str(runs_dir / "fidelity_trained.json"),
        "--block-size", str(eval_config.block_size), "--max-minutes", str(args.fidelity_minutes),
        "--cases", *map(str, cases),
    ]  # fmt: skip
    log("fidelity: python benchmarks/fidelity.py " + " ".join(fidelity_args))
    with _reported(log, "the fidelity tables"):
        _load_fidelity().main(fidelity_args)

    log(f"done in {time.perf_counter() - started:.0f} s")
    print()
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
