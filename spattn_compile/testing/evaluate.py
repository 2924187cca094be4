"""Evaluate many plans of one attention call against dense attention, at the cost of about one dense pass.

Fidelity studies compare dozens of plans (estimators, rectification modes, densities, the oracle) on one input. Running
`reference.rectified_sparse_attention` for each costs a dense pass apiece. `PlanEvaluator` instead computes, once per
chunk of query blocks, every row's partial softmax state per key block, `(m_rj, l_rj, o_rj)` = (the max logit of
key block j, the sum of `exp(logit - m)` over it, the sum of `exp(logit - m) v` over it), and combines any plan's kept
blocks and its rectification's terms (`policies.RectificationTerms`: virtual keys, an affine epilogue; any registered
mode) from those: exactly `rectified_sparse_attention`'s arithmetic, regrouped. The same pass
gives dense attention and the true block mass (`reference.attention_block_mass`), so the oracle plans cost nothing
more. Memory: `B * H * rows * NQ * D` values per chunk, never `S^2`.

A test checks it against the reference pipeline; `benchmarks/fidelity.py` uses it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from ..inputs import key_padding_valid
from ..layout import TokenLayout
from ..plan import SparsePlan
from ..policies import RectificationTerms, rectification_terms
from ..reference import canonical_key_valid, gather_canonical, pool_statistics, scatter_canonical

__all__ = ["PlanEvaluator", "PlanResult"]


@dataclasses.dataclass(frozen=True)
class PlanResult:
    """One plan's fidelity: `error` = `||out - dense|| / ||dense||` over the whole output; `recall` = the share of
    the video queries' true attention mass inside their kept blocks (text always kept), averaged over video query
    blocks; `density` = kept video key blocks over video blocks, averaged likewise; `head_error` per head."""

    error: float
    recall: float
    density: float
    head_error: tuple[float, ...]


class PlanEvaluator:
    """Dense attention, true block mass and the output of any plan for one call `(B, H, S, D)`.

    Args: the call (as `sparse_attention` takes it) and its canonical `layout`; `compute_dtype` (float64 by default);
    `chunk_rows` bounds the canonical query rows per chunk (memory ~ `B * H * chunk_rows * NQ * D` elements).
    """

    def __init__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: TokenLayout,
        *,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
        compute_dtype: torch.dtype = torch.float64,
        chunk_rows: int = 1024,
    ) -> None:
        b, h, s, d = query.shape
        self.layout = layout
        self.scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        self.dtype = compute_dtype
        valid = key_padding_valid(attn_mask, b, h, s)
        self.key_valid = canonical_key_valid(valid, layout, b, h, query.device)
        self.q, self.k, self.v = (gather_canonical(t.to(compute_dtype), layout) for t in (query, key, value))
        # As the pipeline does: a masked key has no effect, whatever its value row holds.
        self.v = self.v.masked_fill(~self.key_valid[..., None], 0)
        self.blocks_per_chunk = max(1, chunk_rows // layout.block_size)
        self.stats = pool_statistics(self.q, self.k, self.v, self.key_valid, layout, layout.block_size)
        self._dense: torch.Tensor | None = None
        self._mass: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------------------------------

    def _chunks(self):
        nq, bs = self.layout.num_blocks, self.layout.block_size
        for start in range(0, nq, self.blocks_per_chunk):
            stop = min(nq, start + self.blocks_per_chunk)
            yield start, stop, self._partials(slice(start * bs, stop * bs))

    def _partials(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of `rows` and key block j: `m (B, H, R, NQ)`, `l (B, H, R, NQ)`, `o (B, H, R, NQ, D)`."""
        b, h, _, d = self.q.shape
        nq, bs = self.layout.num_blocks, self.layout.block_size
        logits = self.scale * self.q[..., rows, :] @ self.k.transpose(-1, -2)
        logits = logits.masked_fill(~self.key_valid[..., None, :], -math.inf)
        logits = logits.reshape(b, h, -1, nq, bs)
        m = logits.amax(-1)
        weights = torch.exp(logits - m.nan_to_num(0.0, neginf=0.0)[..., None])
        l = weights.sum(-1)  # noqa: E741
        o = torch.einsum("bhrjk,bhjkd->bhrjd", weights, self.v.reshape(b, h, nq, bs, d))
        return m, l, o

    @staticmethod
    def _combine(m: torch.Tensor, l: torch.Tensor, o: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # noqa: E741
        """Softmax attention over the kept blocks (`keep (B, H, R, NQ)`); rows with nothing kept give 0."""
        m = m.masked_fill(~keep, -math.inf)
        shift = m.amax(-1).nan_to_num(0.0, neginf=0.0)
        factor = torch.exp(m - shift[..., None]).nan_to_num(0.0)
        numerator = (o * factor[..., None]).sum(-2)
        denominator = (l * factor).sum(-1)
        return numerator / denominator.clamp(min=torch.finfo(denominator.dtype).tiny)[..., None]

    # ----------------------------------------------------------------------------------------------------------------

    def dense(self) -> torch.Tensor:
        """Dense attention `(B, H, S, D)` in the original order (compute dtype)."""
        if self._dense is None:
            self._run()
        assert self._dense is not None
        return self._dense

    def true_mass(self) -> torch.Tensor:
        """The true block mass `(B, H, NB, NB + 1)`, as `reference.attention_block_mass` (the oracle's scores)."""
        if self._mass is None:
            self._run()
        assert self._mass is not None
        return self._mass

    def _run(self) -> None:
        layout = self.layout
        b, h, p, d = self.q.shape
        nb, nq, bs = layout.num_video_blocks, layout.num_blocks, layout.block_size
        out = torch.empty(b, h, p, d, dtype=self.dtype, device=self.q.device)
        mass = torch.zeros(b, h, nb, nb + 1, dtype=self.dtype, device=self.q.device)
        real = (layout.to(self.q.device).source_index >= 0).to(self.dtype)
        all_blocks = torch.ones(b, h, 1, nq, dtype=torch.bool, device=self.q.device)
        for start, stop, (m, l, o) in self._chunks():  # noqa: E741
            rows = slice(start * bs, stop * bs)
            out[..., rows, :] = self._combine(m, l, o, all_blocks.expand_as(m))
            if start < nb:
                log_mass = m + l.log()
                probability = torch.exp(log_mass - torch.logsumexp(log_mass, -1, keepdim=True)).nan_to_num(0.0)
                columns = torch.cat([probability[..., :nb], probability[..., nb:].sum(-1, keepdim=True)], -1)
                columns = columns * real[rows, None]
                video_stop = min(stop, nb)
                per_block = columns.reshape(b, h, stop - start, bs, nb + 1).sum(-2)[..., : video_stop - start, :]
                mass[..., start:video_stop, :] = per_block
        self._dense = scatter_canonical(out, layout)
        self._mass = mass / layout.row_count[:nb].to(self.q.device, self.dtype).clamp(min=1)[:, None]

    def evaluate(self, plans: Mapping[str, tuple[SparsePlan, str]]) -> dict[str, PlanResult]:
        """`plans`: name -> (plan, rectification mode: a registered `rectify` value). Returns each plan's
        `PlanResult`. One pass over the partials for all plans: each chunk's `o` is read once, by one batched product
        over the plans."""
        layout = self.layout
        b, h, p, d = self.q.shape
        nb, bs = layout.num_video_blocks, layout.block_size
        dense = self.dense()
        mass = self.true_mass()
        names = list(plans)
        outputs = torch.empty(len(names), b, h, p, d, dtype=self.dtype, device=self.q.device)
        prepared: list[tuple[torch.Tensor, RectificationTerms]] = []
        for name in names:
            plan, mode = plans[name]
            plan = plan.expand_batch(b)
            prepared.append((plan.to_dense(), rectification_terms(mode, plan, self.stats)))
        for start, stop, (m, l, o) in self._chunks():  # noqa: E741
            rows = slice(start * bs, stop * bs)
            # The virtual keys' logits, once per chunk for the plans that share them (every query-mode plan).
            virtual_logits: dict[tuple[int, int], torch.Tensor] = {}
            factors: list[torch.Tensor] = []
            denominators: list[torch.Tensor] = []
            virtual: list[torch.Tensor | None] = []
            for keep, terms in prepared:
                kept = m.masked_fill(~keep[..., start:stop, :].repeat_interleave(bs, -2), -math.inf)
                top = kept.amax(-1)
                extra = None
                if terms.has_virtual_keys:
                    assert terms.virtual_keys is not None and terms.virtual_log_weights is not None
                    assert terms.virtual_values is not None and terms.virtual_allowed is not None
                    key = (id(terms.virtual_keys), id(terms.virtual_log_weights))
                    if key not in virtual_logits:
                        virtual_logits[key] = (
                            self.scale * self.q[..., rows, :] @ terms.virtual_keys.to(self.dtype).transpose(-1, -2)
                            + terms.virtual_log_weights.to(self.dtype)[..., None, :]
                        )
                    allowed = terms.virtual_allowed[..., start:stop, :].repeat_interleave(bs, -2)
                    logits = virtual_logits[key].masked_fill(~allowed, -math.inf)
                    top = torch.maximum(top, logits.amax(-1))
                    extra = (logits, terms.virtual_values.to(self.dtype))
                shift = top.nan_to_num(0.0, neginf=0.0)
                factor = torch.exp(kept - shift[..., None]).nan_to_num(0.0)
                denominator = (l * factor).sum(-1)
                extra_numerator = None
                if extra is not None:
                    e = torch.exp(extra[0] - shift[..., None]).nan_to_num(0.0)
                    denominator = denominator + e.sum(-1)
                    extra_numerator = e @ extra[1]
                factors.append(factor)
                denominators.append(denominator)
                virtual.append(extra_numerator)
            numerators = torch.einsum("pbhrj,bhrjd->pbhrd", torch.stack(factors), o)
            for index, (_, terms) in enumerate(prepared):
                numerator = numerators[index]
                extra_numerator = virtual[index]
                if extra_numerator is not None:
                    numerator = numerator + extra_numerator
                result = numerator / denominators[index].clamp(min=torch.finfo(self.dtype).tiny)[..., None]
                if terms.has_epilogue:
                    assert terms.rescale is not None and terms.correction is not None
                    result = (
                        terms.rescale[..., start:stop, None].to(self.dtype).repeat_interleave(bs, -2) * result
                        + terms.correction[..., start:stop, :].to(self.dtype).repeat_interleave(bs, -2)
                    )
                outputs[index, ..., rows, :] = result
        results = {}
        occupied = layout.row_count[:nb].to(mass.device) > 0
        for index, name in enumerate(names):
            plan = plans[name][0].expand_batch(b)
            out = scatter_canonical(outputs[index], layout)
            difference = out - dense
            head_error = (difference.norm(dim=(-1, -2)) / dense.norm(dim=(-1, -2))).mean(0)
            keep = plan.to_dense()[..., :nb, :nb]
            kept_mass = (mass[..., :nb] * keep).sum(-1) + mass[..., nb]
            results[name] = PlanResult(
                error=float(difference.norm() / dense.norm()),
                recall=float(kept_mass[..., occupied].mean()),
                density=float(plan.density().mean()),
                head_error=tuple(float(e) for e in head_error),
            )
        return results
