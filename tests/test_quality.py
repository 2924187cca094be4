"""The quality benchmark (`benchmarks/quality/`) at a toy size on the CPU: the peers' masks against float64 references
of their definitions, the metrics against hand computations, the data and dense sampling deterministic, training
learning, and the evaluation (with the attention capture and the fidelity tables on it) end to end.

Tests that build videos or compute metrics need scikit-image (the `quality` extra) and skip without it."""

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import spattn_compile
from spattn_compile import SparseAttentionConfig, select_plan
from spattn_compile.layout import token_layout

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
sys.path.insert(0, str(QUALITY))

import baselines  # noqa: E402
from baselines import RadialDecay, RasterMeanPool, SlidingTileWindow  # noqa: E402

from spattn_compile.estimators import base as estimator_registry  # noqa: E402

needs_skimage = pytest.mark.skipif(
    importlib.util.find_spec("skimage") is None,
    reason="scikit-image is not installed: the quality benchmark's videos and metrics need it "
    "(pip install -e '.[quality]')",
)


@pytest.fixture(autouse=True)
def _peers_registered(monkeypatch):
    """The peers' estimators registered for one test only: the registry is a copy, restored afterwards (other tests
    check that the library registers exactly its own estimators)."""
    monkeypatch.setattr(estimator_registry, "_REGISTRY", dict(estimator_registry._REGISTRY))
    monkeypatch.setattr(estimator_registry, "_BY_NAME", dict(estimator_registry._BY_NAME))
    baselines.register_baselines()


# ---------------------------------------------------------------------------------------------------------------------
# The peers' masks
# ---------------------------------------------------------------------------------------------------------------------


