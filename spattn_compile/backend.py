"""The `spattn` torch.compile backend: run the attention pass on Dynamo's graph, then hand it to an inner compiler.

`torch.compile(model, backend="spattn", options={...})` works once the package is installed (the
`torch_dynamo_backends` entry point), whether or not the user imported `spattn_compile`; importing the package also
registers the name. Options:

- `"compiler"`: the inner compiler of the rewritten graph: `"inductor"` (default), `"eager"` (run the graph as is),
  `"aot_eager"`, or any other registered Dynamo backend name.
- `"compiler_options"`: a dict of Inductor config patches (only with `"compiler": "inductor"`).
- any `SparseAttentionConfig` field (`"sparsity"`, `"block_size"`, `"min_seq_len"`, `"video_grid"`...): settings of
  this compiled model.

How the settings compose, field by field, when the compiled model runs: a field set at run time by an enclosing
`with spattn_compile.config(...)` block (see `spattn_compile.config.explicit_fields`) wins; otherwise the value given
in `options` applies; otherwise the library default. So `options` are the compiled model's defaults and a `config(...)`
block still overrides them, with no recompilation: the op reads the composed settings each time it runs.

Some settings shape the rewrite itself and are read when the graph is compiled: `video_grid`, `text_len` and
`text_position` (which calls become sparse, with which grid) and `min_seq_len` for calls of static length. Give them
in `options`. Setting `video_grid`/`text_len`/`text_position` at run time to a value other than the one the graph was
compiled with raises a RuntimeError (the graph cannot honour it without recompiling); lowering `min_seq_len` below the
length of a call that was left dense as too short logs a warning, since that call stays dense until a recompile.
`mode=` is accepted for Inductor without CUDA graphs only: CUDA graph replay would freeze the run-time settings.

Each call of a compiled graph also advances the step tracker of its model (`spattn_compile.schedule`: denoising step
and CFG branch, read from the graph's `timestep` input unless `spattn_compile.step(...)` names them) and runs the
graph inside that step context, which the op reads for the dense warm-up steps and the plan cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import re
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint
from typing import Any

import torch
import torch.fx as fx

from . import ops  # noqa: F401  (registers torch.ops.spattn.sparse_attention)
from .config import SparseAttentionConfig, config, current_config, explicit_fields
from .passes import AttentionDecision, rewrite_attention
from .schedule import step_context, tracker_for

__all__ = ["BackendOptions", "spattn_backend"]

logger = logging.getLogger("spattn_compile")

BACKEND_NAME = "spattn"
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SparseAttentionConfig))
_BACKEND_FIELDS = ("compiler", "compiler_options")
# Settings the pass reads when it rewrites the graph (the others are read by the op at run time).
_LAYOUT_FIELDS = ("video_grid", "text_len", "text_position")
_LIBRARY_DEFAULTS = SparseAttentionConfig()
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
# Dynamo names a graph input after its source: `L_timestep_` for forward(timestep=...) passed positionally or by
# name, `L_kwargs_timestep_` when forward takes **kwargs.
_TIMESTEP_INPUT = re.compile(r"^L_(kwargs_)?timestep_$", re.IGNORECASE)
# Model keys for graphs compiled outside a Dynamo frame (no compile id).
_ANONYMOUS_MODELS = itertools.count()


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
    if mode not in (None, "default"):
        if options.compiler != "inductor":
            raise ValueError(f"spattn backend: mode={mode!r} needs the Inductor compiler, got {options.compiler!r}")
        if mode in _CUDAGRAPH_MODES:
            raise ValueError(
                f"spattn backend: mode={mode!r} uses CUDA graphs, whose replay would freeze the settings that "
                "spattn reads at run time; use mode='max-autotune-no-cudagraphs' or options={...}"
            )
    if options.compiler == "eager":
        return lambda gm, example_inputs: gm.forward
    if options.compiler == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = dict(options.compiler_options)
        if mode not in (None, "default"):
            patches = {**list_mode_options(mode), **patches}
        return functools.partial(compile_fx, config_patches=patches or None)
    return torch._dynamo.lookup_backend(options.compiler)


def timestep_input_position(gm: fx.GraphModule) -> int | None:
    """Position, among the graph's inputs, of the model's `timestep` argument; None if the graph has none."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for position, node in enumerate(placeholders):
        if _TIMESTEP_INPUT.match(str(node.target)) or _TIMESTEP_INPUT.match(node.name):
            return position
    return None


