"""Planning's memory (issue 17: the public path's peak extra memory <= 10% of the bytes of Q, K and V).

- Planning by groups of heads (`TritonImplementation.prepare_and_estimate`) gives the scores, plans and outputs of
  planning every head at once, bit for bit, and both equal the float64 reference (poisoned allocations).
- The tile means are freed once the scores are made: the preparation kept for attending holds none.
- benchmarks/memory_model.py counts every allocation of a fresh call; an allocation log of a CPU run (every tensor
  an ATen op creates, held until the last tensor on its storage dies) has the peak the count predicts, at toy
  shapes that exercise the groups, text, masks and both scratch dtypes.
- At the video shapes, the counted peak is under 10% of Q + K + V at Wan 2.1 14B 720p, as NOTES_pipeline.md says.
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
from pathlib import Path

import pytest
import torch
from kernel_helpers import (
    make_inputs,
    make_key_valid,
    poisoned_allocations,
    reference_call,
    score_tolerance,
    sparse_call,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from spattn_compile.config import SparseAttentionConfig
from spattn_compile.estimators import PooledTiles
from spattn_compile.implementations.triton import TritonImplementation
from spattn_compile.layout import token_layout
from spattn_compile.testing import relative_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memory_model  # noqa: E402


class AllocationLog(TorchDispatchMode):
    """Bytes of the tensors ATen ops create while active: a storage counts from the op that creates it until the
    last tensor on it that an op returned is gone (views made by ops keep it; the Triton interpreter's own host
    views, which a GPU run does not have, do not). `peak`: the most bytes live at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._holders: dict[int, list[int]] = {}  # storage address -> [tensors holding it, bytes]

    def _release(self, address: int) -> None:
        entry = self._holders[address]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._holders[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.untyped_storage().nbytes() == 0:
                continue
            address = tensor.untyped_storage().data_ptr()
            if address in self._holders:
                self._holders[address][0] += 1
            elif address in inputs:
                continue  # a view of, or a write into, memory allocated before the log
            else:
                self._holders[address] = [1, tensor.untyped_storage().nbytes()]
                self.live += tensor.untyped_storage().nbytes()
                self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._release, address)
        return out


def test_allocation_log_counts_storages_until_their_last_view():
    log = AllocationLog()
    with log:
        base = torch.empty(1000)
        view = base.view(10, 100)
        del base
        assert log.live == 4000
        total = view.sum()
        del view
        assert log.live == total.element_size()
    assert log.peak == 4000 + 4


def _case(batch, heads, grid, text_len, dtype, masked, seed=0):
    generator = torch.Generator().manual_seed(seed)
    layout = token_layout(grid, text_len, False, 16)
    q, k, v = make_inputs(generator, batch=batch, heads=heads, head_dim=32, layout=layout, dtype=dtype,
                          memory="transposed")  # fmt: skip
    mask = make_key_valid(generator, batch=batch, heads=heads, layout=layout, kind="per_batch", masked_share=0.2)
    return layout, q, k, v, (mask if masked else None)


_CONFIG = SparseAttentionConfig(block_size=16, estimator=PooledTiles(16), min_seq_len=0, sparsity=0.7)


@pytest.mark.parametrize(
    "batch, heads, grid, text_len, dtype, masked",
    [(1, 5, (2, 4, 6), 13, torch.float16, True), (2, 3, (3, 3, 5), 0, torch.float32, False)],
)
def test_planning_by_head_groups_equals_all_heads_and_the_reference(batch, heads, grid, text_len, dtype, masked):
    layout, q, k, v, mask = _case(batch, heads, grid, text_len, dtype, masked)
    results = {}
    for group in (None, 1, 2, heads):
        call = sparse_call(q, k, v, mask, layout, _CONFIG, TritonImplementation(heads_per_group=group))
        with poisoned_allocations():
            plan = call.plan()
            out = call.run(plan)
        assert call.prepared is not None and call.prepared.stats.q_tile.shape[2] == 0  # tile means freed
        assert call.prepared.outliers is None and call.prepared.key_valid.shape[:2] == (batch, heads)
        results[group] = (plan, out)
    plan, out = results[heads]
    for group, (other, other_out) in results.items():
        assert torch.equal(other.block_scores, plan.block_scores), group
        assert torch.equal(other.kv_indices, plan.kv_indices) and torch.equal(other.kv_counts, plan.kv_counts)
        assert torch.equal(other.trusted_indices, plan.trusted_indices), group
        assert torch.equal(other_out, out), group
    wide = tuple(t.double() for t in (q, k, v))
    reference = reference_call(*wide, mask, layout, _CONFIG)
    expected_plan = reference.plan()
    assert relative_error(plan.block_scores, expected_plan.block_scores) < score_tolerance(_CONFIG.estimator, dtype)
    expected = reference_call(*wide, mask, layout, _CONFIG).run(plan)
    assert relative_error(out, expected) < (1e-5 if dtype == torch.float32 else 3e-3)


