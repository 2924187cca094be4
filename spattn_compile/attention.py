"""One attention call, planned and run: the orchestrator of the stages (FlashInfer's plan / run; FlexAttention's
`BlockMask`, built apart from attending).

`SparseAttention(query, key, value, layout, config=...)` holds one call: its canonical layout (resolved once), its
key-padding validity, its scale, the settings of its estimator, selection policy and rectification mode (from the
config, once) and its implementation (`implementations`). Then

- `plan()` runs stage 0 (prepare: the Hilbert reorder into the canonical layout and the pooled statistics), stage 1
  (estimate: the estimator's block scores), both through the implementation's `prepare_and_estimate` (which may run
  them by groups of heads, and keeps only the block statistics for attending), and stage 2 (select: the selection
  policy's `SparsePlan`), and returns the plan; the schedule passes its own selection settings (a decayed density)
  or estimator (the true block mass);
- `run(plan)` runs stage 3 (attend: rectified block-sparse attention with the plan, back in the original token
  order), reusing the preparation of `plan()` when there was one.

The stages are methods too (`prepare`, `estimate`, `select`, `attend`), for benchmarks that time them one by one.

The public functions (`api.py`), the compiled graphs' op and the schedule's fresh, cached and exact plans
(`runtime.op`) all go through it. `plan_key()` says what a plan depends on: a cached plan serves a later call only
when their keys are equal.
"""

from __future__ import annotations

import dataclasses

import torch

from .call_layout import CallLayout
from .config import SparseAttentionConfig
from .estimators.base import EstimatorConfig, estimator_for
from .implementations import Implementation, Prepared
from .inputs import default_scale, key_padding_valid
from .plan import SparsePlan
from .policies import RectificationConfig, SelectionConfig, rectification_settings, selection_settings
from .policies.base import SelectionInputs, selection_policy

__all__ = ["PlanKey", "SparseAttention"]