def _coords64(layout):
    """(t, y, x) float64 of every canonical video row (a direct reading of the definition, no vectorised helper)."""
    _, height, width = layout.video_grid
    raster = layout.video_perm
    return torch.stack([raster // (height * width), (raster // width) % height, raster % width], -1).double()


def _reference_keys(layout, kind):
    """Float64 keys from the masks' definitions, one block pair at a time: block centres and tile extents from the
    tokens, STA's box and Euclidean distances in tiles, Radial's `(d + 1) * 2^floor(log2(max(dt, 1)))` and `dt`."""
    coords = _coords64(layout)
    bs, nb = layout.block_size, layout.num_video_blocks
    blocks = [coords[i * bs : (i + 1) * bs] for i in range(nb)]
    centres = [block.mean(0) for block in blocks]
    tile = torch.stack([block.amax(0) - block.amin(0) + 1 for block in blocks]).mean(0)
    primary = torch.empty(nb, nb, dtype=torch.float64)
    secondary = torch.empty(nb, nb, dtype=torch.float64)
    for i in range(nb):
        for j in range(nb):
            offset = centres[i] - centres[j]
            if kind == "sta":
                primary[i, j] = (offset / tile).abs().max()
                secondary[i, j] = (offset / tile).norm()
            else:
                dt = abs(float(offset[0]))
                band = math.floor(math.log2(max(dt, 1.0)))
                primary[i, j] = ((offset[1:] / tile[1:]).norm() + 1) * 2.0**band
                secondary[i, j] = dt
    return primary, secondary


def _expected_keep(primary, secondary, budget):
    """Per query block: the diagonal, then the smallest keys in (primary, secondary, index) order, `budget` in all."""
    nb = primary.shape[0]
    keep = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        order = sorted(range(nb), key=lambda j: (round(float(primary[i, j]), 6), round(float(secondary[i, j]), 6), j))
        order.remove(i)
        keep[i, [i, *order[: budget - 1]]] = True
    return keep


def _inputs(grid, heads=2, head_dim=16, seed=0, text_len=0):
    generator = torch.Generator().manual_seed(seed)
    s = math.prod(grid) + text_len
    return (torch.randn(1, heads, s, head_dim, generator=generator, dtype=torch.float64) for _ in range(2))


@pytest.mark.parametrize("kind, estimator", [("sta", SlidingTileWindow()), ("radial", RadialDecay())])
@pytest.mark.parametrize("grid, block_size, density", [((8, 8, 8), 16, 0.25), ((5, 6, 7), 16, 0.3)])
def test_static_masks_match_their_definition(kind, estimator, grid, block_size, density):
    layout = token_layout(grid, 0, False, block_size, "hilbert")
    q, k = _inputs(grid)
    config = SparseAttentionConfig(
        sparsity=1 - density, block_size=block_size, estimator=estimator, rectify="none", min_seq_len=0
    )
    plan = select_plan(q, k, video_grid=grid, config=config)
    budget = math.ceil(density * layout.num_video_blocks - 1e-9)
    keep = plan.to_dense()[0, 0]
    assert (plan.kv_counts == budget).all(), "the budget must be met exactly, for every head and query block"
    assert torch.equal(keep, _expected_keep(*_reference_keys(layout, kind), budget))
    assert torch.equal(plan.to_dense()[0, 0], plan.to_dense()[0, 1]), "a static mask is the same for every head"


@pytest.mark.parametrize("keys", [baselines.sliding_tile_keys, baselines.radial_keys])
def test_static_keys_are_symmetric(keys):
    for grid in ((8, 8, 8), (5, 6, 7)):
        primary, secondary = keys(grid, 16, "hilbert")
        assert torch.equal(primary, primary.T) and torch.equal(secondary, secondary.T)
        assert (primary.diagonal() == primary.amin(-1)).all()


def _cube_lattice_mask(estimator, budget):
    """16^3 tokens in blocks of 64: the Hilbert curve's blocks are 4^3 cubes on a 4^3 lattice of tiles. Returns the
    kept-block mask `(64, 64)` at `budget` blocks per query block and the block centres."""
    grid = (16, 16, 16)
    q, k = _inputs(grid, heads=1, head_dim=8)
    config = SparseAttentionConfig(
        sparsity=1 - budget / 64, block_size=64, estimator=estimator, rectify="none", min_seq_len=0
    )
    centres, tile = baselines.block_geometry(grid, 64, "hilbert")
    assert torch.equal(tile, torch.full((3,), 4.0, dtype=torch.float64))
    return select_plan(q, k, video_grid=grid, config=config).to_dense()[0, 0], centres


def test_sliding_tile_window_is_a_box_of_tiles():
    # A budget of 27 blocks is the 3x3x3 box of tiles around every interior query block.
    keep, centres = _cube_lattice_mask(SlidingTileWindow(), 27)
    lattice = ((centres - 1.5) / 4).round().long()
    interior = [i for i in range(64) if ((lattice[i] >= 1) & (lattice[i] <= 2)).all()]
    assert len(interior) == 8
    for i in interior:
        box = ((lattice - lattice[i]).abs() <= 1).all(-1)
        assert torch.equal(keep[i], box)
    # At the border the window stays whole: 27 blocks, the nearest ones.
    assert (keep.sum(-1) == 27).all()


def test_radial_window_shrinks_with_temporal_distance():
    keep, centres = _cube_lattice_mask(RadialDecay(), 20)
    dt = (centres[:, None, 0] - centres[None, :, 0]).abs()
    dspace = ((centres[:, None, 1:] - centres[None, :, 1:]).norm(dim=-1) * 1e6).round() / 1e6
    for i in range(64):
        for j in keep[i].nonzero().flatten().tolist():
            # A kept pair implies every pair nearer in time or space, and no farther in the other, is kept too
            # (pairs exactly as far in both tie, and the budget may cut between them by index).
            closer = (
                (dt[i] <= dt[i, j]) & (dspace[i] <= dspace[i, j]) & ((dt[i] < dt[i, j]) | (dspace[i] < dspace[i, j]))
            )
            assert keep[i][closer].all()
        # Kept blocks per temporal distance never grow with the distance.
        per_distance = [int(keep[i][dt[i] == d].sum()) for d in sorted(set(dt[i].tolist()))]
        assert per_distance == sorted(per_distance, reverse=True)


@pytest.mark.parametrize("text_len", [0, 20])
def test_raster_mean_pool_matches_its_definition(text_len):
    grid, block_size, density = (4, 6, 10), 16, 0.3
    q, k = _inputs(grid, heads=2, head_dim=8, seed=3, text_len=text_len)
    config = SparseAttentionConfig(
        sparsity=1 - density, block_size=block_size, estimator=RasterMeanPool(), rectify="none", reorder="none",
        min_seq_len=0,
    )  # fmt: skip
    plan = select_plan(q, k, video_grid=grid, text_len=text_len, config=config)
    nv = math.prod(grid)
    nb = -(-nv // block_size)
    budget = math.ceil(density * nb - 1e-9)
    for head in range(2):
        # Raster blocks: runs of 16 tokens in (t, y, x) order, means of real rows; text blocks pooled alike.
        qv, kv, kt = q[0, head, :nv], k[0, head, :nv], k[0, head, nv:]
        q_mean = torch.stack([qv[i * block_size : (i + 1) * block_size].mean(0) for i in range(nb)])
        key_means = [kv[i * block_size : (i + 1) * block_size].mean(0) for i in range(nb)]
        key_means += [kt[i * block_size : (i + 1) * block_size].mean(0) for i in range(-(-text_len // block_size))]
        weights = torch.softmax(q_mean @ torch.stack(key_means).T / math.sqrt(8), dim=-1)
        expected = torch.cat([weights[:, :nb], weights[:, nb:].sum(-1, keepdim=True)], -1)
        torch.testing.assert_close(plan.block_scores[0, head].double(), expected, rtol=1e-10, atol=1e-12)
        keep = plan.to_dense()[0, head, :nb, :nb]
        assert (keep.sum(-1) == budget).all()
        for i in range(nb):
            rest = sorted((j for j in range(nb) if j != i), key=lambda j: (-float(expected[i, j]), j))
            assert keep[i].nonzero().flatten().tolist() == sorted([i, *rest[: budget - 1]])
        if text_len:
            assert plan.to_dense()[0, head, :nb, nb:].all(), "text blocks are always kept"


def test_raster_mean_pool_equals_block_mean_pooled_tiles_on_full_blocks():
    # Same definition as the library's PooledTiles(block_size, outliers=False) when every block is full.
    grid = (4, 8, 8)
    q, k = _inputs(grid, heads=2, head_dim=8, seed=5)
    ours = SparseAttentionConfig(
        sparsity=0.7, block_size=16, estimator=RasterMeanPool(), rectify="none", reorder="none", min_seq_len=0
    )
    theirs = dataclasses.replace(ours, estimator=spattn_compile.estimators.PooledTiles(tile_size=16, outliers=False))
    a, b = (select_plan(q, k, video_grid=grid, config=c) for c in (ours, theirs))
    torch.testing.assert_close(a.block_scores.double(), b.block_scores.double(), rtol=1e-9, atol=1e-12)
    assert torch.equal(a.to_dense(), b.to_dense())


# ---------------------------------------------------------------------------------------------------------------------
# Metrics, speedup sources
# ---------------------------------------------------------------------------------------------------------------------


@needs_skimage
def test_psnr_and_ssim_against_hand_computation():
    from metrics import summarise, video_metrics

    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (3, 2, 16, 16))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), -1.2, 1.2)  # some values leave [-1, 1]: the wrapper clips
    unit = lambda v: np.clip((v + 1) / 2, 0, 1)  # noqa: E731
    psnr, ssim = video_metrics(a, b)
    assert psnr == pytest.approx(10 * math.log10(1 / np.mean((unit(a) - unit(b)) ** 2)), rel=1e-12)
    assert 0 < ssim < 1

    # Constant frames: the variances vanish and SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1), averaged
    # over the channels, with C1 = (0.01 * data_range)^2.
    levels_a, levels_b = np.array([0.2, 0.5, 0.9]), np.array([0.3, 0.5, 0.6])
    const_a = np.broadcast_to((levels_a * 2 - 1)[:, None, None, None], (3, 3, 12, 12)).copy()
    const_b = np.broadcast_to((levels_b * 2 - 1)[:, None, None, None], (3, 3, 12, 12)).copy()
    c1 = 0.01**2
    expected = np.mean((2 * levels_a * levels_b + c1) / (levels_a**2 + levels_b**2 + c1))
    psnr, ssim = video_metrics(const_a, const_b)
    assert ssim == pytest.approx(expected, rel=1e-9)
    assert psnr == pytest.approx(10 * math.log10(1 / np.mean((levels_a - levels_b) ** 2)), rel=1e-12)

    assert video_metrics(a, a) == (math.inf, 1.0)
    stats = summarise([30.0, 34.0])
    assert (stats["mean"], stats["std"], stats["min"]) == (32.0, 2.0, 30.0)
    assert summarise([math.inf, math.inf])["mean"] == math.inf
    with pytest.raises(ValueError, match="shape"):
        video_metrics(a, a[:, :1])


def test_speedups_come_from_the_benchmark_logs():
    import evaluate

    figures = evaluate.speedup_figures()
    assert set(figures["densities"]) >= {0.25, 0.1, 0.05}
    for row in figures["densities"].values():
        assert row["kernel"] > 1 and row["cached"] > 1 and row["fresh"] > 1
    assert "bench_attention.log" in figures["source"]
    assert figures["estimator_cost"]["pooled(tile_size=16, outliers=True)"] > 0
    assert figures["default_at_10"]["fresh"] > 1


# ---------------------------------------------------------------------------------------------------------------------
# Data, model, training, evaluation
# ---------------------------------------------------------------------------------------------------------------------

TOY_MODEL = dict(num_classes=2, layers=2, heads=2, head_dim=16, ffn_dim=32, text_tokens=2, text_dim=8, freq_dim=16)


@needs_skimage
def test_videos_are_deterministic_and_in_range():
    from data import VideoSize, make_batch

    size = VideoSize(4, 16, 24)
    labels = torch.tensor([0, 1, 7])
    a = make_batch(labels, seed=7, size=size)
    assert a.shape == (3, 3, 4, 16, 24) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, make_batch(labels, seed=7, size=size))
    assert not torch.equal(a, make_batch(labels, seed=8, size=size))
    assert (a[:, :, 1:] - a[:, :, :-1]).abs().mean() > 1e-3, "the camera moves"
    with pytest.raises(ValueError, match="labels"):
        make_batch(torch.tensor([8]), seed=0, size=size)


def test_dense_sampling_is_deterministic_and_capture_changes_nothing():
    from capture import AttentionCapture
    from model import ClassConditionedWan, ModelConfig, euler_sample

    torch.manual_seed(0)
    config = ModelConfig(**TOY_MODEL)
    model = ClassConditionedWan(config).eval()
    grid = config.latent_grid(4, 16, 24)
    noise = torch.randn(2, 3, 4, 16, 24, generator=torch.Generator().manual_seed(1))
    sample = dict(
        conditioning=model.conditioning(torch.tensor([0, 1])), noise=noise, steps=3, shift=3.0, dtype=torch.float32
    )
    first = euler_sample(model.transformer, **sample)
    capture = AttentionCapture(video_tokens=math.prod(grid), steps=[0, 2], layers=[1])
    with capture:
        second = euler_sample(model.transformer, **sample, on_step=capture.begin_step)
    assert torch.isfinite(first).all() and torch.equal(first, second)
    assert [(c["step"], c["layer"]) for c in capture.calls] == [(0, 1), (2, 1)]
    assert capture.calls[0]["query"].shape == (1, 2, math.prod(grid), 16)
    assert capture.calls[0]["timestep"] == 1.0


def test_sampler_and_loss_agree_on_the_flow():
    """With the exact velocity of a single data point, `(x_t - x_0) / t`, the training loss is zero and the Euler
    sampler lands on the data point: the time convention (t = 1 noise, timestep = 1000 t), the target's sign and the
    shift agree between training and sampling."""
    import train
    from model import euler_sample, shift_time

    x0 = torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))

    def exact_transformer(hidden_states, timestep, encoder_hidden_states, return_dict):
        t = timestep.double()[:, None, None, None, None] / 1000
        return ((hidden_states.double() - x0.double()) / t,)

    sample = euler_sample(exact_transformer, torch.zeros(2, 1, 4), noise, steps=7, shift=3.0, dtype=torch.float64)
    torch.testing.assert_close(sample, x0, rtol=0, atol=1e-5)

    t = shift_time(torch.tensor([0.3, 0.8]), 3.0)
    model = lambda x_t, t, labels: exact_transformer(x_t, t * 1000, None, False)[0].float()  # noqa: E731
    loss = train.flow_matching_loss(model, x0, torch.zeros(2), noise, t, autocast=False)
    assert float(loss) < 1e-10