def _model_call(layout, q, masked: bool) -> memory_model.Call:
    batch, heads, _, head_dim = q.shape
    return memory_model.Call(
        batch, heads, head_dim, layout.video_grid, layout.num_text, masked, layout.block_size, 16, q.element_size(),
        programs=4, tiles_per_item=16,  # the interpreter: 2 "SMs" of 2 programs, 16 query tiles per item
    )  # fmt: skip


@pytest.mark.parametrize(
    "batch, heads, grid, text_len, dtype, masked",
    [
        (1, 8, (2, 8, 8), 40, torch.float16, True),  # float16 scratch, text, a mask
        (2, 4, (2, 6, 8), 0, torch.float32, False),  # float32 scratch, two samples
    ],
)
def test_counted_peak_is_the_logged_peak(batch, heads, grid, text_len, dtype, masked):
    """memory_model's count of a fresh call's peak equals the peak of an allocation log of a CPU run, up to the
    allocations of a few bytes it leaves out."""
    layout, q, k, v, mask = _case(batch, heads, grid, text_len, dtype, masked)
    call = sparse_call(q, k, v, mask, layout, _CONFIG, TritonImplementation())
    call.run(call.plan())  # caches (the layout on the device) are filled, as on the GPU after a first call
    model = _model_call(layout, q, masked)
    assert model.planning_heads() < heads, "the case must plan by groups of heads"
    # Planning alone, then a whole call less its output: the larger is the peak above the inputs and the output
    # (the output is allocated while attending, after planning's peak), as bench_attention.py measures it.
    planning, fresh = AllocationLog(), AllocationLog()
    with planning:
        sparse_call(q, k, v, mask, layout, _CONFIG, TritonImplementation()).plan()
    with fresh:
        call = sparse_call(q, k, v, mask, layout, _CONFIG, TritonImplementation())
        out = call.run(call.plan())
    logged = max(planning.peak, fresh.peak - out.numel() * out.element_size())
    counted = max(memory_model.peaks(model).values())
    small = 64 * (batch * heads * layout.num_blocks + 64)  # the counts' and flags' few bytes per block
    assert counted <= logged <= counted + small, (logged, counted, memory_model.peaks(model))


def test_video_shapes_peak_under_the_target():
    """At Wan 2.1 14B 720p the counted peak is under 10% of Q + K + V (NOTES_pipeline.md: 9.1%, from 19.2%), at
    HunyuanVideo 720p 11.6% (from 23.8%); the counted peak before the change is the one the H200 measured."""
    wan, hunyuan = memory_model.WAN14B_720P, memory_model.HUNYUAN_720P
    assert memory_model.peak_ratio(wan, memory_model.BEFORE) == pytest.approx(0.192, abs=0.002)
    assert memory_model.peak_ratio(hunyuan, memory_model.BEFORE) == pytest.approx(0.238, abs=0.002)
    assert memory_model.peak_ratio(wan) < 0.10
    assert memory_model.peak_ratio(hunyuan) < 0.12
    assert wan.planning_heads() == 7 and hunyuan.planning_heads() == 4


def test_planning_heads_fill_the_waves_of_all_heads():
    """The group size of the kernel and of the count agree, and a group's waves add up to those of all heads."""
    from spattn_compile.kernels.pooled_scores import planning_heads

    for heads, grid in ((40, (21, 45, 80)), (24, (33, 45, 80)), (3, (2, 4, 6))):
        call = memory_model.Call(1, heads, 128, grid, programs=4, tiles_per_item=16)
        layout = token_layout(grid, 0, False, 128)
        assert planning_heads(1, heads, layout, 16, torch.device("cpu")) == call.planning_heads()


def test_model_counts_use_the_documented_shapes():
    """The counts' named tensors at Wan 14B 720p (591 blocks, 4,728 tiles, 40 heads, D = 128)."""
    counts = memory_model.count(memory_model.WAN14B_720P)
    assert counts["scores (plan.block_scores, float32)"] == 40 * 591 * 592 * 4
    assert counts["plan block lists"] == 40 * 591 * (591 + 591) * 2
    assert counts["tile means (q_tile, k_tile, rest means, outlier keys)"] == 4 * 40 * 4728 * 128 * 2
    assert (
        dataclasses.replace(memory_model.WAN14B_720P, heads=7).qkv_bytes * 40 == 7 * memory_model.WAN14B_720P.qkv_bytes
    )
