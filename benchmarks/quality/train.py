"""Train the quality benchmark's video DiT from scratch: flow matching on `data.py`'s videos, class-conditioned.

Stages at increasing resolution (Wan's own recipe in miniature): most steps at a quarter of the tokens, where
attention costs 16x less per sample, then the full resolution that evaluation samples at, so the attention patterns
measured there are trained ones. The step counts are fixed (reproducible) and chosen from a FLOP count
(`model.train_step_flops`, printed before training); `max_minutes` is a guard: each stage may use its share of it in
proportion to its planned FLOPs, stops early if it runs out, and the result records how many steps ran.

bf16 autocast with float32 master weights, fused AdamW on CUDA, linear warm-up then cosine decay, gradient clipping.
Data, noise and times of step i come from generators seeded by (seed, i), so a run is a function of its settings (up
to the non-determinism of the GPU's attention backward). A fixed validation batch (fixed videos, noise and times
0.25 / 0.5 / 0.75) is scored at the start, every `val_every` steps and at the end of each stage: a loss curve without
the noise of random times.

Run alone: `python benchmarks/quality/train.py --out runs/` (`--smoke` for a CPU-sized run); the driver
`run_all.py` calls `train(...)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from data import CLASSES, VideoSize, make_batch
from model import ClassConditionedWan, ModelConfig, forward_flops, shift_time, train_step_flops

__all__ = ["Stage", "TrainConfig", "TrainResult", "load_checkpoint", "plan", "plot_losses", "save_checkpoint", "train"]

ASSUMED_TFLOPS = 245.0  # planning figure: ~35% of an H200's ~700 TFLOP/s dense bf16 (see README.md)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: pixel video size, batch and step count."""

    frames: int
    height: int
    width: int
    batch: int
    steps: int

    @property
    def size(self) -> VideoSize:
        return VideoSize(self.frames, self.height, self.width)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    stages: tuple[Stage, ...] = (Stage(16, 64, 96, batch=16, steps=1200), Stage(16, 128, 192, batch=4, steps=400))
    lr: float = 6e-4
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    shift: float = 3.0
    occluder_probability: float = 0.5
    seed: int = 0
    val_every: int = 100
    max_minutes: float | None = None


@dataclasses.dataclass
class TrainResult:
    """What training did: per-step loss, validation points `(step, loss)`, steps run per stage, time, FLOPs."""

    losses: list[float]
    stage_of_step: list[int]
    validation: list[tuple[int, float]]
    steps_run: list[int]
    steps_planned: list[int]
    stopped_early: bool
    seconds: float
    flops: float
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    checkpoint_bytes: int | None = None

    def summary(self) -> dict:
        recent = self.losses[-50:]
        return dict(
            steps_run=self.steps_run,
            steps_planned=self.steps_planned,
            stopped_early=self.stopped_early,
            seconds=round(self.seconds, 1),
            flops=self.flops,
            achieved_tflops=round(self.flops / max(self.seconds, 1e-9) / 1e12, 1),
            final_loss_mean_last_50=sum(recent) / max(len(recent), 1),
            validation=self.validation,
            checkpoint=self.checkpoint,
            checkpoint_sha256=self.checkpoint_sha256,
            checkpoint_bytes=self.checkpoint_bytes,
        )


def plan(model_config: ModelConfig, config: TrainConfig) -> list[dict]:
    """Per stage: tokens per sample, FLOPs per step and per stage, and the time at `ASSUMED_TFLOPS`."""
    rows = []
    for stage in config.stages:
        grid = model_config.latent_grid(stage.frames, stage.height, stage.width)
        per_step = train_step_flops(model_config, grid, stage.batch)
        forward = forward_flops(model_config, grid)
        rows.append(
            dict(
                grid=grid,
                tokens=math.prod(grid),
                batch=stage.batch,
                steps=stage.steps,
                attention_share=forward["attention"] / forward["total"],
                flops_per_step=per_step,
                flops=per_step * stage.steps,
                seconds_at_assumed_rate=per_step * stage.steps / (ASSUMED_TFLOPS * 1e12),
            )
        )
    return rows


