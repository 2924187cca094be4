"""The state of one compiled model: its step tracker, plan cache, report records and attention layers, and the step
context of the call running now.

This module owns the schedule state of compiled models; it knows nothing of FX graphs or Triton. Each compiled model
has one `ModelState` (made by the backend when it compiles the model's first graph, `runtime.binding`): its step
tracker (`runtime.steps`), its plan cache (`runtime.plan_cache`), its report records (`runtime.records`) and the
numbering of its attention layers. Two transformers in one process (the two experts of Wan 2.2 A14B, or two pipelines)
never share any of it. The step of the running call is published as a `StepContext` in a context variable that the op
reads (`current_step`); calls of the op outside a compiled model have none and never use a cache.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import logging
import threading
import weakref
from collections.abc import Iterator

import torch

from ..families import missing_dynamo_settings
from ..plan import SparsePlan
from .plan_cache import PlanCache, plan_cache_limit
from .records import KINDS, HeadRange, PendingRecord, Recorder, report_settings
from .steps import StepTracker

__all__ = ["ModelState", "StepContext", "current_step", "nothing_sparse_message", "record", "step_context"]

logger = logging.getLogger("spattn_compile")


@dataclasses.dataclass(frozen=True, eq=False)
class StepContext:
    """Where one call of a compiled model stands.

    model: the compiled model's `ModelState`.
    generation: counts the model's generations (denoising loops) in this process, from 0.
    step: denoising step within the generation, from 0. branch: the call's index within its step (CFG), from 0.
    source: how the step was found: "timestep" (the model's timestep), "override" (`spattn_compile.step`) or
        "call_count" (no timestep: every call is a step).
    video_grid: the latent token grid (frames, height, width) of this forward, as the model's forward hook read it
        from the model's inputs (None without a hook, or when the inputs did not show it; `grid_note` says why).
    block: module path, in the model, of the compiled block whose graph runs now ("" for a whole-model graph).
    layer_names: module path (relative to `block`) of each rewritten attention call of the running graph, by the
        graph's layer index.
    layer_heads: under context parallelism, the heads each rewritten call of the running graph holds (`HeadRange`,
        by the graph's layer index; None for a call that holds every head).
    """

    model: ModelState
    generation: int
    step: int
    branch: int
    source: str
    video_grid: tuple[int, int, int] | None = None
    grid_note: str = ""
    block: str = ""
    layer_names: tuple[str, ...] = ()
    layer_heads: tuple[HeadRange | None, ...] = ()

    def in_graph(
        self, block: str, layer_names: tuple[str, ...], layer_heads: tuple[HeadRange | None, ...] = ()
    ) -> StepContext:
        """This forward's context, for a call of the graph of `block` whose rewritten calls are `layer_names` (holding
        the heads `layer_heads`)."""
        return dataclasses.replace(self, block=block, layer_names=layer_names, layer_heads=layer_heads)

    def heads_of(self, layer_index: int) -> HeadRange | None:
        """The heads the graph's rewritten call number `layer_index` holds (None: every head)."""
        return self.layer_heads[layer_index] if 0 <= layer_index < len(self.layer_heads) else None

    def layer_name(self, layer_index: int) -> str:
        """The module path, in the model, of the graph's rewritten call number `layer_index`."""
        if 0 <= layer_index < len(self.layer_names) and self.layer_names[layer_index]:
            name = self.layer_names[layer_index]
            if not self.block:
                return name
            if name.startswith("#"):
                # No module path below the block: the compiled block is the attention module itself.
                return self.block if len(self.layer_names) == 1 else f"{self.block}{name}"
            return f"{self.block}.{name}"
        return f"{self.block}#{layer_index}" if self.block else f"#{layer_index}"


class ModelState:
    """The schedule state of one compiled model: its step tracker, plan cache, report records, the numbering of its
    attention layers and what the pass decided in its graphs.

    name: how the report names the model: its class name, with "#k" for the k-th (k >= 1) model of that class.
    module: the model (weakly held), or None for a compiled function.
    forward: the context of the model's running forward (set by its forward hook, `runtime.binding`; for a compiled
        function, by its graph); None outside one.
    hooked: whether the backend's forward hook is on the model.
    """

    def __init__(self, name: str, module: torch.nn.Module | None = None) -> None:
        self.name = name
        self._module = None if module is None else weakref.ref(module)
        self.plan_cache = PlanCache(plan_cache_limit().max_bytes)
        self.tracker = StepTracker(on_new_generation=self.plan_cache.clear)
        self.recorder = Recorder()
        self.forward: StepContext | None = None
        # The model's 3-D convolutions, against which its latent grid is checked (`families.patch_convolutions`).
        self.convolutions: tuple[torch.nn.Conv3d, ...] | None = None
        self.hooked = False
        self.lock = threading.Lock()
        self._layers: dict[str, int] = {}
        self.rules: collections.Counter[str] = collections.Counter()
        self.sparse_calls = 0
        # Calls handed to the op with a run-time grid (grid_from "run_time"), calls that ran sparse, and forwards begun
        # with a video_grid setting in force (for `check_nothing_sparse`).
        self.run_time_calls = 0
        self.sparse_runs = 0
        self.grid_forwards = 0
        self.graphs = 0
        self.forwards = 0  # forwards begun (advance calls): after the first, every attention layer has an index
        self.warned = False

    def __repr__(self) -> str:
        return f"ModelState({self.name!r})"

    @property
    def module(self) -> torch.nn.Module | None:
        return None if self._module is None else self._module()

    def advance(self, timestep: object) -> StepContext:
        """Account for one forward of the model with this `timestep` argument (`steps.StepTracker`)."""
        at = self.tracker.advance(timestep)
        self.forwards += 1
        return StepContext(self, at.generation, at.step, at.branch, at.source)

    def layer_index(self, name: str) -> int:
        """The model-level index of the attention layer `name` (a module path): its rank among the model's rewritten
        attention layers in the order they first ran, which is their order in the forward (so `dense_layers=(0, 1)`
        means the first two sparse-capable layers, whatever the graphs or blocks they are compiled in)."""
        index = self._layers.get(name)
        if index is None:
            with self.lock:
                index = self._layers.setdefault(name, len(self._layers))
        return index

    def plan(self, layer: str, branch: int = 0) -> SparsePlan | None:
        """The plan cached for the attention layer `layer` (a module path, as `report()` names it) and CFG branch, if
        any. Under context parallelism it covers the heads this rank holds (`report()`'s heads column)."""
        return self.plan_cache.plan((layer, branch))

    def check_dense_layers(self, dense_layers: tuple[int, ...]) -> None:
        """Raise ValueError when `dense_layers` names a layer index the model does not have (known once a whole
        forward has run: from the second forward on)."""
        if self.forwards < 2 or not dense_layers:
            return
        count = len(self._layers)
        missing = [index for index in dense_layers if index >= count]
        if missing:
            raise ValueError(
                f"spattn: dense_layers={dense_layers!r} names layer(s) {missing}, but {self.name} has {count} "
                f"sparse-capable attention layers (indices 0 to {count - 1}, named in spattn_compile.report())"
            )

    @property
    def layers(self) -> dict[str, int]:
        """Layer name -> model-level index, for every layer that has run."""
        return dict(self._layers)

    def note_decisions(self, decisions: list) -> None:
        """Add the pass's decisions (`passes.AttentionDecision`) for one compiled graph of the model to its tally
        (for `check_nothing_sparse`)."""
        with self.lock:
            self.graphs += 1
            self.sparse_calls += sum(1 for d in decisions if d.sparse)
            self.run_time_calls += sum(1 for d in decisions if d.grid_from == "run_time" and d.layer_index is not None)
            self.rules.update(d.rule for d in decisions if not d.sparse)

    def check_nothing_sparse(self, video_grid: tuple[int, int, int] | None = None) -> None:
        """Log one WARNING (once per model) when the model has run, was compiled, and nothing in it became sparse;
        `video_grid`: the setting in force for the forward that begins. Calls whose grid is read when they run
        (packed tokens) are given one forward under a video_grid setting before the warning says it did not help."""
        with self.lock:
            if self.warned or self.graphs == 0 or self.sparse_calls or self.sparse_runs:
                return
            if self.run_time_calls and video_grid is not None:
                self.grid_forwards += 1
                if self.grid_forwards == 1:
                    return
            self.warned = True
        logger.warning(nothing_sparse_message(self, video_grid))


# ----------------------------------------------------------------------------------------------------------------
# No silent no-ops
# ----------------------------------------------------------------------------------------------------------------

# The fix to suggest for the commonest reason that no attention call of a model became sparse.
_FIXES = {
    "": "the compiled graphs hold no scaled_dot_product_attention call (the model's attention is not SDPA, e.g. a "
    "linear attention, or a custom kernel): there is nothing to make sparse; compile without backend='spattn'",
    "no_grid": "set the latent token grid: spattn_compile.config(video_grid=(frames, height, width)) around the call "
    "(per call, for every resolution), or options={'video_grid': ...}",
    "short": "the sequences are shorter than min_seq_len: lower it, e.g. torch.compile(..., options={'min_seq_len': "
    "0}) (sparse attention pays off from a few thousand tokens)",
    "autograd": "run the model under torch.no_grad() or torch.inference_mode(): the sparse op has no backward",
    "cross_attention": "the model's self-attention is not a scaled_dot_product_attention over video tokens (only "
    "cross-attention is): there is nothing to make sparse; compile without backend='spattn'",
    "capability": "use inputs the kernels take (spattn_compile.capability: float16/bfloat16/float32 on CUDA with "
    "16 <= head dim <= 256 and head dim % 8 == 0, or the CPU)",
    "mask": "the attention masks are not key-padding masks (causal, windowed or additive masks stay dense)",
    "dtype": "run the model in float16, bfloat16 or float32",
    "ambiguous_grid": "the token layout is ambiguous in the graph: set video_grid (and text_len, text_position)",
    "override_mismatch": "video_grid/text_len/text_position do not match the attention calls' sequence length",
    "causal": "causal attention stays dense",
    "dropout": "run the model in eval mode (model.eval()) so that attention dropout is 0",
    "gqa": "grouped-query attention stays dense",
    "shape": "the attention inputs are not (B, H, S, D) tensors of one shape",
    "scale": "pass scale=None or a positive constant to scaled_dot_product_attention",
    "sequence_shard": "context parallelism with ring attention (ring_degree > 1) never gives one call the whole "
    "sequence: use ContextParallelConfig(ulysses_degree=N) instead",
    "attention_backend": "the model's attention runs through another diffusers attention backend: "
    "model.set_attention_backend('native') (scaled_dot_product_attention) before compiling",
    "mag_cache": "compile the blocks' self-attention modules instead (Wan: `for block in transformer.blocks: "
    "block.attn1.compile(backend='spattn')`), or use FirstBlockCacheConfig or TaylorSeerCacheConfig, whose hooks "
    "torch.compile traces",
}


def nothing_sparse_message(state: ModelState, video_grid: tuple[int, int, int] | None = None) -> str:
    """The warning for a model none of whose attention calls became sparse: the commonest reason and its fix
    (`video_grid`: the setting in force when it runs)."""
    if state.rules:
        # Cross-attention is never sparse; when self-attention stayed dense too, its reason is the one to fix.
        own = [(rule, count) for rule, count in state.rules.most_common() if rule != "cross_attention"]
        rule, count = (own or state.rules.most_common(1))[0]
        total = sum(state.rules.values())
        reason = f"{count} of its {total} attention calls stay dense for the reason {rule!r}"
    elif type(getattr(state.module, "_cache_config", None)).__name__ == "MagCacheConfig":
        # MagCache's hooks are torch.compiler.disable'd: every block runs eagerly, out of the compiled graphs.
        rule, reason = "mag_cache", "diffusers' MagCache runs its transformer blocks outside torch.compile"
    else:
        rule, reason = "", "its compiled graphs hold no scaled_dot_product_attention call"
    fix = _FIXES.get(rule, _FIXES[""])
    settings, why = missing_dynamo_settings(state.module)
    if settings:
        # A family whose attention breaks the graph without a Dynamo setting: what reached the pass is not the point.
        reason = f"{reason}, and {why}"
        fix = f"set {settings} before compiling (then torch._dynamo.reset() if it was compiled already)"
    elif rule == "no_grid" and video_grid is not None and state.run_time_calls:
        # The setting is in force and the calls read it: it does not fit them (never suggest what is already set).
        reason = (
            f"video_grid={tuple(video_grid)} is in force, but none of its {state.run_time_calls} attention calls "
            "that take their grid when they run (packed tokens) became sparse with it"
        )
        fix = (
            "the grid's frames*height*width tokens, with text_len text tokens, must fill each call's sequence, and a "
            "sequence that holds text needs text_position; spattn_compile.report() records each call as 'no_grid'"
        )
    elif rule == "no_grid" and video_grid is not None:
        # Calls without a grid in a graph that proves another call's grid are not video attention (passes.attention).
        fix = (
            f"video_grid={tuple(video_grid)} is in force, but these calls are not attention over the video's tokens "
            "(a grid reaches other calls of their graph, or the model's forward gave one that none of their inputs "
            "holds)"
        )
    return (
        f"spattn: no attention call of {state.name} became sparse: {reason}. Fix: {fix}. "
        "spattn_compile.explain(model, ...) shows every call's decision."
    )


_CURRENT: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("spattn_compile_step", default=None)


def current_step() -> StepContext | None:
    """The step of the compiled-model call running now in this thread / task, or None outside one."""
    return _CURRENT.get()


@contextlib.contextmanager
def step_context(context: StepContext) -> Iterator[None]:
    """Publish `context` to the attention ops run inside the block (used by the backend)."""
    token = _CURRENT.set(context)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def record(
    context: StepContext,
    layer_index: int,
    kind: str,
    cache: str,
    density: torch.Tensor | float,
    recall: torch.Tensor | float,
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None,
    keep_share: torch.Tensor | None = None,
    layer: str = "",
    estimator: str = "",
    heads: HeadRange | None = None,
    head_summary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Append one call (`context`: its `StepContext`) to its model's recorder; `keep_share` `(NB, NB)` and
    `head_summary` (density and estimated recall per head, `records.head_summary`) are kept for `plot` and
    `head_table` (latest only); `heads`: see `records.AttentionRecord`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    model = context.model
    pending = PendingRecord(
        next(report_settings().sequence),
        model.name,
        context.generation,
        context.step,
        context.branch,
        layer_index,
        layer,
        kind,
        cache,
        density,
        recall,
        events,
        estimator,
        heads,
    )
    recorder = model.recorder
    with recorder.lock:
        if kind == "sparse":
            model.sparse_runs += 1
        recorder.records.append(pending)
        if keep_share is not None:
            recorder.masks[(layer_index, layer, context.branch)] = (context.step, keep_share)
        if head_summary is not None:
            recorder.heads[(layer_index, layer, context.branch)] = (context.step, *head_summary)
