"""Probe the public surface with bad and edge inputs (`spattn_compile.testing.bad_inputs`): every outcome must be a
correct result or an error that names the problem, never a silent wrong result.

Owns the bad-input probe of issue 13: one row per case (what was called, its outcome class, the message or why the
result is wrong) and the count per class; the cases and their classes are documented in
`spattn_compile.testing.bad_inputs`. `tests/test_bad_input_probe.py` runs the same cases.

The model cases of issue 18 (`MODEL_CASES`) follow: tiny diffusers models compiled with the backend (`eager` inner
compiler), each checking what the compiled model does against what its settings promise. A wrong output (dense where
a grid is set, sparse on a misread grid) is "silent wrong"; a warning that names the wrong fix (a setting already in
force, or compiling without the backend where a Dynamo setting is what is missing) is "unclear error". They check
that calls went sparse or stayed dense and that the message is right; that the sparse outputs equal sparse SDPA on the
right grid is what `tests/test_silent_wrong.py` and `tests/test_families_compile_modes.py` check.

Run: `python benchmarks/probe_bad_inputs.py` (CPU, about a minute); exits 1 if any case is unclear or silently wrong.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # The Triton cases run under the interpreter on a CPU (it must be set before triton is first imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402

import spattn_compile  # noqa: E402
from spattn_compile.families import FAMILY_RULES, LatentRule  # noqa: E402
from spattn_compile.runtime.binding import reset_schedule  # noqa: E402
from spattn_compile.testing import relative_error, zoo  # noqa: E402
from spattn_compile.testing.bad_inputs import CASES, classify  # noqa: E402

SETTINGS = {"block_size": 16, "min_seq_len": 0, "sparsity": 0.75}
# Mochi's rotary embedding runs under torch.autocast(device, torch.float32), which torch declines on the CPU with a
# warning (it computes in float32 anyway): diffusers' code, not an outcome of a case.
warnings.filterwarnings("ignore", "In CPU autocast, but the target dtype is not supported", UserWarning)


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """run() returns "" when the outcome is right, else what is wrong; `failure`: the class of a wrong outcome."""

    name: str
    run: Callable[[], str]
    failure: str = "silent wrong"


def _fresh() -> None:
    torch._dynamo.reset()
    reset_schedule()
    spattn_compile.reset_report()


def _compile(model: torch.nn.Module) -> Callable:
    return torch.compile(model, backend="spattn", options={"compiler": "eager", **SETTINGS})


def _out(result: object) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@contextlib.contextmanager
def _warnings() -> Iterator[list[str]]:
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                messages.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("spattn_compile")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _packed_ltx(grid: tuple[int, int, int]) -> tuple[zoo.TinyModel, dict]:
    """LTX-Video with packed tokens and `video_coords`, without num_frames/height/width: no grid anywhere."""
    tiny = zoo.ltx_video()
    inputs = tiny.make_inputs(*grid)
    for name in ("num_frames", "height", "width"):
        del inputs[name]
    axes = torch.meshgrid(*(torch.arange(size, dtype=torch.float32) for size in grid), indexing="ij")
    inputs["video_coords"] = torch.stack(axes).flatten(1).unsqueeze(0)
    return tiny, inputs


def _kinds() -> list[str]:
    return [record.kind for record in spattn_compile.report().records]


def _packed_tokens_sparse_inside_config() -> str:
    _fresh()
    grid = (3, 4, 6)
    tiny, inputs = _packed_ltx(grid)
    compiled = _compile(tiny.model)
    with torch.no_grad():
        dense = _out(tiny.model(**inputs))
        compiled(**inputs)  # the first compiled call: no grid
        with spattn_compile.config(video_grid=grid):
            out = _out(compiled(**inputs))
    if "sparse" not in _kinds() or relative_error(out, dense) < 1e-4:
        return f"dense inside config(video_grid={grid}) (report kinds {_kinds()})"
    return ""


def _grid_in_force_not_suggested() -> str:
    _fresh()
    tiny, inputs = _packed_ltx((3, 4, 6))
    compiled = _compile(tiny.model)
    with torch.no_grad(), _warnings() as logged:
        compiled(**inputs)
        with spattn_compile.config(video_grid=(3, 4, 7)):  # does not fit the 72-token sequence
            for _ in range(3):
                compiled(**inputs)
    suggests = [w for w in logged if "set the latent token grid" in w or "give video_grid" in w]
    if suggests or not logged:
        return f"warnings {logged}"
    return ""


def _misread_grid_of_the_same_token_count() -> str:
    _fresh()
    saved = FAMILY_RULES.get("WanTransformer3DModel")
    FAMILY_RULES["WanTransformer3DModel"] = LatentRule(channel_dim=4)  # a rule that does not fit: reads (4, 2, 12)
    try:
        tiny = zoo.wan()
        inputs = tiny.make_inputs(4, 24, 4)  # true grid (4, 12, 2): 96 tokens, as many as the misread one
        tiny.model.compile_repeated_blocks(backend="spattn", options={"compiler": "eager", **SETTINGS})
        with torch.no_grad(), spattn_compile.config(**SETTINGS):
            dense = _out(zoo.wan().model(**inputs))
            out = _out(tiny.model(**inputs))
    finally:
        FAMILY_RULES.pop("WanTransformer3DModel")
        if saved is not None:
            FAMILY_RULES["WanTransformer3DModel"] = saved
    if "sparse" in _kinds() or relative_error(out, dense) > 1e-5:
        return f"sparse on a misread grid (report kinds {_kinds()})"
    return ""


def _mochi(setting: bool) -> tuple[zoo.TinyModel, Callable, dict]:
    _fresh()
    tiny = zoo.mochi()
    inputs = tiny.make_inputs(batch=2)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=setting):
        compiled = _compile(tiny.model)
    return tiny, compiled, inputs


def _mochi_sparse_with_its_setting() -> str:
    tiny, compiled, inputs = _mochi(True)
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        dense = _out(tiny.model(**inputs))
        out = _out(compiled(**inputs))
    if _kinds().count("sparse") != 2 or relative_error(out, dense) < 1e-4:
        return f"Mochi's joint attention is not sparse (report kinds {_kinds()})"
    return ""


def _mochi_without_its_setting_says_so() -> str:
    tiny, compiled, inputs = _mochi(False)
    with torch.no_grad(), _warnings() as logged:
        for _ in range(3):
            compiled(**inputs)
    if len(logged) != 1 or "capture_dynamic_output_shape_ops = True" not in logged[0]:
        return f"warnings {logged}"
    return ""


MODEL_CASES = (
    ModelCase("packed tokens (LTX video_coords) compiled without a grid, then config(video_grid)",
              _packed_tokens_sparse_inside_config),  # fmt: skip
    ModelCase("packed tokens, a video_grid in force that fits no call: the warning", _grid_in_force_not_suggested,
              "unclear error"),  # fmt: skip
    ModelCase("regional Wan, latent misread as a grid of the same token count", _misread_grid_of_the_same_token_count),
    ModelCase("Mochi whole-model with capture_dynamic_output_shape_ops", _mochi_sparse_with_its_setting),
    ModelCase("Mochi without it: the warning", _mochi_without_its_setting_says_so, "unclear error"),
)


def classify_model(case: ModelCase) -> tuple[str, str]:
    """(outcome class, detail) of one model case."""
    try:
        wrong = case.run()
    except Exception as error:  # noqa: BLE001  (classifying every exception is the point)
        return "unclear error", f"{type(error).__name__}: {error}".replace("\n", " ")
    return (case.failure, wrong) if wrong else ("correct result", "")


def main() -> int:
    torch._dynamo.reset()
    outcomes: dict[str, int] = {}
    lines = ["| case | outcome | detail |", "|---|---|---|"]
    rows = [(case.name, *classify(case)) for case in CASES]
    rows += [(case.name, *classify_model(case)) for case in MODEL_CASES]
    for name, outcome, detail in rows:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        lines.append(f"| {name} | {outcome} | {detail[:140]} |")
    summary = ", ".join(f"{count} {name}" for name, count in sorted(outcomes.items()))
    print("\n".join(lines))
    print(f"\n{len(rows)} cases ({len(MODEL_CASES)} model cases): {summary}")
    return 1 if outcomes.get("unclear error") or outcomes.get("silent wrong") else 0


if __name__ == "__main__":
    sys.exit(main())
