"""examples/generate.py end to end: tiny random diffusers pipelines compiled with the spattn backend write a video, the
dense and sparse videos side by side and a report plot, and the report counts exactly the dense warm-up, refreshed
and cached calls that the settings given on the command line ask for."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import spattn_compile

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "generate.py"


@pytest.fixture(scope="module")
def example():
    # Loaded from its path: examples/ is not a package. Registered while in use, as dataclasses look their module up.
    name = "spattn_example_generate"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


STEPS, DENSE_STEPS, REFRESH_INTERVAL = 3, 1, 2


# Wan calls the transformer twice per step (conditional, unconditional); CogVideoX batches both branches into one
# call and HunyuanVideo is guidance-distilled: one call per step. Layers: attention calls rewritten per forward.
@pytest.mark.parametrize(("model", "branches", "layers"), [("wan", 2, 2), ("cogvideox", 1, 2), ("hunyuan", 1, 2)])
def test_generate_writes_video_and_report(example, tmp_path, model, branches, layers):
    # 9 frames of 128x128: a 3x16x16 latent, 3x8x8 = 192 video tokens, 6 blocks of 32.
    result = example.main(
        [
            *("--model", model, "--steps", str(STEPS), "--frames", "9", "--height", "128", "--width", "128"),
            *("--sparsity", "0.5", "--dense-steps", str(DENSE_STEPS), "--refresh-interval", str(REFRESH_INTERVAL)),
            *("--device", "cpu", "--compiler", "eager", "--output-dir", str(tmp_path)),
        ]
    )

    assert result.video_path.parent == tmp_path and result.video_path.stat().st_size > 0
    assert result.video_path.suffix in (".mp4", ".gif")
    if result.video_path.suffix == ".gif":
        from PIL import Image

        with Image.open(result.video_path) as gif:
            assert gif.size == (128, 128) and gif.n_frames > 1
    assert result.report_path == tmp_path / f"{model}_report.png"
    assert result.report_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The dense and the sparse videos side by side, under their labels; sparse attention changed the video.
    assert result.comparison_path.parent == tmp_path and result.comparison_path.stem == f"{model}_dense_vs_sparse"
    if result.comparison_path.suffix == ".gif":
        from PIL import Image

        with Image.open(result.comparison_path) as gif:
            assert gif.size == (2 * 128 + 4, 14 + 128) and gif.n_frames > 1
    assert 0 < result.psnr < float("inf")

    report = result.report
    per_step = branches * layers
    assert report.dense_calls == report.count("dense_step") == DENSE_STEPS * per_step
    assert report.sparse_calls == (STEPS - DENSE_STEPS) * per_step
    # The last dense step (step 0) measures the true block mass; its plan serves steps 1 and 2 (exact_plan_steps).
    assert report.count("dense_step", "exact") == per_step
    assert report.refreshes == 0 and report.cache_hits == 2 * per_step
    # The plot's heat maps: the kept blocks of the plan each layer and branch ran with (here the exact plan).
    assert len(report.masks) == per_step
    assert {(r.step, r.branch) for r in report.records} == {(s, b) for s in range(STEPS) for b in range(branches)}
    assert {r.layer_index for r in report.records} == set(range(layers))
    # Half of the 6 video blocks per query block.
    assert all(r.density == pytest.approx(0.5) for r in report.records if r.kind == "sparse")
    assert all(0 < r.recall <= 1 + 1e-6 for r in report.records)


def _without(monkeypatch, example, *modules: str) -> None:
    """Make `example` see `modules` as not installed."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(example.importlib.util, "find_spec", lambda name: None if name in modules else find_spec(name))


def test_video_falls_back_to_gif_without_imageio(example, tmp_path, monkeypatch, capsys):
    _without(monkeypatch, example, "imageio", "imageio_ffmpeg")
    frames = np.random.default_rng(0).random((3, 16, 16, 3))
    path = example.save_video(frames, tmp_path / "clip", fps=8)
    assert path == tmp_path / "clip.gif"
    from PIL import Image

    with Image.open(path) as gif:
        assert gif.n_frames == 3
    assert "GIF" in capsys.readouterr().out


def test_report_plot_is_skipped_without_matplotlib(example, tmp_path, monkeypatch, capsys):
    _without(monkeypatch, example, "matplotlib")
    report = spattn_compile.ScheduleReport(records=(), masks={})
    assert example.save_report_plot(report, tmp_path / "report.png") is None
    assert not (tmp_path / "report.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_side_by_side_puts_each_video_under_its_label(example):
    rng = np.random.default_rng(0)
    left, right = rng.random((2, 8, 10, 3)), rng.random((2, 8, 10, 3))
    both = example.side_by_side(left, right, ("dense", "sparse"), gap=4)
    assert both.shape == (2, 14 + 8, 24, 3)
    assert np.array_equal(both[:, 14:, :10], left) and np.array_equal(both[:, 14:, 14:], right)
    assert (both[:, 14:, 10:14] == 1).all() and (both[:, :14] < 1).any(), "white gap, labels drawn in the strip"
    assert example.video_psnr(left, left) == float("inf")
    assert example.video_psnr(left, right) == pytest.approx(10 * np.log10(1 / np.mean((left - right) ** 2)))


def test_char_tokenizer_lowercases_ends_with_eos_and_pads(example):
    tokenizer = example.char_tokenizer()
    ids = tokenizer(["A cat"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    assert ids.shape == (1, 8) and ids[0, 5].item() == tokenizer.eos_token_id and ids[0, -1].item() == 0
    assert torch.equal(ids, tokenizer(["a cat"], padding="max_length", max_length=8, return_tensors="pt").input_ids)
