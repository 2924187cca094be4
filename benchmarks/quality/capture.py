"""Captured attention: Q, K, V of the trained model's self-attention at chosen denoising steps and layers, saved as
the input of `benchmarks/fidelity.py --suite trained`, and the per-layer recall of each method measured on them.

Capture. `AttentionCapture` is a `TorchFunctionMode` active during one dense (uncompiled) sampling run: it sees every
`torch.nn.functional.scaled_dot_product_attention` call, takes those whose queries and keys are the video tokens
(self-attention; Wan's cross-attention has the class tokens as keys) as layers 0, 1, ... of the current forward, and
copies sample 0's `(1, H, S, D)` query, key and value of the chosen steps and layers to the CPU. It changes nothing
that the model computes (the run's output is checked bit for bit against the first dense run).

File format (`torch.save`, loadable with `weights_only=True`), `FORMAT = "spattn-captured-attention/1"`:

    {"format": FORMAT, "video_grid": (F, H, W), "text_len": 0, "text_first": False, "model": {...},
     "calls": [{"step": i, "timestep": t, "layer": l, "query": q, "key": k, "value": v}, ...]}

with q, k, v `(1, H, F*H*W + text_len, D)` in the model's dtype, video tokens in raster (t, y, x) order, as SDPA saw
them (after Wan's RMS norms and rotary embedding).

Recall. `measure_plans` selects each method's plan on every captured call with the public `select_plan` (the
backend's own stages: Triton on CUDA) and scores it with `spattn_compile.testing.PlanEvaluator`: recall (the share of
the true attention mass inside the kept blocks) and the attention output's relative error against dense attention.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import spattn_compile
from spattn_compile.layout import token_layout
from spattn_compile.testing import PlanEvaluator

__all__ = ["FORMAT", "AttentionCapture", "load_capture", "mean_by", "measure_plans", "save_capture"]

FORMAT = "spattn-captured-attention/1"


class AttentionCapture(TorchFunctionMode):
    """Records self-attention Q, K, V of sample `sample` at `steps` and `layers` (None: every layer) of a sampling run
    whose sequences hold `video_tokens` tokens. Call `begin_step(i, t)` before each denoising step (the sampler's
    `on_step`)."""

    def __init__(
        self, *, video_tokens: int, steps: Iterable[int], layers: Iterable[int] | None = None, sample: int = 0
    ) -> None:
        super().__init__()
        self.video_tokens = video_tokens
        self.steps = frozenset(steps)
        self.layers = None if layers is None else frozenset(layers)
        self.sample = sample
        self.calls: list[dict] = []
        self._step: int | None = None
        self._timestep: float | None = None
        self._layer = 0

    def begin_step(self, index: int, timestep: float | None = None) -> None:
        self._step, self._timestep, self._layer = index, timestep, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value")
            q, k, v = (kwargs[name] if name in kwargs else args[index] for index, name in enumerate(names))
            if q.shape[-2] == k.shape[-2] == self.video_tokens:
                layer = self._layer
                self._layer += 1
                if self._step in self.steps and (self.layers is None or layer in self.layers):
                    rows = slice(self.sample, self.sample + 1)
                    self.calls.append(
                        dict(
                            step=self._step,
                            timestep=self._timestep,
                            layer=layer,
                            **{name: t[rows].detach().to("cpu", copy=True) for name, t in zip(names, (q, k, v))},
                        )
                    )
        return func(*args, **kwargs)


def save_capture(path, capture: AttentionCapture, video_grid, model: Mapping) -> None:
    payload = dict(
        format=FORMAT, video_grid=tuple(video_grid), text_len=0, text_first=False, model=dict(model),
        calls=capture.calls,
    )  # fmt: skip
    torch.save(payload, path)


def load_capture(path) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a captured-attention file (expected format {FORMAT!r})")
    return payload


def measure_plans(
    capture: Mapping,
    plans: Mapping[str, dict],
    *,
    device: torch.device | str,
    compute_dtype: torch.dtype = torch.float32,
    deadline: float | None = None,
    log=print,
) -> list[dict]:
    """Per captured call and plan: recall, error, kept density.

    `plans`: name -> SparseAttentionConfig fields (at least `sparsity`; `reorder` picks the layout the evaluator
    uses). Returns rows `dict(step, layer, plan, recall, error, density)`. Calls go step by step from the middle
    captured step outwards (every layer of a step before the next step), so that calls not reached before `deadline`
    (a `time.perf_counter()` value; skipped and logged) leave whole steps measured."""
    device = torch.device(device)
    grid, text_len, text_first = tuple(capture["video_grid"]), capture["text_len"], capture["text_first"]
    steps = sorted({call["step"] for call in capture["calls"]})
    middle = steps[len(steps) // 2] if steps else 0
    calls = sorted(capture["calls"], key=lambda c: (abs(steps.index(c["step"]) - steps.index(middle)), c["step"]))
    # Bigger chunks on a GPU: fewer, larger kernels (memory ~ 10 * rows * S * heads floats per chunk).
    chunk_rows = 4096 if device.type == "cuda" else 1024
    rows: list[dict] = []
    for number, call in enumerate(calls):
        if deadline is not None and time.perf_counter() > deadline:
            log(f"recall: time guard reached after {number} of {len(calls)} captured calls")
            break
        q, k, v = (call[name].to(device) for name in ("query", "key", "value"))
        by_layout: dict[tuple, dict[str, tuple]] = {}
        for name, fields in plans.items():
            config = spattn_compile.SparseAttentionConfig(**{"min_seq_len": 0, **fields})
            try:
                plan = spattn_compile.select_plan(
                    q, k, v, video_grid=grid, text_len=text_len, text_first=text_first, config=config
                )
            except Exception as error:  # one failing plan must not cost the others theirs
                log(f"recall: {name} at step {call['step']} layer {call['layer']} FAILED: {error!r}")
                continue
            key = (config.block_size, config.reorder)
            by_layout.setdefault(key, {})[name] = (plan, config.rectify)
        for (block_size, reorder), named in by_layout.items():
            layout = token_layout(grid, text_len, text_first, block_size, reorder)
            evaluator = PlanEvaluator(q, k, v, layout, compute_dtype=compute_dtype, chunk_rows=chunk_rows)
            for name, result in evaluator.evaluate(named).items():
                rows.append(
                    dict(
                        step=call["step"], layer=call["layer"], plan=name, recall=result.recall,
                        error=result.error, density=result.density,
                    )
                )  # fmt: skip
            del evaluator
    return rows


def mean_by(rows: list[dict], keys: tuple[str, ...], value: str) -> dict[tuple, float]:
    """Mean of `value` over rows grouped by `keys` (NaN-free groups only)."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if math.isfinite(row[value]):
            groups.setdefault(tuple(row[k] for k in keys), []).append(row[value])
    return {key: sum(values) / len(values) for key, values in groups.items()}