@needs_skimage
def test_training_learns_and_the_time_guard_stops_it(tmp_path):
    import train
    from model import ModelConfig

    model_config = ModelConfig(**TOY_MODEL)
    config = train.TrainConfig(
        stages=(train.Stage(4, 16, 24, batch=4, steps=12),), lr=3e-3, warmup_steps=2, val_every=6, seed=0
    )
    model, result = train.train(model_config, config, "cpu", checkpoint_dir=tmp_path, log=lambda _: None)
    assert result.steps_run == [12] and not result.stopped_early
    assert all(math.isfinite(v) for v in result.losses)
    first, last = result.validation[0][1], result.validation[-1][1]
    assert last < 0.9 * first, f"validation loss {first:.4f} -> {last:.4f}"
    loaded, loaded_config = train.load_checkpoint(tmp_path / "checkpoint.pt")
    assert loaded_config == model_config
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert len(result.checkpoint_sha256) == 64 and (tmp_path / "config.json").exists()
    train.plot_losses(result, tmp_path / "loss.png")

    _, stopped = train.train(model_config, dataclasses.replace(config, max_minutes=0.0), "cpu", log=lambda _: None)
    assert stopped.steps_run == [0] and stopped.stopped_early


@needs_skimage
def test_evaluation_end_to_end(tmp_path):
    import evaluate
    from data import VideoSize
    from model import ClassConditionedWan, ModelConfig

    torch.manual_seed(0)
    model_config = ModelConfig(**TOY_MODEL)
    model = ClassConditionedWan(model_config).eval()
    config = evaluate.EvalConfig(
        num_videos=2, steps=2, sparsities=(0.5,), focus_sparsity=0.5, block_size=16, min_seq_len=0,
        metric_workers=0, capture_steps=(0.0,), tables=("sweep", "controls"),
    )  # fmt: skip
    written = []
    evaluation, kept = evaluate.evaluate(
        model, model_config, config, VideoSize(4, 16, 24), "cpu",
        capture_path=tmp_path / "capture.pt", write=written.append, log=lambda _: None,
    )  # fmt: skip
    assert evaluation.deterministic and written
    runs = evaluation.runs.values()
    assert len(runs) == 8 and not any(r.skipped for r in runs)
    for result in runs:
        assert len(result.psnr) == 2 and len(result.ssim) == 2
    by_label = {r.label: r for r in runs}
    assert by_label["all dense"].psnr == [math.inf, math.inf], "the compiled graph computes what the eager one does"
    assert by_label["all dense"].report["sparse_calls"] == 0
    assert by_label["default"].report["sparse_calls"] == 2 * 2 and by_label["default"].report["mean_density"] == 0.5
    assert all(math.isfinite(v) and v > 20 for v in by_label["default"].psnr)
    # Recall measured on the captured calls (2 layers at step 0) for the 6 methods of the sweep; the oracle's recall
    # is the largest on the shared (Hilbert) layout.
    recall = {(row["plan"], row["layer"]): row["recall"] for row in evaluation.recall_rows}
    assert len(evaluation.recall_rows) == 2 * 6
    for layer in (0, 1):
        ours = {plan: value for (plan, at), value in recall.items() if at == layer and "reorder" not in plan}
        oracle = [value for plan, value in ours.items() if "SampledRows(rows=16)" in plan]
        assert max(ours.values()) == pytest.approx(max(oracle), abs=1e-5)

    figures = evaluate.speedup_figures()
    text = evaluate.to_markdown(evaluation, figures, "# toy")
    assert "| default | query | 0.5 |" in text and "## Targets" in text
    evaluate.write_json(tmp_path / "results.json", evaluate.to_json(evaluation, figures))
    evaluate.plot_psnr(evaluation, tmp_path / "psnr.png")
    evaluate.save_sample_pictures(
        kept, evaluate.class_names(2, 2), tmp_path / "s.gif", tmp_path / "s.png", caption="sparse"
    )

    # The fidelity tables of benchmarks/fidelity.py on the captured calls.
    spec = importlib.util.spec_from_file_location("fidelity", QUALITY.parent / "fidelity.py")
    fidelity = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fidelity
    spec.loader.exec_module(fidelity)
    output, table = tmp_path / "fidelity.md", tmp_path / "fidelity.json"
    arguments = ["--suite", "trained", "--input", str(tmp_path / "capture.pt"), "--block-size", "32"]
    assert (
        fidelity.main([*arguments, "--cases", "1", "--densities", "0.5", "--output", str(output), "--json", str(table)])
        == 0
    )
    report = output.read_text()
    assert "step 0 layer 1" in report and "Per-head concentration" in report
    import json

    payload = json.loads(table.read_text())
    assert len(payload["heads"]) == 2 and all(0 < h["top 25%"] <= 1 for h in payload["heads"])


