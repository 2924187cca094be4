"""Hypothesis strategies shared by the property tests (hypothesis is a test dependency: this module is imported as
`spattn_compile.testing.strategies`, never by the package itself).

The kernel tests draw from small grids with prime sides (partial last blocks, text blocks) and head dims that are
powers of two and not (the kernels pad to a power of two in registers); `rectify_modes` draws from the registered
rectification modes, so a newly registered mode is covered by every property test that draws one.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ..policies import rectification_modes

__all__ = ["GRIDS", "HEAD_DIMS", "head_dims", "kernel_grids", "rectify_modes", "seeds"]

# Small grids with prime sides (partial last blocks, text blocks), the interpreter's bread and butter.
GRIDS = [(1, 3, 5), (2, 5, 7), (3, 5, 7), (1, 1, 13), (3, 3, 3)]
# Head dims: powers of two and not (the kernels pad to a power of two in registers).
HEAD_DIMS = [16, 24, 32, 40]


def seeds() -> st.SearchStrategy[int]:
    """Seeds of `torch.Generator`s."""
    return st.integers(0, 2**31 - 1)


def kernel_grids() -> st.SearchStrategy[tuple[int, int, int]]:
    """A latent grid (frames, height, width) from `GRIDS`."""
    return st.sampled_from(GRIDS)


def head_dims() -> st.SearchStrategy[int]:
    """A head dim from `HEAD_DIMS`."""
    return st.sampled_from(HEAD_DIMS)


def rectify_modes() -> st.SearchStrategy[str]:
    """A registered rectification mode (`SparseAttentionConfig.rectify`)."""
    return st.sampled_from(rectification_modes())
