"""Context parallelism (diffusers' Ulysses attention): the pass follows the sequence through the split and the
all-to-all, each rank's video self-attention runs sparse over the whole sequence for its heads, and the output and
plans equal one process's.

`test_two_ranks_match_one_process` starts `tests/ulysses_worker.py` under torchrun with two gloo processes (CPU) once
for the module; the other tests trace single-process modules, with torch.distributed's fake process group standing
in for a group of two ranks where an all-to-all is needed (its collectives move no data: only the decisions are
checked there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from filelock import FileLock
from helpers import explain_model

WORKER = Path(__file__).with_name("ulysses_worker.py")
MODES = ("breaks", "regional", "regional_dynamic", "whole")
HEADS = 4  # the worker's model: 4 heads, 2 per rank


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, request) -> list[dict]:
    """What each of the two ranks of the worker wrote, per mode. Under pytest-xdist the workers share one run of it
    (the session's temporary directory and a file lock), so the two processes start once per session."""
    worker = getattr(request.config, "workerinput", None)
    shared = tmp_path_factory.getbasetemp().parent if worker is not None else tmp_path_factory.mktemp("session")
    out = shared / "ulysses"
    with FileLock(str(shared / "ulysses.lock")):
        if not (out / "done").exists():
            out.mkdir(exist_ok=True)
            root = Path(__file__).resolve().parents[1]
            path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
            done = subprocess.run(
                [*command, str(WORKER), str(out), *MODES],
                env={**os.environ, "PYTHONPATH": path},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, (
                f"worker failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
            )
            (out / "done").touch()
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_match_one_process(ranks, mode):
    for rank, result in enumerate(ranks):
        run = result[mode]
        # Sparsity changed the output (so an equal output is not equal by being dense), and two ranks give what one
        # process gives (float64: the same arithmetic on each head, up to rounding).
        assert run["single_vs_dense"] > 1e-3
        assert run["error_vs_single"] < 1e-12, run
        assert run["error_again_vs_single"] < 1e-12, run
        # Each rank's plan of a layer is the single-process plan of the heads it holds.
        assert run["plans_equal"] == {"blocks.0.attn1": True, "blocks.1.attn1": True}, run["plans_equal"]
        # Every video self-attention call ran sparse, named by its module and by the global heads of the rank.
        assert len(run["records"]) == 4, run["report"]
        for record in run["records"]:
            assert record["kind"] == "sparse", run["report"]
            assert record["heads"] == [rank, 2, rank * HEADS // 2, HEADS // 2], run["report"]
        assert {r["layer"] for r in run["records"]} == {"blocks.0.attn1", "blocks.1.attn1"}


def test_whole_model_is_one_graph_with_readme_settings(ranks):
    """With the settings docs/MULTI_GPU.md gives for diffusers' own graph breaks, the context-parallel model is one
    graph, and explain shows each rank's sparse self-attention with its heads and the cross-attention dense."""
    for rank, result in enumerate(ranks):
        run = result["whole"]
        assert run["graphs"] == 1, run["explain_text"]
        rows = {(row["module"], row["sparse"], row["rule"]) for row in run["explain"]}
        assert rows == {
            ("blocks.0.attn1", True, ""),
            ("blocks.1.attn1", True, ""),
            ("blocks.0.attn2", False, "cross_attention"),
            ("blocks.1.attn2", False, "cross_attention"),
        }, run["explain_text"]
        for row in run["explain"]:
            if row["sparse"]:
                assert row["heads"] == [rank * 2, 2] and row["rank"] == rank, run["explain_text"]
        assert f"heads {rank * 2}..{rank * 2 + 1} over the whole sequence" in run["explain_text"]


# ----------------------------------------------------------------------------------------------------------------
# The pass's rules, on single-process modules
# ----------------------------------------------------------------------------------------------------------------


class ShardedAttention(torch.nn.Module):
    """A video DiT attention under context parallelism over 2 ranks: a conv patch embedding, this rank's chunk of the
    tokens, and (with `exchange`) Ulysses' all-to-all of the heads before SDPA, as diffusers' TemplatedUlyssesAttention
    does. `inner`: split the heads with the rank group as the inner part (not what an all-to-all of head groups
    needs); `index`: take another rank's chunk than this process's; `text`: join this rank's piece of `text` text
    tokens after its video piece. Without `exchange` each rank attends within its own chunk (ring attention's first
    step)."""

    def __init__(self, exchange: bool = True, inner: bool = False, index: int | None = None, text: int = 0) -> None:
        super().__init__()
        self.exchange_heads, self.inner, self.index, self.text = exchange, inner, index, text
        self.heads, self.head_dim = HEADS, 16
        self.patch = torch.nn.Conv3d(4, HEADS * 16, (1, 2, 2), stride=(1, 2, 2))
        self.qkv = torch.nn.Linear(HEADS * 16, 3 * HEADS * 16)

    def exchange(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        batch, tokens, heads, dim = x.shape
        if self.inner:
            x = x.reshape(batch, tokens, heads // 2, 2, dim).permute(3, 1, 0, 2, 4).contiguous()
        else:
            x = x.reshape(batch, tokens, 2, heads // 2, dim).permute(2, 1, 0, 3, 4).contiguous()
        shape = x.shape
        x = funcol.all_to_all_single(x.flatten(), None, None, dist.group.WORLD).reshape(shape)
        return x.flatten(0, 1).permute(1, 0, 2, 3).contiguous()

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        tokens = self.patch(video).flatten(2).transpose(1, 2)
        rank = (dist.get_rank() if dist.is_initialized() else 0) if self.index is None else self.index
        tokens = tokens.chunk(2, dim=1)[rank]
        if self.text:
            # Joint attention with each stream split on its own (what a diffusers plan for HunyuanVideo would do).
            words = torch.ones(tokens.shape[0], 2 * self.text, tokens.shape[2]).chunk(2, dim=1)[rank]
            tokens = torch.cat([tokens, words], dim=1)
        q, k, v = self.qkv(tokens).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
        if self.exchange_heads:
            q, k, v = (self.exchange(t) for t in (q, k, v))
        return F.scaled_dot_product_attention(*(t.permute(0, 2, 1, 3) for t in (q, k, v)))


@pytest.fixture
def two_ranks():
    """This process as rank 1 of a fake process group of 2 (collectives move no data)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=1, world_size=2, store=FakeStore())
    yield
    dist.destroy_process_group()


VIDEO = torch.randn(1, 4, 3, 8, 12, generator=torch.Generator().manual_seed(0))


def test_exchange_makes_the_whole_sequence_sparse_for_the_ranks_heads(two_ranks):
    (decision,) = explain_model(ShardedAttention(), {"video": VIDEO}).decisions
    assert decision.sparse, decision.reason
    assert (decision.rank, decision.world_size, decision.heads) == (1, 2, (2, 2))
    assert decision.video_grid == (3, 4, 6) and decision.grid_from == "graph"
    assert decision.query_shape == (1, 2, 72, 16)


@pytest.mark.parametrize(
    "module, why",
    [
        (ShardedAttention(inner=True), "not the outer part of a split of the attention heads"),
        (ShardedAttention(index=0), "rank 1 of 2 sends rank 0's shard"),
        (ShardedAttention(text=4), "interleaves each rank's video and text pieces"),
    ],
    ids=["heads_split_inner", "another_ranks_shard", "video_and_text_split_apart"],
)
def test_exchange_the_pass_cannot_follow_stays_dense(two_ranks, module, why):
    (decision,) = explain_model(module, {"video": VIDEO}).decisions
    assert not decision.sparse and decision.rule == "ambiguous_grid"
    assert why in decision.reason, decision.reason


def test_attention_within_one_ranks_shard_stays_dense_even_with_video_grid():
    """Ring attention attends to one chunk at a time: no call holds the whole sequence, whatever the settings say."""
    for overrides in ({}, {"video_grid": (3, 2, 6)}):
        (decision,) = explain_model(ShardedAttention(exchange=False), {"video": VIDEO}, **overrides).decisions
        assert not decision.sparse and decision.rule == "sequence_shard", decision
        assert "ring attention" in decision.reason and "ulysses_degree" in decision.reason


class FusedAttention(torch.nn.Module):
    """Attention through a fused aten op (what diffusers' flash backends call), not SDPA."""

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0]


def test_fused_attention_op_is_listed_dense_with_its_reason():
    report = explain_model(FusedAttention(), {"q": torch.randn(1, 2, 64, 16)})
    (decision,) = report.decisions
    assert not decision.sparse and decision.rule == "attention_backend"
    assert "_scaled_dot_product_flash_attention_for_cpu" in decision.reason
    assert "dense: attention_backend" in str(report)


# ----------------------------------------------------------------------------------------------------------------
# examples/generate.py --ulysses
# ----------------------------------------------------------------------------------------------------------------

# diffusers' enable_parallelism takes `rank % torch.accelerator.device_count()`, which is 0 on a CPU machine: the test
# runs the example through this launcher, which says there is one accelerator.
LAUNCHER = """
import runpy, sys, torch
torch.accelerator.device_count = lambda: 1
sys.argv = [{example!r}, *sys.argv[1:]]
runpy.run_path({example!r}, run_name="__main__")
"""


def test_generate_example_with_ulysses_runs_sparse_on_every_rank(tmp_path):
    root = Path(__file__).resolve().parents[1]
    launcher = tmp_path / "launch_generate.py"
    launcher.write_text(LAUNCHER.format(example=str(root / "examples" / "generate.py")))
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    arguments = ["--ulysses", "2", "--steps", "2", "--frames", "5", "--height", "128", "--width", "128"]
    arguments += ["--sparsity", "0.5", "--dense-steps", "0", "--device", "cpu", "--output-dir", str(tmp_path)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(launcher)]
    done = subprocess.run([*command, *arguments], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    # Each rank printed its report: 2 steps x 2 CFG branches x 2 layers, all sparse, over the rank's one head of two.
    for rank in (0, 1):
        report = done.stdout.split(f"rank {rank}:\n", 1)[1].split("calls:", 1)[0]
        rows = [line.split() for line in report.splitlines() if line.startswith("WanTransformer3DModel")]
        assert len(rows) == 8, report
        assert all(row[6] == "sparse" and row[-2:] == [f"{rank}/2", f"{rank}-{rank}"] for row in rows), report
    assert list(tmp_path.glob("wan.*")), done.stdout[-2000:]


def test_bench_e2e_ulysses_smoke_prints_the_four_variants():
    """benchmarks/bench_e2e.py --ulysses 2 --smoke (tiny Wan, gloo): the script the 2-GPU run uses runs through, and
    the 2-process sparse output equals the 1-process one."""
    root = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    # Run as a module of the repository (not loaded by path), the way `python -m benchmarks.bench_e2e` runs it.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--module"]
    arguments = ["benchmarks.bench_e2e", "--ulysses", "2", "--smoke", "--sparsities", "0.9"]
    done = subprocess.run(
        [*command, *arguments], env=environment, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in done.stdout.splitlines()}
    for variant in ("dense", "spattn 0.90 refresh", "spattn 0.90 cached"):
        for gpus in ("1", "2"):
            assert (variant, gpus) in rows, done.stdout[-3000:]
    # float32 on both sides: the same arithmetic per head, up to the rounding of matmuls over other row counts.
    error = float(rows[("spattn 0.90 refresh", "2")].split("|")[-2])
    assert error < 1e-5, rows[("spattn 0.90 refresh", "2")]
    assert "PASS spattn 0.90 refresh: 2 GPUs vs 1 GPU sparse output" in done.stdout
