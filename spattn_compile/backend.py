"""The `spattn` torch.compile backend: run the attention pass on Dynamo's graph, then hand it to an inner compiler.

`torch.compile(model, backend="spattn", options={...})` works once the package is installed (the
`torch_dynamo_backends` entry point), whether or not the user imported `spattn_compile`; importing the package also
registers the name. Regional compilation works the same way: `transformer.compile_repeated_blocks(backend="spattn")`.
Options:

- `"compiler"`: the inner compiler of the rewritten graph: `"inductor"` (default), `"eager"` (run the graph as is),
  `"aot_eager"`, or any other registered Dynamo backend name.
- `"compiler_options"`: a dict of Inductor config patches (only with `"compiler": "inductor"`).
- any `SparseAttentionConfig` field (`"sparsity"`, `"block_size"`, `"min_seq_len"`, `"video_grid"`...): settings of
  this compiled model.

torch.compile takes `mode=` or `options=`, not both. With a mode, give the settings to the backend itself:
`torch.compile(model, backend=spattn_compile.backend(sparsity=0.9, min_seq_len=0), mode="max-autotune")` (the module
is callable: `spattn_compile.backend(**options)` returns a backend with those options, validated at once), or
scope them with `spattn_compile.config(...)`. `mode="max-autotune"` and `"max-autotune-no-cudagraphs"` compile
with Inductor's autotuning and without CUDA graphs; `mode="reduce-overhead"` (CUDA graphs only) is refused with an
error saying what to use instead: CUDA graph replay skips the Python of the sparse op, which reads its settings,
the denoising step and its cached plans on every call.

How the settings compose, field by field, when the compiled model runs: a field set at run time by an enclosing
`with spattn_compile.config(...)` block (see `spattn_compile.config.explicit_fields`) wins; otherwise the value given
in `options` applies; otherwise the library default. So `options` are the compiled model's defaults and a `config(...)`
block still overrides them, with no recompilation: the op reads the composed settings each time it runs.

`min_seq_len` is read when the graph is compiled for calls of static length (lowering it below the length of a call
that was left dense as too short logs a warning, since that call stays dense until a recompile). `video_grid`,
`text_len` and `text_position` are for models whose graphs do not show their token layout: where the graph has no
grid, the op reads `video_grid` when it runs, so it may change per call (per resolution). Where the graph proves the
layout, a consistent setting is accepted and a contradicting one raises an error naming both.

When it compiles a graph, the backend binds it to its model (`runtime.binding`: the model's `ModelState`, the block
for regionally compiled models, and a forward hook on the model); each call of the graph then runs in the model's
step context (`runtime.steps`: denoising step and CFG branch, from the model's `timestep`, unless
`spattn_compile.step(...)` names them), which the op reads for the dense warm-up steps, the layer numbering, the plan
cache and the report. A model in which no attention call became sparse logs one WARNING with the commonest reason
and its fix, when it runs a second time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import re
import sys
import types
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint
from typing import Any

import torch
import torch.fx as fx

from .config import SparseAttentionConfig, config, current_config, explicit_fields
from .passes import AttentionDecision, GroupInfo, context_seeds, rewrite_attention
from .runtime import op  # noqa: F401  (registers torch.ops.spattn.sparse_attention)
from .runtime.binding import Binding, ModelRegistry, Owner, default_registry
from .runtime.model_state import StepContext, step_context
from .runtime.records import HeadRange

__all__ = ["BackendOptions", "SpattnBackend", "graph_seeds", "note_missing_grid", "sequence_parallel", "spattn_backend"]

logger = logging.getLogger("spattn_compile")

BACKEND_NAME = "spattn"
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SparseAttentionConfig))
_BACKEND_FIELDS = ("compiler", "compiler_options")
_LIBRARY_DEFAULTS = SparseAttentionConfig()
# Inductor modes: those that use CUDA graphs are refused or compiled without them (see the module docstring).
_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
# Dynamo names a graph input after its source: `L_timestep_` for forward(timestep=...) passed positionally or by
# name, `L_kwargs_timestep_` when forward takes **kwargs, `L_stack0_1_timestep_` in the frame resumed after a hook
# that graph-breaks and returns the forward's (args, kwargs) (accelerate's offloading hooks, `new_forward`).
_TIMESTEP_INPUT = re.compile(r"^L_(kwargs_|stack\d+_1_)?timestep_$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """The parsed `options` of `torch.compile(..., backend="spattn", options=...)`.

    compiler: name of the inner compiler. compiler_options: Inductor config patches, as sorted (key, value) pairs.
    overrides: the SparseAttentionConfig fields given, as sorted (field, value) pairs (validated).
    """

    compiler: str = "inductor"
    compiler_options: tuple[tuple[str, Any], ...] = ()
    overrides: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        """Validate `options`; raises ValueError / TypeError naming the option and what it accepts."""
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise TypeError(f"spattn backend: options must be a dict, got {type(options).__name__}")
        unknown = sorted(set(options) - set(_BACKEND_FIELDS) - set(_CONFIG_FIELDS))
        if unknown:
            raise ValueError(
                f"spattn backend: unknown option(s) {unknown}; known options: {list(_BACKEND_FIELDS)} and the "
                f"SparseAttentionConfig fields {list(_CONFIG_FIELDS)}"
            )
        compiler = options.get("compiler", "inductor")
        if not isinstance(compiler, str):
            raise TypeError(f"spattn backend: option 'compiler' must be a backend name (str), got {compiler!r}")
        if compiler == BACKEND_NAME:
            raise ValueError("spattn backend: option 'compiler' cannot be 'spattn' itself")
        if compiler not in ("inductor", "eager"):
            available = torch._dynamo.list_backends(exclude_tags=())
            if compiler not in available:
                raise ValueError(
                    f"spattn backend: option 'compiler'={compiler!r} is not a Dynamo backend; use 'inductor', "
                    f"'eager', 'aot_eager' or one of {available}"
                )
        compiler_options = options.get("compiler_options") or {}
        if not isinstance(compiler_options, Mapping):
            raise TypeError(
                f"spattn backend: option 'compiler_options' must be a dict of Inductor settings, got "
                f"{type(compiler_options).__name__}"
            )
        if compiler_options and compiler != "inductor":
            raise ValueError(
                f"spattn backend: option 'compiler_options' is for the Inductor compiler; compiler={compiler!r}"
            )
        if compiler_options.get("triton.cudagraphs"):
            raise ValueError(
                "spattn backend: compiler_options 'triton.cudagraphs'=True would freeze the settings that spattn "
                "reads at run time (CUDA graph replay skips the op's Python code)"
            )
        overrides = {name: options[name] for name in _CONFIG_FIELDS if name in options}
        # Validates every value, with SparseAttentionConfig's own error messages naming the field.
        checked = dataclasses.replace(_LIBRARY_DEFAULTS, **overrides)
        overrides = {name: getattr(checked, name) for name in overrides}
        return cls(
            compiler=compiler,
            compiler_options=tuple(sorted(compiler_options.items())),
            overrides=tuple(sorted(overrides.items())),
        )

    def compose(self, active: SparseAttentionConfig) -> SparseAttentionConfig:
        """The settings in force for this compiled model when `active` is the run-time config (module docstring)."""
        return _compose(self.overrides, active, explicit_fields())


@functools.lru_cache(maxsize=256)
def _compose(
    overrides: tuple[tuple[str, Any], ...], active: SparseAttentionConfig, explicit: frozenset[str]
) -> SparseAttentionConfig:
    if not overrides:
        return active
    # A field set explicitly by an enclosing config(...) block is the user's run-time choice and wins.
    kept = {name: value for name, value in overrides if name not in explicit}
    return dataclasses.replace(active, **kept) if kept else active


def _inner_compiler(
    options: BackendOptions, mode: str | None
) -> Callable[[fx.GraphModule, list[torch.Tensor]], Callable]:
    if mode is not None and mode not in _MODES:
        raise ValueError(f"spattn backend: mode={mode!r} is not a torch.compile mode; use one of {list(_MODES)}")
    if mode == "reduce-overhead":
        raise ValueError(
            "spattn backend: mode='reduce-overhead' runs the model as CUDA graphs, whose replay skips the Python of "
            "the sparse attention op (it reads its settings, the denoising step and its cached plans on every call). "
            "Use mode='max-autotune-no-cudagraphs' (or mode='max-autotune', which spattn compiles without CUDA "
            "graphs), or no mode"
        )
    if mode not in (None, "default") and options.compiler != "inductor":
        raise ValueError(
            f"spattn backend: mode={mode!r} needs the Inductor compiler, got compiler={options.compiler!r}"
        )
    if options.compiler == "eager":
        return lambda gm, example_inputs: gm.forward
    if options.compiler == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = dict(options.compiler_options)
        if mode not in (None, "default"):
            # CUDA graphs off: see the module docstring. The other settings of the mode (autotuning) apply.
            patches = {**list_mode_options(mode), **patches, "triton.cudagraphs": False}
            if mode == "max-autotune":
                logger.info("spattn: mode='max-autotune' compiles with Inductor's autotuning, without CUDA graphs")
        # compile_fx is annotated with what it returns when exporting too (paths, weights); for a graph module from
        # Dynamo it returns the compiled callable.
        return functools.partial(compile_fx, config_patches=patches or None)  # type: ignore[return-value]
    return torch._dynamo.lookup_backend(options.compiler)


def timestep_input_position(gm: fx.GraphModule) -> int | None:
    """Position, among the graph's inputs, of the compiled function's `timestep` argument; None if the graph has
    none. (A model's steps advance in its forward hook; a compiled function's graph advances its own.)"""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for position, node in enumerate(placeholders):
        if _TIMESTEP_INPUT.match(str(node.target)) or _TIMESTEP_INPUT.match(node.name):
            return position
    return None






def sequence_parallel(model: torch.nn.Module | None) -> GroupInfo | None:
    """The sequence-parallel group of a diffusers model run with Ulysses context parallelism
    (`model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`): its size N and this process's rank.
    diffusers' context-parallel hooks split the sequence before the blocks in N equal, contiguous pieces in rank order
    (`EquipartitionSharder`), so a block's graph receives this rank's piece (`passes.context_seeds`). None without
    context parallelism, with ring attention (`ring_degree > 1`: no call sees the whole sequence) and with uneven
    pieces (`ulysses_anything`)."""
    config = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    if config is None:
        return None
    ulysses, ring = getattr(config, "ulysses_degree", 1) or 1, getattr(config, "ring_degree", 1) or 1
    if ulysses <= 1 or ring != 1 or getattr(config, "ulysses_anything", False):
        return None
    mesh = getattr(config, "_flattened_mesh", None)
    if mesh is None or not torch.distributed.is_initialized():
        return None
    # The rank diffusers' sharder takes its piece by (EquipartitionSharder.shard).
    return GroupInfo(ulysses, torch.distributed.get_rank(mesh.get_group()))


def graph_seeds(gm: fx.GraphModule, owner: Owner) -> dict | None:
    """The token axes a block's graph starts from: its inputs that hold the video tokens of the model's forward."""
    forward = owner.state.forward if owner.block else None
    if forward is None or forward.video_grid is None:
        return None
    return context_seeds(gm.graph, math.prod(forward.video_grid), sequence_parallel(owner.state.module))


def note_missing_grid(decisions: list[AttentionDecision], owner: Owner) -> list[AttentionDecision]:
    """A block's decisions that found no grid say why the model's forward gave none."""
    forward = owner.state.forward if owner.block else None
    if forward is None or forward.video_grid is not None:
        return decisions
    return [
        dataclasses.replace(d, reason=f"{d.reason}; the model's forward gave no grid: {forward.grid_note}")
        if d.rule == "no_grid"
        else d
        for d in decisions
    ]


def _layer_order(decision: AttentionDecision) -> int:
    return -1 if decision.layer_index is None else decision.layer_index


def _layer_names(decisions: list[AttentionDecision]) -> tuple[str, ...]:
    """The module path of each rewritten call, by layer index; a path met twice in one graph gets "#k" suffixes."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for decision in sorted((d for d in decisions if d.layer_index is not None), key=_layer_order):
        base = decision.module or f"#{decision.layer_index}"
        count = seen.get(base, 0)
        seen[base] = count + 1
        names.append(base if count == 0 else f"{base}#{count}")
    return tuple(names)


