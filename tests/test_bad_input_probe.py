"""The bad-input probe (`spattn_compile.testing.bad_inputs`, printed by `benchmarks/probe_bad_inputs.py`): every case is
a correct result or an error that names the problem."""

import pytest

from spattn_compile.testing.bad_inputs import CASES, classify


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case_is_a_correct_result_or_a_clear_error(case):
    outcome, detail = classify(case)
    assert outcome in ("clear error", "correct result"), f"{outcome}: {detail}"
