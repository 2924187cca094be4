"""Stage 4 of ALGORITHMS.md: which denoising step and CFG branch an attention call belongs to, and the plan cache.

This module owns the schedule state of compiled models; it knows nothing of FX graphs or Triton.

**Step awareness without model edits.** The `spattn` backend gives every compiled graph a `StepTracker`, shared by
the recompiles of one Python frame (keyed by Dynamo's frame id), and advances it once per call of the graph, i.e.
once per transformer forward, before any attention layer runs. The tracker reads the graph's `timestep` input
(diffusers' video DiTs all take one) and compares it with the previous call's:

- the same timestep: the same step, the next branch (Wan calls the transformer twice per step, conditional then
  unconditional, so these get branches 0 and 1);
- a smaller timestep: the next step, branch 0 (denoising runs from high to low timesteps; CogVideoX batches its
  two CFG branches into one call of batch 2 and HunyuanVideo is guidance-distilled: both make one call per step, and
  the per-sample plans of a batch are separate anyway);
- a larger timestep, or a call of `new_generation()` since the last call: a new generation starting at step 0,
  whose plans are never taken from the previous one.

Reading the timestep costs one device-to-host copy per forward (not per layer). `with spattn_compile.step(i)` (or
`step(i, branch=b)`) names the step explicitly, reads nothing and takes precedence; a step lower than the previous
one also starts a new generation. A graph without a `timestep` input counts every call as a new step (branch 0) and
starts a new generation only on `new_generation()`. More than `MAX_BRANCHES` (8) calls at one timestep also start
a new generation, so that a loop re-running one input (a benchmark) keeps a bounded number of plans. Limits: a
scheduler that evaluates the model twice at one timestep (Heun) makes the second call a branch of that step;
Dynamo shares compiled code, hence the tracker and the plan cache, between instances of one model class (Wan 2.2's
two experts): call `new_generation()` or use `step()` when that matters. The tracker publishes a `StepContext` in a
context variable that the op reads; calls of `sparse_attention` outside a compiled model have none and never use the
cache.

**Plan cache.** Plans (`SparsePlan`: kept blocks, trusted lists, the scores they came from) are cached per
(model, attention layer, branch) and reused for `refresh_interval` steps; refresh number r (0 for the first sparse
step of a generation) selects at density `max(1 / NB, (1 - sparsity) - r * density_decay)`, DFSAttn's adaptive
ratio. An entry is used only by the same generation, the same input shapes and the same selection settings;
otherwise it is refreshed and its refresh count restarts. Memory is bounded by a byte cap with least-recently-used
eviction (an evicted entry is recomputed at the density its refresh count calls for). Lookups compare Python ints
only: the cached path never synchronises with the device.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import itertools
import threading
from collections.abc import Hashable, Iterator

import torch

from .plan import SparsePlan

__all__ = [
    "PlanCache",
    "StepContext",
    "StepTracker",
    "current_step",
    "new_generation",
    "plan_cache",
    "plan_summary",
    "refresh_density",
    "reset_schedule",
    "set_plan_cache_limit",
    "step",
    "tracker_for",
]


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Where one call of a compiled model stands.

    model_key: identifies the compiled model (Dynamo's frame id; shared by its recompiles).
    generation: counts the model's generations (denoising loops) in this process, from 0.
    step: denoising step within the generation, from 0. branch: the call's index within its step (CFG), from 0.
    source: how the step was found: "timestep" (the graph's timestep input), "override" (`spattn_compile.step`)
        or "call_count" (no timestep input: every call is a step).
    """

    model_key: Hashable
    generation: int
    step: int
    branch: int
    source: str


_CURRENT: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("spattn_compile_step", default=None)
_OVERRIDE: contextvars.ContextVar[tuple[int, int | None] | None] = contextvars.ContextVar(
    "spattn_compile_step_override", default=None
)
# More calls than this at one timestep start a new generation (see StepTracker.advance).
MAX_BRANCHES = 8
# Bumped by new_generation(); each tracker starts a new generation when it sees a value it has not seen.
_generation_epoch = itertools.count(1)
_latest_epoch = 0


def current_step() -> StepContext | None:
    """The step of the compiled-model call running now in this thread / task, or None outside one."""
    return _CURRENT.get()


@contextlib.contextmanager
def step_context(context: StepContext) -> Iterator[None]:
    """Publish `context` to the attention ops run inside the block (used by the backend)."""
    token = _CURRENT.set(context)
    try:
        yield
    finally:
        _CURRENT.reset(token)


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
    global _latest_epoch
    _latest_epoch = next(_generation_epoch)


class StepTracker:
    """Step and branch counting of one compiled model (see the module docstring). Thread-safe."""

    def __init__(self, model_key: Hashable) -> None:
        self.model_key = model_key
        self._lock = threading.Lock()
        self._epoch = _latest_epoch
        self._generation = -1
        self._step = -1
        self._branch = -1
        self._timestep: float | None = None

    def _start_generation(self) -> None:
        self._generation += 1
        self._step, self._branch, self._timestep = -1, -1, None
        plan_cache().drop_model(self.model_key)

    def advance(self, timestep: torch.Tensor | None) -> StepContext:
        """Account for one call of the model, whose `timestep` input is given (None if the graph has none)."""
        override = _OVERRIDE.get()
        # The host read happens outside the lock; it is the one sync per forward the module docstring mentions.
        value = None
        if override is None and isinstance(timestep, torch.Tensor) and timestep.numel():
            value = float(timestep.detach().float().max())
        with self._lock:
            if self._epoch != _latest_epoch or self._generation < 0:
                self._epoch = _latest_epoch
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
            return StepContext(self.model_key, self._generation, self._step, self._branch, source)


_TRACKERS: dict[Hashable, StepTracker] = {}
_TRACKERS_LOCK = threading.Lock()


