"""The plain-PyTorch reference (the specification) against docs/DESIGN.md, stage by stage, in float64: reorder round
trips and invariance, key-padding masks by SDPA's rules, pooling over the usable rows and the estimators' reference
scores against loop implementations of the formulas, selection and plan properties (forced blocks included), both
rectification modes against explicit per-query formulas, masking, and the whole pipeline at sparsity 0 against SDPA."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import attend_reference, reference_plan, sprinkle_non_finite

import spattn_compile.reference as reference
from spattn_compile import sparse_attention
from spattn_compile.config import SparseAttentionConfig
from spattn_compile.estimators import EstimatorInputs, PooledTiles, QueryTiles, SampledRows, estimator_for
from spattn_compile.estimators.pooled import pooled_scores_reference
from spattn_compile.inputs import key_padding_valid
from spattn_compile.layout import neighbor_block_mask, token_layout
from spattn_compile.plan import block_budget, indices_from_mask, mask_from_indices
from spattn_compile.policies.rectification import block_rectification, gapr_trusted
from spattn_compile.policies.topk import select_blocks
from spattn_compile.reference import (
    attention_block_mass,
    block_non_finite,
    canonical_key_valid,
    dense_attention,
    finite_rows,
    gather_canonical,
    key_usable,
    pool_statistics,
    scatter_canonical,
)
from spattn_compile.testing import relative_error, video_attention_inputs
from spattn_compile.testing.strategies import rectify_modes

F64 = torch.float64




@dataclasses.dataclass
class Case:
    """One attention call on the canonical layout, with everything the stages need."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    grid: tuple[int, int, int]
    text_len: int
    text_first: bool
    block_size: int
    tile_size: int
    reorder: str

    @property
    def layout(self):
        return token_layout(self.grid, self.text_len, self.text_first, self.block_size, self.reorder)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.query.shape[-1])

    def canonical(self):
        b, h, s, _ = self.query.shape
        valid = key_padding_valid(self.attn_mask, b, h, s)
        valid_c = canonical_key_valid(valid, self.layout, b, h, self.query.device)
        q_c, k_c, v_c = (gather_canonical(t, self.layout) for t in (self.query, self.key, self.value))
        return q_c, k_c, v_c, valid_c

    def kwargs(self) -> dict:
        return {
            "video_grid": self.grid,
            "text_len": self.text_len,
            "text_first": self.text_first,
            "attn_mask": self.attn_mask,
        }


@st.composite
def cases(draw, max_tokens: int = 200):
    """Small video-like float64 inputs: odd grids, text first or last, padding, random key masks (whole blocks
    masked too; one video key stays valid, so that SDPA's rows are defined), odd block tails."""
    grid = draw(st.tuples(st.integers(1, 4), st.integers(1, 7), st.integers(1, 8)))
    text_len = draw(st.integers(0, 20))
    if math.prod(grid) + text_len > max_tokens or math.prod(grid) + text_len < 2:
        grid, text_len = (2, 3, 5), 7
    text_padding = draw(st.integers(0, text_len)) if text_len else 0
    text_first = draw(st.booleans())
    block_size = draw(st.sampled_from([4, 8, 16, 32]))
    tile_size = draw(st.sampled_from([t for t in (2, 4, 8, 16) if block_size % t == 0 and t <= block_size]))
    inputs = video_attention_inputs(
        grid,
        batch=draw(st.integers(1, 2)),
        heads=draw(st.integers(1, 2)),
        head_dim=draw(st.sampled_from([8, 16])),
        text_len=text_len,
        text_first=text_first,
        text_padding=text_padding,
        num_sinks=min(math.prod(grid), draw(st.integers(0, 2))),
        dtype=F64,
        seed=draw(st.integers(0, 2**16)),
    )
    mask = inputs.attn_mask
    if draw(st.booleans()):
        # Random key-padding masks over video and text, whole blocks too; one video key stays valid.
        batch, seq_len = inputs.query.shape[0], inputs.seq_len
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        keep = torch.rand(batch, 1, 1, seq_len, generator=generator) > draw(st.sampled_from([0.2, 0.6, 0.95]))
        mask = keep if mask is None else mask & keep
        video_start = text_len if text_first else 0
        mask[..., video_start + draw(st.integers(0, math.prod(grid) - 1))] = True
    return Case(
        inputs.query,
        inputs.key,
        inputs.value,
        mask,
        grid,
        text_len,
        text_first,
        block_size,
        tile_size,
        draw(st.sampled_from(["hilbert", "none"])),
    )


def sdpa(case: Case) -> torch.Tensor:
    return F.scaled_dot_product_attention(case.query, case.key, case.value, attn_mask=case.attn_mask)


def pooled_scores(case: Case, stats, outliers: bool = True) -> torch.Tensor:
    """The pooled estimator's reference scores at the case's own tile size (the reference reads the tile size from
    the statistics, so tiles below the settings' minimum of 16 exercise many tiles and tails on small inputs)."""
    q_c, k_c, v_c, valid_c = case.canonical()
    inputs = EstimatorInputs(q_c, k_c, key_usable(k_c, v_c, valid_c), stats, case.layout, case.scale)
    return pooled_scores_reference(inputs, PooledTiles(16, outliers=outliers))


def plan_for(case: Case, density: float, outliers: bool = True, **config_fields):
    """Stages 0-2 on the case's own block and tile sizes (which may be below the config's minimum of 16)."""
    config = SparseAttentionConfig(sparsity=1 - density, min_seq_len=0, **config_fields)
    q_c, k_c, v_c, valid_c = case.canonical()
    stats = pool_statistics(q_c, k_c, v_c, valid_c, case.layout, case.tile_size)
    scores = pooled_scores(case, stats, outliers)
    plan = reference_plan(
        scores, stats, valid_c, case.layout, density=density, config=config, estimator="pooled",
        forced_blocks=block_non_finite(k_c, v_c, valid_c, case.layout),
    )  # fmt: skip
    return plan, stats, (q_c, k_c, v_c, valid_c)