@dataclasses.dataclass(frozen=True)
class PlanKey:
    """What a plan was selected for. Every input of `SparseAttention.plan` but the tensors' values is here (the
    call's shapes, dtype, device, layout, softmax scale and mask shape, and the settings of its estimator, selection
    policy and rectification mode), so a plan cached under this key cannot outlive a change of any of them. The
    mask's contents are named by the plan cache (`runtime.plan_cache.MaskFingerprints`), which adds them to the key.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    layout: CallLayout
    block_size: int
    reorder: str
    mask_shape: tuple[int, ...] | None
    scale: float
    estimator: EstimatorConfig
    selection: SelectionConfig
    rectification: RectificationConfig


class SparseAttention:
    """One self-attention call over a video token grid (module docstring).

    Args:
        query, key, value: `(B, H, S, D)` of one float dtype and device, validated by the caller (the public
            functions validate at the edge; the op's inputs are what the compiler pass proved).
        layout: the call's grid and text span (`call_layout`).
        attn_mask: a boolean key-padding mask broadcastable to `(B, H, 1, S)`, or None.
        scale: the softmax scale (None: `1/sqrt(D)`).
        config: the settings (block size, reorder, estimator, selection, rectification).
        implementation: the implementation that runs it (`implementations.implementation_for`, which checks that it
            can).
    """

    def __init__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: CallLayout,
        *,
        attn_mask: torch.Tensor | None,
        scale: float | None,
        config: SparseAttentionConfig,
        implementation: Implementation,
    ) -> None:
        batch, heads, seq_len, _ = query.shape
        self.query, self.key, self.value = query, key, value
        self.call_layout = layout
        self.layout = layout.token_layout(config.block_size, config.reorder)
        self.attn_mask = attn_mask
        self.mask_shape = None if attn_mask is None else tuple(attn_mask.shape)
        self.key_valid = key_padding_valid(attn_mask, batch, heads, seq_len)
        self.scale = default_scale(query, scale)
        self.estimator = config.estimator
        self.selection = selection_settings(config)
        self.rectification = rectification_settings(config)
        self.implementation = implementation
        self._prepared: Prepared | None = None

    @property
    def prepared(self) -> Prepared | None:
        """Stage 0 of the last `plan()` (the canonical inputs and their block statistics; the tile means, which only
        the estimator reads, are freed once it has), or None before one."""
        return self._prepared

    def plan_key(self) -> PlanKey:
        """The key of the plan `plan()` selects with the call's own settings (class docstring of `PlanKey`)."""
        query = self.query
        return PlanKey(
            tuple(query.shape),
            query.dtype,
            query.device,
            self.call_layout,
            self.layout.block_size,
            self.layout.reorder,
            self.mask_shape,
            self.scale,
            self.estimator,
            self.selection,
            self.rectification,
        )

    def prepare(self, tile_size: int | None = None, outliers: bool = False) -> Prepared:
        """Stage 0 (prepare): the inputs as the stages read them and their pooled statistics at `tile_size` (default:
        the block size, what attending reads); `outliers`: also the key tiles' outliers (an estimator's
        `reads_tile_outliers`)."""
        tile = self.layout.block_size if tile_size is None else tile_size
        query, key, value = self.query, self.key, self.value
        return self.implementation.prepare(query, key, value, self.layout, self.key_valid, tile, self.scale, outliers)

    def estimate(self, prepared: Prepared, estimator: EstimatorConfig | None = None) -> torch.Tensor:
        """Stage 1 (estimate): the block scores `P_hat (B, H, NB, NB + 1)` of `estimator` (default: the config's),
        from a preparation at its `pool_tile_size` (of every head, or of a group of heads)."""
        estimator = self.estimator if estimator is None else estimator
        scores = getattr(estimator_for(estimator), self.implementation.kind)(prepared.estimator_inputs(), estimator)
        self._check_scores(scores, estimator, prepared)
        return scores

    def _check_scores(self, scores: object, estimator: EstimatorConfig, prepared: Prepared) -> None:
        """An estimator's scores must be a float `(B, H, NB, NB + 1)` tensor on the inputs' device, `(B, H)` those of
        `prepared` (a group of heads when planning goes by groups); a registered estimator written elsewhere is
        checked here, where its result enters the plan, not where it fails later."""
        batch, heads = prepared.key_valid.shape[:2]
        nb = self.layout.num_video_blocks
        expected = (batch, heads, nb, nb + 1)
        if (
            not isinstance(scores, torch.Tensor)
            or tuple(scores.shape) != expected
            or not scores.is_floating_point()
            or scores.device != self.query.device
        ):
            got = type(scores).__name__
            if isinstance(scores, torch.Tensor):
                got = f"a {scores.dtype} tensor of shape {tuple(scores.shape)} on {scores.device}"
            raise ValueError(
                f"estimator {estimator.name!r} ({type(estimator).__name__}) returned {got}; an estimator returns "
                f"float block scores of shape (B, H, NB, NB + 1) = {expected} on {self.query.device}"
            )

    def select(
        self, prepared: Prepared, scores: torch.Tensor, selection: SelectionConfig | None = None, label: str = ""
    ) -> SparsePlan:
        """Stage 2 (select): the plan of `selection` (default: the config's) from `scores`, with the trusted blocks
        the rectification mode needs; `label` names the scores' origin in the plan (default: the config's
        estimator)."""
        selection = self.selection if selection is None else selection
        inputs = SelectionInputs(
            scores,
            prepared.stats,
            prepared.key_valid,
            prepared.key_block_count,
            prepared.block_non_finite,
            self.layout,
            label or self.estimator.name,
            self.scale,
        )
        select = getattr(selection_policy(selection), self.implementation.kind)
        return select(inputs, selection, self.rectification.trust)

    def plan(
        self,
        *,
        selection: SelectionConfig | None = None,
        estimator: EstimatorConfig | None = None,
        label: str | None = None,
    ) -> SparsePlan:
        """Stages 0-2: the plan of `selection` (default: the config's) from the scores of `estimator` (default: the
        config's), with the trusted blocks the rectification mode needs. `label` names the scores' origin in the plan
        (default: the estimator's name). Plans carry no gradient; the preparation is kept for `run`."""
        estimator = self.estimator if estimator is None else estimator
        with torch.no_grad():
            # Stages 0 and 1 together: the implementation may run them by groups of heads, and frees the tile means
            # once the scores are made (benchmarks/NOTES_pipeline.md, "Memory").
            prepared, scores = self.implementation.prepare_and_estimate(
                self.query,
                self.key,
                self.value,
                self.layout,
                self.key_valid,
                estimator.pool_tile_size(self.layout.block_size),
                self.scale,
                estimator.reads_tile_outliers,
                lambda part: self.estimate(part, estimator),
            )
            self._prepared = prepared
            return self.select(prepared, scores, selection, estimator.name if label is None else label)

    def attend(self, prepared: Prepared, plan: SparsePlan) -> torch.Tensor:
        """Stage 3 (attend): rectified block-sparse attention of a preparation with `plan`, `(B, H, S, D)` in the
        query's dtype and memory order."""
        return self.implementation.attend(prepared, plan, self.rectification)

    def run(self, plan: SparsePlan) -> torch.Tensor:
        """Stage 3 with `plan` (for this call's layout and `(B, H)`, or a batch-1 plan): `(B, H, S, D)` in the
        query's dtype and memory order. The pooled statistics of the rectification are the call's own (block mode
        reads the plan's `block_scores`); the preparation of `plan()` is reused when there was one. With autograd on
        and an input requiring grad, the inputs are prepared again with grad."""
        differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (self.query, self.key, self.value))
        prepared = self._prepared
        if prepared is None or differentiable:
            prepared = self.prepare()
        return self.attend(prepared, plan)
