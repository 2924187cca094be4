"""`spattn_compile.explain`: what the `spattn` backend would do to a model, without compiling it.

This module owns the user-facing report. `explain(model, *args, **kwargs)` captures the model's graphs the way
`torch._dynamo.explain` does (so, like it, it runs the model once and calls `torch._dynamo.reset()`, which makes
already compiled models recompile on their next call), runs the attention pass's analysis on each graph under the
active settings (`spattn_compile.current_config()`; wrap the call in `with spattn_compile.config(...)` to use the
options you compile with) and returns an `ExplainReport`: one `AttentionDecision` per attention call (sparse or
dense, the inferred video grid and text span, and the reason), plus Dynamo's graph-break summary. `print(report)`
shows it as a table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .config import SparseAttentionConfig, current_config
from .passes import AttentionDecision, analyze_attention

__all__ = ["ExplainReport", "explain"]


@dataclasses.dataclass(frozen=True, eq=False)
class ExplainReport:
    """The attention decisions of one model, in graph order.

    decisions: one per scaled_dot_product_attention call of every captured graph.
    graph_count, graph_break_count, break_reasons: Dynamo's capture summary (break reasons as text).
    config: the settings the decisions were made under.
    """

    decisions: tuple[AttentionDecision, ...]
    graph_count: int
    graph_break_count: int
    break_reasons: tuple[str, ...]
    config: SparseAttentionConfig

    @property
    def sparse(self) -> tuple[AttentionDecision, ...]:
        """The calls that become sparse attention."""
        return tuple(d for d in self.decisions if d.sparse)

    @property
    def dense(self) -> tuple[AttentionDecision, ...]:
        """The calls left to dense SDPA."""
        return tuple(d for d in self.decisions if not d.sparse)

    def __str__(self) -> str:
        header = ("graph", "node", "module", "attention", "layer", "query (B,H,S,D)", "video grid", "text", "reason")
        rows = [header]
        for d in self.decisions:
            grid = "" if d.video_grid is None else "x".join(str(s) for s in d.video_grid) + f" ({d.grid_from})"
            if d.text_len is None:
                text = ""
            elif d.text_position is None:
                text = "none"
            else:
                text = f"{d.text_len} {d.text_position}"
            shape = "(" + ", ".join(str(s) for s in d.query_shape) + ")" if d.query_shape else ""
            decision = "sparse" if d.sparse else f"dense: {d.rule}"
            layer = "" if d.layer_index is None else str(d.layer_index)
            rows.append((str(d.graph_index), d.node, d.module, decision, layer, shape, grid, text, d.reason))
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


def explain(model: Callable, /, *args: object, **kwargs: object) -> ExplainReport:
    """Run `model(*args, **kwargs)` under Dynamo's explain and report every attention call's decision (see the module
    docstring). Call it under `torch.no_grad()` for inference models, as you would run them."""
    if not callable(model):
        raise TypeError(f"explain: model must be callable, got {type(model).__name__}")
    settings = current_config()
    captured = torch._dynamo.explain(model)(*args, **kwargs)
    decisions: list[AttentionDecision] = []
    for index, graph_module in enumerate(captured.graphs):
        decisions.extend(analyze_attention(graph_module.graph, settings, graph_index=index))
    reasons = tuple(str(getattr(reason, "reason", reason)).strip() for reason in captured.break_reasons)
    return ExplainReport(
        decisions=tuple(decisions),
        graph_count=captured.graph_count,
        graph_break_count=captured.graph_break_count,
        break_reasons=reasons,
        config=settings,
    )
