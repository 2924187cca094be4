"""The implementations of the sparse attention, in a registry with capability checks (`base.py`):

| name | entry | takes | handlers |
|---|---|---|---|
| `"reference"` | `reference.ReferenceImplementation` | any device and float dtype; differentiable | reference |
| `"triton"` | `triton.TritonImplementation` | CUDA (or the CPU under `TRITON_INTERPRET=1`), `kernel_limits` | kernel |

`impl="auto"` picks Triton on CUDA and the reference elsewhere. The Triton entry imports the kernels when it is
first made, so the package works without Triton.
"""

from __future__ import annotations

import torch

from ..capability import check_capability, kernel_limits
from .base import (
    IMPLS,
    Implementation,
    ImplementationEntry,
    Prepared,
    check_autograd,
    implementation_for,
    make_implementation,
    register_implementation,
    resolve_impl,
)
from .reference import ReferenceImplementation

__all__ = [
    "IMPLS",
    "Implementation",
    "ImplementationEntry",
    "Prepared",
    "ReferenceImplementation",
    "check_autograd",
    "implementation_for",
    "make_implementation",
    "register_implementation",
    "resolve_impl",
]


def _make_triton() -> Implementation:
    from .triton import TritonImplementation

    return TritonImplementation()


def _triton_supports(dtype: torch.dtype, head_dim: int, device: torch.device) -> str | None:
    # The one rule of the pass, the op and the kernels; on the CPU, impl="triton" runs the interpreter.
    if device.type == "cuda":
        return check_capability(dtype, head_dim, device).reason or None
    return kernel_limits(dtype, head_dim)


register_implementation(ImplementationEntry("reference", ReferenceImplementation, lambda *_: None, differentiable=True))
register_implementation(ImplementationEntry("triton", _make_triton, _triton_supports, differentiable=False))