def _learning_rate(config: TrainConfig, step: int, total: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * (config.final_lr_ratio + (1 - config.final_lr_ratio) * cosine)


def _labels(step: int, batch: int, num_classes: int) -> torch.Tensor:
    """Classes cycled so every class is drawn equally often."""
    return (torch.arange(batch) + step * batch) % num_classes


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def flow_matching_loss(
    model: ClassConditionedWan,
    videos: torch.Tensor,
    labels: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    *,
    autocast: bool,
) -> torch.Tensor:
    """Mean squared error of the predicted velocity `noise - videos` at times `t (B,)` (already shifted)."""
    x_t = (1 - t)[:, None, None, None, None] * videos + t[:, None, None, None, None] * noise
    with torch.autocast(videos.device.type, dtype=torch.bfloat16, enabled=autocast):
        prediction = model(x_t, t, labels)
    return F.mse_loss(prediction.float(), noise - videos)


def _validation_batch(model_config: ModelConfig, config: TrainConfig, stage: Stage, device: torch.device):
    times = torch.tensor([0.25, 0.5, 0.75], device=device)
    count = min(model_config.num_classes, 4)
    labels = torch.arange(count).repeat_interleave(len(times))
    videos = make_batch(
        labels, seed=config.seed + 10**6, size=stage.size, device=device,
        occluder_probability=config.occluder_probability,
    )  # fmt: skip
    noise = torch.randn(videos.shape, generator=_generator(device, config.seed + 10**6), device=device)
    return videos, labels.to(device), noise, times.repeat(count)


@torch.no_grad()
def _validate(model, batch, autocast: bool) -> float:
    videos, labels, noise, t = batch
    model.eval()
    loss = float(flow_matching_loss(model, videos, labels, noise, t, autocast=autocast))
    model.train()
    return loss


def train(
    model_config: ModelConfig,
    config: TrainConfig,
    device: torch.device | str,
    *,
    checkpoint_dir: Path | None = None,
    log=print,
) -> tuple[ClassConditionedWan, TrainResult]:
    """Train from scratch; returns the model (float32, eval mode) and what happened. With `checkpoint_dir`, writes
    `checkpoint.pt`, `config.json` (both configs, steps run, the checkpoint's sha256) there."""
    device = torch.device(device)
    if model_config.num_classes > len(CLASSES):
        raise ValueError(f"num_classes={model_config.num_classes} is more than the {len(CLASSES)} classes of data.py")
    torch.manual_seed(config.seed)
    model = ClassConditionedWan(model_config).to(device).train()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, fused=cuda
    )
    stages_plan = plan(model_config, config)
    total_steps = sum(stage.steps for stage in config.stages)
    total_flops = sum(row["flops"] for row in stages_plan)
    for index, row in enumerate(stages_plan):
        log(
            f"stage {index}: grid {row['grid']} ({row['tokens']} tokens, attention {row['attention_share']:.0%} of "
            f"the forward), batch {row['batch']}, {row['steps']} steps x {row['flops_per_step']:.3g} FLOP = "
            f"{row['flops']:.3g} FLOP, {row['seconds_at_assumed_rate']:.0f} s at {ASSUMED_TFLOPS:.0f} TFLOP/s"
        )
    started = time.perf_counter()
    losses: list[float] = []
    stage_of_step: list[int] = []
    validation: list[tuple[int, float]] = []
    steps_run: list[int] = []
    flops_done = 0.0
    stopped_early = False
    step = 0
    budget_used = 0.0
    for index, (stage, row) in enumerate(zip(config.stages, stages_plan)):
        val_batch = _validation_batch(model_config, config, stage, device)
        validation.append((step, _validate(model, val_batch, cuda)))
        budget_used += row["flops"] / total_flops
        deadline = None if config.max_minutes is None else started + 60 * config.max_minutes * budget_used
        ran = 0
        for _ in range(stage.steps):
            if deadline is not None and time.perf_counter() > deadline:
                stopped_early = True
                log(f"stage {index}: time guard reached after {ran} of {stage.steps} steps")
                break
            labels = _labels(step, stage.batch, model_config.num_classes)
            videos = make_batch(
                labels, seed=config.seed * 10**7 + step, size=stage.size, device=device,
                occluder_probability=config.occluder_probability,
            )  # fmt: skip
            generator = _generator(device, config.seed * 10**7 + step)
            noise = torch.randn(videos.shape, generator=generator, device=device)
            t = shift_time(torch.sigmoid(torch.randn(stage.batch, generator=generator, device=device)), config.shift)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step, total_steps)
            loss = flow_matching_loss(model, videos, labels.to(device), noise, t, autocast=cuda)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss is {value} at step {step} (stage {index})")
            losses.append(value)
            stage_of_step.append(index)
            flops_done += row["flops_per_step"]
            step += 1
            ran += 1
            if config.val_every and ran % config.val_every == 0 and ran < stage.steps:
                validation.append((step, _validate(model, val_batch, cuda)))
            if ran % 50 == 0 or ran == stage.steps:
                elapsed = time.perf_counter() - started
                recent = losses[-50:]
                log(
                    f"[{elapsed:6.1f} s] stage {index} step {ran}/{stage.steps}: loss {sum(recent) / len(recent):.4f}"
                    f" (mean of {len(recent)}), {flops_done / elapsed / 1e12:.0f} TFLOP/s so far"
                )
        steps_run.append(ran)
        validation.append((step, _validate(model, val_batch, cuda)))
        log(f"stage {index}: validation loss {validation[-1][1]:.4f} after {ran} steps")
    seconds = time.perf_counter() - started
    model.eval()
    result = TrainResult(
        losses, stage_of_step, validation, steps_run, [s.steps for s in config.stages], stopped_early, seconds,
        flops_done,
    )  # fmt: skip
    if checkpoint_dir is not None:
        save_checkpoint(model, model_config, config, result, Path(checkpoint_dir))
    return model, result


