"""Which inputs the sparse attention can run on: one rule, shared by the compiler pass, the API and the kernels.

This module owns the limits. Two implementations run the pipeline (see `spattn_compile.api`):

- the **Triton kernels**, on CUDA: float16, bfloat16 or float32 inputs whose head dim D satisfies
  `MIN_HEAD_DIM <= D <= MAX_HEAD_DIM` and `D % HEAD_DIM_MULTIPLE == 0` (the kernels pad D internally to
  `padded_head_dim(D)`, the next power of two), with Triton installed;
- the **plain-PyTorch reference**, on the CPU: any of float16, bfloat16, float32, float64 and any head dim. float64
  runs there only: the kernels have no float64 path, so a float64 call on CUDA is not sparse-capable.

`check_capability(dtype, head_dim, device)` answers for one call with a `Capability` (`capable`, and `reason` when
not); `kernel_limits(dtype, head_dim)` is the kernels' own rule (None when the kernels take the input, else why not),
for the kernels to import. The compiler pass leaves a call that is not capable dense, with the reason in `explain()`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import numbers

import torch

__all__ = [
    "HEAD_DIM_MULTIPLE",
    "KERNEL_DTYPES",
    "MAX_HEAD_DIM",
    "MIN_HEAD_DIM",
    "REFERENCE_DTYPES",
    "Capability",
    "check_capability",
    "kernel_limits",
    "padded_head_dim",
    "triton_available",
]

KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class Capability:
    """Whether one attention call can run sparse. `implementation`: "triton" or "reference" (the one that would run);
    `reason`: why not, "" when capable."""

    capable: bool
    implementation: str
    reason: str = ""

    def __bool__(self) -> bool:
        return self.capable


@functools.cache
def triton_available() -> bool:
    """Whether the `triton` package can be imported (looked up once per process, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernels compute with: the next power of two >= `head_dim` (at least `MIN_HEAD_DIM`)."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    head_dim = int(head_dim)
    return max(MIN_HEAD_DIM, 1 << (head_dim - 1).bit_length())


def kernel_limits(dtype: torch.dtype, head_dim: int) -> str | None:
    """None when the Triton kernels take inputs of `dtype` and head dim `head_dim`; otherwise why not, in words."""
    if dtype not in KERNEL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
        return f"dtype {dtype} is not supported by the Triton kernels (they take {names})"
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM or head_dim % HEAD_DIM_MULTIPLE:
        return (
            f"head dim {head_dim} is not supported by the Triton kernels (they take {MIN_HEAD_DIM} <= D <= "
            f"{MAX_HEAD_DIM} with D % {HEAD_DIM_MULTIPLE} == 0)"
        )
    return None


def check_capability(dtype: torch.dtype, head_dim: int, device: torch.device | str) -> Capability:
    """Whether attention over inputs of `dtype` and head dim `head_dim` on `device` can run sparse (module docstring).

    Raises TypeError / ValueError naming the argument for arguments that are not a dtype, a positive int and a
    device."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    head_dim = int(head_dim)
    device = torch.device(device)
    if device.type == "cpu":
        if dtype not in REFERENCE_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in REFERENCE_DTYPES)
            return Capability(False, "reference", f"dtype {dtype} is not a float dtype the reference takes ({names})")
        return Capability(True, "reference")
    if device.type != "cuda":
        return Capability(
            False, "triton", f"device {device.type!r}: sparse attention runs on CUDA (Triton) or on the CPU (reference)"
        )
    if dtype == torch.float64:
        return Capability(
            False,
            "triton",
            "float64 runs only on the CPU (the plain-PyTorch reference); the Triton kernels have no float64 path",
        )
    reason = kernel_limits(dtype, head_dim)
    if reason is not None:
        return Capability(False, "triton", reason)
    if not triton_available():
        return Capability(
            False, "triton", "Triton is not installed (pip install triton), so the CUDA kernels cannot run"
        )
    return Capability(True, "triton")
