# mypy: ignore-errors
# (The cases pass arguments of the wrong types on purpose.)
"""Bad and edge inputs of the public surface, each with the outcome it must have: a correct result or an error that
names the problem, never a silent wrong result.

Each `Case` calls the library (`sparse_attention`, `select_plan`, `SparseAttentionConfig`/`config`, the `spattn`
backend's options, threads) with one thing wrong or unusual; `classify(case)` runs it and says what happened:

- **clear error**: the expected exception type, whose message contains every word the case requires (the argument's
  name, and usually the value or what is allowed);
- **correct result**: no exception, and the result passes the case's check (equal to SDPA, or to the same call with
  plain Python numbers, non-finite values where SDPA has them...);
- **unclear error**: an exception of another type, or a message missing a required word;
- **silent wrong**: no exception, but the check fails (or an error was expected).

`tests/test_bad_input_probe.py` requires every case to be a clear error or a correct result;
`benchmarks/probe_bad_inputs.py` prints the table. NumPy is needed (NumPy scalars are among the inputs).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..api import select_plan, sparse_attention
from ..backend import SpattnBackend
from ..config import SparseAttentionConfig, config, current_config
from ..estimators import PooledTiles, SampledRows

__all__ = ["CASES", "Case", "classify"]

GRID = (2, 4, 6)  # 48 video tokens
TEXT = 8
SEQ = 48 + TEXT
CONFIG = SparseAttentionConfig(sparsity=0.5, block_size=16, min_seq_len=0)


def _inputs(batch: int = 1, heads: int = 2, dim: int = 16, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, heads, SEQ, dim, generator=generator, dtype=dtype) for _ in range(3)]


def _call(**overrides) -> torch.Tensor:
    q, k, v = overrides.pop("qkv", None) or _inputs()
    arguments = dict(video_grid=GRID, text_len=TEXT, config=CONFIG)
    arguments.update(overrides)
    return sparse_attention(q, k, v, **arguments)


def _same_as_python_numbers(result: torch.Tensor) -> bool:
    return torch.equal(result, _call())


def _nonfinite_like_sdpa(position: tuple[int, ...], which: int, value: float) -> Callable[[], bool]:
    def run() -> bool:
        qkv = _inputs(dtype=torch.float32)
        qkv[which][position] = value
        expected = F.scaled_dot_product_attention(*qkv)
        out = _call(qkv=qkv)
        return torch.equal(~torch.isfinite(out), ~torch.isfinite(expected))

    return run


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[], object]
    error: type[BaseException] | None = None  # expected exception type; None: a result is expected
    words: tuple[str, ...] = ()  # required in the message (case-insensitive)
    check: Callable[[object], bool] | None = None  # for results


def _thread_isolation() -> bool:
    seen: list[float] = []

    def worker() -> None:
        seen.append(current_config().sparsity)

    with config(sparsity=0.9):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        inside = current_config().sparsity
    return seen == [SparseAttentionConfig().sparsity] and inside == 0.9


def _compile_with(options: dict, mode: str | None = None) -> None:
    """`torch.compile` with the backend's options; with a `mode`, through `SpattnBackend(options)` (torch
    refuses `mode` and `options` together)."""
    model = torch.nn.Linear(4, 4)
    if mode is None:
        compiled = torch.compile(model, backend="spattn", options=options)
    else:
        compiled = torch.compile(model, backend=SpattnBackend(options), mode=mode)
    compiled(torch.randn(2, 4))


def _plan_of_another_layout() -> torch.Tensor:
    q, k, v = _inputs()
    plan = select_plan(q, k, video_grid=GRID, text_len=TEXT, config=dataclasses.replace(CONFIG, block_size=32))
    return _call(plan=plan)


def _requires_grad_triton() -> torch.Tensor:
    q, k, v = (t.float().requires_grad_() for t in _inputs())
    return sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, config=CONFIG, impl="triton")


CASES: tuple[Case, ...] = (
    # Tensors
    Case("query is a list", lambda: _call(qkv=[[1.0], *_inputs()[1:]]), TypeError, ("query", "tensor")),
    Case("query is 3-D", lambda: _call(qkv=[t[0] for t in _inputs()]), ValueError, ("query", "shape")),
    Case("integer dtype", lambda: _call(qkv=[t.long() for t in _inputs()]), TypeError, ("query", "float")),
    Case("key of another length", lambda: _call(qkv=[*_inputs()[:1], _inputs()[1][..., :-1, :], _inputs()[2]]),
         ValueError, ("same shape",)),  # fmt: skip
    Case("mixed dtypes", lambda: _call(qkv=[_inputs()[0].float(), *_inputs()[1:]]), TypeError, ("dtype",)),
    Case("no heads", lambda: _call(qkv=_inputs(heads=0)), ValueError, ("empty",)),
    Case("batch of 0", lambda: _call(qkv=_inputs(batch=0)), check=lambda out: out.shape == (0, 2, SEQ, 16)),
    # Layout arguments
    Case("video_grid of two sizes", lambda: _call(video_grid=(2, 24)), ValueError, ("video_grid",)),
    Case("video_grid with a zero", lambda: _call(video_grid=(0, 4, 6)), ValueError, ("video_grid",)),
    Case("video_grid of floats", lambda: _call(video_grid=(2.0, 4, 6)), TypeError, ("video_grid",)),
    Case("video_grid does not fit", lambda: _call(video_grid=(2, 4, 5)), ValueError, ("video_grid", "sequence")),
    Case("video_grid of np.int64", lambda: _call(video_grid=tuple(np.int64(n) for n in GRID)),
         check=_same_as_python_numbers),  # fmt: skip
    Case("text_len negative", lambda: _call(text_len=-1), ValueError, ("text_len",)),
    Case("text_len np.int32", lambda: _call(text_len=np.int32(TEXT)), check=_same_as_python_numbers),
    Case("text_first = 1", lambda: _call(text_first=1), TypeError, ("text_first",)),
    Case("scale negative", lambda: _call(scale=-0.25), ValueError, ("scale",)),
    Case("scale NaN", lambda: _call(scale=float("nan")), ValueError, ("scale",)),
    Case("scale np.float32", lambda: _call(scale=np.float32(0.25)), check=_same_as_python_numbers),
    # Masks
    Case("1-D mask (SDPA rejects it)", lambda: _call(attn_mask=torch.ones(SEQ, dtype=torch.bool)), ValueError,
         ("attn_mask",)),  # fmt: skip
    Case("float mask", lambda: _call(attn_mask=torch.zeros(1, 1, 1, SEQ)), TypeError, ("attn_mask", "bool")),
    Case("query-varying mask", lambda: _call(attn_mask=torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool)), ValueError,
         ("attn_mask", "key-padding")),  # fmt: skip
    Case("(H, 1, S) mask", lambda: _call(attn_mask=torch.ones(2, 1, SEQ, dtype=torch.bool)),
         check=lambda out: torch.equal(out, _call())),  # fmt: skip
    # Other arguments
    Case("impl unknown", lambda: _call(impl="cuda"), ValueError, ("impl",)),
    Case("config a dict", lambda: _call(config={"sparsity": 0.5}), TypeError, ("config",)),
    Case("plan a string", lambda: _call(plan="plan"), TypeError, ("plan",)),
    Case("plan of another block size", _plan_of_another_layout, ValueError, ("plan", "block_size")),
    Case("impl='triton' with inputs requiring grad", _requires_grad_triton, RuntimeError, ("no_grad", "reference")),
    # Non-finite values: non-finite exactly where SDPA's output is
    Case("NaN in a query", lambda: None, check=lambda _: _nonfinite_like_sdpa((0, 0, 3, 1), 0, float("nan"))()),
    Case("+inf in a key", lambda: None, check=lambda _: _nonfinite_like_sdpa((0, 1, 20, 2), 1, float("inf"))()),
    Case("NaN in a value", lambda: None, check=lambda _: _nonfinite_like_sdpa((0, 0, 50, 0), 2, float("nan"))()),
    # Settings
    Case("sparsity 1.0", lambda: SparseAttentionConfig(sparsity=1.0), ValueError, ("sparsity", "[0, 1)")),
    Case("sparsity '0.5'", lambda: SparseAttentionConfig(sparsity="0.5"), TypeError, ("sparsity",)),
    Case("sparsity np.float32", lambda: SparseAttentionConfig(sparsity=np.float32(0.5)),
         check=lambda c: c.sparsity == 0.5 and isinstance(c.sparsity, float)),  # fmt: skip
    Case("block_size 100", lambda: SparseAttentionConfig(block_size=100), ValueError, ("block_size",)),
    Case("estimator name unknown", lambda: SparseAttentionConfig(estimator="exact"), ValueError, ("estimator",)),
    Case("estimator tile larger than the block", lambda: SparseAttentionConfig(block_size=16,
         estimator=PooledTiles(tile_size=32)), ValueError, ("tile_size", "block_size")),  # fmt: skip
    Case("SampledRows(rows=0)", lambda: SampledRows(rows=0), ValueError, ("rows",)),
    Case("config(unknown=1)", lambda: config(unknown=1).__enter__(), TypeError, ("unknown",)),
    Case("dense_layers (-1,)", lambda: SparseAttentionConfig(dense_layers=(-1,)), ValueError, ("dense_layers",)),
    # Backend options
    Case("backend option unknown", lambda: _compile_with({"bogus": 1}), Exception, ("bogus",)),
    Case("backend compiler not a name", lambda: _compile_with({"compiler": 3}), Exception, ("compiler",)),
    Case("backend sparsity out of range", lambda: _compile_with({"sparsity": 2.0}), Exception, ("sparsity",)),
    Case("mode reduce-overhead", lambda: _compile_with({"compiler": "inductor"}, "reduce-overhead"), Exception,
         ("reduce-overhead",)),  # fmt: skip
    # Threads
    Case("config is private to its thread", lambda: None, check=lambda _: _thread_isolation()),
)


def classify(case: Case) -> tuple[str, str]:
    """(outcome class, detail) of one case."""
    try:
        result = case.run()
    except Exception as error:  # noqa: BLE001  (classifying every exception is the point)
        message = f"{type(error).__name__}: {error}".replace("\n", " ")
        if case.error is None:
            return "unclear error", message
        missing = [w for w in case.words if w.lower() not in message.lower()]
        if isinstance(error, case.error) and not missing:
            return "clear error", message
        return "unclear error", message + (f" (missing: {missing})" if missing else "")
    if case.error is not None:
        return "silent wrong", f"no error (expected {case.error.__name__})"
    if case.check is not None and not case.check(result):
        return "silent wrong", "the result fails its check"
    return "correct result", ""