def _model_key() -> object:
    """Dynamo's frame id of the graph being compiled: the same for every recompile of one forward."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    frame_id = getattr(compile_id, "frame_id", None)
    return f"frame{frame_id}" if frame_id is not None else f"graph{next(_ANONYMOUS_MODELS)}"


def _bind_settings(
    compiled: Callable,
    options: BackendOptions,
    compiled_config: SparseAttentionConfig,
    decisions: list[AttentionDecision],
    model_key: object | None = None,
    timestep_position: int | None = None,
) -> Callable:
    """Wrap a compiled graph so that it runs under the composed settings, rejects run-time changes of the settings
    its rewrite depends on, and (with a `model_key`, when the graph has sparse calls) runs each call in the step
    context its model's tracker assigns."""
    layout = {name: getattr(compiled_config, name) for name in _LAYOUT_FIELDS}
    short = [d for d in decisions if d.rule == "short"]
    warned_min_seq_len: set[int] = set()

    def settings() -> SparseAttentionConfig:
        active = current_config()
        for name, compiled_value in layout.items():
            value = getattr(active, name)
            if value is not None and value != compiled_value:
                raise RuntimeError(
                    f"spattn: this graph was rewritten with {name}={compiled_value!r}, but {name}={value!r} is "
                    f"active now. {', '.join(_LAYOUT_FIELDS)} shape the rewrite and are fixed when the model is "
                    "compiled: give them in torch.compile(..., options={...}), or call torch._dynamo.reset() to "
                    "recompile"
                )
        effective = options.compose(active)
        if effective.min_seq_len < compiled_config.min_seq_len and effective.min_seq_len not in warned_min_seq_len:
            stuck = [d.node for d in short if d.query_shape and d.query_shape[2] >= effective.min_seq_len]
            if stuck:
                warned_min_seq_len.add(effective.min_seq_len)
                logger.warning(
                    "spattn: min_seq_len=%d is active, but %s were left dense when compiled with min_seq_len=%d; "
                    "they stay dense until a recompile (give min_seq_len in options, or torch._dynamo.reset())",
                    effective.min_seq_len,
                    stuck,
                    compiled_config.min_seq_len,
                )
        return effective

    tracker = tracker_for(model_key) if model_key is not None and any(d.sparse for d in decisions) else None

    # Dynamo calls a backend's compiled function with the graph inputs as positional arguments.
    def run(*args: Any) -> Any:
        effective = settings()
        with contextlib.ExitStack() as scope:
            if effective is not current_config():
                scope.enter_context(config(effective))
            if tracker is not None:
                timestep = args[timestep_position] if timestep_position is not None else None
                scope.enter_context(step_context(tracker.advance(timestep)))
            return compiled(*args)

    return run


def spattn_backend(
    gm: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """The Dynamo backend: rewrite the graph's attention calls (`spattn_compile.passes`), compile it with the inner
    compiler and bind this model's settings (see the module docstring)."""
    parsed = BackendOptions.parse(options)
    compile_inner = _inner_compiler(parsed, mode)
    compiled_config = parsed.compose(current_config())
    timestep_position = timestep_input_position(gm)
    decisions = rewrite_attention(gm, compiled_config)
    compiled = compile_inner(gm, example_inputs)
    return _bind_settings(compiled, parsed, compiled_config, decisions, _model_key(), timestep_position)


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