def _jsonable(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save_checkpoint(model, model_config: ModelConfig, config: TrainConfig, result: TrainResult, directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "checkpoint.pt"
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    torch.save({"model": state, "model_config": _jsonable(model_config), "train_config": _jsonable(config)}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    result.checkpoint, result.checkpoint_sha256, result.checkpoint_bytes = str(path), digest, path.stat().st_size
    (directory / "config.json").write_text(
        json.dumps(
            dict(
                model_config=_jsonable(model_config),
                train_config=_jsonable(config),
                steps_run=result.steps_run,
                checkpoint="checkpoint.pt",
                sha256=digest,
            ),
            indent=2,
        )
        + "\n"
    )


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[ClassConditionedWan, ModelConfig]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    fields = payload["model_config"]
    model_config = ModelConfig(**{**fields, "patch": tuple(fields["patch"])})
    model = ClassConditionedWan(model_config)
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), model_config


def plot_losses(result: TrainResult, path: Path, title: str = "") -> None:
    """Per-step training loss (and its moving average) and the validation loss, stages marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=120)
    steps = range(1, len(result.losses) + 1)
    axis.plot(steps, result.losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="training loss (per step)")
    window = 25
    if len(result.losses) >= window:
        cumulative = [0.0]
        for value in result.losses:
            cumulative.append(cumulative[-1] + value)
        average = [(cumulative[i] - cumulative[i - window]) / window for i in range(window, len(cumulative))]
        axis.plot(range(window, len(result.losses) + 1), average, color="tab:blue", label=f"mean of {window} steps")
    # Validation points come in stages (a new resolution has its own loss level): one segment per stage.
    segments: list[list[tuple[int, float]]] = [[]]
    for point in result.validation:
        if segments[-1] and point[0] == segments[-1][-1][0]:
            segments.append([])
        segments[-1].append(point)
    for number, segment in enumerate(s for s in segments if s):
        vsteps, vloss = zip(*segment)
        label = "validation (fixed batch, t = .25 / .5 / .75)" if number == 0 else None
        axis.plot(vsteps, vloss, "o-", color="tab:red", markersize=3, label=label)
    boundary = 0
    for index, ran in enumerate(result.steps_run[:-1]):
        boundary += ran
        axis.axvline(boundary, color="gray", linestyle="--", linewidth=0.8)
        axis.text(boundary, axis.get_ylim()[1], f" stage {index + 1}", va="top", fontsize=8, color="gray")
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("flow-matching loss (MSE of the velocity)")
    axis.set_title(title or "Training loss")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


SMOKE_MODEL = ModelConfig(num_classes=2, layers=2, heads=2, head_dim=16, ffn_dim=64, text_tokens=2, text_dim=16,
                          freq_dim=32)  # fmt: skip
SMOKE_TRAIN = TrainConfig(stages=(Stage(4, 16, 24, batch=4, steps=6), Stage(4, 32, 48, batch=2, steps=4)),
                          lr=2e-3, warmup_steps=2, val_every=3)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the checkpoint, config and loss plot")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--smoke", action="store_true", help="a toy model and a few steps (CPU)")
    args = parser.parse_args(argv)
    model_config, config = (SMOKE_MODEL, SMOKE_TRAIN) if args.smoke else (ModelConfig(), TrainConfig())
    config = dataclasses.replace(config, max_minutes=args.max_minutes)
    _, result = train(model_config, config, args.device, checkpoint_dir=args.out)
    plot_losses(result, args.out / "loss.png")
    print(json.dumps(result.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
