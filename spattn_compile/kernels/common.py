"""What every kernel module shares: whether Triton runs interpreted, the dot precision of fp32 statistics, the device
check, and the head-dim padding rule.

Under `TRITON_INTERPRET=1` (CPU tests), `@triton.jit` yields an interpreted function instead of a `JITFunction`; the
launchers then use small fixed tile configurations instead of autotuning (timing candidates would time numpy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..capability import kernel_limits, padded_head_dim

__all__ = [
    "INTERPRETED",
    "LOG2E",
    "STATS_DOT_PRECISION",
    "check_device",
    "check_kernel_inputs",
    "online_logsumexp",
    "padded_head_dim",
]

LOG2E = 1.4426950408889634


@triton.jit
def _probe_kernel():
    pass


INTERPRETED: bool = not isinstance(_probe_kernel, triton.runtime.jit.JITFunction)
# fp32 statistics: exact fp32 products under the interpreter; on the GPU three tf32 products per dot (tf32x3) give
# about fp32 accuracy on the tensor cores, where plain fp32 ("ieee") would run the products on the FMA units.
STATS_DOT_PRECISION = "ieee" if INTERPRETED else "tf32x3"


@triton.jit
def online_logsumexp(m_i, l_i, logits):
    """Fold one tile of logits (log2 units, `(ROWS, N)`) into each row's running maximum `m_i` and sum
    `l_i = sum 2^(logit - m_i)`; a row whose logits are all -inf keeps m = -inf without NaN."""
    m_new = tl.maximum(m_i, tl.max(logits, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.math.exp2(m_i - m_shift) + tl.sum(tl.math.exp2(logits - m_shift[:, None]), 1)
    return m_new, l_i


def check_device(device: torch.device, name: str) -> None:
    """Raise ValueError unless the kernels can run on `device` (CUDA, or the CPU under the interpreter)."""
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"{name} is on {device}: the kernels run on CUDA, or on the CPU under the Triton interpreter "
            "(TRITON_INTERPRET=1 set before triton is first imported)"
        )


def check_kernel_inputs(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError unless the kernels take `tensor`'s dtype and head dim (`capability.kernel_limits`, the one
    rule shared with the compiler pass and the API); the head dim is padded to `padded_head_dim` in registers."""
    reason = kernel_limits(tensor.dtype, tensor.shape[-1])
    if reason is not None:
        raise ValueError(f"{name}: {reason}")


# Keep `tl` importable from here for kernels that only need the language module.
__all__ += ["tl"]
