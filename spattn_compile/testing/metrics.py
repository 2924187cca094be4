"""The one error measure of the tests and benchmarks: the relative error of an output against its reference."""

from __future__ import annotations

import math

import torch

__all__ = ["relative_error"]


def relative_error(out: torch.Tensor, ref: torch.Tensor, *, zero_reference: bool = False) -> float:
    """`||out - ref|| / ||ref||`, computed in float64; the shapes must be equal.

    A reference of norm 0 is refused with a ValueError: a comparison with zeros can pass by accident (an output that
    was never written, a plan that keeps nothing). Where zeros are the expected result, say so with
    `zero_reference=True`: the error is then 0.0 when `out` is all zero too, and inf otherwise."""
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"relative_error: shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    difference = (out.double() - ref.double()).norm().item()
    reference_norm = ref.double().norm().item()
    if reference_norm == 0:
        if not zero_reference:
            raise ValueError(
                "relative_error: the reference is all zeros (pass zero_reference=True where zeros are expected)"
            )
        return 0.0 if difference == 0 else math.inf
    return difference / reference_norm
