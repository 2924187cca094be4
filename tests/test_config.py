"""SparseAttentionConfig validation (every field: range and type; NumPy scalars accepted and stored as Python numbers;
the estimator by name or settings, checked against the block size) and the scoping of the `config` context manager
(nesting, explicit fields, exceptions, threads, asyncio tasks)."""

import asyncio
import dataclasses
import math
import threading

import numpy as np
import pytest

from spattn_compile.config import (
    SparseAttentionConfig,
    config,
    current_config,
    explicit_fields,
    reset_config,
    set_config,
)
from spattn_compile.estimators import PooledTiles, QueryTiles, SampledRows

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
    ("estimator", "oracle", ValueError),
    ("estimator", "Pooled", ValueError),
    ("estimator", None, TypeError),
    ("estimator", 16, TypeError),
    ("estimator", PooledTiles(tile_size=256), ValueError),  # does not divide the default block_size 128
    ("estimator", SampledRows(rows=129), ValueError),  # more rows than the default block_size 128 has
    ("estimator", QueryTiles(tile_size=256), ValueError),
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
    ("head_budget", "best", ValueError),
    ("head_budget", None, ValueError),
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
    ("exact_plan_steps", -1, ValueError),
    ("exact_plan_steps", 1.5, TypeError),
    ("exact_plan_steps", None, TypeError),
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
    ("estimator", PooledTiles(tile_size=128, outliers=False)),
    ("estimator", SampledRows(rows=128)),
    ("estimator", QueryTiles(tile_size=32)),
    ("mass_threshold", 1.0),
    ("mass_threshold", 1e-6),
    ("max_density", 1.0),
    ("max_density", 1),
    ("reorder", "none"),
    ("rectify", "none"),
    ("rectify", "query"),
    ("head_budget", "water_fill"),
    ("gapr", False),
    ("neighbors", True),
    ("dense_steps", 5),
    ("dense_layers", (0, 1, 7)),
    ("refresh_interval", 12),
    ("exact_plan_steps", 0),
    ("exact_plan_steps", 9),
    ("density_decay", 0.5),
    ("min_seq_len", 0),
    ("video_grid", (1, 1, 1)),
    ("text_len", 0),
    ("text_position", "first"),
]


@pytest.mark.parametrize(("field", "value"), GOOD_VALUES)
def test_valid_field_values_are_kept(field, value):
    assert getattr(SparseAttentionConfig(**{field: value}), field) == value


def test_block_size_and_estimator_checked_together():
    assert SparseAttentionConfig(block_size=64, estimator=PooledTiles(tile_size=64)).estimator.tile_size == 64
    assert SparseAttentionConfig(block_size=16, estimator=SampledRows(rows=16)).block_size == 16
    with pytest.raises(ValueError, match=r"estimator=PooledTiles\(tile_size=128\) is invalid with block_size=64"):
        SparseAttentionConfig(block_size=64, estimator=PooledTiles(tile_size=128))
    with pytest.raises(ValueError, match=r"estimator=SampledRows\(rows=32\) is invalid with block_size=16"):
        SparseAttentionConfig(block_size=16, estimator=SampledRows(rows=32))
    # The default estimator (tile 16) fits every block size.
    assert SparseAttentionConfig(block_size=16).estimator == PooledTiles(16, outliers=True)


@pytest.mark.parametrize(("name", "settings"), [("pooled", PooledTiles()), ("sampled_rows", SampledRows()),
                                                ("query_tiles", QueryTiles())])  # fmt: skip
def test_estimator_names_give_default_settings(name, settings):
    cfg = SparseAttentionConfig(estimator=name)
    assert cfg.estimator == settings and cfg == SparseAttentionConfig(estimator=settings)
    assert hash(cfg) == hash(SparseAttentionConfig(estimator=settings))


def test_numpy_scalars_are_stored_as_python_numbers():
    """Issue 13 item 8: NumPy scalars are accepted wherever Python numbers are, and stored as Python numbers, so that
    configs built either way compare, hash and print alike."""
    cfg = SparseAttentionConfig(
        sparsity=np.float32(0.5),
        block_size=np.int64(64),
        mass_threshold=np.float64(0.75),
        max_density=np.float32(0.25),
        dense_steps=np.int32(2),
        dense_layers=[np.int64(3), np.int16(1)],
        refresh_interval=np.uint8(4),
        exact_plan_steps=np.int64(3),
        density_decay=np.float16(0.125),
        min_seq_len=np.int64(0),
        video_grid=(np.int64(2), np.int32(3), np.int8(5)),
        text_len=np.int64(7),
    )
    plain = SparseAttentionConfig(
        sparsity=float(np.float32(0.5)),
        block_size=64,
        mass_threshold=0.75,
        max_density=float(np.float32(0.25)),
        dense_steps=2,
        dense_layers=(1, 3),
        refresh_interval=4,
        exact_plan_steps=3,
        density_decay=0.125,
        min_seq_len=0,
        video_grid=(2, 3, 5),
        text_len=7,
    )
    assert cfg == plain and hash(cfg) == hash(plain) and repr(cfg) == repr(plain)
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        values = value if isinstance(value, tuple) else (value,)
        assert all(type(v).__module__ == "builtins" or isinstance(v, PooledTiles) for v in values), field.name
    with pytest.raises(ValueError, match=r"SparseAttentionConfig\.sparsity=.*is invalid"):
        SparseAttentionConfig(sparsity=np.float32(1.5))
    with pytest.raises(TypeError, match=r"SparseAttentionConfig\.block_size=.* has type"):
        SparseAttentionConfig(block_size=np.float64(64.0))
    with pytest.raises(TypeError, match=r"SparseAttentionConfig\.gapr"):
        SparseAttentionConfig(gapr=np.bool_(True))


@pytest.mark.parametrize(
    "make",
    [
        lambda: SampledRows(rows=np.int64(8)),
        lambda: QueryTiles(tile_size=np.int64(16)),
        lambda: PooledTiles(tile_size=np.int64(16)),
    ],  # fmt: skip
    ids=["SampledRows.rows", "QueryTiles.tile_size", "PooledTiles.tile_size"],
)
def test_numpy_integers_in_estimator_settings(make):
    settings = make()
    assert SparseAttentionConfig(estimator=settings).estimator == settings


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
    assert (cfg.sparsity, cfg.block_size, cfg.estimator) == (0.75, 128, PooledTiles(tile_size=16, outliers=True))
    assert (cfg.reorder, cfg.rectify, cfg.gapr, cfg.neighbors) == ("hilbert", "query", True, False)
    assert (cfg.max_density, cfg.dense_steps, cfg.exact_plan_steps, cfg.min_seq_len) == (0.5, 0, 5, 2048)
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
    base = SparseAttentionConfig(block_size=64, estimator=QueryTiles(tile_size=32))
    with config(sparsity=0.5):
        with config(base, rectify="none") as scoped:
            assert scoped.sparsity == base.sparsity
            assert (scoped.block_size, scoped.estimator, scoped.rectify) == (64, QueryTiles(32), "none")
            assert explicit_fields() == frozenset(f.name for f in dataclasses.fields(SparseAttentionConfig))


def test_explicit_fields_are_the_ones_set_by_enclosing_blocks():
    assert explicit_fields() == frozenset()
    with config(sparsity=0.5):
        assert explicit_fields() == {"sparsity"}
        with config(estimator="sampled_rows"):
            assert explicit_fields() == {"sparsity", "estimator"}
        assert explicit_fields() == {"sparsity"}
    assert explicit_fields() == frozenset()


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
