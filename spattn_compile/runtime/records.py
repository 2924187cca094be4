"""What the sparse attention of a compiled model did, call by call: the records `spattn_compile.report()` reads.

Each compiled model keeps a `Recorder` (in its `ModelState`); the op appends one record per rewritten attention call
that runs inside a compiled model (so with a step context): dense or sparse and why, the density and estimated recall
of the plan it used, whether the plan was refreshed or taken from the cache, and, when `enable_timing(True)` is in
force on CUDA, a pair of CUDA events around the call. Numbers stay device tensors while the model runs (no host sync in
the hot path) and are read when `report()` (`runtime.report`) is called. Under context parallelism each process
(rank) records its own calls, with the global heads each held (`HeadRange`). Each recorder is bounded (the oldest
calls are dropped beyond `max_records`). `ScheduleReport` is what `report()` returns: `print(report())` shows a table;
`report().head_table()` each head's density and estimated recall in the latest plan of each layer (per-head budgets,
`SparseAttentionConfig.head_budget`, give heads different densities); `report().plot(path)` draws the kept-block
share of the latest plan of each layer, each head's density and estimated recall, and the density per layer and step
to a PNG (needs matplotlib: `pip install spattn_compile[plot]`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading

import torch

__all__ = [
    "KINDS",
    "AttentionRecord",
    "HeadRange",
    "PendingRecord",
    "ReportSettings",
    "Recorder",
    "ScheduleReport",
    "enable_timing",
    "head_summary",
    "report_settings",
    "timing_enabled",
]

# What the schedule did with a call: sparse, or dense because of the warm-up steps, a dense layer, a short sequence,
# no grid for the call (its run-time grid is unknown, or does not hold the call's video tokens) or inputs the sparse
# attention cannot take (`spattn_compile.capability`).
KINDS = ("sparse", "dense_step", "dense_layer", "short", "no_grid", "capability")


@dataclasses.dataclass(frozen=True)
class HeadRange:
    """The heads of one attention call under context parallelism (diffusers' Ulysses attention): this process is rank
    `rank` of `world_size` and its call holds the model's heads `first ... first + count - 1`."""

    rank: int
    world_size: int
    first: int
    count: int

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


@dataclasses.dataclass(frozen=True)
class AttentionRecord:
    """One attention call of a compiled model, as read by `report()`.

    model: the model's name (its class, with "#k" for the k-th further model of that class).
    layer_index: the layer's index in its model (see `ModelState.layer_index`); layer: its module path.
    kind: one of "sparse", "dense_step" (a warm-up step), "dense_layer" (`dense_layers`), "short" (`min_seq_len`),
        "no_grid" (no run-time grid for the call), "capability" (inputs the sparse attention cannot take).
    cache: for sparse calls "refresh" (plan selected and cached) or "hit" (cached plan reused); for the last dense
        step "exact" when it measured the true block mass for the next steps' plan; "" otherwise.
    density: share of video key blocks kept (1.0 when dense). recall: share of the attention mass in the kept blocks
        by the plan's block scores (1.0 when dense): an estimate of the estimate's, or a measurement when `estimator`
        measures mass ("exact": the true mass of every query row; "sampled_rows": the exact mass of sampled rows).
    estimator: what produced the plan's block scores ("" for dense calls).
    time_ms: CUDA-event time of the call, None unless timing was enabled on CUDA.
    heads: under context parallelism, the rank and the global heads the call held (`HeadRange`); None otherwise
        (every head). Each process records its own calls: `report()` on rank r shows rank r's.
    """

    model: str
    generation: int
    step: int
    branch: int
    layer_index: int
    layer: str
    kind: str
    cache: str
    density: float
    recall: float
    time_ms: float | None
    estimator: str = ""
    heads: HeadRange | None = None


@dataclasses.dataclass
class PendingRecord:
    """One call as the op records it: its numbers may still be device tensors, its time a pair of CUDA events."""

    sequence: int
    model: str
    generation: int
    step: int
    branch: int
    layer_index: int
    layer: str
    kind: str
    cache: str
    density: torch.Tensor | float
    recall: torch.Tensor | float
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None
    estimator: str
    heads: HeadRange | None = None


class ReportSettings:
    """Process-wide report settings: timing, the default bound of each recorder, and the call order across models."""

    def __init__(self) -> None:
        self.timing = False
        self.max_records = 100_000
        self.sequence = itertools.count()


_SETTINGS = ReportSettings()


def report_settings() -> ReportSettings:
    """The process-wide report settings."""
    return _SETTINGS


def head_summary(plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Device tensors, float32 `(H,)` (mean over the batch), without a host sync: each head's share of video key
    blocks kept (`SparsePlan.density`) and estimated recall (`SparsePlan.estimated_recall`)."""
    return plan.density().mean(0), plan.estimated_recall().mean(0)


class Recorder:
    """The records of one compiled model (bounded: the oldest are dropped beyond `max_records`), and the kept-block
    share of the latest plan refresh of each (layer, branch)."""

    def __init__(self, max_records: int | None = None) -> None:
        self.lock = threading.Lock()
        self.records: collections.deque[PendingRecord] = collections.deque(maxlen=max_records or _SETTINGS.max_records)
        # (layer index, layer name, branch) -> (step, kept share (NB, NB)) of the latest refresh.
        self.masks: dict[tuple[int, str, int], tuple[int, torch.Tensor]] = {}
        # (layer index, layer name, branch) -> (step, density (H,), estimated recall (H,)) of the latest refresh.
        self.heads: dict[tuple[int, str, int], tuple[int, torch.Tensor, torch.Tensor]] = {}

    def clear(self, max_records: int | None = None) -> None:
        with self.lock:
            self.records = collections.deque(maxlen=max_records or self.records.maxlen)
            self.masks = {}
            self.heads = {}


def enable_timing(enabled: bool = True) -> None:
    """Time each sparse-capable attention call of compiled models with CUDA events (adds two event records per call,
    no sync); `report()` then fills `time_ms`."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _SETTINGS.timing = enabled


def timing_enabled() -> bool:
    """Whether `enable_timing(True)` is in force."""
    return _SETTINGS.timing


@dataclasses.dataclass(frozen=True, eq=False)
class ScheduleReport:
    """The calls recorded since the last `reset_report()`, oldest first (see `AttentionRecord`).

    masks: (model, layer_index, layer, branch) -> (step, kept share `(NB, NB)` on the CPU) of the latest refresh.
    heads: (model, layer_index, layer, branch) -> (step, density `(H,)`, estimated recall `(H,)`, on the CPU) of the
        latest refresh: each head's share of the video key blocks and of the estimated mass.
    """

    records: tuple[AttentionRecord, ...]
    masks: dict[tuple[str, int, str, int], tuple[int, torch.Tensor]]
    heads: dict[tuple[str, int, str, int], tuple[int, torch.Tensor, torch.Tensor]] = dataclasses.field(
        default_factory=dict
    )

    @property
    def models(self) -> tuple[str, ...]:
        """The models that made the recorded calls, in the order of their first call."""
        return tuple(dict.fromkeys(r.model for r in self.records))

    def layers(self, model: str | None = None) -> tuple[str, ...]:
        """The layers (module paths) with records, of one model or of all, in the order of their first call."""
        return tuple(dict.fromkeys(r.layer for r in self.records if model is None or r.model == model))

    def count(self, kind: str | None = None, cache: str | None = None) -> int:
        """Number of records of a kind and/or cache outcome (None matches any)."""
        return sum((kind is None or r.kind == kind) and (cache is None or r.cache == cache) for r in self.records)

    @property
    def sparse_calls(self) -> int:
        return self.count("sparse")

    @property
    def dense_calls(self) -> int:
        return len(self.records) - self.sparse_calls

    @property
    def cache_hits(self) -> int:
        return self.count("sparse", "hit")

    @property
    def refreshes(self) -> int:
        return self.count("sparse", "refresh")

    def __str__(self) -> str:
        if not self.records:
            return "spattn report: no attention call recorded (run a model compiled with backend='spattn')"
        header: tuple[str, ...] = (
            "model", "gen", "step", "branch", "layer", "module", "mode", "plan", "density", "recall", "estimator",
            "time ms",
        )  # fmt: skip
        rows: list[tuple[str, ...]] = [
            (
                r.model,
                str(r.generation),
                str(r.step),
                str(r.branch),
                str(r.layer_index),
                r.layer,
                r.kind,
                r.cache or "-",
                f"{r.density:.3f}",
                f"{r.recall:.3f}",
                r.estimator or "-",
                "-" if r.time_ms is None else f"{r.time_ms:.3f}",
            )
            for r in self.records
        ]
        if any(r.heads is not None for r in self.records):
            # Context parallelism: which rank recorded the call and which of the model's heads it held.
            header = (*header, "rank", "heads")
            rows = [
                (*row, "-", "all") if r.heads is None else (*row, f"{r.heads.rank}/{r.heads.world_size}", str(r.heads))
                for row, r in zip(rows, self.records)
            ]
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in (header, *rows)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"{len(self.records)} calls: {self.sparse_calls} sparse ({self.refreshes} plan refreshes, "
            f"{self.cache_hits} cache hits), {self.dense_calls} dense"
        )
        return "\n".join(lines)

    def head_table(self) -> str:
        """Each head's density and estimated recall in the latest plan of each (model, layer, branch)."""
        if not self.heads:
            return "spattn report: no sparse plan recorded"
        lines = []
        for (model, _, layer, branch), (step, density, recall) in sorted(
            self.heads.items(), key=lambda item: (item[0][0], item[0][3], item[0][1])
        ):
            pairs = enumerate(zip(density.tolist(), recall.tolist()))
            cells = "  ".join(f"{h}: {d:.3f}/{r:.3f}" for h, (d, r) in pairs)
            lines.append(f"{model} {layer} branch {branch} step {step}  head: density/recall  {cells}")
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Draw the kept-block share of each layer's latest plan (branch 0 first), each head's density and estimated
        recall in those plans, and the mean density per layer and step to a PNG at `path`. Needs matplotlib (the
        `plot` extra)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(
                "report().plot needs matplotlib: pip install 'spattn_compile[plot]' (or pip install matplotlib)"
            ) from error
        if not self.records:
            raise ValueError("report().plot: nothing recorded yet; run a model compiled with backend='spattn' first")
        masks = sorted(self.masks.items(), key=lambda item: (item[0][0], item[0][3], item[0][1]))
        panels = len(masks) + 1 + bool(self.heads)
        columns = min(4, panels)
        rows = -(-panels // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows), squeeze=False)
        flat = [axis for row in axes for axis in row]
        for axis, ((model, _, layer, branch), (step, share)) in zip(flat, masks):
            axis.imshow(share.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            axis.set_title(f"{model} {layer} branch {branch} (step {step})", fontsize=7)
            axis.set_xlabel("key block", fontsize=7)
            axis.set_ylabel("query block", fontsize=7)
        if self.heads:
            self._plot_heads(flat[len(masks) + 1])
        density = flat[len(masks)]
        by_layer: dict[str, dict[int, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        several = len(self.models) > 1
        for r in self.records:
            layer = r.layer or f"#{r.layer_index}"
            by_layer[f"{r.model} {layer}" if several else layer][r.step].append(r.density)
        for layer in sorted(by_layer):
            steps = sorted(by_layer[layer])
            density.plot(steps, [sum(by_layer[layer][s]) / len(by_layer[layer][s]) for s in steps], label=f"{layer}")
        density.set_xlabel("step")
        density.set_ylabel("density")
        density.set_ylim(0, 1.05)
        density.set_title("density per layer", fontsize=8)
        if len(by_layer) <= 12:
            density.legend(title="layer", fontsize=6)
        for axis in flat[panels:]:
            axis.axis("off")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)

    def _plot_heads(self, axis) -> None:
        """Each head's density (x) and estimated recall (y) in the latest plan of each layer, one point per head."""
        several = len(self.models) > 1
        entries = sorted(self.heads.items(), key=lambda item: (item[0][0], item[0][3], item[0][1]))
        for (model, _, layer, branch), (_, density, recall) in entries:
            label = f"{model} {layer}" if several else layer
            axis.scatter(density.numpy(), recall.numpy(), s=10, label=f"{label} b{branch}")
        axis.set_xlabel("head density", fontsize=7)
        axis.set_ylabel("estimated recall", fontsize=7)
        axis.set_xlim(0, 1.05)
        axis.set_ylim(0, 1.05)
        axis.set_title("per head (latest plan)", fontsize=8)
        if len(entries) <= 12:
            axis.legend(fontsize=5)
