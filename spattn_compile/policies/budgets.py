"""Per-head budgets (part of stage 2, select): how many key blocks each head's query blocks keep, at the same
average density as the user's setting.

Heads differ by an order of magnitude in how concentrated their attention is (`benchmarks/fidelity.py`: on a trained
video DiT most heads are near-uniform, a few hold most of their mass in a few blocks). One budget for every head
gives a sharp head too few blocks and a diffuse head blocks that each hold almost nothing. A budget policy,
`SparseAttentionConfig.head_budget`, returns int32 `(B, H)` budgets whose mean over the heads is the uniform budget
`block_budget(density, NB)` exactly (so the call's cost is unchanged); selection keeps each head's budget instead.

- `"uniform"` (`UniformBudget`): every head keeps the uniform budget (no tensor: selection runs as it always did).
- `"water_fill"` (`WaterFilling`): each head's estimated cumulative-mass curve, from the block scores the estimator
  already produced (no pass over Q or K): `gain[h, k]`, the mean over the head's video query blocks of the score of
  the row's `(k+1)`-th block in selection's order (forced blocks first, then by descending score). A row's sorted
  scores do not increase, so `sum_{k < b_h} gain[h, k]` (the head's estimated recall at budget `b_h`, less text) is
  concave in `b_h`, and taking the `H * uniform` largest gains over all heads (greedy water-filling) maximises the
  summed estimated recall, i.e. minimises the estimated missing mass, over every split of the blocks. Each head keeps
  at least its floor: its forced blocks (the diagonal, the 26-neighbour blocks with `neighbors`, blocks holding a
  non-finite key; text blocks are kept outside the budget) and `min_share` of the uniform budget.
  Calibration: at an exact step (`exact_plan_steps`) the scores are the true block mass, so the budgets are the
  true-mass optimum; otherwise they are the estimate's (`benchmarks/NOTES_budgets.md` states how far the estimated
  recall is from the true one, per suite).

- `"residual"` (`ResidualFilling`): water-filling on the error that remains *after* rectification instead of the
  skipped mass. Query rectification stands a trusted skipped block j in for row i with one virtual key `k_bar_j`
  (logit `s q . k_bar_j + log n_j`, value `v_bar_j`); it recovers most of a block whose keys agree as the row's
  queries see them, little of a block whose logits spread. With the logits of block j seen from query block i
  roughly Gaussian around the stand-in's, of variance `var[i, j] = s^2 sum_d E[q_d^2] Var[k_d]` (from the block
  means and mean absolute deviations planning already pooled: `E[q_d^2] ~ q_bar_d^2 + pi/2 dq_d^2`,
  `Var[k_d] ~ pi/2 dk_d^2`; one `(NB, D) x (D, NB)` product per head, as GAPR's gate), the virtual key carries
  `exp(-var / 2)` of the block's weight (Jensen's gap of `log mean exp`), so skipping the block costs
  `P_hat[i, j] * (1 - exp(-var[i, j] / 2))` when it is trusted and its whole `P_hat[i, j]` when it is not
  (GAPR's gate refuses it, or the rectification does not compensate). `gain[h, k]` is that cost of the row's
  `(k+1)`-th block in selection's order, averaged over the head's rows; the cost is not sorted within a row, so the
  greedy fill takes each head's gains through their concave majorant (`concave_gains`: a head whose next blocks
  are cheap but whose later ones are costly bids with their average), which makes it choose prefixes again.
  Floors, `min_share` and the exact total as for `"water_fill"`. Measured (`benchmarks/NOTES_budgets.md`): on an
  exact step's true mass the best split of the three; from the estimate better than uniform on most cases but not
  all, so `"uniform"` stays the default.

- `"calibrated"` (`CalibratedResidual`): the residual policy on each head's *calibrated* residual curve. The estimate
  under-counts the missing mass of sharp heads (up to 4x on the hard suite, 7x on sharper generators) because it
  scores tile-mean queries: the per-token parts of the queries send mass to keys the mean does not see.
  `MissingMassCalibration` predicts the true missing mass from the estimated one and the head's concentration (a
  power law fitted on held-in cases, checked on held-out ones), from the scores alone: no new statistic, no pass over
  Q or K. Each head's gains are divided by its calibrated residual at the uniform budget to the power `relative`
  (0.25), so that a head whose error is already small is not emptied for one whose error is large. Measured: closer
  recall estimates on every suite, but the split it chooses is better than the uniform one on some cases and worse on
  others, so `"uniform"` stays the default (`benchmarks/NOTES_budgets.md`).

Deterministic for a given input: a stable sort, ties broken by head then position.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..plan import PooledStats, SparsePlan
from .base import BudgetConfig, BudgetInputs, Trust, register_budget
from .rectification import gapr_trusted

__all__ = [
    "CalibratedResidual",
    "MissingMassCalibration",
    "ResidualFilling",
    "UniformBudget",
    "WaterFilling",
    "calibrated_recall",
    "calibrated_residual_budgets",
    "concave_gains",
    "calibrated_missing",
    "top_share",
    "fill_budgets",
    "residual_budgets",
    "residual_share",
    "water_fill_budgets",
]


@dataclasses.dataclass(frozen=True)
class UniformBudget(BudgetConfig):
    """`head_budget="uniform"`: every head keeps `block_budget(density, NB)` blocks per query block."""

    name = "uniform"


@dataclasses.dataclass(frozen=True)
class WaterFilling(BudgetConfig):
    """`head_budget="water_fill"`: blocks go to the heads whose next block holds the most estimated mass; no head
    below `min_share` of the uniform budget (nor below its forced blocks)."""

    name = "water_fill"
    min_share: float = 0.25


@dataclasses.dataclass(frozen=True)
class ResidualFilling(BudgetConfig):
    """`head_budget="residual"`: blocks go to the heads whose next blocks leave the most error after rectification
    (the skipped mass that the pooled stand-in does not recover); no head below `min_share` of the uniform budget
    (nor below its forced blocks)."""

    name = "residual"
    min_share: float = 0.25


@dataclasses.dataclass(frozen=True)
class MissingMassCalibration:
    """How far the estimator's missing mass is from the true one, per head: the estimated missing mass `m` (of the
    whole head, averaged over its video query blocks) stands for the true `m * clamp(exp(intercept + top_share * T_h)
    * m ** (power - 1), low, high)`, at most 1, where `T_h` is the mean over the head's video query blocks of the
    largest share one key block takes of the row's estimated video mass. Increasing in `m` for any `power > 0`.

    Why (benchmarks/NOTES_budgets.md, "Why the estimate under-counts"): the pooled estimator scores a tile's *mean*
    query; the per-token parts of the queries that the mean averages away send each query's mass to keys of its own,
    spread over blocks the mean does not favour, so the mixture of the queries' distributions holds more mass outside
    the top blocks than the distribution of their mean (with the keys exact and the queries pooled the estimate is
    within 1.3x of its own missing mass on the sharp heads, while the truth is up to 4x). That spread is a floor under
    the true missing mass: the smaller the estimated missing mass, the larger the under-count (`power < 1`). The
    defaults were fitted (least squares on the log of the true missing mass) on the smooth suite and three hard cases
    at grid 8x24x40, and checked on the other hard cases and on generators outside both suites; they describe those
    generators' heads, not a law: refit on captured attention (`benchmarks/fidelity.py --budgets` prints the
    ratios)."""

    intercept: float = -0.137
    power: float = 0.783
    top_share: float = -0.725
    low: float = 0.25
    high: float = 8.0

    def __post_init__(self) -> None:
        for name in ("intercept", "power", "top_share", "low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"MissingMassCalibration.{name}={value!r} is invalid: expected a finite number")
        if self.power <= 0:
            raise ValueError(f"MissingMassCalibration.power={self.power!r} is invalid: expected a number > 0")
        if not 0 < self.low <= self.high:
            raise ValueError(
                f"MissingMassCalibration.low={self.low!r}, high={self.high!r} are invalid: expected 0 < low <= high"
            )


def top_share(scores: torch.Tensor) -> torch.Tensor:
    """float64 `(B, H)`: the mean over the video query blocks of the largest share one video key block takes of the
    row's video scores `(B, H, NB, NB + 1)` (NaN as 0; a row without video mass counts as uniform, `1 / NB`)."""
    nb = scores.shape[2]
    video = scores[..., :nb].double().nan_to_num(0.0).clamp(min=0.0)
    total = video.sum(-1)
    largest = video.amax(-1) / total.clamp(min=torch.finfo(torch.float64).tiny)
    return torch.where(total > 0, largest, 1.0 / nb).mean(-1)


