"""Quality of sparse generations on the trained model: PSNR and SSIM against the dense generation from the same noise.

`N` videos (one per class, batched) are sampled with dense attention (the uncompiled transformer: diffusers calls
SDPA) and then, for every method, with `torch.compile(transformer, backend="spattn", options={"compiler": "eager"})`
under `spattn_compile.config(...)` (the inner compiler runs the graph's own ops, so everything but the attention is
computed exactly as in the dense run; the "everything dense" control checks that to the bit). Same noise, same
Euler steps; per video PSNR and SSIM (`metrics.py`, scikit-image) against the dense video, then the mean over videos.

Methods (`tables()`): at every sparsity, the defaults, the oracle selection (the true top blocks: `SampledRows(rows=
block_size)` measures each query block's exact block mass) with and without rectification, and the peers' masks at
equal density (`baselines.py`: STA's sliding tile window, Radial Attention's static energy-decay mask, raster
mean-pooled top-k); at the focus sparsity (0.9) every estimator with every rectification mode and the schedules
(`dense_steps` 0 / 10% / 20% of the steps with `exact_plan_steps`, `refresh_interval` 1 / 5); two controls. Runs go in
priority order and a time guard skips what does not fit (listed as skipped). Per-layer recall and attention error of
each plan are measured on Q, K, V captured from the dense run (`capture.py`), not estimated.

The attention speedup of a density is not timed here (this script's wall time is Python and an eager inner compiler):
it is read from the repository's own benchmark logs (`speedup_figures`), named in the table's header.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from baselines import RadialDecay, RasterMeanPool, SlidingTileWindow, register_baselines
from capture import AttentionCapture, mean_by, measure_plans, save_capture
from data import CLASSES, VideoSize, make_batch
from metrics import summarise, video_metrics
from model import ClassConditionedWan, ModelConfig, euler_sample, to_inference_dtype

import spattn_compile
from spattn_compile.estimators import PooledTiles, QueryTiles, SampledRows

__all__ = ["EvalConfig", "Method", "evaluate", "speedup_figures", "tables"]

REPO = Path(__file__).resolve().parents[2]
KERNEL_LOG = REPO / "benchmarks/results/2026-11-23-h100/bench_attention.log"
STAGES_LOG = REPO / "benchmarks/results/2026-11-29-h200/stages_bf16_products.log"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    num_videos: int = 8
    steps: int = 30
    shift: float = 3.0
    sparsities: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95)
    focus_sparsity: float = 0.9
    seed: int = 1234
    block_size: int = 128
    min_seq_len: int | None = None  # None: the library's default
    capture_steps: tuple[float, ...] = (0.0, 0.5, 0.9)  # fractions of the steps
    capture_layers: tuple[int, ...] | None = None  # None: every layer
    metric_workers: int = 4  # worker processes for PSNR / SSIM (0: in this process)
    tables: tuple[str, ...] = ("sweep", "controls", "estimators", "schedules")  # which result tables to run
    max_minutes: float | None = None
    recall_minutes: float | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """A way to run the backend: `SparseAttentionConfig` fields (besides `sparsity`), a label, and which speedup
    figure applies ("fresh": a plan estimated every step; "cached": a static plan; "none": no speedup possible)."""

    label: str
    settings: tuple[tuple[str, Any], ...] = ()
    speedup: str = "fresh"
    recall: bool = True  # measurable on one captured call (not for schedules, whose plans come from other steps)

    def fields(self) -> dict[str, Any]:
        return dict(self.settings)

    @property
    def rectify(self) -> str:
        return self.fields().get("rectify", spattn_compile.SparseAttentionConfig().rectify)


def _method(label: str, speedup: str = "fresh", recall: bool = True, **settings) -> Method:
    return Method(label, tuple(sorted(settings.items())), speedup, recall)


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    method: Method
    sparsity: float


def tables(config: EvalConfig) -> dict[str, list[Row]]:
    """The result tables, each a list of rows in priority order (a method's run is shared by every row naming it).
    Registers the peers' estimators (`baselines.register_baselines`)."""
    register_baselines()
    bs = config.block_size
    defaults = spattn_compile.SparseAttentionConfig()
    oracle = SampledRows(rows=bs)
    sweep = [
        _method("default"),
        _method("oracle (true top blocks)", "none", estimator=oracle, rectify="none"),
        _method(f"oracle + {defaults.rectify} rectification", "none", estimator=oracle),
        _method("STA sliding tile window", "cached", estimator=SlidingTileWindow(), rectify="none"),
        _method("Radial energy-decay mask", "cached", estimator=RadialDecay(), rectify="none"),
        _method("raster mean-pooled top-k", "fresh", estimator=RasterMeanPool(), rectify="none", reorder="none"),
    ]
    focus = config.focus_sparsity
    order = [focus] + [s for s in sorted(config.sparsities, key=lambda s: abs(s - focus)) if s != focus]
    sweep_rows = [Row(m.label, m, s) for s in order for m in sweep]

    estimators = [
        (f"pooled {defaults.estimator.tile_size} + outliers (default)", defaults.estimator),
        ("query tiles 16", QueryTiles(tile_size=16)),
        ("sampled rows 8", SampledRows(rows=8)),
    ]
    # Per-head budgets (the `head_budget` policy) at the default estimator and rectification, first: the time guard
    # cuts the table's end.
    estimator_rows = []
    for budget in ("residual", "water_fill"):
        method = _method(f"per-head budgets: {budget} (default estimator, rectify query)", head_budget=budget)
        estimator_rows.append(Row(method.label, method, focus))
    for label, estimator in estimators:
        for rectify in ("none", "block", "query"):
            settings = {} if estimator == defaults.estimator else {"estimator": estimator}
            if rectify != defaults.rectify:
                settings["rectify"] = rectify
            method = _method(f"{label}, rectify {rectify}", **settings)
            estimator_rows.append(Row(method.label, method, focus))
    mean_pool = _method(
        "mean-pooled blocks, Hilbert order (SpargeAttn with its permutation)",
        estimator=PooledTiles(bs, outliers=False),
        rectify="none",
    )
    estimator_rows.append(Row(mean_pool.label, mean_pool, focus))

    schedule_rows = []
    # At the dense steps the exact plan's scores are the true block mass, so the budgets are calibrated on it.
    calibrated_dense = max(1, round(0.1 * config.steps))
    for budget in ("residual", "water_fill"):
        label = (
            f"dense_steps {calibrated_dense}, refresh_interval 1, exact_plan_steps {defaults.exact_plan_steps}, "
            f"per-head budgets {budget}"
        )
        schedule_rows.append(
            Row(label, _method(label, recall=False, dense_steps=calibrated_dense, head_budget=budget), focus)
        )
    for dense in sorted({0, round(0.1 * config.steps), round(0.2 * config.steps)}):
        for refresh in (1, 5):
            settings = {}
            if dense:
                settings["dense_steps"] = dense
            if refresh != 1:
                settings["refresh_interval"] = refresh
            label = f"dense_steps {dense}, refresh_interval {refresh}"
            if dense:
                label += f", exact_plan_steps {defaults.exact_plan_steps}"
            speedup = "fresh" if refresh == 1 else "cached"
            schedule_rows.append(Row(label, _method(label, speedup, recall=False, **settings), focus))

    controls = [
        Row("backend at sparsity 0 (every block, sparse kernel)", _method("sparsity 0", "none"), 0.0),
        Row(
            "backend, every call dense (min_seq_len above S)",
            _method("all dense", "none", recall=False, min_seq_len=2**31),
            focus,
        ),
    ]
    every = dict(sweep=sweep_rows, controls=controls, estimators=estimator_rows, schedules=schedule_rows)
    unknown = set(config.tables) - set(every)
    if unknown or "sweep" not in config.tables:
        raise ValueError(f"EvalConfig.tables={config.tables!r} is invalid: expected 'sweep' and any of {sorted(every)}")
    return {name: rows if name in config.tables else [] for name, rows in every.items()}


def run_order(all_tables: dict[str, list[Row]]) -> list[tuple[Method, float]]:
    """Unique (method settings, sparsity) runs in priority order: the sweep at the focus and next sparsity, the
    controls, the rest of the sweep, estimators, schedules."""
    sweep = all_tables["sweep"]
    per_sparsity = len({row.method.settings for row in sweep})
    ordered = sweep[: 2 * per_sparsity] + all_tables["controls"] + sweep[2 * per_sparsity :]
    ordered += all_tables["estimators"] + all_tables["schedules"]
    runs: dict[tuple, tuple[Method, float]] = {}
    for row in ordered:
        runs.setdefault(run_key(row.method, row.sparsity), (row.method, row.sparsity))
    return list(runs.values())


def run_key(method: Method, sparsity: float) -> tuple:
    return (method.settings, round(sparsity, 6))


def key_name(key: tuple) -> str:
    settings, sparsity = key
    text = ", ".join(f"{name}={value}" for name, value in settings) or "defaults"
    return f"{text} @ sparsity {sparsity}"


# ------------------------------------------------------------------------------------------------------------------
# Speedups from the repository's benchmark logs
# ------------------------------------------------------------------------------------------------------------------


def speedup_figures(kernel_log: Path = KERNEL_LOG, stages_log: Path = STAGES_LOG, shape: str = "wan14b-720p") -> dict:
    """Measured attention-call speedups over cuDNN dense, from the benchmark logs in `benchmarks/results/`.

    Returns `{"densities": {density: {"kernel", "fresh", "cached"}}, "source": ..., "estimator_cost": {name: % of
    dense}, "default_at_10": {...}, "stages_source": ...}`; missing logs give empty entries."""
    figures: dict[str, Any] = dict(densities={}, source=None, estimator_cost={}, default_at_10=None, stages_source=None)
    if kernel_log.exists():
        header: list[str] | None = None
        for line in kernel_log.read_text().splitlines():
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if cells and cells[0] == "shape" and "density" in cells:
                header = cells
            elif header and cells and cells[0] == shape and len(cells) == len(header):
                row = dict(zip(header, cells))
                density = round(float(row["density"]), 4)
                figures["densities"][density] = {
                    "kernel": float(row["dense/ours"].rstrip("x")),
                    "fresh": float(row["dense/pipeline"].rstrip("x")),
                    "cached": float(row["dense/cached"].rstrip("x")),
                }
        figures["source"] = (
            f"`{kernel_log.relative_to(REPO)}` (H100, 2026-11-23, {shape}, head dim 128, the first version's "
            "estimator; BENCHMARKS.md, 'Attention: our kernel and our whole pipeline')"
        )
    if stages_log.exists():
        text = stages_log.read_text()
        for line in text.splitlines():
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if len(cells) >= 6 and cells[5].endswith("%") and "(" in cells[0]:
                figures["estimator_cost"][cells[0]] = float(cells[5].rstrip("%"))
        match = re.search(
            r"kept density ([\d.]+); attention kernel [\d.]+ ms \(([\d.]+)x dense\); whole pipeline [\d.]+ ms "
            r"\(([\d.]+)x dense.*?with a cached plan [\d.]+ ms \(([\d.]+)x dense\)",
            text,
        )
        if match:
            figures["default_at_10"] = dict(
                density=float(match[1]), kernel=float(match[2]), fresh=float(match[3]), cached=float(match[4])
            )
        figures["stages_source"] = f"`{stages_log.relative_to(REPO)}` (H200, 2026-11-29, Wan 2.1 14B 720p)"
    return figures


def speedup_cell(method: Method, sparsity: float, figures: dict) -> str:
    if method.speedup == "none":
        return "-"
    row = figures["densities"].get(round(1 - sparsity, 4))
    if row is None:
        return "n/m"
    return f"{row['fresh']:.2f}x / {row['cached']:.2f}x" if method.speedup == "fresh" else f"{row['cached']:.2f}x"


# ------------------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    key: tuple
    label: str
    sparsity: float
    seconds: float = 0.0
    psnr: list[float] = dataclasses.field(default_factory=list)
    ssim: list[float] = dataclasses.field(default_factory=list)
    report: dict = dataclasses.field(default_factory=dict)
    skipped: str | None = None
    pending: list[Future] | None = None

    def collect(self, wait: bool) -> None:
        if self.pending and (wait or all(f.done() for f in self.pending)):
            values = [f.result() for f in self.pending]
            self.psnr, self.ssim = [v[0] for v in values], [v[1] for v in values]
            self.pending = None

    def summary(self) -> dict:
        return dict(
            key=key_name(self.key), label=self.label, sparsity=self.sparsity, seconds=round(self.seconds, 2),
            psnr=summarise(self.psnr), ssim=summarise(self.ssim), psnr_per_video=self.psnr, ssim_per_video=self.ssim,
            report=self.report, skipped=self.skipped,
        )  # fmt: skip


class _InlineFuture:
    def __init__(self, value) -> None:
        self._value = value

    def done(self) -> bool:
        return True

    def result(self):
        return self._value


def _report_summary() -> dict:
    records = spattn_compile.report().records
    sparse = [r for r in records if r.kind == "sparse"]
    return dict(
        calls=len(records),
        sparse_calls=len(sparse),
        dense_calls=len(records) - len(sparse),
        refreshes=sum(r.cache == "refresh" for r in sparse),
        cache_hits=sum(r.cache == "hit" for r in sparse),
        mean_density=float(np.mean([r.density for r in sparse])) if sparse else 1.0,
        mean_estimated_recall=float(np.mean([r.recall for r in sparse])) if sparse else 1.0,
    )


@dataclasses.dataclass
class Evaluation:
    config: EvalConfig
    model_config: ModelConfig
    size: VideoSize
    grid: tuple[int, int, int]
    device: str
    dtype: str
    deterministic: bool | None = None
    dense_max_difference: float | None = None
    runs: dict[tuple, RunResult] = dataclasses.field(default_factory=dict)
    recall_rows: list[dict] = dataclasses.field(default_factory=list)
    capture_path: str | None = None
    captured: list[dict] = dataclasses.field(default_factory=list)  # (step, layer) of each captured call
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)