def _layer_heads(decisions: list[AttentionDecision]) -> tuple[HeadRange | None, ...]:
    """The heads each rewritten call holds under context parallelism (by layer index, as `_layer_names`)."""
    heads: list[HeadRange | None] = []
    for decision in sorted((d for d in decisions if d.layer_index is not None), key=_layer_order):
        held = decision.heads
        static = held is not None and all(isinstance(size, int) for size in held)
        heads.append(
            HeadRange(decision.rank, decision.world_size, int(held[0]), int(held[1]))
            if held is not None and static
            else None
        )
    return tuple(heads)




class _GraphRunner:
    """A compiled graph, run under the composed settings and in its model's step context (module docstring)."""

    def __init__(
        self,
        compiled: Callable,
        options: BackendOptions,
        compiled_config: SparseAttentionConfig,
        decisions: list[AttentionDecision],
        binding: Binding,
        timestep_position: int | None,
    ) -> None:
        self.compiled = compiled
        self.options = options
        self.compiled_config = compiled_config
        self.binding = binding
        self.timestep_position = timestep_position
        # Calls handed to the op (sparse, or dense until a video grid is set: grid_from "run_time").
        self.sparse = any(d.layer_index is not None for d in decisions)
        self.layer_names = _layer_names(decisions)
        self.layer_heads = _layer_heads(decisions)
        self.short = [d for d in decisions if d.rule == "short"]
        self.warned_min_seq_len: set[int] = set()
        self.calls = 0

    def settings(self) -> SparseAttentionConfig:
        effective = self.options.compose(current_config())
        compiled_min = self.compiled_config.min_seq_len
        if effective.min_seq_len < compiled_min and effective.min_seq_len not in self.warned_min_seq_len:
            stuck = [d.node for d in self.short if d.query_shape and d.query_shape[2] >= effective.min_seq_len]
            if stuck:
                self.warned_min_seq_len.add(effective.min_seq_len)
                logger.warning(
                    "spattn: min_seq_len=%d is active, but %s were left dense when compiled with min_seq_len=%d; "
                    "they stay dense until a recompile (give min_seq_len in options, or torch._dynamo.reset())",
                    effective.min_seq_len,
                    stuck,
                    compiled_min,
                )
        return effective

    def context(self, owner: Owner, args: tuple) -> StepContext | None:
        state = owner.state
        if state.module is None:
            # A compiled function: its graph is its forward, and advances its steps.
            timestep = args[self.timestep_position] if self.timestep_position is not None else None
            state.forward = state.advance(timestep)
        # A model's forward hook advanced the steps and read the grid (None outside the model's forward).
        base = state.forward
        return None if base is None else base.in_graph(owner.block, self.layer_names, self.layer_heads)

    def __call__(self, *args: Any) -> Any:
        # Dynamo calls a backend's compiled function with the graph inputs as positional arguments.
        effective = self.settings()
        owner = self.binding.owner_of(args)
        context = self.context(owner, args) if self.sparse else None
        with contextlib.ExitStack() as scope:
            if effective is not current_config():
                scope.enter_context(config(effective))
            if context is not None:
                scope.enter_context(step_context(context))
            output = self.compiled(*args)
        self.calls += 1
        if self.calls == 2 and not owner.state.hooked:
            # A graph runs again: its model has run a whole forward, every graph of it has been compiled once.
            owner.state.check_nothing_sparse(effective.video_grid)
        return output


