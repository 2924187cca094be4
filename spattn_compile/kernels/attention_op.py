"""The custom op `torch.ops.spattn.block_sparse_attention`: the attention kernel as an opaque, functional graph node.

This module owns the op's schema and its fake (meta) implementation, so that Dynamo, AOTAutograd and Inductor can
trace through a call without running Triton. The op is functional: it allocates and returns its output instead of
writing a caller's buffer (a custom op may not return an alias of an input). With `out_index` the output has
`out_len` rows and rows that no canonical row maps to are zero; without it the output is `(B, H, P, D)` in the
canonical layout. Validation and the launch are the launcher's (`block_sparse_attention.block_sparse_attention`).
"""

from __future__ import annotations

import torch

from .block_sparse_attention import block_sparse_attention

__all__ = ["block_sparse_attention_op"]


def _output_rows(q: torch.Tensor, out_index: torch.Tensor | None, out_len: int | None) -> int:
    padded_len = q.shape[2]
    if out_index is None:
        if out_len is not None and out_len != padded_len:
            raise ValueError(f"out_len={out_len}: without out_index the output has the P={padded_len} rows of q")
        return padded_len
    if out_len is None:
        raise ValueError("out_len must be given with out_index: the output length cannot be read from out_index")
    if isinstance(out_len, bool) or not isinstance(out_len, (int, torch.SymInt)) or out_len < 1:
        raise ValueError(f"out_len must be a positive int, got {out_len!r}")
    return out_len


@torch.library.custom_op("spattn::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    scale: float,
    block_size: int,
    key_valid: torch.Tensor | None = None,
    rectify: str = "none",
    rescale: torch.Tensor | None = None,
    correction: torch.Tensor | None = None,
    trusted_counts: torch.Tensor | None = None,
    trusted_indices: torch.Tensor | None = None,
    k_block: torch.Tensor | None = None,
    v_block: torch.Tensor | None = None,
    k_block_log_count: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    out_len: int | None = None,
) -> torch.Tensor:
    """Functional form of `block_sparse_attention` (same arguments, minus `out`): returns `(B, H, out_len, D)` in
    q's dtype when `out_index` is given (unmapped rows zero), else `(B, H, P, D)`."""
    rows = _output_rows(q, out_index, out_len)
    out = None
    if out_index is not None:
        out = q.new_zeros(q.shape[0], q.shape[1], rows, q.shape[3])
    return block_sparse_attention(
        q,
        k,
        v,
        kv_counts,
        kv_indices,
        scale=scale,
        block_size=block_size,
        key_valid=key_valid,
        rectify=rectify,
        rescale=rescale,
        correction=correction,
        trusted_counts=trusted_counts,
        trusted_indices=trusted_indices,
        k_block=k_block,
        v_block=v_block,
        k_block_log_count=k_block_log_count,
        out_index=out_index,
        out=out,
    )


@block_sparse_attention_op.register_fake
def _(
    q,
    k,
    v,
    kv_counts,
    kv_indices,
    scale,
    block_size,
    key_valid=None,
    rectify="none",
    rescale=None,
    correction=None,
    trusted_counts=None,
    trusted_indices=None,
    k_block=None,
    v_block=None,
    k_block_log_count=None,
    out_index=None,
    out_len=None,
):
    rows = _output_rows(q, out_index, out_len)
    return q.new_empty(q.shape[0], q.shape[1], rows, q.shape[3])