def evaluate(
    model: ClassConditionedWan,
    model_config: ModelConfig,
    config: EvalConfig,
    size: VideoSize,
    device: torch.device | str,
    *,
    capture_path: Path | None = None,
    write: Callable[[Evaluation], None] | None = None,
    log=print,
) -> tuple[Evaluation, dict[str, np.ndarray]]:
    """Run every method (module docstring). Returns the evaluation and the videos kept for pictures (`dense`,
    `default`: float32 `(N, 3, F, H, W)`, and `data`: training-distribution videos of the same classes). `write` is
    called after each run (partial results survive a time-out)."""
    started = time.perf_counter()
    deadline = None if config.max_minutes is None else started + 60 * config.max_minutes
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    grid = model_config.latent_grid(size.frames, size.height, size.width)
    model = to_inference_dtype(model.to(device).eval(), dtype)
    transformer = model.transformer
    labels = torch.arange(config.num_videos) % model_config.num_classes
    conditioning = model.conditioning(labels.to(device))
    shape = (config.num_videos, 3, size.frames, size.height, size.width)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(config.seed)).to(device)
    sample = dict(conditioning=conditioning, noise=noise, steps=config.steps, shift=config.shift, dtype=dtype)
    evaluation = Evaluation(config, model_config, size, grid, str(device), str(dtype).replace("torch.", ""))
    all_tables = tables(config)
    base_fields: dict[str, Any] = dict(block_size=config.block_size)
    if config.min_seq_len is not None:
        base_fields["min_seq_len"] = config.min_seq_len

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Dense reference, then the same again with the capture mode on: determinism, and the captured Q, K, V.
    t0 = time.perf_counter()
    dense = euler_sample(transformer, **sample)
    synchronize()
    log(f"dense sampling: {time.perf_counter() - t0:.1f} s for {config.num_videos} videos x {config.steps} steps")
    steps_to_capture = sorted({min(config.steps - 1, round(f * (config.steps - 1))) for f in config.capture_steps})
    capture = AttentionCapture(video_tokens=math.prod(grid), steps=steps_to_capture, layers=config.capture_layers)
    with capture:
        repeat = euler_sample(transformer, **sample, on_step=capture.begin_step)
    synchronize()
    evaluation.deterministic = bool(torch.equal(dense, repeat))
    evaluation.dense_max_difference = float((dense - repeat).abs().max())
    log(
        f"dense sampling twice from the same noise: identical={evaluation.deterministic} (max |difference| "
        f"{evaluation.dense_max_difference:.3g}); captured {len(capture.calls)} attention calls"
    )
    if capture_path is not None:
        capture_path.parent.mkdir(parents=True, exist_ok=True)
        save_capture(capture_path, capture, grid, dict(model_config=dataclasses.asdict(model_config), size=str(size)))
        evaluation.capture_path = str(capture_path)
    captured = dict(video_grid=grid, text_len=0, text_first=False, calls=capture.calls)
    evaluation.captured = [dict(step=call["step"], layer=call["layer"]) for call in capture.calls]
    del repeat

    reference = dense.cpu().numpy()
    pool = None
    if config.metric_workers > 0:
        import multiprocessing

        pool = ProcessPoolExecutor(config.metric_workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(candidate: np.ndarray) -> list:
        if pool is None:
            return [_InlineFuture(video_metrics(r, c)) for r, c in zip(reference, candidate)]
        return [pool.submit(video_metrics, r, c) for r, c in zip(reference, candidate)]

    compiled = torch.compile(transformer, backend="spattn", options={"compiler": "eager"})
    kept: dict[str, np.ndarray] = dict(dense=reference)
    default_key = run_key(all_tables["sweep"][0].method, config.focus_sparsity)
    for method, sparsity in run_order(all_tables):
        key = run_key(method, sparsity)
        result = RunResult(key, method.label, sparsity)
        evaluation.runs[key] = result
        if deadline is not None and time.perf_counter() > deadline:
            result.skipped = "time guard"
            continue
        t0 = time.perf_counter()
        try:
            with spattn_compile.config(sparsity=sparsity, **{**base_fields, **method.fields()}):
                spattn_compile.new_generation()
                spattn_compile.reset_report()
                video = euler_sample(compiled, **sample)
                result.report = _report_summary()
        except Exception as error:  # one failing method must not cost the others their (device) time
            result.skipped = f"failed: {type(error).__name__}: {error}"
            log(f"{key_name(key)} FAILED:\n{traceback.format_exc()}")
            continue
        candidate = video.cpu().numpy()
        result.seconds = time.perf_counter() - t0
        result.pending = submit(candidate)
        if key == default_key:
            kept["default"] = candidate
        for other in evaluation.runs.values():
            other.collect(wait=False)
        log(
            f"[{time.perf_counter() - started:6.1f} s] {key_name(key)}: {result.seconds:.1f} s, "
            f"{result.report['sparse_calls']} sparse / {result.report['dense_calls']} dense calls, "
            f"density {result.report['mean_density']:.3f}"
        )
        if write is not None:
            write(evaluation)
    for result in evaluation.runs.values():
        result.collect(wait=True)
    if pool is not None:
        pool.shutdown()
    for reason in ("time guard", "failed"):
        names = [key_name(k) for k, r in evaluation.runs.items() if r.skipped and r.skipped.startswith(reason)]
        if names:
            evaluation.notes.append(f"{len(names)} runs not run ({reason}): {names}")

    # Recall and attention error of every plan on the captured calls.
    plans: dict[str, dict] = {}
    for name in ("sweep", "estimators"):
        for row in all_tables[name]:
            if row.method.recall:
                plans[key_name(run_key(row.method, row.sparsity))] = dict(
                    sparsity=row.sparsity, **{**base_fields, **row.method.fields()}
                )
    recall_deadline = None
    if config.recall_minutes is not None:
        recall_deadline = time.perf_counter() + 60 * config.recall_minutes
    t0 = time.perf_counter()
    evaluation.recall_rows = measure_plans(captured, plans, device=device, deadline=recall_deadline, log=log)
    log(f"recall on {len(capture.calls)} captured calls x {len(plans)} plans: {time.perf_counter() - t0:.1f} s")
    kept["data"] = make_batch(labels, seed=config.seed, size=size).numpy()
    evaluation.seconds = time.perf_counter() - started
    if write is not None:
        write(evaluation)
    return evaluation, kept


# ------------------------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------------------------


def _fmt(stats: dict, digits: int) -> str:
    if not stats.get("count"):
        return "-"
    if math.isinf(stats["mean"]):
        return "identical" if stats.get("identical") == stats["count"] else f"inf ({stats['identical']} identical)"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _recall_by_plan(evaluation: Evaluation) -> tuple[dict, dict]:
    return mean_by(evaluation.recall_rows, ("plan",), "recall"), mean_by(evaluation.recall_rows, ("plan",), "error")


def to_json(evaluation: Evaluation, figures: dict) -> dict:
    recall, error = _recall_by_plan(evaluation)
    all_tables = tables(evaluation.config)
    rows = {}
    for name, table in all_tables.items():
        rows[name] = []
        for row in table:
            key = run_key(row.method, row.sparsity)
            result = evaluation.runs.get(key)
            rows[name].append(
                dict(
                    label=row.label, sparsity=row.sparsity, rectify=row.method.rectify, run=key_name(key),
                    result=None if result is None else result.summary(),
                    captured_recall=recall.get((key_name(key),)), captured_attention_error=error.get((key_name(key),)),
                    speedup=speedup_cell(row.method, row.sparsity, figures),
                )
            )  # fmt: skip
    return dict(
        config=dataclasses.asdict(evaluation.config),
        size=dataclasses.asdict(evaluation.size),
        grid=evaluation.grid,
        device=evaluation.device,
        dtype=evaluation.dtype,
        deterministic=evaluation.deterministic,
        dense_max_difference=evaluation.dense_max_difference,
        tables=rows,
        recall_rows=evaluation.recall_rows,
        capture_path=evaluation.capture_path,
        seconds=round(evaluation.seconds, 1),
        notes=evaluation.notes,
        speedup_figures={k: v for k, v in figures.items() if k != "densities"}
        | {"densities": {str(k): v for k, v in figures["densities"].items()}},
    )


def targets(evaluation: Evaluation) -> list[str]:
    """The issue's targets, stated with the numbers either way."""
    config = evaluation.config
    all_tables = tables(config)
    sweep = all_tables["sweep"]
    lines = []

    def psnr(row: Row) -> float | None:
        result = evaluation.runs.get(run_key(row.method, row.sparsity))
        if result is None or result.skipped or not result.psnr:
            return None
        return summarise(result.psnr)["mean"]

    focus = [row for row in sweep if row.sparsity == config.focus_sparsity]
    default, oracle = psnr(focus[0]), psnr(focus[1])
    baselines = [(row.label, psnr(row)) for row in focus[3:]]
    if default is None:
        return ["targets: the default run at the focus sparsity did not run"]
    measured = [(label, value) for label, value in baselines if value is not None]
    beaten = all(default >= value for _, value in measured)
    detail = ", ".join(f"{label} {value:.2f}" for label, value in measured)
    lines.append(
        f"- Default at sparsity {config.focus_sparsity}: PSNR {default:.2f} dB; baselines at equal density: {detail}: "
        f"**{'met' if beaten and measured else 'not met'}** (>= every baseline)."
    )
    if oracle is not None:
        gap = oracle - default
        relation = f"{gap:.2f} dB below it" if gap >= 0 else f"{-gap:.2f} dB above it"
        rectified = psnr(focus[2])
        also = f" (the oracle with {focus[2].method.rectify} rectification: {rectified:.2f} dB)" if rectified else ""
        lines.append(
            f"- Oracle selection (true top blocks, no rectification) at {config.focus_sparsity}: {oracle:.2f} dB"
            f"{also}; the default is {relation}: **{'met' if gap <= 1.0 else 'not met'}** (within 1 dB)."
        )
    at_75 = [row for row in sweep if abs(row.sparsity - 0.75) < 1e-9]
    if at_75:
        value = psnr(at_75[0])
        if value is not None:
            verdict = "met" if value >= 30 else "not met"
            lines.append(f"- Default at sparsity 0.75: {value:.2f} dB: **{verdict}** (>= 30 dB).")
    return lines


def to_markdown(evaluation: Evaluation, figures: dict, header: str) -> str:
    config = evaluation.config
    recall, error = _recall_by_plan(evaluation)
    all_tables = tables(config)
    lines = [header, ""]
    if evaluation.deterministic is not None:
        same = "bitwise identical" if evaluation.deterministic else "NOT identical"
        lines.append(
            f"Dense sampling twice from the same noise: {same} (max |difference| "
            f"{evaluation.dense_max_difference:.3g})."
        )
    lines += [f"Note: {note}" for note in evaluation.notes]
    speed_note = (
        "Attention speedup: one attention call at this density against cuDNN dense, fresh plan / cached plan, from "
        f"{figures['source']}; 'n/m': not measured at this density; '-': none (the oracle needs dense attention)."
        if figures["source"]
        else "Attention speedup: no benchmark log found."
    )
    if figures.get("default_at_10"):
        d10 = figures["default_at_10"]
        speed_note += (
            f" With today's default estimator at {d10['density']:.3f} density: {d10['fresh']:.2f}x fresh / "
            f"{d10['cached']:.2f}x cached ({figures['stages_source']})."
        )
    lines += ["", speed_note, ""]

    def row_cells(row: Row) -> list[str]:
        key = run_key(row.method, row.sparsity)
        result = evaluation.runs.get(key)
        if result is None or result.skipped:
            reason = f" ({result.skipped.splitlines()[0][:100]})" if result is not None and result.skipped else ""
            return [f"not run{reason}".replace("|", "/")] + [""] * 4
        name = (key_name(key),)
        recall_cell = f"{recall[name]:.4f}" if name in recall else ("n/a" if not row.method.recall else "-")
        error_cell = f"{error[name]:.4f}" if name in error else ("n/a" if not row.method.recall else "-")
        return [
            _fmt(summarise(result.psnr), 2),
            _fmt(summarise(result.ssim), 4),
            recall_cell,
            error_cell,
            f"{result.report.get('mean_density', math.nan):.3f}",
        ]

    headings = "| PSNR dB | SSIM | recall | attn error | kept density |"
    lines += [
        "## Sparse against dense, by method and sparsity",
        "",
        "PSNR and SSIM: mean ± std over the videos; recall (share of the true attention mass in the kept blocks) "
        "and attn error (`||out - dense|| / ||dense||` of the attention output) measured on the captured calls, "
        "mean over steps and layers; kept density from `spattn_compile.report()`.",
        "",
        "| method | rectify | sparsity " + headings + " attention speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(all_tables["sweep"], key=lambda r: (r.sparsity, all_tables["sweep"].index(r))):
        cells = row_cells(row)
        speed = speedup_cell(row.method, row.sparsity, figures)
        lines.append(f"| {row.label} | {row.method.rectify} | {row.sparsity} | " + " | ".join(cells) + f" | {speed} |")

    cost = figures.get("estimator_cost", {})
    lines += [
        "",
        f"## Estimators and rectification at sparsity {config.focus_sparsity}",
        "",
        f"estimate + select cost: % of a dense attention call, from {figures.get('stages_source') or 'n/m'}.",
        "",
        "| estimator, rectify " + headings + " estimate + select cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in all_tables["estimators"]:
        estimator = row.method.fields().get("estimator", spattn_compile.SparseAttentionConfig().estimator)
        cost_cell = cost.get(_estimator_label(estimator))
        lines.append(
            f"| {row.label} | " + " | ".join(row_cells(row)) + f" | {f'{cost_cell:.2f}%' if cost_cell else 'n/m'} |"
        )
    lines += [
        "",
        f"## Schedules at sparsity {config.focus_sparsity} ({config.steps} steps)",
        "",
        "| schedule " + headings,
        "|---|---|---|---|---|---|",
    ]
    for row in all_tables["schedules"]:
        lines.append(f"| {row.label} | " + " | ".join(row_cells(row)) + " |")
    lines += ["", "## Controls", "", "| control | sparsity " + headings, "|---|---|---|---|---|---|---|"]
    for row in all_tables["controls"]:
        lines.append(f"| {row.label} | {row.sparsity} | " + " | ".join(row_cells(row)) + " |")

    by_layer = mean_by(evaluation.recall_rows, ("plan", "layer"), "recall")
    if by_layer:
        layers = sorted({layer for _, layer in by_layer})
        focus_rows = [row for row in all_tables["sweep"] if row.sparsity == config.focus_sparsity]
        focus_rows += [row for row in all_tables["estimators"] if row.method.recall]
        seen = set()
        lines += [
            "",
            f"## Recall per layer at sparsity {config.focus_sparsity} (captured Q, K, V; mean over the captured steps)",
            "",
            "| method | " + " | ".join(f"layer {layer}" for layer in layers) + " |",
            "|---|" + "---|" * len(layers),
        ]
        for row in focus_rows:
            name = key_name(run_key(row.method, row.sparsity))
            if name in seen:
                continue
            seen.add(name)
            cells = [f"{by_layer[(name, layer)]:.4f}" if (name, layer) in by_layer else "-" for layer in layers]
            lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""] + targets(evaluation)
    return "\n".join(lines)


def _estimator_label(estimator) -> str:
    fields = ", ".join(f"{f.name}={getattr(estimator, f.name)}" for f in dataclasses.fields(estimator))
    return f"{estimator.name}({fields})"


def header_lines(command: str, device: torch.device | str, train_summary: dict | None, model_config, evaluation) -> str:
    import importlib.metadata

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    versions = [f"torch {torch.__version__}"]
    for package in ("triton", "diffusers", "scikit-image"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    config = evaluation.config
    lines = [
        "# Quality on a trained video DiT: sparse against dense generations",
        "",
        f"Measured {datetime.date.today().isoformat()} with `{command}` on {name}, {', '.join(versions)}.",
        "",
        f"Model: diffusers `WanTransformer3DModel`, {model_config.layers} layers, {model_config.heads} heads of "
        f"{model_config.head_dim}, FFN {model_config.ffn_dim}, pixel space with patch {model_config.patch}, "
        f"{model_config.num_classes} classes through {model_config.text_tokens} learned `encoder_hidden_states` "
        f"tokens; videos {evaluation.size.frames}x{evaluation.size.height}x{evaluation.size.width} px = "
        f"{evaluation.grid[0]}x{evaluation.grid[1]}x{evaluation.grid[2]} = {math.prod(evaluation.grid)} tokens, "
        f"blocks of {config.block_size}.",
    ]
    if train_summary:
        validation = train_summary.get("validation") or []
        val_text = f", validation loss {validation[0][1]:.4f} -> {validation[-1][1]:.4f}" if validation else ""
        lines.append(
            f"Training: {train_summary['steps_run']} steps per stage (planned {train_summary['steps_planned']}), "
            f"{train_summary['seconds']} s, final loss {train_summary['final_loss_mean_last_50']:.4f} (mean of the "
            f"last 50 steps){val_text}; checkpoint sha256 {train_summary.get('checkpoint_sha256')}."
        )
    lines.append(
        f"Sampling: {config.num_videos} videos (one per class), Euler {config.steps} steps, shift {config.shift}, "
        f'{evaluation.dtype}, the same noise for every method; backend `torch.compile(..., backend="spattn", '
        'options={"compiler": "eager"})`, settings per run with `spattn_compile.config(...)`.'
    )
    return "\n".join(lines)


def plot_psnr(evaluation: Evaluation, path: Path, title: str = "") -> None:
    """PSNR and SSIM against kept density, one line per method of the sweep (mean ± std over videos)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_tables = tables(evaluation.config)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    labels = list(dict.fromkeys(row.label for row in all_tables["sweep"]))
    for label in labels:
        points = []
        for row in all_tables["sweep"]:
            result = evaluation.runs.get(run_key(row.method, row.sparsity))
            if row.label == label and result is not None and result.psnr and not result.skipped:
                points.append((1 - row.sparsity, summarise(result.psnr), summarise(result.ssim)))
        points.sort()
        if not points:
            continue
        x = [p[0] for p in points]
        style = "o-" if "oracle" not in label else "s--"
        for axis, index in ((axes[0], 1), (axes[1], 2)):
            mean = [p[index]["mean"] for p in points]
            std = [p[index]["std"] if math.isfinite(p[index]["std"]) else 0.0 for p in points]
            axis.errorbar(x, mean, yerr=std, fmt=style, capsize=3, label=label)
    controls = all_tables["controls"]
    control = evaluation.runs.get(run_key(controls[0].method, 0.0)) if controls else None
    if control is not None and control.psnr and math.isfinite(summarise(control.psnr)["mean"]):
        floor = summarise(control.psnr)["mean"]
        low, high = axes[0].get_ylim()
        if floor <= high + 0.5 * (high - low):
            axes[0].axhline(floor, color="gray", linestyle=":", label="sparsity 0 (all blocks, sparse kernel)")
        else:
            title = (title or "Sparse against dense generations") + f" (sparsity 0 control: {floor:.1f} dB)"
    for axis, name in ((axes[0], "PSNR against dense (dB)"), (axes[1], "SSIM against dense")):
        axis.set_xscale("log")
        axis.set_xlabel("kept density (1 - sparsity)")
        axis.set_ylabel(name)
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title or "Sparse against dense generations")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _to_uint8(video: np.ndarray) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    return (np.clip((video.transpose(1, 2, 3, 0) + 1) / 2, 0, 1) * 255 + 0.5).astype(np.uint8)


def save_sample_pictures(kept: dict[str, np.ndarray], labels: list[str], gif_path: Path, png_path: Path, caption: str):
    """An animated GIF (dense samples, and the default sparse ones beside them when they ran) and a still PNG: per
    class a training-distribution video, the dense sample and the sparse sample at three frames."""
    from PIL import Image, ImageDraw

    dense = np.stack([_to_uint8(v) for v in kept["dense"]])  # (N, F, H, W, 3)
    sparse = np.stack([_to_uint8(v) for v in kept["default"]]) if "default" in kept else None
    data = np.stack([_to_uint8(v) for v in kept["data"]])
    n, frames, h, w, _ = dense.shape
    columns = min(n, 4)
    rows = -(-n // columns)

    def tile(videos: np.ndarray, frame: int) -> np.ndarray:
        canvas = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
        for index in range(n):
            r, c = divmod(index, columns)
            canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = videos[index, frame]
        return canvas

    band = 16
    gif_frames = []
    for frame in range(frames):
        panels = [("dense", tile(dense, frame))]
        if sparse is not None:
            panels.append((caption, tile(sparse, frame)))
        width = sum(p[1].shape[1] for p in panels) + 8 * (len(panels) - 1)
        image = Image.new("RGB", (width, rows * h + band), "white")
        draw = ImageDraw.Draw(image)
        x = 0
        for title, panel in panels:
            image.paste(Image.fromarray(panel), (x, band))
            draw.text((x + 4, 2), title, fill="black")
            x += panel.shape[1] + 8
        gif_frames.append(image)
    gif_frames[0].save(gif_path, save_all=True, append_images=gif_frames[1:], duration=125, loop=0)

    picks = sorted({0, frames // 2, frames - 1})
    groups = [("data", data), ("dense sample", dense)] + ([("sparse sample", sparse)] if sparse is not None else [])
    strip_w = len(groups) * len(picks) * w + 8 * (len(groups) - 1)
    image = Image.new("RGB", (strip_w + 150, n * h + band), "white")
    draw = ImageDraw.Draw(image)
    x = 150
    for title, videos in groups:
        draw.text((x + 4, 2), f"{title}: frames {picks}", fill="black")
        for column, frame in enumerate(picks):
            for index in range(n):
                image.paste(Image.fromarray(videos[index, frame]), (x + column * w, band + index * h))
        x += len(picks) * w + 8
    for index in range(n):
        draw.text((4, band + index * h + 4), labels[index], fill="black")
    image.save(png_path)


def class_names(num_videos: int, num_classes: int) -> list[str]:
    return [CLASSES[i % num_classes].name for i in range(num_videos)]


def write_json(path: Path, payload: dict) -> None:
    def default(value):
        if isinstance(value, (np.floating, np.integer)):
            return value.item()
        if isinstance(value, torch.dtype):
            return str(value)
        return repr(value)

    text = json.dumps(payload, indent=1, default=default, allow_nan=True)
    path.write_text(text + "\n")
