"""Test setup: Triton runs under its interpreter on machines without CUDA; `gpu` tests skip there, and the summary
at the end of the run says why tests were skipped and how to run them; every test starts and ends with no compiled
graph, no model state and no report record (`helpers.reset_dynamo`)."""

import collections
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere, so that @triton.jit kernels run on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import reset_dynamo  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "spattn",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("spattn")


@pytest.fixture(autouse=True)
def _fresh_state():
    """Compiled graphs, model states (step trackers, plan caches, hooks) and report records of one test never reach
    the next."""
    reset_dynamo()
    yield
    reset_dynamo()


NEEDS_GPU = "needs a CUDA GPU"
GPU_COMMAND = "python -m pytest -q -m gpu tests"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason=NEEDS_GPU)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _skip_reason(report) -> str:
    # A skip's longrepr is (file, line, "Skipped: <reason>"), also when it comes back from an xdist worker.
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return "skipped"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say why tests were skipped, and how to run them: a skip count alone reads like something is broken."""
    reasons = collections.Counter(_skip_reason(r) for r in terminalreporter.stats.get("skipped", ()))
    if not reasons:
        return
    terminalreporter.section("why tests were skipped", sep="-")
    gpu = reasons.pop(NEEDS_GPU, 0)
    if gpu:
        terminalreporter.write_line(
            f"{gpu} test{'s' if gpu > 1 else ''} need a CUDA GPU (this machine has none); on a GPU machine run: "
            f"{GPU_COMMAND}"
        )
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count} test{'s' if count > 1 else ''}: {reason}")