class SpattnBackend:
    """The `spattn` backend with preset options (`spattn_compile.backend(**options)`): usable as
    `torch.compile(model, backend=SpattnBackend({...}), mode=...)`. `options` given to torch.compile as well are
    applied on top of the preset ones."""

    def __init__(self, options: Mapping[str, Any] | None = None, registry: ModelRegistry | None = None) -> None:
        self.preset = dict(options or {})
        BackendOptions.parse(self.preset)  # fail at once, naming the option, not at the first compile
        self._registry = registry
        self.__name__ = BACKEND_NAME

    @property
    def registry(self) -> ModelRegistry:
        return self._registry if self._registry is not None else default_registry()

    def __repr__(self) -> str:
        return f"spattn_compile.backend({', '.join(f'{k}={v!r}' for k, v in self.preset.items())})"

    def __call__(
        self,
        gm: fx.GraphModule,
        example_inputs: list[torch.Tensor],
        *,
        options: Mapping[str, Any] | None = None,
        mode: str | None = None,
    ) -> Callable:
        """Rewrite the graph's attention calls (`spattn_compile.passes`), compile it with the inner compiler and bind
        it to its model (see the module docstring)."""
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"spattn backend: options must be a dict, got {type(options).__name__}")
        parsed = BackendOptions.parse({**self.preset, **(options or {})})
        compile_inner = _inner_compiler(parsed, mode)
        compiled_config = parsed.compose(current_config())
        binding = self.registry.bind(example_inputs)
        owner = binding.owner
        assert owner is not None  # bind places the graph
        decisions = rewrite_attention(gm, compiled_config, seeds=graph_seeds(gm, owner))
        decisions = note_missing_grid(decisions, owner)
        owner.state.note_decisions(decisions)
        timestep_position = timestep_input_position(gm) if owner.state.module is None else None
        compiled = compile_inner(gm, example_inputs)
        return _GraphRunner(compiled, parsed, compiled_config, decisions, binding, timestep_position)


