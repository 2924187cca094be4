"""`spattn_compile.explain`: what the `spattn` backend does to a model, as a table.

This module owns the user-facing report. `explain(model, *args, **kwargs)` runs the model once, the way the backend
would compile it, with a capturing backend that runs the pass's analysis on each graph (under the active settings,
`spattn_compile.current_config()`; wrap the call in `with spattn_compile.config(...)` to use the options you compile
with) and runs the graphs unchanged (dense): a plain model is compiled whole, a model whose blocks were compiled with
`compile_repeated_blocks` (or `block.compile()`) has just those blocks captured. It returns an `ExplainReport`: one
`AttentionDecision` per attention call in execution order (for a block compiled once and run N times, one row per
block, named by its module path in the model, with the grid of the model's forward), plus the number of graphs and
Dynamo's graph breaks. `print(report)` shows it as a table. Like `torch._dynamo.explain`, it calls
`torch._dynamo.reset()` before and after, so already compiled models recompile on their next call; it leaves no hook
or schedule state behind. Under context parallelism (diffusers' Ulysses attention) every rank must call it together
(the model runs its collectives), and the table shows each call's rank and the model's heads it holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .backend import graph_seeds, note_missing_grid
from .call_layout import LayoutOverrideError
from .config import SparseAttentionConfig, current_config
from .passes import AttentionDecision, analyze_attention
from .runtime.binding import ModelRegistry, only

__all__ = ["ExplainReport", "explain"]


@dataclasses.dataclass(frozen=True, eq=False)
class ExplainReport:
    """The attention decisions of one model, in execution order.

    decisions: one per scaled_dot_product_attention call the model ran (per block instance for compiled blocks);
        `module` is the module path in the model and `layer_index` the model-level index of the sparse calls (the
        numbering `dense_layers` and `report()` use).
    graph_count, graph_break_count, break_reasons: the capture summary (break reasons as text).
    config: the settings the decisions were made under.
    regional: whether the model's blocks were captured on their own (regional compilation).
    """

    decisions: tuple[AttentionDecision, ...]
    graph_count: int
    graph_break_count: int
    break_reasons: tuple[str, ...]
    config: SparseAttentionConfig
    regional: bool = False

    @property
    def sparse(self) -> tuple[AttentionDecision, ...]:
        """The calls that become sparse attention."""
        return tuple(d for d in self.decisions if d.sparse)

    @property
    def dense(self) -> tuple[AttentionDecision, ...]:
        """The calls left to dense SDPA."""
        return tuple(d for d in self.decisions if not d.sparse)

    def __str__(self) -> str:
        parallel = any(d.world_size > 1 for d in self.decisions)
        header: tuple[str, ...] = (
            "graph", "node", "module", "attention", "layer", "query (B,H,S,D)", "video grid", "text", "reason",
        )  # fmt: skip
        if parallel:
            # Context parallelism: the rank and the model's heads each call holds, before the reason.
            header = (*header[:-1], "rank", "heads", header[-1])
        rows = [header]
        for d in self.decisions:
            if d.video_grid is not None:
                grid = "x".join(str(s) for s in d.video_grid) + f" ({d.grid_from})"
            else:
                grid = "at run time" if d.sparse else ""
            if d.text_len is None:
                text = ""
            elif d.text_position is None:
                text = "none"
            else:
                text = f"{d.text_len} {d.text_position}"
            shape = "(" + ", ".join(str(s) for s in d.query_shape) + ")" if d.query_shape else ""
            decision = "sparse" if d.sparse else f"dense: {d.rule}"
            layer = "" if d.layer_index is None else str(d.layer_index)
            row: tuple[str, ...] = (str(d.graph_index), d.node, d.module, decision, layer, shape, grid, text)
            if parallel:
                held = "" if d.heads is None else f"{d.heads[0]}-{d.heads[0] + d.heads[1] - 1}"
                row = (*row, f"{d.rank}/{d.world_size}" if d.heads is not None else "", held)
            rows.append((*row, d.reason))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths) + "  " + "-" * len(header[-1]))
        summary = (
            f"{len(self.sparse)} of {len(self.decisions)} attention calls sparse; {self.graph_count} graph(s), "
            f"{self.graph_break_count} graph break(s); sparsity={self.config.sparsity}, "
            f"block_size={self.config.block_size}, estimator={self.config.estimator}, "
            f"min_seq_len={self.config.min_seq_len}, rectify={self.config.rectify!r}"
        )
        if self.break_reasons:
            summary += "\ngraph breaks:\n" + "\n".join(f"  {reason}" for reason in self.break_reasons)
        return "\n".join(line.rstrip() for line in lines) + "\n" + summary


class _Capture:
    """A Dynamo backend that records the pass's decisions for each graph and which block instance runs it."""

    def __init__(self, registry: ModelRegistry, settings: SparseAttentionConfig) -> None:
        self.registry = registry
        self.settings = settings
        self.graphs: list[list[AttentionDecision]] = []
        self.break_reasons: list[str] = []
        # (graph index, block path, grid of the model's forward) per graph call, in execution order.
        self.calls: list[tuple[int, str, tuple[int, int, int] | None]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor], **_: object) -> Callable:
        index = len(self.graphs)
        # Dynamo tells each graph why it ended (as torch._dynamo.explain reads it): at a graph break, or at the end.
        reason = getattr(gm, "compile_subgraph_reason", None)
        if getattr(reason, "graph_break", False):
            self.break_reasons.append(str(getattr(reason, "reason", reason)).strip())
        binding = self.registry.bind(example_inputs)
        owner = binding.owner
        assert owner is not None  # bind places the graph
        decisions = analyze_attention(gm.graph, self.settings, graph_index=index, seeds=graph_seeds(gm, owner))
        self.graphs.append(note_missing_grid(decisions, owner))

        def run(*args: object) -> object:
            found = binding.owner_of(args)
            state = found.state
            grid = state.forward.video_grid if found.block and state.forward is not None else None
            self.calls.append((index, found.block, grid))
            return gm.forward(*args)

        return run

    def decisions(self) -> list[AttentionDecision]:
        """Every call's decisions in execution order, named and numbered in the model (class docstring)."""
        rows: list[AttentionDecision] = []
        shown: set[tuple[int, str]] = set()
        layers: dict[str, int] = {}
        for index, block, grid in self.calls:
            if (index, block) in shown:
                continue  # a graph run again (a second forward of one graph): its rows are there
            shown.add((index, block))
            for decision in self.graphs[index]:
                module = f"{block}.{decision.module}" if block and decision.module else decision.module or block
                layer = decision.layer_index
                if decision.layer_index is not None:  # sparse, or handed to the op for a run-time grid
                    layer = layers.setdefault(module or f"{block}#{decision.layer_index}", len(layers))
                video_grid = grid if decision.grid_from == "context" and grid is not None else decision.video_grid
                rows.append(dataclasses.replace(decision, module=module, layer_index=layer, video_grid=video_grid))
        return rows




