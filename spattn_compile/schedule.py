"""Stage 4 of ALGORITHMS.md: which denoising step and CFG branch an attention call belongs to, and the plan cache.

This module owns the schedule state of compiled models; it knows nothing of FX graphs or Triton. Each compiled model
has one `ModelState` (created by `spattn_compile.tracking` the first time one of its graphs runs): its step tracker,
its plan cache, its report records and the numbering of its attention layers. Two transformers in one process (the
two experts of Wan 2.2 A14B, or two pipelines) never share any of it.

**Step awareness without model edits.** A model's `StepTracker` advances once per forward of the model, before any
attention layer runs: from the model's `timestep` argument, read by a forward hook on the model (regional
compilation, see `spattn_compile.tracking`) or from the graph's `timestep` input (a whole-model graph). It compares the
timestep with the previous call's:

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
model twice at one timestep (Heun) makes the second call a branch of that step. The step of the running call is
published as a `StepContext` in a context variable that the op reads; calls of `sparse_attention` outside a compiled
model have none and never use a cache.

**Plan cache.** Plans (`SparsePlan`: kept blocks, trusted lists, the scores they came from) are cached per model, per
(attention layer, branch), and reused for `refresh_interval` steps; refresh number r (0 for the first sparse step of a
generation) selects at density `max(1 / NB, (1 - sparsity) - r * density_decay)`, DFSAttn's adaptive ratio. An entry
is used only by the same generation, the same input shapes and the same selection settings; otherwise it is refreshed
and its refresh count restarts. Each model's cache is bounded by a byte cap (`set_plan_cache_limit`, 8 GiB by
default) with least-recently-used eviction (an evicted entry is recomputed at the density its refresh count calls
for). Lookups compare Python ints only: the cached path never synchronises with the device.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import itertools
import threading
import weakref
from collections.abc import Hashable, Iterator

import torch

from .plan import SparsePlan
from .report import HeadRange, Recorder

__all__ = [
    "MAX_BRANCHES",
    "ModelState",
    "PlanCache",
    "StepContext",
    "StepTracker",
    "current_step",
    "new_generation",
    "plan_summary",
    "refresh_density",
    "reset_schedule",
    "set_plan_cache_limit",
    "step",
    "step_context",
]


@dataclasses.dataclass(frozen=True, eq=False)
class StepContext:
    """Where one call of a compiled model stands.

    model: the compiled model's `ModelState`.
    generation: counts the model's generations (denoising loops) in this process, from 0.
    step: denoising step within the generation, from 0. branch: the call's index within its step (CFG), from 0.
    source: how the step was found: "timestep" (the model's timestep), "override" (`spattn_compile.step`) or
        "call_count" (no timestep: every call is a step).
    video_grid: the latent token grid (frames, height, width) of this forward, as the model's forward hook read it
        from the model's inputs (None without a hook, or when the inputs did not show it; `grid_note` says why).
    block: module path, in the model, of the compiled block whose graph runs now ("" for a whole-model graph).
    layer_names: module path (relative to `block`) of each rewritten attention call of the running graph, by the
        graph's layer index.
    layer_heads: under context parallelism, the heads each rewritten call of the running graph holds (`HeadRange`,
        by the graph's layer index; None for a call that holds every head).
    """

    model: ModelState
    generation: int
    step: int
    branch: int
    source: str
    video_grid: tuple[int, int, int] | None = None
    grid_note: str = ""
    block: str = ""
    layer_names: tuple[str, ...] = ()
    layer_heads: tuple[HeadRange | None, ...] = ()

    def in_graph(
        self, block: str, layer_names: tuple[str, ...], layer_heads: tuple[HeadRange | None, ...] = ()
    ) -> StepContext:
        """This forward's context, for a call of the graph of `block` whose rewritten calls are `layer_names` (holding
        the heads `layer_heads`)."""
        return dataclasses.replace(self, block=block, layer_names=layer_names, layer_heads=layer_heads)

    def heads_of(self, layer_index: int) -> HeadRange | None:
        """The heads the graph's rewritten call number `layer_index` holds (None: every head)."""
        return self.layer_heads[layer_index] if 0 <= layer_index < len(self.layer_heads) else None

    def layer_name(self, layer_index: int) -> str:
        """The module path, in the model, of the graph's rewritten call number `layer_index`."""
        if 0 <= layer_index < len(self.layer_names) and self.layer_names[layer_index]:
            name = self.layer_names[layer_index]
            if not self.block:
                return name
            if name.startswith("#"):
                # No module path below the block: the compiled block is the attention module itself.
                return self.block if len(self.layer_names) == 1 else f"{self.block}{name}"
            return f"{self.block}.{name}"
        return f"{self.block}#{layer_index}" if self.block else f"#{layer_index}"


_CURRENT: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("spattn_compile_step", default=None)
_OVERRIDE: contextvars.ContextVar[tuple[int, int | None] | None] = contextvars.ContextVar(
    "spattn_compile_step_override", default=None
)
# More calls than this at one timestep start a new generation (see StepTracker.advance).
MAX_BRANCHES = 8


class _GenerationClock:
    """`new_generation()`'s signal to every tracker: a tracker that sees an epoch it has not seen starts a new
    generation."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self.latest = 0

    def tick(self) -> None:
        self.latest = next(self._counter)


_CLOCK = _GenerationClock()


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
    _CLOCK.tick()


class StepTracker:
    """Step and branch counting of one compiled model (see the module docstring). Thread-safe."""

    def __init__(self, model: ModelState) -> None:
        self._model = model
        self._lock = threading.Lock()
        self._epoch = _CLOCK.latest
        self._generation = -1
        self._step = -1
        self._branch = -1
        self._timestep: float | None = None

    def _start_generation(self) -> None:
        self._generation += 1
        self._step, self._branch, self._timestep = -1, -1, None
        self._model.plan_cache.clear()

    def advance(self, timestep: object) -> StepContext:
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
            return StepContext(self._model, self._generation, self._step, self._branch, source)


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
    """One model's plans by (layer, branch), bounded by `max_bytes` with least-recently-used eviction.

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
            self._evict()
        return entry

    def plan(self, key: Hashable) -> SparsePlan | None:
        """The plan cached under `key` ((layer, branch)), if any; it stays in the cache."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.plan

    def set_limit(self, max_bytes: int) -> None:
        """Change the cap, evicting least recently used entries beyond it."""
        with self._lock:
            self.max_bytes = max_bytes
            self._evict()

    def _evict(self) -> None:
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._entries.clear()
            self._refreshes.clear()
            self._bytes = 0


class _CacheLimit:
    """The byte cap of every model's plan cache (`set_plan_cache_limit`)."""

    def __init__(self) -> None:
        self.max_bytes = 8 << 30


_LIMIT = _CacheLimit()


def set_plan_cache_limit(max_bytes: int) -> None:
    """Cap the bytes of each compiled model's cached plans (default 8 GiB); least recently used plans are evicted
    beyond it."""
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
        raise TypeError(f"max_bytes must be an int, got {type(max_bytes).__name__}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    _LIMIT.max_bytes = max_bytes
    from .tracking import default_registry

    for model in default_registry().models():
        model.plan_cache.set_limit(max_bytes)


# ----------------------------------------------------------------------------------------------------------------
# One compiled model
# ----------------------------------------------------------------------------------------------------------------


class ModelState:
    """The schedule state of one compiled model: its step tracker, plan cache, report records, the numbering of its
    attention layers and what the pass decided in its graphs.

    name: how the report names the model: its class name, with "#k" for the k-th (k >= 1) model of that class.
    module: the model (weakly held), or None for a compiled function.
    forward: the context of the model's running forward (set by its forward hook, or by the graph that reads the
        timestep); None before the first one.
    hooked: whether a forward hook on the model sets `forward` (regional compilation).
    """

    def __init__(self, name: str, module: torch.nn.Module | None = None) -> None:
        self.name = name
        self._module = None if module is None else weakref.ref(module)
        self.tracker = StepTracker(self)
        self.plan_cache = PlanCache(_LIMIT.max_bytes)
        self.recorder = Recorder()
        self.forward: StepContext | None = None
        self.hooked = False
        # The graph (a Dynamo frame) that advances the steps of a model without a forward hook, and whether it reads
        # the timestep (see spattn_compile.backend).
        self.leader: Hashable | None = None
        self.leader_reads_timestep = False
        self.lock = threading.Lock()
        self._layers: dict[str, int] = {}
        self.rules: collections.Counter[str] = collections.Counter()
        self.sparse_calls = 0
        self.graphs = 0
        self.warned = False

    def __repr__(self) -> str:
        return f"ModelState({self.name!r})"

    @property
    def module(self) -> torch.nn.Module | None:
        return None if self._module is None else self._module()

    def layer_index(self, name: str) -> int:
        """The model-level index of the attention layer `name` (a module path): its rank among the model's rewritten
        attention layers in the order they first ran, which is their order in the forward (so `dense_layers=(0, 1)`
        means the first two sparse-capable layers, whatever the graphs or blocks they are compiled in)."""
        index = self._layers.get(name)
        if index is None:
            with self.lock:
                index = self._layers.setdefault(name, len(self._layers))
        return index

    def plan(self, layer: str, branch: int = 0) -> SparsePlan | None:
        """The plan cached for the attention layer `layer` (a module path, as `report()` names it) and CFG branch, if
        any. Under context parallelism it covers the heads this rank holds (`report()`'s heads column)."""
        return self.plan_cache.plan((layer, branch))

    @property
    def layers(self) -> dict[str, int]:
        """Layer name -> model-level index, for every layer that has run."""
        return dict(self._layers)


def reset_schedule() -> None:
    """Forget every model's state (trackers, cached plans, layer numbering and report records) and remove the hooks
    the backend put on models (for tests, or after `torch._dynamo.reset()`)."""
    from .tracking import default_registry

    default_registry().clear()