def run_stages(case: Case, density: float, outliers: bool = True, **config_fields) -> torch.Tensor:
    """Stages 0-3 in order, like `sparse_attention(impl="reference")`, but on the case's own block and tile sizes."""
    plan, stats, (q_c, k_c, v_c, valid_c) = plan_for(case, density, outliers, **config_fields)
    rectify = config_fields.get("rectify", SparseAttentionConfig().rectify)
    out_c = attend_reference(
        q_c, k_c, v_c, valid_c, plan, stats, case.layout, scale=case.scale, rectify=rectify
    )
    return scatter_canonical(out_c, case.layout)


# --------------------------------------------------------------------------------------------------------------------
# Stage 0 (prepare): reorder
# --------------------------------------------------------------------------------------------------------------------


@given(case=cases())
@settings(max_examples=60)
def test_gather_scatter_round_trip(case):
    layout = case.layout
    canonical = gather_canonical(case.query, layout)
    assert canonical.shape == (*case.query.shape[:2], layout.padded_len, case.query.shape[-1])
    source = layout.source_index
    assert torch.equal(canonical[..., source >= 0, :], case.query[..., source[source >= 0], :])
    assert (canonical[..., source < 0, :] == 0).all()
    assert torch.equal(scatter_canonical(canonical, layout), case.query)


@given(case=cases())
@settings(max_examples=40)
def test_dense_attention_is_invariant_under_the_reorder(case):
    """Attention over the canonical layout (padding rows masked as keys), scattered back, is the original attention."""
    q_c, k_c, v_c, valid_c = case.canonical()
    reordered = dense_attention(q_c, k_c, v_c, attn_mask=valid_c[:, :, None, :], scale=case.scale)
    expected = sdpa(case)
    assert relative_error(scatter_canonical(reordered, case.layout), expected) < 1e-12


# --------------------------------------------------------------------------------------------------------------------
# The whole pipeline at sparsity 0 is exact attention
# --------------------------------------------------------------------------------------------------------------------


@given(
    case=cases(),
    rectify=rectify_modes(),
    gapr=st.booleans(),
    neighbors=st.booleans(),
    mass_threshold=st.sampled_from([None, 0.5, 1.0]),
    estimator=st.sampled_from([PooledTiles(16), PooledTiles(16, outliers=False), SampledRows(3), QueryTiles(16)]),
)
@settings(max_examples=80)
def test_pipeline_at_sparsity_zero_equals_sdpa(case, rectify, gapr, neighbors, mass_threshold, estimator):
    config = SparseAttentionConfig(
        sparsity=0.0,
        block_size=case.block_size if case.block_size >= 16 else 16,
        estimator=estimator,
        reorder=case.reorder,
        rectify=rectify,
        gapr=gapr,
        neighbors=neighbors,
        mass_threshold=mass_threshold,
        min_seq_len=0,
    )
    out = sparse_attention(case.query, case.key, case.value, **case.kwargs(), config=config, impl="reference")
    assert out.dtype == F64
    assert relative_error(out, sdpa(case)) < 1e-10


@given(case=cases(), rectify=rectify_modes(), outliers=st.booleans())
@settings(max_examples=40)
def test_stages_at_full_density_equal_sdpa_for_any_block_and_tile(case, rectify, outliers):
    out = run_stages(case, 1.0, outliers, reorder=case.reorder, rectify=rectify)
    assert relative_error(out, sdpa(case)) < 1e-10


# --------------------------------------------------------------------------------------------------------------------
# Stage 0 (prepare) pooling and stage 1 (estimate) scoring, against loops over the formulas
# --------------------------------------------------------------------------------------------------------------------