def calibrated_missing(
    missing: torch.Tensor, concentration: torch.Tensor, calibration: MissingMassCalibration = MissingMassCalibration()
) -> torch.Tensor:
    """float64, the shape of `missing (B, H, ...)`: the true missing mass `MissingMassCalibration` predicts for each
    head's estimated missing mass `missing` (>= 0), given the head's `concentration (B, H)`, the `top_share` of the
    block scores the estimate came from (an `(NB, NB)` pass over the scores, nothing else)."""
    missing = missing.double().clamp(min=0.0)
    head = calibration.intercept + calibration.top_share * concentration.double().to(missing.device)
    head = head.reshape(*head.shape, *([1] * (missing.dim() - head.dim())))
    # m ** (power - 1) is inf at m = 0 (power < 1): the clamp holds it, and 0 * high is 0.
    factor = (head.exp() * missing.pow(calibration.power - 1.0)).clamp(calibration.low, calibration.high)
    return (missing * factor).clamp(max=1.0)


def calibrated_recall(plan: SparsePlan, calibration: MissingMassCalibration = MissingMassCalibration()) -> torch.Tensor:
    """float32 `(B, H)`: `1 - calibrated_missing(1 - plan.estimated_recall(), top_share(plan.block_scores))`, the
    recall the calibration predicts the plan's kept blocks truly hold."""
    missing = 1 - plan.estimated_recall().double()
    return (1 - calibrated_missing(missing, top_share(plan.block_scores), calibration)).float()