def _compiled_blocks(model: object) -> list[torch.nn.Module]:
    """The submodules compiled on their own (`Module.compile()`, which `compile_repeated_blocks` calls)."""
    if not isinstance(model, torch.nn.Module):
        return []
    return [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def explain(model: Callable, /, *args: object, **kwargs: object) -> ExplainReport:
    """Run `model(*args, **kwargs)` once, capturing its graphs as the `spattn` backend would, and report every
    attention call's decision (see the module docstring). Call it under `torch.no_grad()` for inference models, as
    you would run them."""
    if not callable(model):
        raise TypeError(f"explain: model must be callable, got {type(model).__name__}")
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module: explain the module itself
    settings = current_config()
    registry = ModelRegistry()
    capture = _Capture(registry, settings)
    blocks = _compiled_blocks(model)
    saved = [block._compiled_call_impl for block in blocks]
    torch._dynamo.reset()
    try:
        # The hooks the backend put on a compiled model stand still: explaining it is not one of its forwards.
        with only(registry):
            if blocks:
                for block in blocks:
                    block._compiled_call_impl = torch.compile(block._call_impl, backend=capture)
                model(*args, **kwargs)
            else:
                torch.compile(model, backend=capture)(*args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as failure:
        # The analysis's own errors (settings that contradict the graph) reach the user as they are.
        inner = getattr(failure, "inner_exception", None)
        if isinstance(inner, LayoutOverrideError):
            raise inner from None
        raise
    finally:
        for block, compiled in zip(blocks, saved):
            block._compiled_call_impl = compiled
        registry.clear()
        torch._dynamo.reset()
    return ExplainReport(
        decisions=tuple(capture.decisions()),
        graph_count=len(capture.graphs),
        graph_break_count=len(capture.break_reasons),
        break_reasons=tuple(capture.break_reasons),
        config=settings,
        regional=bool(blocks),
    )
