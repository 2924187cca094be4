"""Probe the public surface with bad and edge inputs (`spattn_compile.testing.bad_inputs`): every outcome must be a
correct result or an error that names the problem, never a silent wrong result.

Owns the bad-input probe of issue 13: one row per case (what was called, its outcome class, the message or why the
result is wrong) and the count per class; the cases and their classes are documented in
`spattn_compile.testing.bad_inputs`. `tests/test_bad_input_probe.py` runs the same cases.

Run: `python benchmarks/probe_bad_inputs.py` (CPU, seconds); exits 1 if any case is unclear or silently wrong.
"""

from __future__ import annotations

import sys

import torch

from spattn_compile.testing.bad_inputs import CASES, classify


def main() -> int:
    torch._dynamo.reset()
    outcomes = {}
    lines = ["| case | outcome | detail |", "|---|---|---|"]
    for case in CASES:
        outcome, detail = classify(case)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        lines.append(f"| {case.name} | {outcome} | {detail[:140]} |")
    summary = ", ".join(f"{count} {name}" for name, count in sorted(outcomes.items()))
    print("\n".join(lines))
    print(f"\n{len(CASES)} cases: {summary}")
    return 1 if outcomes.get("unclear error") or outcomes.get("silent wrong") else 0


if __name__ == "__main__":
    sys.exit(main())