_DEFAULT_BACKEND = SpattnBackend()


def spattn_backend(
    gm: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """The Dynamo backend registered as "spattn" (see the module docstring)."""
    return _DEFAULT_BACKEND(gm, example_inputs, options=options, mode=mode)


def _register() -> None:
    # Dynamo's registry tables are private (checked on torch 2.11 and 2.13); without them, plain registration.
    from torch._dynamo.backends import registry

    if BACKEND_NAME in getattr(registry, "_COMPILER_FNS", {}):
        return
    # Known through the entry point: Dynamo loads it (importing this module) and registers it under the name itself;
    # registering here as well would make that registration fail as a duplicate.
    if isinstance(getattr(registry, "_BACKENDS", {}).get(BACKEND_NAME), EntryPoint):
        return
    registry.register_backend(spattn_backend, name=BACKEND_NAME)


_register()


class _CallableModule(types.ModuleType):
    """`spattn_compile.backend(**options)`: this module, called, makes a backend with preset options (so that the
    settings reach the backend when torch.compile is given `mode=`, which excludes `options=`)."""

    def __call__(self, *args: Any, **options: Any) -> SpattnBackend:
        if args:
            given = ", ".join(f"{type(a).__name__}" for a in args)
            example = ", ".join(f"{k}={v!r}" for k, v in args[0].items()) if isinstance(args[0], Mapping) else ""
            raise TypeError(
                f"spattn_compile.backend takes its options as keyword arguments, got positional argument(s) of type "
                f"{given}: write spattn_compile.backend({example or 'sparsity=0.9'})"
                + (" or spattn_compile.backend(**options)" if example else "")
            )
        return SpattnBackend(options)


# The same trick as torch.backends' modules: give this module a class that adds behaviour, keeping every attribute.
sys.modules[__name__].__class__ = _CallableModule
