"""The plan cache of the schedule: plans reused across denoising steps, per model.

Plans (`SparsePlan`: kept blocks, trusted lists, the scores they came from) are cached per model, per (attention
layer, branch), and reused for `refresh_interval` steps; refresh number r (0 for the first sparse step of a
generation) selects at density `max(1 / NB, (1 - sparsity) - r * density_decay)`, DFSAttn's adaptive ratio
(`refresh_density`). An entry serves a later call only in the same generation and with an equal `signature`: the op
passes the call's `attention.PlanKey` (every input of the plan: shapes, layout, mask, the estimator's, selection's and
rectification's settings) with the schedule's `density_decay`, so a change of any of them refreshes the plan and
restarts its refresh count. Each model's cache is bounded by a byte cap (`spattn_compile.set_plan_cache_limit`, 8 GiB
by default) with least-recently-used eviction (an evicted entry is recomputed at the density its refresh count calls
for). Lookups compare Python values only: the cached path never synchronises with the device.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Hashable
from typing import Protocol

import torch

from ..plan import SparsePlan

__all__ = ["CacheLimit", "CachedPlan", "PlanCache", "plan_cache_limit", "plan_summary", "refresh_density"]


class AtStep(Protocol):
    """A point of the schedule: a generation and a step in it (`steps.Step`, `model_state.StepContext`)."""

    @property
    def generation(self) -> int: ...

    @property
    def step(self) -> int: ...


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
        self, key: Hashable, at: AtStep, signature: Hashable, refresh_interval: int
    ) -> CachedPlan | None:
        """The entry to reuse at step `at`, or None when the plan must be refreshed."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            lifetime = refresh_interval if entry.lifetime is None else entry.lifetime
            fresh = (
                entry.generation == at.generation
                and entry.signature == signature
                and 0 <= at.step - entry.refresh_step < lifetime
            )
            if not fresh:
                return None
            self._entries.move_to_end(key)
            return entry

    def next_refresh_count(self, key: Hashable, at: AtStep, signature: Hashable) -> int:
        """How many refreshes this key made before, in this generation with this signature."""
        with self._lock:
            generation, previous_signature, count = self._refreshes.get(key, (-1, None, 0))
            if generation != at.generation or previous_signature != signature:
                return 0
            return count

    def store(
        self,
        key: Hashable,
        at: AtStep,
        signature: Hashable,
        plan: SparsePlan,
        refresh_count: int,
        summary: tuple[torch.Tensor, torch.Tensor],
        lifetime: int | None = None,
    ) -> CachedPlan:
        """Cache `plan`, built for `context` as refresh number `refresh_count` and valid for `lifetime` steps from
        `at.step` (default: the `refresh_interval` of each lookup), evicting old entries over the cap."""
        entry = CachedPlan(
            plan, at.generation, at.step, refresh_count, signature, _plan_bytes(plan), summary, lifetime
        )
        with self._lock:
            self._refreshes[key] = (at.generation, signature, refresh_count + 1)
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


class CacheLimit:
    """The byte cap of every model's plan cache (`set_plan_cache_limit`)."""

    def __init__(self) -> None:
        self.max_bytes = 8 << 30


_LIMIT = CacheLimit()


def plan_cache_limit() -> CacheLimit:
    """The byte cap new models' plan caches start with (`spattn_compile.set_plan_cache_limit`)."""
    return _LIMIT
