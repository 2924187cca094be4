"""Which denoising step and CFG branch a forward of a compiled model is: the step tracking of the schedule.

**Step awareness without model edits.** A model's `StepTracker` advances once per forward of the model, before any
attention layer runs, from the model's `timestep` argument (read by the forward hook the backend puts on the model,
`runtime.binding`). It compares the timestep with the previous call's:

- the same timestep: the same step, the next branch (Wan calls the transformer twice per step, conditional then
  unconditional, so these get branches 0 and 1);
- a smaller timestep: the next step, branch 0 (denoising runs from high to low timesteps; CogVideoX batches its
  two CFG branches into one call of batch 2 and HunyuanVideo is guidance-distilled: both make one call per step, and
  the per-sample plans of a batch are separate anyway);
- a larger timestep, or a call of `new_generation()` since the last call: a new generation starting at step 0,
  whose plans are never taken from the previous one.

Reading the timestep costs one device-to-host copy per forward (not per layer). `with spattn_compile.step(i)` (or
`step(i, branch=b)`) names the step explicitly, reads nothing and takes precedence; a step lower than the previous
one also starts a new generation. A model without a `timestep` counts every call as a new step (branch 0) and starts
a new generation only on `new_generation()`. More than `MAX_BRANCHES` (8) calls at one timestep also start a new
generation, so that a loop re-running one input (a benchmark) keeps a bounded number of plans. Each model counts its
own steps: in Wan 2.2 A14B the low-noise expert's first call is its step 0 (so `dense_steps` applies to each expert's
first steps; name the pipeline's step with `step(i)` to count across experts). Limits: a scheduler that evaluates the
model twice at one timestep (Heun) makes the second call a branch of that step.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import threading
from collections.abc import Callable, Iterator

import torch

__all__ = ["MAX_BRANCHES", "Step", "StepTracker", "new_generation", "step"]

# More calls than this at one timestep start a new generation (see StepTracker.advance).
MAX_BRANCHES = 8


@dataclasses.dataclass(frozen=True)
class Step:
    """Where one forward of a model stands: its generation (denoising loop, from 0), its step within the generation
    (from 0), its branch within the step (CFG, from 0), and how the step was found: "timestep" (the model's
    timestep), "override" (`spattn_compile.step`) or "call_count" (no timestep: every call is a step)."""

    generation: int
    step: int
    branch: int
    source: str


_OVERRIDE: contextvars.ContextVar[tuple[int, int | None] | None] = contextvars.ContextVar(
    "spattn_compile_step_override", default=None
)


class _GenerationClock:
    """`new_generation()`'s signal to every tracker: a tracker that sees an epoch it has not seen starts a new
    generation."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self.latest = 0

    def tick(self) -> None:
        self.latest = next(self._counter)


_CLOCK = _GenerationClock()


def _check_index(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


@contextlib.contextmanager
def step(index: int, *, branch: int | None = None) -> Iterator[None]:
    """Name the denoising step of the compiled-model calls inside the block; no timestep is read then.

    `branch=None` numbers the calls of one step 0, 1, ... (CFG); a given `branch` applies to every call inside. A
    step lower than the previous call's starts a new generation, e.g.::

        for i, t in enumerate(scheduler.timesteps):
            with spattn_compile.step(i):
                noise_cond = transformer(latents, t, cond)
                noise_uncond = transformer(latents, t, uncond)
    """
    _check_index("step index", index)
    if branch is not None:
        _check_index("branch", branch)
    token = _OVERRIDE.set((index, branch))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def new_generation() -> None:
    """Start a new generation in every compiled model: the next call is step 0, with no cached plan."""
    _CLOCK.tick()


class StepTracker:
    """Step and branch counting of one compiled model (see the module docstring). Thread-safe. `on_new_generation`
    runs when a generation starts (the model's plan cache forgets the previous one's plans)."""

    def __init__(self, on_new_generation: Callable[[], None]) -> None:
        self._on_new_generation = on_new_generation
        self._lock = threading.Lock()
        self._epoch = _CLOCK.latest
        self._generation = -1
        self._step = -1
        self._branch = -1
        self._timestep: float | None = None

    def _start_generation(self) -> None:
        self._generation += 1
        self._step, self._branch, self._timestep = -1, -1, None
        self._on_new_generation()

    def advance(self, timestep: object) -> Step:
        """Account for one forward of the model, whose `timestep` argument is given (None if it has none)."""
        override = _OVERRIDE.get()
        # The host read happens outside the lock; it is the one sync per forward the module docstring mentions.
        value = None
        if override is None and isinstance(timestep, torch.Tensor) and timestep.numel():
            value = float(timestep.detach().float().max())
        elif override is None and isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            value = float(timestep)
        with self._lock:
            if self._epoch != _CLOCK.latest or self._generation < 0:
                self._epoch = _CLOCK.latest
                self._start_generation()
            if override is not None:
                index, branch = override
                if index < self._step:
                    self._start_generation()
                if branch is None:
                    branch = self._branch + 1 if index == self._step else 0
                self._step, self._branch, self._timestep = index, branch, None
                source = "override"
            elif value is not None:
                if self._timestep is not None and value > self._timestep:
                    self._start_generation()
                if self._timestep is not None and value == self._timestep and self._branch + 1 >= MAX_BRANCHES:
                    # A loop calling the model again and again at one timestep (a benchmark) is not CFG: restart,
                    # so that the plans kept stay bounded by layers x MAX_BRANCHES.
                    self._start_generation()
                if self._timestep is not None and value == self._timestep:
                    self._branch += 1
                else:
                    self._step, self._branch = self._step + 1, 0
                self._timestep = value
                source = "timestep"
            else:
                self._step, self._branch, self._timestep = self._step + 1, 0, None
                source = "call_count"
            return Step(self._generation, self._step, self._branch, source)
