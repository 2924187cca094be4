"""`spattn_compile.report()`: what the sparse attention of compiled models did, per model, layer, step and branch.

`report()` gathers the records of every compiled model (`runtime.records`, appended by the op) in call order, reading
their device numbers then (one host sync per stored tensor); models are named by class (with "#1", "#2"... for further
models of one class) and layers by module path. Under context parallelism it reads this process's records.
`reset_report()` empties every model's records; `enable_timing(True)` adds CUDA-event times.
"""

from __future__ import annotations

import torch

from .binding import default_registry
from .records import AttentionRecord, PendingRecord, ScheduleReport, enable_timing, report_settings

__all__ = ["ScheduleReport", "enable_timing", "report", "reset_report"]


def reset_report(max_records: int | None = None) -> None:
    """Forget every record of every compiled model (and optionally change how many each model keeps, 100,000 by
    default)."""
    if max_records is not None and (
        not isinstance(max_records, int) or isinstance(max_records, bool) or max_records < 1
    ):
        raise ValueError(f"max_records must be None or a positive int, got {max_records!r}")
    if max_records is not None:
        report_settings().max_records = max_records
    for model in default_registry().models():
        model.recorder.clear(max_records)


def _value(x: torch.Tensor | float) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def report() -> ScheduleReport:
    """Read every compiled model's records (one host sync per stored tensor) into a `ScheduleReport`, in call order."""
    pending: list[PendingRecord] = []
    masks: dict[tuple[str, int, str, int], tuple[int, torch.Tensor]] = {}
    heads: dict[tuple[str, int, str, int], tuple[int, torch.Tensor, torch.Tensor]] = {}
    for model in default_registry().models():
        with model.recorder.lock:
            pending.extend(model.recorder.records)
            for (index, layer, branch), value in model.recorder.masks.items():
                masks[(model.name, index, layer, branch)] = value
            for (index, layer, branch), summary in model.recorder.heads.items():
                heads[(model.name, index, layer, branch)] = summary
    pending.sort(key=lambda p: p.sequence)
    if any(p.events is not None for p in pending):
        torch.cuda.synchronize()
    records = tuple(
        AttentionRecord(
            p.model,
            p.generation,
            p.step,
            p.branch,
            p.layer_index,
            p.layer,
            p.kind,
            p.cache,
            _value(p.density),
            _value(p.recall),
            None if p.events is None else p.events[0].elapsed_time(p.events[1]),
            p.estimator,
            p.heads,
        )
        for p in pending
    )
    mask_values = {key: (step, share.detach().float().cpu()) for key, (step, share) in masks.items()}
    head_values = {
        key: (step, density.detach().float().cpu(), recall.detach().float().cpu())
        for key, (step, density, recall) in heads.items()
    }
    return ScheduleReport(records, mask_values, head_values)
