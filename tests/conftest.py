"""Test setup: Triton runs under its interpreter on machines without CUDA; `gpu` tests skip there; every test starts
and ends with no compiled graph, no model state and no report record (`helpers.reset_dynamo`)."""

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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
