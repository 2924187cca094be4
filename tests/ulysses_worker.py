"""One rank of the context-parallel (Ulysses) test: run with `torchrun --nproc-per-node N tests/ulysses_worker.py OUT
MODE...` (gloo, CPU). `tests/test_ulysses.py` starts it and reads what each rank writes to `OUT/rank<r>.json`.

Each rank builds the same tiny Wan transformer (4 heads, float64), runs it compiled with backend="spattn" on one
process's worth of work first (no parallelism: the single-GPU reference, its output and its plans), then enables
diffusers' Ulysses context parallelism over all ranks, compiles it again and runs the same input. It records the
relative error of the parallel sparse output against the single-process sparse output (and against dense), whether
each plan of the rank equals the single-process plan of the same heads, the report's rows, `explain`'s decisions and
the number of graphs Dynamo compiled. Each MODE is "whole" (torch.compile of the model, with the settings
docs/MULTI_GPU.md gives to avoid diffusers' own graph breaks), "regional" (`compile_repeated_blocks`),
"regional_dynamic" (the same with symbolic sizes) or "breaks" (torch.compile without those settings: diffusers'
context-parallel hooks break the graph, and the blocks are compiled on their own).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import spattn_compile
from spattn_compile.runtime.binding import default_registry, reset_schedule
from spattn_compile.runtime.model_state import ModelState
from spattn_compile.testing import relative_error, zoo

SETTINGS = {"block_size": 16, "min_seq_len": 0, "compiler": "eager"}
SPARSITY = 0.6
LAYER = "blocks.0.attn1"


def build() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    # 4 heads, so that each of 2 ranks holds 2 (a group of one head would hide a head mix-up).
    model = WanTransformer3DModel(**{**zoo.wan_config(num_layers=2), "num_attention_heads": 4})
    return zoo.finish(model).double()


def inputs() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 4, 3, 8, 12, generator=generator, dtype=torch.float64),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 7, zoo.TEXT_DIM, generator=generator, dtype=torch.float64),
        "return_dict": False,
    }


def compile_model(model: torch.nn.Module, mode: str):
    options = {**SETTINGS, "sparsity": SPARSITY}
    if mode.startswith("regional"):
        model.compile_repeated_blocks(backend="spattn", options=options, dynamic=mode == "regional_dynamic" or None)
        return model
    return torch.compile(model, backend="spattn", options=options)


def run(compiled, step: int) -> torch.Tensor:
    with torch.no_grad(), spattn_compile.step(step):
        return compiled(**inputs())[0]




def fresh() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    reset_schedule()
    spattn_compile.reset_report()


def main() -> None:
    out_dir, modes = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    # diffusers' enable_parallelism takes `rank % torch.accelerator.device_count()`, which is 0 on a CPU machine.
    torch.accelerator.device_count = lambda: 1  # type: ignore[method-assign]

    # The single-process reference: the same model and input, no parallelism.
    model = build()
    with torch.no_grad():
        dense = model(**inputs())[0]
    single = run(compile_model(model, "whole"), 0)
    single_state = schedule_state()
    single_plans = {name: single_state.plan(name) for name in single_state.layers}
    results = {mode: parallel_run(mode, single, dense, single_plans) for mode in modes}
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1, default=str))
    dist.destroy_process_group()


def parallel_run(mode: str, single: torch.Tensor, dense: torch.Tensor, single_plans: dict) -> dict:
    from diffusers.models._modeling_parallel import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    fresh()
    world = dist.get_world_size()
    model = build()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world, mesh=mesh))
    if mode == "whole":
        # What docs/MULTI_GPU.md tells users to set: skip diffusers' warning_once in the hooks, and run one forward
        # before compiling (the hooks read the blocks' signatures on their first call).
        warning_once = getattr(logging.Logger, "warning_once", None)
        if warning_once is not None:
            torch._dynamo.config.ignore_logger_methods.add(warning_once)
        with torch.no_grad():
            model(**inputs())
    compiled = compile_model(model, mode)
    parallel = run(compiled, 0)
    parallel_again = run(compiled, 1)
    state = schedule_state()
    records = spattn_compile.report().records
    graphs = compiled_graphs()
    plans: dict[str, bool | None] = {}
    for name in state.layers:
        plan, reference = state.plan(name), single_plans.get(name)
        heads = next((r.heads for r in records if r.layer == name and r.heads is not None), None)
        if plan is None or reference is None or heads is None:
            plans[name] = None
            continue
        held = slice(heads.first, heads.first + heads.count)
        plans[name] = bool(
            torch.equal(plan.kv_counts, reference.kv_counts[:, held])
            and torch.equal(plan.kv_indices, reference.kv_indices[:, held])
        )
    explained = None
    if mode == "whole":
        with torch.no_grad(), spattn_compile.config(**{k: v for k, v in SETTINGS.items() if k != "compiler"}):
            explained = spattn_compile.explain(model, **inputs())
    return {
        "error_vs_single": relative_error(parallel, single),
        "error_again_vs_single": relative_error(parallel_again, single),
        "single_vs_dense": relative_error(single, dense),
        "plans_equal": plans,
        "graphs": graphs,
        "records": [
            {
                "layer": r.layer,
                "kind": r.kind,
                "step": r.step,
                "heads": None if r.heads is None else [r.heads.rank, r.heads.world_size, r.heads.first, r.heads.count],
            }
            for r in records
        ],
        "explain": None
        if explained is None
        else [
            {"module": d.module, "sparse": d.sparse, "rule": d.rule, "heads": d.heads, "rank": d.rank}
            for d in explained.decisions
        ],
        "explain_text": str(explained),
        "report": str(spattn_compile.report()),
    }


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def schedule_state() -> ModelState:
    (state,) = default_registry().models()
    return state


if __name__ == "__main__":
    main()