def tracker_for(model_key: Hashable) -> StepTracker:
    """The tracker of `model_key`, created on first use (recompiles of one frame share it)."""
    with _TRACKERS_LOCK:
        tracker = _TRACKERS.get(model_key)
        if tracker is None:
            tracker = _TRACKERS[model_key] = StepTracker(model_key)
        return tracker


# ----------------------------------------------------------------------------------------------------------------
# Plan cache
# ----------------------------------------------------------------------------------------------------------------


def refresh_density(density: float, density_decay: float, refresh_count: int, num_video_blocks: int) -> float:
    """Density of refresh number `refresh_count` (0-based): `max(1 / NB, density - refresh_count * decay)`."""
    return max(1.0 / num_video_blocks, density - refresh_count * density_decay)


def plan_summary(plan: SparsePlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Device tensors describing `plan` without a host sync: the share of video key blocks kept (a float32 scalar,
    mean over batch, heads and video query blocks), the estimated recall (the share of the pooled estimate `P_hat`
    held by the kept video blocks plus the text column, same mean) and the kept share per block pair, float32
    `(NB, NB)` averaged over batch and heads."""
    nb = plan.num_video_blocks
    keep = plan.to_dense()[..., :nb, :nb]
    scores = plan.block_scores.float()
    recall = (scores[..., :nb] * keep).sum(-1) + scores[..., nb]
    keep_share = keep.float().mean((0, 1))
    return keep_share.mean(), recall.mean(), keep_share


@dataclasses.dataclass
class CachedPlan:
    """One cache entry: the plan, when it was refreshed (generation, step, refresh number), what it was built for
    (signature), its size, and its (kept share, recall) from `plan_summary`."""

    plan: SparsePlan
    generation: int
    refresh_step: int
    refresh_count: int
    signature: Hashable
    nbytes: int
    summary: tuple[torch.Tensor, torch.Tensor]
    lifetime: int | None = None  # steps this entry serves; None: the caller's refresh_interval


def _plan_bytes(plan: SparsePlan) -> int:
    tensors = (plan.kv_counts, plan.kv_indices, plan.trusted_counts, plan.trusted_indices, plan.block_scores)
    return sum(t.numel() * t.element_size() for t in tensors)


class PlanCache:
    """Plans by (model_key, layer_index, branch), bounded by `max_bytes` with least-recently-used eviction.

    Besides the plans it remembers, per key and in a few ints, how many refreshes the current generation has made,
    so that an evicted entry is rebuilt at the right density."""

    def __init__(self, max_bytes: int = 8 << 30) -> None:
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[Hashable, CachedPlan] = collections.OrderedDict()
        self._refreshes: dict[Hashable, tuple[int, Hashable, int]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached plans' tensors."""
        return self._bytes

    def lookup(
        self, key: Hashable, context: StepContext, signature: Hashable, refresh_interval: int
    ) -> CachedPlan | None:
        """The entry to reuse at `context`, or None when the plan must be refreshed."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            lifetime = refresh_interval if entry.lifetime is None else entry.lifetime
            fresh = (
                entry.generation == context.generation
                and entry.signature == signature
                and 0 <= context.step - entry.refresh_step < lifetime
            )
            if not fresh:
                return None
            self._entries.move_to_end(key)
            return entry

    def next_refresh_count(self, key: Hashable, context: StepContext, signature: Hashable) -> int:
        """How many refreshes this key made before, in this generation with this signature."""
        with self._lock:
            generation, previous_signature, count = self._refreshes.get(key, (-1, None, 0))
            if generation != context.generation or previous_signature != signature:
                return 0
            return count

    def store(
        self,
        key: Hashable,
        context: StepContext,
        signature: Hashable,
        plan: SparsePlan,
        refresh_count: int,
        summary: tuple[torch.Tensor, torch.Tensor],
        lifetime: int | None = None,
    ) -> CachedPlan:
        """Cache `plan`, built for `context` as refresh number `refresh_count` and valid for `lifetime` steps from
        `context.step` (default: the `refresh_interval` of each lookup), evicting old entries over the cap."""
        entry = CachedPlan(
            plan, context.generation, context.step, refresh_count, signature, _plan_bytes(plan), summary, lifetime
        )
        with self._lock:
            self._refreshes[key] = (context.generation, signature, refresh_count + 1)
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if entry.nbytes <= self.max_bytes:
                self._entries[key] = entry
                self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
        return entry

    def drop_model(self, model_key: Hashable) -> None:
        """Forget every entry of one model (a new generation)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == model_key]:
                self._bytes -= self._entries.pop(key).nbytes
            for key in [k for k in self._refreshes if k[0] == model_key]:
                del self._refreshes[key]

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._entries.clear()
            self._refreshes.clear()
            self._bytes = 0


_PLAN_CACHE = PlanCache()


def plan_cache() -> PlanCache:
    """The process-wide plan cache."""
    return _PLAN_CACHE


def set_plan_cache_limit(max_bytes: int) -> None:
    """Cap the bytes of cached plans (default 8 GiB); least recently used plans are evicted beyond it."""
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
        raise TypeError(f"max_bytes must be an int, got {type(max_bytes).__name__}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    _PLAN_CACHE.max_bytes = max_bytes
    with _PLAN_CACHE._lock:
        while _PLAN_CACHE._bytes > max_bytes:
            _, evicted = _PLAN_CACHE._entries.popitem(last=False)
            _PLAN_CACHE._bytes -= evicted.nbytes


def reset_schedule() -> None:
    """Forget every model's step tracker and every cached plan (for tests, or after `torch._dynamo.reset()`)."""
    with _TRACKERS_LOCK:
        _TRACKERS.clear()
    _PLAN_CACHE.clear()
