"""What an implementation of the sparse attention is, and the registry that picks one for a call (diffusers' attention
dispatcher is the model: named entries, each with the constraints it checks).

An implementation provides the two stages that touch the full-size tensors: `prepare` (stage 0: the inputs in the
canonical layout, as copies or read through its index, and the pooled statistics, as `Prepared`) and `attend` (stage
3: rectified block-sparse attention with a plan, back in the original token order). The stages in between run the
registered policies' handlers of the implementation's `kind` (the estimators' and selection policies' `reference` or
`kernel` functions), so an implementation never names an estimator or a policy.

`implementation_for(impl, query)` resolves "auto" (the Triton kernels on CUDA, the reference on the CPU, as
`capability.check_capability` decides), checks the entry's constraints and raises ValueError naming the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, Protocol

import torch

from ..estimators.base import EstimatorInputs, KeyTileOutliers
from ..layout import TokenLayout
from ..plan import PooledStats, SparsePlan
from ..policies.base import RectificationConfig

__all__ = [
    "IMPLS",
    "Implementation",
    "ImplementationEntry",
    "Prepared",
    "check_autograd",
    "implementation_for",
    "make_implementation",
    "register_implementation",
    "resolve_impl",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """Stage 0's result: the inputs of one call as the later stages read them, and their pooled statistics.

    query: the caller's `(B, H, S, D)` query (for the output's dtype and memory order).
    q, k, v: without `source_index`, `(B, H, P, D)` canonical copies (padding rows zero; the reference's); with it,
    the caller's `(B, H, S, D)` tensors, canonical row p being row `source_index[p]` (-1: a padding row), read through
    the index by the kernels (no copies). key_valid: bool `(B, H, P)` in canonical order: a real, unmasked key.
    key_usable: bool `(B, H, P)`: a valid key whose key and value rows are finite (what statistics and estimators
    read). key_block_count: `(B, H, NQ)` valid keys per canonical block. block_non_finite: bool `(B, H, NQ)`: the
    block holds a valid key that is not usable. stats: pooled statistics at `stats.tile_size`.
    masked_keys: the call has a key-padding mask (else only padding rows are invalid).
    source_index: None, or `layout.source_index` on the inputs' device (see q, k, v).
    outliers: the key tiles' outliers when the preparation computed them (the pooled estimator's), else None.
    """

    layout: TokenLayout
    query: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_valid: torch.Tensor
    key_usable: torch.Tensor
    key_block_count: torch.Tensor
    block_non_finite: torch.Tensor
    stats: PooledStats
    scale: float
    masked_keys: bool
    source_index: torch.Tensor | None = None
    outliers: KeyTileOutliers | None = None

    def estimator_inputs(self) -> EstimatorInputs:
        return EstimatorInputs(
            self.q, self.k, self.key_usable, self.stats, self.layout, self.scale, self.source_index, self.outliers
        )

    def for_attending(self) -> Prepared:
        """This preparation without what only the estimators read (the tile means and the key tiles' outliers), as
        planning keeps it for `attend`."""
        return dataclasses.replace(self, stats=self.stats.block_statistics_only(), outliers=None)

    @classmethod
    def concatenate_heads(
        cls, parts: list[Prepared], query: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> Prepared:
        """One preparation from those of head groups `parts` (in head order, prepared for attending): their
        per-head tensors concatenated over heads; `query`, `q`, `k`, `v` the full tensors of which the parts' are
        head slices."""
        first = parts[0]

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(part, name) for part in parts], 1)

        return cls(
            first.layout,
            query,
            q,
            k,
            v,
            cat("key_valid"),
            cat("key_usable"),
            cat("key_block_count"),
            cat("block_non_finite"),
            PooledStats.concatenate_heads([part.stats for part in parts]),
            first.scale,
            first.masked_keys,
            first.source_index,
            None,
        )


class Implementation(Protocol):
    """One implementation of the stages that touch the full-size tensors (module docstring).

    name: its registry name. kind: which handler of every registered estimator and policy it runs ("reference" or
    "kernel").
    """

    name: str
    kind: Literal["reference", "kernel"]

    def prepare(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: TokenLayout,
        key_valid: torch.Tensor | None,
        tile_size: int,
        scale: float,
        outliers: bool = False,
    ) -> Prepared:
        """Stage 0 on `(B, H, S, D)` inputs: statistics at `tile_size`; `key_valid` bool `(B, H, S)` or None;
        `outliers`: also the key tiles' outliers (`Prepared.outliers`) where the implementation computes them in its
        pass (the Triton one; the reference's estimator derives them itself)."""
        ...

    def prepare_and_estimate(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: TokenLayout,
        key_valid: torch.Tensor | None,
        tile_size: int,
        scale: float,
        outliers: bool,
        estimate: Callable[[Prepared], torch.Tensor],
    ) -> tuple[Prepared, torch.Tensor]:
        """Stages 0 and 1 of planning: `prepare`, then the block scores `estimate(prepared)` `(B, H, NB, NB + 1)`;
        returns the preparation for attending (`Prepared.for_attending`: the tile means freed) and the scores. An
        implementation may run them in groups of heads (the Triton one does, to bound planning's memory), calling
        `estimate` once per group on that group's preparation."""
        ...

    def attend(self, prepared: Prepared, plan: SparsePlan, rectification: RectificationConfig) -> torch.Tensor:
        """Stage 3: the output `(B, H, S, D)` in the query's dtype and memory order."""
        ...


@dataclasses.dataclass(frozen=True)
class ImplementationEntry:
    """A registered implementation: how to make it, and its constraints.

    supports(dtype, head_dim, device): None when it takes such inputs, else why not. differentiable: whether its
    output supports autograd.
    """

    name: str
    make: Callable[[], Implementation]
    supports: Callable[[torch.dtype, int, torch.device], str | None]
    differentiable: bool


IMPLS = ("auto", "triton", "reference")
_REGISTRY: dict[str, ImplementationEntry] = {}


def register_implementation(entry: ImplementationEntry) -> None:
    """Register an implementation under `entry.name` (one of `IMPLS` but "auto")."""
    _REGISTRY[entry.name] = entry


def resolve_impl(impl: str, device: torch.device) -> str:
    """"triton" or "reference" for `impl` ("auto": Triton on CUDA, the reference elsewhere)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return impl


def implementation_for(impl: str, query: torch.Tensor) -> Implementation:
    """The implementation `impl` names for inputs like `query` (module docstring). Raises ValueError naming the
    reason when it cannot run them, and RuntimeError when it has no backward but an input needs one."""
    name = resolve_impl(impl, query.device)
    entry = _REGISTRY[name]
    reason = entry.supports(query.dtype, query.shape[-1], query.device)
    if reason:
        raise ValueError(f"impl={impl!r} cannot run this call: {reason}; impl='reference' runs it on the CPU")
    return entry.make()


def make_implementation(name: str) -> Implementation:
    """The registered implementation `name`, made without checks (for callers that checked `capability` already)."""
    return _REGISTRY[name].make()


def check_autograd(impl: str, *tensors: torch.Tensor) -> None:
    """RuntimeError when `impl` has no backward but autograd is on and an input requires grad."""
    name = resolve_impl(impl, tensors[0].device)
    if _REGISTRY[name].differentiable or not torch.is_grad_enabled():
        return
    if any(t.requires_grad for t in tensors):
        raise RuntimeError(
            f"sparse_attention(impl={name!r}) has no backward (it is an inference kernel), but an input requires "
            "grad: run it under torch.no_grad() / torch.inference_mode(), detach the inputs, or use "
            "impl='reference' (plain PyTorch, differentiable) for gradients"
        )