@dataclasses.dataclass(frozen=True)
class CalibratedResidual(BudgetConfig):
    """`head_budget="calibrated"`: the residual policy on the calibrated estimate (`MissingMassCalibration`), each
    head's gains divided by its calibrated residual at the uniform budget to the power `relative`, so that a head
    whose error is small is not emptied for a head whose error is large; no head below `min_share` of the uniform
    budget (nor below its forced blocks)."""

    name = "calibrated"
    min_share: float = 0.25
    relative: float = 0.25
    calibration: MissingMassCalibration = MissingMassCalibration()
    max_loss: float | None = None

    def __post_init__(self) -> None:
        relative = self.relative
        if isinstance(relative, bool) or not isinstance(relative, (int, float)) or not 0 <= relative <= 1:
            raise ValueError(f"CalibratedResidual.relative={relative!r} is invalid: expected a number in [0, 1]")
        loss = self.max_loss
        if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float)) or not loss >= 1):
            raise ValueError(f"CalibratedResidual.max_loss={loss!r} is invalid: expected None or a number >= 1")
        if not isinstance(self.calibration, MissingMassCalibration):
            raise TypeError(
                f"CalibratedResidual.calibration={self.calibration!r} is invalid: expected a MissingMassCalibration"
            )


def _selection_order(scores: torch.Tensor, forced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The video scores `(B, H, NB, NB)` (float32 at least, NaN as 0) and selection's order of each row: forced
    blocks first (scores are in [0, 1]), then by descending score, ties by index."""
    nb = scores.shape[2]
    video = scores[..., :nb].nan_to_num(0.0).to(torch.promote_types(scores.dtype, torch.float32))
    return video, (video + 2.0 * forced).argsort(dim=-1, descending=True, stable=True)


def _floors(forced: torch.Tensor, uniform: int, min_share: float) -> torch.Tensor:
    """`(B, H)`: each head's least budget, its rows' most forced blocks and `min_share` of the uniform budget."""
    nb = forced.shape[-1]
    return forced.sum(-1).amax(-1).clamp(min=max(1, math.ceil(min_share * uniform - 1e-9)), max=nb)


def fill_budgets(gain: torch.Tensor, floor: torch.Tensor, uniform: int) -> torch.Tensor:
    """int32 `(B, H)`: greedy water-filling of `H * uniform` blocks over the gains `(B, H, NB)` of each head's next
    block, every head at least at its `floor (B, H)` (when the floors alone exceed the total, every head keeps its
    floor). Past its floor each head's gains must not increase, so that the largest gains are a prefix of each
    head's positions; ties go to the lower head, then the lower position (a stable sort)."""
    b, h, nb = gain.shape
    position = torch.arange(nb, device=gain.device)
    gain = torch.where(position < floor[..., None], torch.full_like(gain, math.inf), gain)
    ranked = gain.reshape(b, h * nb).argsort(dim=-1, descending=True, stable=True)
    chosen = torch.zeros(b, h * nb, dtype=torch.bool, device=gain.device)
    chosen.scatter_(-1, ranked[:, : h * uniform], True)
    budgets = chosen.reshape(b, h, nb).sum(-1)
    return torch.maximum(budgets, floor).to(torch.int32)


def water_fill_budgets(
    scores: torch.Tensor, forced: torch.Tensor, uniform: int, min_share: float = 0.0
) -> torch.Tensor:
    """int32 `(B, H)` per-head budgets (module docstring) from `scores (B, H, NB, NB + 1)` and the forced blocks
    `forced`, bool broadcastable to `(B, H, NB, NB)`, keeping the sum over heads at `H * uniform` (unless the floors
    alone exceed it: then every head keeps its floor)."""
    b, h, nb = scores.shape[0], scores.shape[1], scores.shape[2]
    forced = forced.expand(b, h, nb, nb)
    video, order = _selection_order(scores, forced)
    # Past its floor a head's rows are in descending score order, so its gains do not increase.
    gain = video.gather(-1, order).mean(-2)  # (B, H, NB)
    return fill_budgets(gain, _floors(forced, uniform, min_share), uniform)


def concave_gains(gain: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """`(B, H, NB)` gains that do not increase past each head's `floor (B, H)`: at position k, the best average gain
    of the positions k..j over every j >= k, then the running minimum from the floor on (the slopes of a concave
    majorant of the head's cumulative gain; positions before the floor are left as they are). `(B, H, NB, NB)`
    intermediates, the size of the scores."""
    nb = gain.shape[-1]
    position = torch.arange(nb, device=gain.device)
    cumulative = torch.nn.functional.pad(gain.cumsum(-1), (1, 0))
    span = (position[None, :] - position[:, None] + 1).to(gain.dtype)  # (k, j): j - k + 1 positions
    average = (cumulative[..., None, 1:] - cumulative[..., :-1, None]) / span.clamp(min=1)
    ahead = average.masked_fill(span < 1, -math.inf).amax(-1)
    past_floor = position >= floor[..., None]
    running = torch.where(past_floor, ahead, torch.full_like(ahead, math.inf)).cummin(-1).values
    return torch.where(past_floor, running, gain)


def residual_share(stats: PooledStats, scale: float | None, trust: Trust | None) -> torch.Tensor:
    """`(B, H, NB, NB)`, float64 at least: the share of skipped video block j's contribution to query block i that
    rectification does not recover (module docstring): `1 - exp(-var[i, j] / 2)` where `trust` compensates the block
    (and GAPR's gate, when `trust.gapr`, lets it), 1 elsewhere."""
    dtype = torch.promote_types(stats.q_block.dtype, torch.float64)
    q, dq = stats.q_block.to(dtype), stats.q_block_mad.to(dtype)
    dk = stats.k_block_mad.to(dtype)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    query_power = q.square() + (math.pi / 2) * dq.square()  # E[q_d^2] over the block's queries
    key_variance = (math.pi / 2) * dk.square()  # Var[k_d] over the block's keys (Gaussian: sigma = sqrt(pi/2) MAD)
    variance = (s * s) * (query_power @ key_variance.transpose(-1, -2))
    share = -torch.expm1(-0.5 * variance)
    if trust is None or not trust.compensate:
        return torch.ones_like(share)
    usable = (stats.k_block_count > 0)[..., None, :]
    if trust.gapr:
        usable = usable & gapr_trusted(stats)
    return torch.where(usable, share, torch.ones_like(share))


def residual_budgets(
    scores: torch.Tensor,
    forced: torch.Tensor,
    uniform: int,
    stats: PooledStats,
    scale: float | None,
    trust: Trust | None,
    min_share: float = 0.0,
) -> torch.Tensor:
    """int32 `(B, H)` per-head budgets of `head_budget="residual"` (module docstring) from `scores (B, H, NB, NB + 1)`,
    the forced blocks `forced` (bool, broadcastable to `(B, H, NB, NB)`), the pooled `stats`, the softmax `scale`
    (None: `1/sqrt(D)`) and the rectification's `trust`; the sum over heads is `H * uniform` as for
    `water_fill_budgets`. Computed in float64 whatever the inputs' dtype, so that the reference and the kernel path
    choose the same budgets from the same scores."""
    gain, forced = _residual_gains(scores, forced, stats, scale, trust)
    floor = _floors(forced, uniform, min_share)
    return fill_budgets(concave_gains(gain, floor), floor, uniform)


def _residual_gains(
    scores: torch.Tensor, forced: torch.Tensor, stats: PooledStats, scale: float | None, trust: Trust | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 `(B, H, NB)`: the residual policy's gain of each head's `(k+1)`-th block in selection's order (the
    skipped cost after rectification, averaged over the head's rows), and `forced` expanded to `(B, H, NB, NB)`."""
    b, h, nb = scores.shape[0], scores.shape[1], scores.shape[2]
    forced = forced.expand(b, h, nb, nb)
    video, order = _selection_order(scores.double(), forced)
    cost = video * residual_share(stats, scale, trust).to(video.device)
    return cost.gather(-1, order).mean(-2), forced


def calibrated_residual_budgets(
    scores: torch.Tensor,
    forced: torch.Tensor,
    uniform: int,
    stats: PooledStats,
    scale: float | None,
    trust: Trust | None,
    min_share: float = 0.0,
    relative: float = 0.25,
    calibration: MissingMassCalibration = MissingMassCalibration(),
    max_loss: float | None = None,
) -> torch.Tensor:
    """int32 `(B, H)` per-head budgets of `head_budget="calibrated"` (`CalibratedResidual`): `residual_budgets` on each
    head's calibrated residual curve. With `R_h(b)` the head's estimated residual at budget `b` (the sum of
    `residual_budgets`' gains from position `b` on) and `C_h = calibrated_missing(R_h, top_share(scores))`, the head's
    gain at position `b` is `C_h(b) - C_h(b + 1)` divided by `C_h(uniform) ** relative` (0: the calibrated summed
    error; 1: the sum of each head's error relative to its own at the uniform budget). `max_loss` (>= 1, None: no
    limit) raises each head's floor to the least budget whose calibrated residual is at most `max_loss` times the
    head's own at the uniform budget: a head gives blocks away only while its own error stays within that factor.
    Same arguments, floors and total as `residual_budgets`; float64."""
    gain, forced = _residual_gains(scores, forced, stats, scale, trust)
    residual = torch.nn.functional.pad(gain.flip(-1).cumsum(-1).flip(-1), (0, 1))  # R_h(b), b = 0..NB
    curve = calibrated_missing(residual, top_share(scores), calibration)
    at_uniform = curve[..., uniform : uniform + 1]
    gain = (curve[..., :-1] - curve[..., 1:]) / at_uniform.clamp(min=1e-12) ** relative
    floor = _floors(forced, uniform, min_share)
    if max_loss is not None:
        # The curve does not increase, so the budgets b < NB + 1 whose residual exceeds the limit are a prefix.
        floor = torch.maximum(floor, (curve > max_loss * at_uniform).sum(-1).clamp(max=uniform))
    return fill_budgets(concave_gains(gain, floor), floor, uniform)


def _uniform(inputs: BudgetInputs, settings: UniformBudget) -> torch.Tensor | None:
    return None


def _water_fill(inputs: BudgetInputs, settings: WaterFilling) -> torch.Tensor:
    return water_fill_budgets(inputs.scores, inputs.forced, inputs.uniform, settings.min_share)


def _statistics(inputs: BudgetInputs, settings: BudgetConfig) -> PooledStats:
    if inputs.stats is None:
        raise ValueError(
            f"head_budget={settings.name!r} needs the pooled statistics (BudgetInputs.stats), got None: pass stats= to "
            "policies.topk.head_budgets"
        )
    return inputs.stats


def _residual(inputs: BudgetInputs, settings: ResidualFilling) -> torch.Tensor:
    return residual_budgets(
        inputs.scores, inputs.forced, inputs.uniform, _statistics(inputs, settings), inputs.scale, inputs.trust,
        settings.min_share,
    )  # fmt: skip


def _calibrated(inputs: BudgetInputs, settings: CalibratedResidual) -> torch.Tensor:
    return calibrated_residual_budgets(
        inputs.scores, inputs.forced, inputs.uniform, _statistics(inputs, settings), inputs.scale, inputs.trust,
        settings.min_share, settings.relative, settings.calibration, settings.max_loss,
    )  # fmt: skip


register_budget(UniformBudget, allocate=_uniform)
register_budget(WaterFilling, allocate=_water_fill)
register_budget(ResidualFilling, allocate=_residual)
register_budget(CalibratedResidual, allocate=_calibrated)
