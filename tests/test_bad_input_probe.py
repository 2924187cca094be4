"""The bad-input probe (`benchmarks/probe_bad_inputs.py`): every case is a correct result or an error that names the
problem."""

import importlib.util
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "probe_bad_inputs.py"
_SPEC = importlib.util.spec_from_file_location("probe_bad_inputs", _PATH)
probe = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = probe  # dataclasses look their module up there
_SPEC.loader.exec_module(probe)


@pytest.mark.parametrize("case", probe.CASES, ids=[case.name for case in probe.CASES])
def test_case_is_a_correct_result_or_a_clear_error(case):
    outcome, detail = probe.classify(case)
    assert outcome in ("clear error", "correct result"), f"{outcome}: {detail}"