@needs_skimage
def test_evaluation_time_guard_skips_runs_and_says_so(tmp_path):
    import evaluate
    from data import VideoSize
    from model import ClassConditionedWan, ModelConfig

    torch.manual_seed(0)
    model_config = ModelConfig(**TOY_MODEL)
    config = evaluate.EvalConfig(
        num_videos=1, steps=1, sparsities=(0.5,), focus_sparsity=0.5, block_size=16, min_seq_len=0,
        metric_workers=0, capture_steps=(0.0,), tables=("sweep",), max_minutes=0.0, recall_minutes=0.0,
    )  # fmt: skip
    evaluation, _ = evaluate.evaluate(
        ClassConditionedWan(model_config).eval(), model_config, config, VideoSize(4, 16, 24), "cpu",
        log=lambda _: None,
    )  # fmt: skip
    assert all(r.skipped == "time guard" for r in evaluation.runs.values()) and len(evaluation.runs) == 6
    assert evaluation.recall_rows == []
    text = evaluate.to_markdown(evaluation, evaluate.speedup_figures(), "# toy")
    assert text.count("| not run (time guard) |") == 6 and "did not run" in text
    with pytest.raises(ValueError, match="EvalConfig.tables"):
        evaluate.tables(dataclasses.replace(config, tables=("estimators",)))
