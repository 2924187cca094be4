"""SparseAttentionConfig validation (every field: range and type) and the scoping of the `config` context manager
(nesting, exceptions, threads, asyncio tasks)."""

import asyncio
import dataclasses
import math
import threading

import pytest

from spattn_compile.config import SparseAttentionConfig, config, current_config, reset_config, set_config

# (field, value, error): one bad value per line; the message must name the field.
BAD_VALUES = [
    ("sparsity", -0.1, ValueError),
    ("sparsity", 1.0, ValueError),
    ("sparsity", math.nan, ValueError),
    ("sparsity", math.inf, ValueError),
    ("sparsity", "0.5", TypeError),
    ("sparsity", None, TypeError),
    ("sparsity", True, TypeError),
    ("block_size", 8, ValueError),
    ("block_size", 512, ValueError),
    ("block_size", 96, ValueError),
    ("block_size", 0, ValueError),
    ("block_size", 128.0, TypeError),
    ("block_size", "128", TypeError),
    ("block_size", True, TypeError),
    ("tile_size", 8, ValueError),
    ("tile_size", 24, ValueError),
    ("tile_size", 256, ValueError),  # does not divide the default block_size 128
    ("tile_size", 32.0, TypeError),
    ("mass_threshold", 0.0, ValueError),
    ("mass_threshold", 1.01, ValueError),
    ("mass_threshold", -0.5, ValueError),
    ("mass_threshold", math.nan, ValueError),
    ("mass_threshold", "high", TypeError),
    ("max_density", 0.0, ValueError),
    ("max_density", 1.5, ValueError),
    ("max_density", None, TypeError),
    ("reorder", "zorder", ValueError),
    ("reorder", "Hilbert", ValueError),
    ("reorder", None, ValueError),
    ("rectify", "both", ValueError),
    ("rectify", True, ValueError),
    ("gapr", 1, TypeError),
    ("gapr", "yes", TypeError),
    ("neighbors", 0, TypeError),
    ("dense_steps", -1, ValueError),
    ("dense_steps", 1.5, TypeError),
    ("dense_steps", True, TypeError),
    ("dense_layers", (-1,), ValueError),
    ("dense_layers", (0, 1.0), ValueError),
    ("dense_layers", (True,), ValueError),
    ("dense_layers", "01", ValueError),
    ("dense_layers", 3, ValueError),
    ("refresh_interval", 0, ValueError),
    ("refresh_interval", 2.0, TypeError),
    ("density_decay", 1.0, ValueError),
    ("density_decay", -0.01, ValueError),
    ("density_decay", "0.1", TypeError),
    ("min_seq_len", -1, ValueError),
    ("min_seq_len", 1e3, TypeError),
    ("video_grid", (2, 3), ValueError),
    ("video_grid", (2, 3, 0), ValueError),
    ("video_grid", (2, 3, 4.0), ValueError),
    ("video_grid", (2, 3, True), ValueError),
    ("video_grid", "2x3x4", ValueError),
    ("text_len", -1, ValueError),
    ("text_len", 2.0, TypeError),
    ("text_len", "77", TypeError),
    ("text_position", "middle", ValueError),
    ("text_position", True, ValueError),
]


@pytest.mark.parametrize(("field", "value", "error"), BAD_VALUES)
def test_bad_field_value_raises_naming_the_field(field, value, error):
    with pytest.raises(error, match=rf"SparseAttentionConfig\.{field}="):
        SparseAttentionConfig(**{field: value})


@pytest.mark.parametrize(("field", "value", "error"), BAD_VALUES)
def test_bad_field_value_in_config_context_raises(field, value, error):
    before = current_config()
    with pytest.raises(error, match=field):
        with config(**{field: value}):
            pytest.fail("the body must not run")
    assert current_config() is before


def test_every_field_has_a_bad_value_case():
    covered = {field for field, _, _ in BAD_VALUES}
    assert covered == {f.name for f in dataclasses.fields(SparseAttentionConfig)}


GOOD_VALUES = [
    ("sparsity", 0.0),
    ("sparsity", 0.999),
    ("sparsity", 0),
    ("block_size", 32),
    ("block_size", 256),
    ("tile_size", 16),
    ("tile_size", 128),
    ("mass_threshold", 1.0),
    ("mass_threshold", 1e-6),
    ("max_density", 1.0),
    ("max_density", 1),
    ("reorder", "none"),
    ("rectify", "none"),
    ("rectify", "query"),
    ("gapr", False),
    ("neighbors", True),
    ("dense_steps", 5),
    ("dense_layers", (0, 1, 7)),
    ("refresh_interval", 12),
    ("density_decay", 0.5),
    ("min_seq_len", 0),
    ("video_grid", (1, 1, 1)),
    ("text_len", 0),
    ("text_position", "first"),
]


@pytest.mark.parametrize(("field", "value"), GOOD_VALUES)
def test_valid_field_values_are_kept(field, value):
    assert getattr(SparseAttentionConfig(**{field: value}), field) == value