@given(case=cases(max_tokens=120), non_finite=st.sampled_from([0, 0, 1, 3]), seed=st.integers(0, 2**16))
@settings(max_examples=40)
def test_pool_statistics_match_loop_formulas(case, non_finite, seed):
    """Means and deviations over the usable rows only: real queries with finite entries, unmasked keys whose key and
    value rows are finite (values over the same rows); groups with nothing to count have zero means."""
    if non_finite:
        generator = torch.Generator().manual_seed(seed)
        tensors = sprinkle_non_finite(generator, (case.query, case.key, case.value), non_finite)
        case = dataclasses.replace(case, query=tensors[0], key=tensors[1], value=tensors[2])
    q_c, k_c, v_c, valid_c = case.canonical()
    layout, ts, bs = case.layout, case.tile_size, case.block_size
    stats = pool_statistics(q_c, k_c, v_c, valid_c, layout, ts)
    real = layout.source_index >= 0
    query_ok = real & finite_rows(q_c)
    key_ok = key_usable(k_c, v_c, valid_c)
    b, h = q_c.shape[:2]
    nb = layout.num_video_blocks
    assert stats.q_tile.shape == (b, h, nb * bs // ts, q_c.shape[-1])
    assert stats.k_block.shape == (b, h, nb, q_c.shape[-1])
    for name in ("q_tile", "k_tile", "q_block", "k_block", "v_block", "q_block_mad", "k_block_mad"):
        assert torch.isfinite(getattr(stats, name)).all(), name
    for bi in range(b):
        for hi in range(h):
            for tile in range(nb * bs // ts):
                rows = torch.arange(tile * ts, (tile + 1) * ts)
                q_rows, k_rows = rows[query_ok[bi, hi, rows]], rows[key_ok[bi, hi, rows]]
                assert stats.q_tile_count[bi, hi, tile] == q_rows.numel()
                assert stats.k_tile_count[bi, hi, tile] == k_rows.numel()
                if q_rows.numel():
                    torch.testing.assert_close(stats.q_tile[bi, hi, tile], q_c[bi, hi, q_rows].mean(0))
                if k_rows.numel():
                    torch.testing.assert_close(stats.k_tile[bi, hi, tile], k_c[bi, hi, k_rows].mean(0))
            for block in range(nb):
                rows = torch.arange(block * bs, (block + 1) * bs)
                q_rows, k_rows = rows[query_ok[bi, hi, rows]], rows[key_ok[bi, hi, rows]]
                assert stats.k_block_count[bi, hi, block] == k_rows.numel()
                if q_rows.numel():
                    q_mean = q_c[bi, hi, q_rows].mean(0)
                    torch.testing.assert_close(stats.q_block[bi, hi, block], q_mean)
                    torch.testing.assert_close(
                        stats.q_block_mad[bi, hi, block], (q_c[bi, hi, q_rows] - q_mean).abs().mean(0)
                    )
                else:
                    assert (stats.q_block[bi, hi, block] == 0).all()
                if k_rows.numel():
                    k_mean = k_c[bi, hi, k_rows].mean(0)
                    torch.testing.assert_close(stats.k_block[bi, hi, block], k_mean)
                    torch.testing.assert_close(
                        stats.k_block_mad[bi, hi, block], (k_c[bi, hi, k_rows] - k_mean).abs().mean(0)
                    )
                    torch.testing.assert_close(stats.v_block[bi, hi, block], v_c[bi, hi, k_rows].mean(0))
                else:
                    assert (stats.k_block[bi, hi, block] == 0).all() and (stats.v_block[bi, hi, block] == 0).all()


def test_usable_keys_and_non_finite_blocks():
    """`finite_rows`, `key_usable` and `block_non_finite` on a hand-made canonical layout of two blocks of 4."""
    layout = token_layout((1, 2, 3), 2, False, 4)  # 6 video tokens (blocks of 4 and 2 + 2 padding), 2 text tokens
    k = torch.zeros(1, 1, layout.padded_len, 2, dtype=F64)
    v = torch.zeros_like(k)
    k[0, 0, 1, 0] = math.nan  # video block 0, valid: flags block 0
    v[0, 0, 5, 1] = math.inf  # video block 1, masked: flags nothing
    v[0, 0, 8, 0] = -math.inf  # text block, valid
    valid = torch.ones(1, 1, layout.padded_len, dtype=torch.bool)
    valid[0, 0, 5] = False
    assert finite_rows(k)[0, 0].tolist() == [True, False] + [True] * 10
    usable = key_usable(k, v, valid)
    assert torch.nonzero(~usable[0, 0]).flatten().tolist() == [1, 5, 8]
    assert block_non_finite(k, v, valid, layout).tolist() == [[[True, False, True]]]


@pytest.mark.parametrize(
    "shape", [(1, 37), (2, 1, 37), (1, 1, 37), (3, 1, 1, 37), (1, 2, 1, 37), (3, 2, 1, 37), (1, 1, 1, 37)]
)
def test_key_padding_masks_broadcast_by_sdpa_rules(shape):
    """Aligned right to (B=3, H=2, 1, S=37): the bool (B, H, S) view equals the mask broadcast as SDPA does."""
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) > 0.4
    valid = key_padding_valid(mask, 3, 2, 37)
    assert valid.shape == (3, 2, 37) and valid.dtype == torch.bool
    expected = mask.reshape((1,) * (4 - mask.dim()) + shape).expand(3, 2, 1, 37)[:, :, 0]
    assert torch.equal(valid, expected)
    assert key_padding_valid(None, 3, 2, 37) is None


@pytest.mark.parametrize(
    ("mask", "error", "message"),
    [
        (torch.ones(37, dtype=torch.bool), ValueError, r"attn_mask of shape \(37,\) is not a key-padding mask"),
        (torch.ones(3, 2, 37, 37, dtype=torch.bool), ValueError, "with a query dimension of 1"),
        (torch.ones(37, 37, dtype=torch.bool), ValueError, r"\(37, 37\) is not a key-padding mask"),
        (torch.ones(4, 1, 1, 37, dtype=torch.bool), ValueError, r"broadcastable to \(3, 2, 1, 37\)"),
        (torch.ones(1, 3, 1, 37, dtype=torch.bool), ValueError, r"broadcastable to \(3, 2, 1, 37\)"),
        (torch.ones(1, 1, 1, 36, dtype=torch.bool), ValueError, "is not a key-padding mask"),
        (torch.ones(1, 1, 1, 1, 37, dtype=torch.bool), ValueError, "expected 2 to 4 dims"),
        (torch.zeros(1, 1, 1, 37), TypeError, "got dtype torch.float32"),
        ([True] * 37, TypeError, "attn_mask must be a torch.Tensor or None, got list"),
    ],
)
def test_key_padding_masks_that_sdpa_rules_reject(mask, error, message):
    with pytest.raises(error, match=message):
        key_padding_valid(mask, 3, 2, 37)


def loop_pooled_scores(case: Case, outliers: bool) -> torch.Tensor:
    """docs/DESIGN.md stage 1, the pooled estimator, with explicit loops: query tile means score key tiles by
    `s q.k + log n` (IPAR's multiplicity); with `outliers`, each key tile's key farthest from the tile mean (the first
    on ties) is scored apart with multiplicity 1 and the tile mean is over the others; text keys are isolated; the
    softmax weights are summed per key block and averaged over the real queries of each query block."""
    q_c, k_c, v_c, valid_c = case.canonical()
    layout, ts, bs = case.layout, case.tile_size, case.block_size
    real = layout.source_index >= 0
    nb = layout.num_video_blocks
    b, h = q_c.shape[:2]
    text_rows = torch.arange(layout.text_offset, layout.padded_len)
    scores = torch.zeros(b, h, nb, nb + 1, dtype=F64)
    for bi in range(b):
        for hi in range(h):
            valid = valid_c[bi, hi]
            key_tiles = []  # (key block, multiplicity, key vector)
            for tile in range(nb * bs // ts):
                rows = torch.arange(tile * ts, (tile + 1) * ts)
                rows = rows[valid[rows]]
                if not rows.numel():
                    continue
                keys = k_c[bi, hi, rows]
                if outliers:
                    far = int((keys - keys.mean(0)).pow(2).sum(-1).argmax())
                    key_tiles.append((tile * ts // bs, 1, keys[far]))
                    keys = torch.cat([keys[:far], keys[far + 1 :]])
                if keys.shape[0]:
                    key_tiles.append((tile * ts // bs, keys.shape[0], keys.mean(0)))
            text_keys = [k_c[bi, hi, r] for r in text_rows if valid[r]]
            for block in range(nb):
                total, weight_sum = torch.zeros(nb + 1, dtype=F64), 0
                for tile in range(block * bs // ts, (block + 1) * bs // ts):
                    rows = torch.arange(tile * ts, (tile + 1) * ts)
                    rows = rows[real[rows]]
                    if not rows.numel():
                        continue
                    q_bar = q_c[bi, hi, rows].mean(0)
                    logits = [case.scale * q_bar @ k + math.log(n) for _, n, k in key_tiles]
                    logits += [case.scale * q_bar @ k for k in text_keys]
                    if not logits:
                        continue
                    weights = torch.softmax(torch.stack(logits), 0)
                    tile_score = torch.zeros(nb + 1, dtype=F64)
                    for (key_block, _, _), w in zip(key_tiles, weights[: len(key_tiles)]):
                        tile_score[key_block] += w
                    tile_score[nb] = weights[len(key_tiles) :].sum()
                    total += rows.numel() * tile_score
                    weight_sum += rows.numel()
                if weight_sum:
                    scores[bi, hi, block] = total / weight_sum
    return scores


@given(case=cases(max_tokens=120), outliers=st.booleans())
@settings(max_examples=30)
def test_pooled_scores_match_loop_formula(case, outliers):
    q_c, k_c, v_c, valid_c = case.canonical()
    stats = pool_statistics(q_c, k_c, v_c, valid_c, case.layout, case.tile_size)
    scores = pooled_scores(case, stats, outliers)
    expected = loop_pooled_scores(case, outliers)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)
    # Rows of blocks with a real query and some unmasked key are distributions.
    has_key = valid_c.any(-1)[..., None]
    sums = scores.sum(-1)
    assert torch.allclose(sums[has_key.expand_as(sums)], torch.ones(()).to(F64), atol=1e-12)


def loop_probe_scores(case: Case, probes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The probe estimators' formula with loops: each probe's exact softmax over every valid key, summed per key block
    (all text keys in the last column), and the weighted mean over the probes of each query block."""
    _, k_c, _, valid_c = case.canonical()
    layout = case.layout
    nb, bs = layout.num_video_blocks, layout.block_size
    b, h, num_probes, _ = probes.shape
    per_block = num_probes // nb
    scores = torch.zeros(b, h, nb, nb + 1, dtype=F64)
    for bi in range(b):
        for hi in range(h):
            keys = torch.nonzero(valid_c[bi, hi]).flatten()
            columns = (keys // bs).clamp(max=nb)
            for block in range(nb):
                total, weight_sum = torch.zeros(nb + 1, dtype=F64), 0.0
                for p in range(block * per_block, (block + 1) * per_block):
                    w = float(weights[bi, hi, p] if weights.dim() == 3 else weights[p])
                    if w == 0 or not keys.numel():
                        continue
                    probability = torch.softmax(case.scale * k_c[bi, hi, keys] @ probes[bi, hi, p], 0)
                    total += w * torch.zeros(nb + 1, dtype=F64).index_add_(0, columns, probability)
                    weight_sum += w
                if weight_sum:
                    scores[bi, hi, block] = total / weight_sum
    return scores


@given(case=cases(max_tokens=120), rows=st.integers(1, 4))
@settings(max_examples=25)
def test_probe_estimators_match_loop_formula(case, rows):
    """`SampledRows(rows)` (real query rows of each stratum) and `QueryTiles` (tile means weighted by their row counts)
    at the case's own block and tile sizes."""
    q_c, k_c, v_c, valid_c = case.canonical()
    layout = case.layout
    rows = min(rows, case.block_size)
    stats = pool_statistics(q_c, k_c, v_c, valid_c, layout, case.tile_size)
    inputs = EstimatorInputs(q_c, k_c, key_usable(k_c, v_c, valid_c), stats, layout, case.scale)
    sampled = estimator_for(SampledRows(rows)).reference(inputs, SampledRows(rows))
    positions, weights = _sampled_rows(layout, rows)
    expected = loop_probe_scores(case, q_c[..., positions, :], weights)
    torch.testing.assert_close(sampled, expected, rtol=1e-10, atol=1e-12)
    tiles = estimator_for(QueryTiles()).reference(inputs, QueryTiles())
    expected = loop_probe_scores(case, stats.q_tile, stats.q_tile_count)
    torch.testing.assert_close(tiles, expected, rtol=1e-10, atol=1e-12)


def _sampled_rows(layout, rows: int):
    from spattn_compile.estimators.probes import sampled_row_probes

    return sampled_row_probes(layout, rows, torch.device("cpu"))


@given(case=cases(max_tokens=120))
@settings(max_examples=30)
def test_gapr_matches_its_formula(case):
    q_c, k_c, v_c, valid_c = case.canonical()
    stats = pool_statistics(q_c, k_c, v_c, valid_c, case.layout, case.tile_size)
    trusted = gapr_trusted(stats)
    b, h, nb, _ = stats.q_block.shape
    for bi in range(b):
        for hi in range(h):
            for i in range(nb):
                for j in range(nb):
                    q, dq = stats.q_block[bi, hi, i], stats.q_block_mad[bi, hi, i]
                    k, dk = stats.k_block[bi, hi, j], stats.k_block_mad[bi, hi, j]
                    gain_beats_error = abs(q @ k) > abs(dq @ k) + abs(q @ dk)
                    expected = bool(gain_beats_error) and stats.k_block_count[bi, hi, j] > 0
                    assert bool(trusted[bi, hi, i, j]) == expected


@given(case=cases(max_tokens=150))
@settings(max_examples=30)
def test_true_block_mass_rows_are_distributions(case):
    """Regression: padding query rows of a partial last block used to add a uniform row to its mass."""
    b, h, s, _ = case.query.shape
    mass = attention_block_mass(case.query, case.key, case.layout, case.attn_mask)
    logits = case.scale * case.query @ case.key.transpose(-1, -2)
    if case.attn_mask is not None:
        logits = logits.masked_fill(~key_padding_valid(case.attn_mask, b, h, s)[..., None, :], -math.inf)
    probabilities = torch.softmax(logits, dim=-1)
    layout = case.layout
    source = layout.source_index
    nb, bs = layout.num_video_blocks, layout.block_size
    for block in range(nb):
        rows = source[block * bs : (block + 1) * bs]
        rows = rows[rows >= 0]
        expected = torch.zeros(b, h, nb + 1, dtype=F64)
        for key_block in range(nb + 1):
            keys = source[key_block * bs : (key_block + 1) * bs] if key_block < nb else source[layout.text_offset :]
            keys = keys[keys >= 0]
            expected[..., key_block] = probabilities[..., rows, :][..., keys].sum(-1).mean(-1)
        torch.testing.assert_close(mass[..., block, :], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mass.sum(-1), torch.ones(b, h, nb, dtype=F64), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Stage 2 (select): selection
# --------------------------------------------------------------------------------------------------------------------


def test_block_budget_is_robust_to_float_noise():
    assert block_budget(0.3, 10) == 3
    assert block_budget(0.1, 48) == 5
    assert block_budget(0.25, 48) == 12
    assert block_budget(0.0001, 7) == 1
    assert block_budget(1.0, 7) == 7


@st.composite
def selection_problems(draw):
    grid = draw(st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 8)))
    text_len = draw(st.integers(0, 12))
    layout = token_layout(grid, text_len, draw(st.booleans()), draw(st.sampled_from([4, 8])), "hilbert")
    nb, b, h = layout.num_video_blocks, draw(st.integers(1, 2)), draw(st.integers(1, 2))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    raw = torch.rand(b, h, nb, nb + 1, generator=generator, dtype=F64) ** 3
    if not text_len:
        raw[..., nb] = 0
    scores = raw / raw.sum(-1, keepdim=True)
    return layout, scores, generator


@given(
    problem=selection_problems(),
    density=st.floats(0.01, 0.99),
    neighbors=st.booleans(),
)
@settings(max_examples=150)
def test_selection_keeps_budget_diagonal_neighbours_and_text(problem, density, neighbors):
    layout, scores, _ = problem
    nb, nq = layout.num_video_blocks, layout.num_blocks
    b, h = scores.shape[:2]
    nonempty = torch.ones(b, h, nq, dtype=torch.bool)
    keep = select_blocks(scores, layout, density=density, key_block_nonempty=nonempty, neighbors=neighbors)
    assert keep.shape == (b, h, nq, nq) and keep.dtype == torch.bool
    assert keep[..., nb:, :].all(), "text query rows attend densely"
    assert keep[..., :nb, nb:].all(), "text key blocks are always kept"
    video = keep[..., :nb, :nb]
    forced = torch.eye(nb, dtype=torch.bool)
    if neighbors:
        forced = forced | neighbor_block_mask(layout)
    assert video[..., forced.expand_as(video)].all()
    budget = block_budget(density, nb)
    expected_count = torch.maximum(forced.sum(-1), torch.tensor(budget))
    assert torch.equal(video.sum(-1), expected_count.expand(b, h, nb))
    # The free slots go to the highest-scoring blocks.
    free_kept = torch.where(video & ~forced, scores[..., :nb], math.inf).amin(-1)
    free_skipped = torch.where(~video & ~forced, scores[..., :nb], -math.inf).amax(-1)
    assert (free_kept >= free_skipped).all()


@given(
    problem=selection_problems(),
    density=st.floats(0.01, 0.6),
    mass_threshold=st.floats(0.05, 1.0),
    max_density=st.floats(0.05, 1.0),
)
@settings(max_examples=150)
def test_mass_threshold_grows_rows_minimally_up_to_max_density(problem, density, mass_threshold, max_density):
    layout, scores, _ = problem
    nb, nq = layout.num_video_blocks, layout.num_blocks
    b, h = scores.shape[:2]
    nonempty = torch.ones(b, h, nq, dtype=torch.bool)
    plain = select_blocks(scores, layout, density=density, key_block_nonempty=nonempty)
    keep = select_blocks(
        scores,
        layout,
        density=density,
        key_block_nonempty=nonempty,
        mass_threshold=mass_threshold,
        max_density=max_density,
    )
    assert (keep >= plain).all(), "the threshold only adds blocks"
    video = keep[..., :nb, :nb]
    count = video.sum(-1)
    budget = block_budget(density, nb)
    cap = max(budget, block_budget(max_density, nb))
    assert (count >= budget).all() and (count <= cap).all()
    mass = (scores[..., :nb] * video).sum(-1) + scores[..., nb]
    reached = mass >= mass_threshold - 1e-12
    assert (reached | (count == cap)).all(), "grow until the threshold or the cap"
    grown = count > budget
    # Minimal: without its lowest-scoring added block a grown row would be below the threshold.
    lowest = torch.where(video & ~torch.eye(nb, dtype=torch.bool), scores[..., :nb], math.inf).amin(-1)
    assert (mass[grown] - lowest[grown] < mass_threshold + 1e-12).all()


@given(problem=selection_problems(), density=st.floats(0.01, 0.99), share=st.floats(0.0, 0.5))
@settings(max_examples=100)
def test_forced_blocks_are_kept_by_every_video_row_first(problem, density, share):
    """Blocks holding a non-finite key (`forced_blocks`) are kept by every video query block and rank first (after
    none), the free slots of the budget going to the highest-scoring other blocks."""
    layout, scores, generator = problem
    nb, nq = layout.num_video_blocks, layout.num_blocks
    b, h = scores.shape[:2]
    nonempty = torch.ones(b, h, nq, dtype=torch.bool)
    forced_blocks = torch.rand(b, h, nq, generator=generator) < share
    keep = select_blocks(scores, layout, density=density, key_block_nonempty=nonempty, forced_blocks=forced_blocks)
    video = keep[..., :nb, :nb]
    forced = torch.eye(nb, dtype=torch.bool) | forced_blocks[..., None, :nb]
    assert video[forced].all()
    assert keep[..., nb:, :].all() and keep[..., :nb, nb:].all()
    budget = block_budget(density, nb)
    assert torch.equal(video.sum(-1), torch.maximum(forced.sum(-1), torch.tensor(budget)))
    free_kept = torch.where(video & ~forced, scores[..., :nb], math.inf).amin(-1)
    free_skipped = torch.where(~video & ~forced, scores[..., :nb], -math.inf).amax(-1)
    assert (free_kept >= free_skipped).all()


@given(problem=selection_problems(), density=st.floats(0.01, 0.99), neighbors=st.booleans())
@settings(max_examples=100)
def test_empty_blocks_are_never_kept(problem, density, neighbors):
    layout, scores, generator = problem
    b, h = scores.shape[:2]
    nonempty = torch.rand(b, h, layout.num_blocks, generator=generator) > 0.4
    keep = select_blocks(scores, layout, density=density, key_block_nonempty=nonempty, neighbors=neighbors)
    assert not (keep & ~nonempty[..., None, :]).any()
    # Everything else that a full mask would keep on the forced or text columns is still kept.
    full = select_blocks(
        scores, layout, density=density, key_block_nonempty=torch.ones_like(nonempty), neighbors=neighbors
    )
    nb = layout.num_video_blocks
    assert torch.equal(keep[..., nb:], full[..., nb:] & nonempty[..., None, nb:])
    assert torch.equal(keep[..., nb:, :], full[..., nb:, :] & nonempty[..., None, :])


@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 9)),
    seed=st.integers(0, 2**16),
    p=st.floats(0, 1),
)
@settings(max_examples=100)
def test_index_lists_round_trip(shape, seed, p):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=generator) < p
    counts, indices = indices_from_mask(mask)
    assert counts.dtype == torch.int32 and indices.dtype == torch.int16  # a plan's block lists
    assert torch.equal(counts, mask.sum(-1, dtype=torch.int32))
    slot = torch.arange(shape[-1])
    used = slot < counts[..., None]
    assert (indices[~used] == -1).all()
    increasing = indices[..., 1:] > indices[..., :-1]
    assert increasing[used[..., 1:]].all(), "sorted ascending and unique"
    assert torch.equal(mask_from_indices(counts, indices, shape[-1]), mask)


@given(
    case=cases(max_tokens=150),
    density=st.floats(0.05, 0.7),
    rectify=rectify_modes(),
    gapr=st.booleans(),
)
@settings(max_examples=60)
def test_plan_lists_and_trusted_blocks(case, density, rectify, gapr):
    plan, stats, (_, _, _, valid_c) = plan_for(case, density, rectify=rectify, gapr=gapr)
    layout = case.layout
    nb, nq, bs = layout.num_video_blocks, layout.num_blocks, layout.block_size
    b, h = case.query.shape[:2]
    assert plan.kv_counts.shape == (b, h, nq) and plan.kv_indices.shape == (b, h, nq, nq)
    assert plan.trusted_counts.shape == (b, h, nq) and plan.trusted_indices.shape == (b, h, nq, nb)
    for counts, indices in ((plan.kv_counts, plan.kv_indices), (plan.trusted_counts, plan.trusted_indices)):
        used = torch.arange(indices.shape[-1]) < counts[..., None]
        assert (indices[~used] == -1).all() and (indices[used] >= 0).all()
        assert (indices[..., 1:] > indices[..., :-1])[used[..., 1:]].all()
    keep, trusted = plan.to_dense(), plan.trusted_mask()
    nonempty = valid_c.reshape(b, h, nq, bs).any(-1)
    assert not (keep & ~nonempty[..., None, :]).any()
    assert not trusted[..., nb:, :].any(), "text query rows are dense, nothing to compensate"
    skipped = ~keep[..., :nb, :nb] & nonempty[..., None, :nb]
    if rectify == "none":
        assert not trusted.any()
    elif gapr:
        assert torch.equal(trusted[..., :nb, :], skipped & gapr_trusted(stats))
    else:
        assert torch.equal(trusted[..., :nb, :], skipped)
    density_kept = plan.density()
    assert density_kept.shape == (b, h)


def test_plan_uses_given_scores_for_the_oracle():
    inputs = video_attention_inputs((3, 8, 8), heads=2, head_dim=16, dtype=F64, seed=3)
    case = Case(inputs.query, inputs.key, inputs.value, None, (3, 8, 8), 0, False, 16, 16, "hilbert")
    q_c, k_c, v_c, valid_c = case.canonical()
    stats = pool_statistics(q_c, k_c, v_c, valid_c, case.layout, 16)
    true_mass = attention_block_mass(case.query, case.key, case.layout)
    config = SparseAttentionConfig(sparsity=0.75, rectify="none", min_seq_len=0)
    plan = reference_plan(
        true_mass, stats, valid_c, case.layout, density=0.25, config=config, estimator="oracle"
    )
    assert plan.block_scores is true_mass and plan.estimator == "oracle"
    nb = case.layout.num_video_blocks
    kept = plan.to_dense()[..., :nb, :nb]
    budget = block_budget(0.25, nb)
    # The oracle keeps the diagonal and fills the rest of its budget with the blocks of highest true mass.
    diagonal = torch.eye(nb, dtype=torch.bool)
    others = true_mass[..., :nb].masked_fill(diagonal, -1.0)
    expected = diagonal | torch.zeros_like(kept).scatter(-1, others.topk(budget - 1, dim=-1).indices, True)
    assert torch.equal(kept, expected)


# --------------------------------------------------------------------------------------------------------------------
# Stage 3 (attend): rectified block-sparse attention, against explicit per-query formulas
# --------------------------------------------------------------------------------------------------------------------


def explicit_sparse_attention(case: Case, plan, stats, rectify: str) -> torch.Tensor:
    """Per canonical query row: softmax over its kept unmasked keys (plus, in query mode, one virtual key per trusted
    block with logit `s q.k_bar + log n`, value `v_bar`); block mode then applies `R * O + c` with
    `R = 1 - sum_T P_hat`, `c = sum_T P_hat v_bar`; a row with no kept unmasked key has a zero sparse part.
    Padding rows are left at zero."""
    q_c, k_c, v_c, valid_c = case.canonical()
    layout = case.layout
    bs, nb = layout.block_size, layout.num_video_blocks
    keep, trusted = plan.to_dense(), plan.trusted_mask()
    out = torch.zeros_like(q_c)
    real = layout.source_index >= 0
    b, h = q_c.shape[:2]
    for bi in range(b):
        for hi in range(h):
            for row in torch.nonzero(real).flatten().tolist():
                block = row // bs
                columns = keep[bi, hi, block].repeat_interleave(bs) & valid_c[bi, hi]
                logits = case.scale * k_c[bi, hi, columns] @ q_c[bi, hi, row]
                values = v_c[bi, hi, columns]
                if rectify == "query":
                    blocks = trusted[bi, hi, block].nonzero().flatten()
                    virtual = case.scale * stats.k_block[bi, hi, blocks] @ q_c[bi, hi, row]
                    virtual = virtual + torch.log(stats.k_block_count[bi, hi, blocks].to(F64))
                    logits = torch.cat([logits, virtual])
                    values = torch.cat([values, stats.v_block[bi, hi, blocks]])
                # A row whose kept keys are all masked has an empty sparse part (zero); block mode still adds `c`.
                result = torch.softmax(logits, 0) @ values if logits.numel() else torch.zeros_like(q_c[bi, hi, row])
                if rectify == "block" and block < nb:
                    blocks = trusted[bi, hi, block].nonzero().flatten()
                    weights = plan.block_scores[bi, hi, block, blocks]
                    result = (1 - weights.sum()) * result + weights @ stats.v_block[bi, hi, blocks]
                out[bi, hi, row] = result
    return out


@given(case=cases(max_tokens=100), density=st.floats(0.05, 0.6), rectify=rectify_modes())
@settings(max_examples=30)
def test_rectified_attention_matches_explicit_formulas(case, density, rectify):
    plan, stats, (q_c, k_c, v_c, valid_c) = plan_for(case, density, rectify=rectify, gapr=False)
    out = attend_reference(
        q_c, k_c, v_c, valid_c, plan, stats, case.layout, scale=case.scale, rectify=rectify
    )
    expected = explicit_sparse_attention(case, plan, stats, rectify)
    real = case.layout.source_index >= 0
    assert relative_error(out[..., real, :], expected[..., real, :]) < 1e-12


@given(case=cases(max_tokens=150), density=st.floats(0.05, 0.6))
@settings(max_examples=30)
def test_block_mode_without_trusted_blocks_is_plain_sparse_attention(case, density):
    plan, stats, (q_c, k_c, v_c, valid_c) = plan_for(case, density, rectify="block", gapr=False)
    untrusted = dataclasses.replace(
        plan,
        trusted_counts=torch.zeros_like(plan.trusted_counts),
        trusted_indices=torch.full_like(plan.trusted_indices, -1),
    )
    rescale, correction = block_rectification(untrusted, stats, case.layout.num_blocks)
    assert (rescale == 1).all() and (correction == 0).all()
    arguments = (q_c, k_c, v_c, valid_c, untrusted, stats, case.layout)
    block = attend_reference(*arguments, scale=case.scale, rectify="block")
    plain = attend_reference(*arguments, scale=case.scale, rectify="none")
    assert torch.equal(block, plain)


@given(case=cases(max_tokens=150), density=st.floats(0.05, 0.5), rectify=st.sampled_from(["block", "query"]))
@settings(max_examples=30)
def test_rectification_is_exactly_normalised(case, density, rectify):
    """With V = ones every row's weights must sum to one: sparse softmax plus compensation gives exactly 1."""
    ones = torch.ones_like(case.value)
    case = dataclasses.replace(case, value=ones)
    plan, stats, (q_c, k_c, v_c, valid_c) = plan_for(case, density, rectify=rectify, gapr=False)
    out = attend_reference(
        q_c, k_c, v_c, valid_c, plan, stats, case.layout, scale=case.scale, rectify=rectify
    )
    real = case.layout.source_index >= 0
    assert (out[..., real, :] - 1).abs().max() < 1e-13


@given(case=cases(max_tokens=150), rectify=rectify_modes(), seed=st.integers(0, 99))
@settings(max_examples=40)
def test_masked_keys_have_no_effect(case, rectify, seed):
    if case.attn_mask is None or case.attn_mask.all():
        return
    before = run_stages(case, 0.3, reorder=case.reorder, rectify=rectify)
    masked = ~case.attn_mask.expand(case.query.shape[0], 1, 1, -1)[:, 0, 0]  # (B, S)
    generator = torch.Generator().manual_seed(seed)
    key, value = case.key.clone(), case.value.clone()
    for bi in range(key.shape[0]):
        garbage_shape = (key.shape[1], int(masked[bi].sum()), key.shape[-1])
        key[bi][:, masked[bi]] = 1e3 * torch.randn(garbage_shape, generator=generator, dtype=F64)
        value[bi][:, masked[bi]] = 1e6 * torch.randn(garbage_shape, generator=generator, dtype=F64)
    after = run_stages(dataclasses.replace(case, key=key, value=value), 0.3, reorder=case.reorder, rectify=rectify)
    assert torch.isfinite(before).all()
    assert torch.equal(before, after)


@pytest.mark.parametrize("text_first", [False, True])
@pytest.mark.parametrize("rectify", ["none", "block", "query"])
def test_rows_with_only_text_keys_left_are_finite_and_exact(text_first, rectify):
    inputs = video_attention_inputs(
        (2, 5, 7), batch=2, heads=2, head_dim=16, text_len=9, text_first=text_first, text_padding=3, dtype=F64, seed=11
    )
    mask = inputs.attn_mask.clone()
    video = slice(9, None) if text_first else slice(0, 70)
    mask[0, ..., video] = False  # batch 0: every video key masked; only the 6 unpadded text keys remain
    config = SparseAttentionConfig(sparsity=0.8, block_size=16, rectify=rectify, min_seq_len=0)
    out = sparse_attention(
        inputs.query,
        inputs.key,
        inputs.value,
        video_grid=(2, 5, 7),
        text_len=9,
        text_first=text_first,
        attn_mask=mask,
        config=config,
        impl="reference",
    )
    assert torch.isfinite(out).all()
    expected = F.scaled_dot_product_attention(inputs.query, inputs.key, inputs.value, attn_mask=mask)
    assert relative_error(out[0], expected[0]) < 1e-12


def test_chunked_reference_equals_unchunked(monkeypatch):
    """The O(S^2) reference functions work in query chunks; tiny chunks must give the same numbers."""
    inputs = video_attention_inputs(
        (3, 6, 7), batch=2, heads=2, head_dim=16, text_len=11, text_padding=4, dtype=F64, seed=5
    )
    layout = token_layout((3, 6, 7), 11, False, 16)
    config = SparseAttentionConfig(sparsity=0.6, block_size=16, rectify="query", min_seq_len=0)

    def run():
        return (
            dense_attention(inputs.query, inputs.key, inputs.value, inputs.attn_mask),
            attention_block_mass(inputs.query, inputs.key, layout, inputs.attn_mask),
            sparse_attention(
                inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config, impl="reference"
            ),
        )

    whole = run()
    monkeypatch.setattr(reference, "_CHUNK_BYTES", 1)
    chunked = run()
    for a, b in zip(whole, chunked):
        assert relative_error(b, a) < 1e-13  # summation order inside the matmuls may differ


@pytest.mark.parametrize("rectify", ["none", "block", "query"])
def test_error_falls_with_density_on_video_like_inputs(rectify):
    """Not an exactness test: keeping more blocks of a video-like input brings the output closer to dense attention
    (measured 0.36, 0.32, 0.21, 0.07 at densities 1/8 to 3/4 for plain block-sparse), exact at density 1."""
    inputs = video_attention_inputs((4, 8, 12), heads=2, head_dim=32, text_len=16, dtype=F64, seed=2)
    dense = dense_attention(inputs.query, inputs.key, inputs.value)
    errors = []
    for sparsity in (0.875, 0.75, 0.5, 0.25, 0.0):
        config = SparseAttentionConfig(sparsity=sparsity, block_size=32, rectify=rectify, min_seq_len=0)
        out = sparse_attention(
            inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config, impl="reference"
        )
        errors.append(relative_error(out, dense))
    assert all(sparser > denser for sparser, denser in zip(errors, errors[1:]))
    assert errors[-1] < 1e-12