def test_block_and_tile_size_checked_together():
    assert SparseAttentionConfig(block_size=64, tile_size=64).tile_size == 64
    assert SparseAttentionConfig(block_size=16, tile_size=16).block_size == 16
    with pytest.raises(ValueError, match=r"tile_size=128 .*divisor of block_size=64"):
        SparseAttentionConfig(block_size=64, tile_size=128)


def test_sequences_are_normalised_to_tuples():
    cfg = SparseAttentionConfig(dense_layers=[3, 0, 1], video_grid=[2, 3, 4])
    assert cfg.dense_layers == (0, 1, 3)
    assert cfg.video_grid == (2, 3, 4)
    assert SparseAttentionConfig(dense_layers={2, 1}).dense_layers == (1, 2)
    hash(cfg)  # frozen and hashable once normalised


def test_config_is_frozen_and_density_is_one_minus_sparsity():
    cfg = SparseAttentionConfig(sparsity=0.8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sparsity = 0.5
    assert cfg.density == pytest.approx(0.2)


def test_defaults_are_the_documented_ones():
    cfg = SparseAttentionConfig()
    assert (cfg.sparsity, cfg.block_size, cfg.tile_size) == (0.75, 128, 32)
    assert (cfg.reorder, cfg.rectify, cfg.gapr, cfg.neighbors) == ("hilbert", "block", True, False)
    assert cfg.mass_threshold is None and cfg.video_grid is None and cfg.text_len is None


# --------------------------------------------------------------------------------------------------------------------
# The context manager
# --------------------------------------------------------------------------------------------------------------------


def test_config_nests_and_restores():
    outer_default = current_config()
    with config(sparsity=0.9) as outer:
        assert current_config() is outer and outer.sparsity == 0.9
        with config(rectify="query") as inner:
            # Fields not overridden come from the enclosing block, not from the defaults.
            assert inner.sparsity == 0.9 and inner.rectify == "query"
            assert current_config() is inner
        assert current_config() is outer
    assert current_config() is outer_default


def test_config_restores_after_an_exception():
    before = current_config()
    with pytest.raises(RuntimeError, match="boom"):
        with config(sparsity=0.5):
            raise RuntimeError("boom")
    assert current_config() is before


def test_config_with_a_base_ignores_the_enclosing_block():
    base = SparseAttentionConfig(block_size=64, tile_size=16)
    with config(sparsity=0.5):
        with config(base, rectify="none") as scoped:
            assert scoped.sparsity == base.sparsity
            assert (scoped.block_size, scoped.tile_size, scoped.rectify) == (64, 16, "none")


def test_config_rejects_unknown_fields_and_non_config_base():
    with pytest.raises(TypeError, match=r"unknown SparseAttentionConfig field\(s\) \['sparsty'\]"):
        with config(sparsty=0.5):
            pass
    with pytest.raises(TypeError, match="SparseAttentionConfig"):
        with config({"sparsity": 0.5}):
            pass
    with pytest.raises(TypeError, match="SparseAttentionConfig"):
        set_config({"sparsity": 0.5})


def test_set_config_token_resets():
    before = current_config()
    token = set_config(SparseAttentionConfig(sparsity=0.3))
    try:
        assert current_config().sparsity == 0.3
    finally:
        reset_config(token)
    assert current_config() is before


def test_config_is_private_to_each_thread():
    barrier = threading.Barrier(2)
    seen: dict[str, float] = {}
    errors: list[BaseException] = []

    def worker(name: str, sparsity: float) -> None:
        try:
            with config(sparsity=sparsity):
                barrier.wait(timeout=10)  # both threads are inside their block now
                seen[name] = current_config().sparsity
                barrier.wait(timeout=10)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    with config(sparsity=0.1):
        threads = [threading.Thread(target=worker, args=(f"t{i}", s)) for i, s in enumerate((0.5, 0.9))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # The threads' blocks never leak into the main thread.
        assert current_config().sparsity == 0.1
    assert not errors
    assert seen == {"t0": 0.5, "t1": 0.9}


def test_new_threads_start_from_the_defaults():
    seen = []
    with config(sparsity=0.2):
        thread = threading.Thread(target=lambda: seen.append(current_config().sparsity))
        thread.start()
        thread.join()
    assert seen == [SparseAttentionConfig().sparsity]


def test_config_is_private_to_each_asyncio_task():
    async def task(sparsity: float, started: asyncio.Event, other_started: asyncio.Event) -> tuple[float, float]:
        with config(sparsity=sparsity):
            started.set()
            await other_started.wait()  # interleave: the other task is inside its own block now
            during = current_config().sparsity
            await asyncio.sleep(0)
        return during, current_config().sparsity

    async def main() -> list[tuple[float, float]]:
        first, second = asyncio.Event(), asyncio.Event()
        with config(sparsity=0.1):
            results = await asyncio.gather(task(0.5, first, second), task(0.9, second, first))
            assert current_config().sparsity == 0.1
        return results

    default = SparseAttentionConfig().sparsity
    (during_a, after_a), (during_b, after_b) = asyncio.run(main())
    assert (during_a, during_b) == (0.5, 0.9)
    # After its block, each task sees what it inherited when it was created (the 0.1 block), not the other task's.
    assert after_a == after_b == 0.1
    assert current_config().sparsity == default
