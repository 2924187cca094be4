"""Which compiled model, and which block of it, a graph call belongs to; what the model's running forward looks like.

This module owns the link between compiled graphs and the models they come from. Dynamo shares one compiled graph
between instances of a module class (the two experts of Wan 2.2 A14B; every block of a model compiled with
`compile_repeated_blocks`), so the link is made when a graph *runs*, from the identity of a parameter among its
inputs: each compiled graph maps the parameters it meets to their `Owner` (the model's `ModelState`, and the module
path of the compiled block in the model, "" for a whole-model graph). A parameter seen for the first time is placed
by `ModelRegistry.resolve`, which looks at the modules being called on the Python stack (the `nn.Module._call_impl`
frames): the innermost module holding the parameter is the compiled one; it is a block of the innermost enclosing
module whose `forward` takes a `timestep` (the denoiser), if there is one; else a model of its own when it takes the
timestep itself or nothing calls it, and otherwise a block of the module that calls it. The registry keeps one
`ModelState` per model.

For a model with compiled blocks (regional compilation, or a whole-model compile whose graph breaks leave blocks to
be compiled on their own), the registry puts a forward pre-hook on the model: once per forward it advances the
model's step tracker from the `timestep` argument and reads the latent grid from the model's inputs
(`latent_grid`), and the blocks' graphs run in that context. The forward that first compiles a block has already
passed the hook; its context is read from the model's `_call_impl` frame instead. The hooks are removed by
`reset_schedule()` (and `ModelRegistry.clear()`).

Under context parallelism (diffusers' Ulysses attention) the hook runs before diffusers' hooks split the sequence, so it
reads the full latent: the grid of the whole sequence that every rank's attention sees after the all-to-all.
`sequence_parallel(model)` says how the model splits it (the group size and this process's rank).

`latent_grid` reads `hidden_states` (the first argument) and the model's `config.patch_size` / `patch_size_t`: a 5-D
latent is `(B, C, F, H, W)`, or `(B, F, C, H, W)` / `(B, F, H, W, C)` when that is where `config.in_channels` is; a
packed `(B, S, C)` latent takes its size from `num_frames`, `height` and `width` arguments (LTX-Video). The op checks
on every call that the grid holds exactly the block's video tokens, and runs the call dense otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any

import torch

from .passes.token_axes import GroupInfo
from .schedule import ModelState, StepContext

__all__ = [
    "ModelRegistry",
    "Owner",
    "default_registry",
    "latent_grid",
    "nothing_sparse_message",
    "sequence_parallel",
]

logger = logging.getLogger("spattn_compile")


@dataclasses.dataclass(frozen=True)
class Owner:
    """Where a graph call belongs: the model's state, and the module path of the compiled block in the model ("" for
    a graph of the whole model)."""

    state: ModelState
    block: str = ""


@dataclasses.dataclass(frozen=True)
class _ModuleCall:
    module: torch.nn.Module
    args: tuple
    kwargs: dict


def _module_calls(frame: FrameType | None) -> Iterator[_ModuleCall]:
    """The module calls on the stack, innermost first: frames of `nn.Module._call_impl` (also when Dynamo runs them
    as compiled code, which keeps the name and the locals)."""
    while frame is not None:
        if frame.f_code.co_name == "_call_impl":
            local = frame.f_locals
            module = local.get("self")
            if isinstance(module, torch.nn.Module):
                yield _ModuleCall(module, tuple(local.get("args", ())), dict(local.get("kwargs", {})))
        frame = frame.f_back


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module an `OptimizedModule` (`torch.compile(module)`) wraps, or the module itself."""
    original = getattr(module, "_orig_mod", None)
    return original if isinstance(original, torch.nn.Module) else module


@functools.cache
def _forward_parameters(cls: type[torch.nn.Module]) -> Mapping[str, inspect.Parameter] | None:
    try:
        return inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return None


def _takes_timestep(module: torch.nn.Module) -> bool:
    # Classes hash by identity; mypy reads Module.__hash__ as an instance method.
    parameters = _forward_parameters(type(module))  # type: ignore[arg-type]
    return parameters is not None and "timestep" in parameters


def _bind(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The forward's arguments by name (positional ones bound to their names), or {} when they do not bind."""
    try:
        return dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return {}


def _size(value: object) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


# Where the channels of a 5-D latent sit when `config.in_channels` does not tell (it matches several dims, or none):
# the diffusers families whose latents are not (B, C, F, H, W).
_CHANNEL_DIM_BY_FAMILY = {"CogVideoX": 2, "ConsisID": 2, "Kandinsky5": 4}


def latent_grid(model: torch.nn.Module, arguments: Mapping[str, Any]) -> tuple[tuple[int, int, int] | None, str]:
    """The attention grid (frames, height, width) of a forward of `model` with `arguments` (see the module
    docstring), or (None, why not)."""
    config = getattr(model, "config", None)
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, int):
        patch_t = getattr(config, "patch_size_t", None) or 1
        patch = (patch_t, patch, patch)
    elif isinstance(patch, (tuple, list)) and len(patch) == 2:
        patch = (1, *patch)
    if not (isinstance(patch, (tuple, list)) and len(patch) == 3 and all(isinstance(p, int) for p in patch)):
        return None, f"{type(model).__name__} has no config.patch_size to turn its latent into the attention grid"
    latent = arguments.get("hidden_states")
    if latent is None and arguments:
        latent = next(iter(arguments.values()))
    if not isinstance(latent, torch.Tensor):
        return None, f"{type(model).__name__}'s first argument is not a latent tensor"
    if latent.dim() == 5:
        channels = getattr(config, "in_channels", None) or getattr(config, "in_visual_dim", None)
        matches = [d for d in (1, 2, 4) if latent.shape[d] == channels]
        family = next((dim for name, dim in _CHANNEL_DIM_BY_FAMILY.items() if type(model).__name__.startswith(name)), 1)
        channel_dim = matches[0] if len(matches) == 1 else family
        sizes = [latent.shape[d] for d in range(1, 5) if d != channel_dim]
    elif latent.dim() == 3:
        given = [_size(arguments.get(name)) for name in ("num_frames", "height", "width")]
        sizes = [size for size in given if size is not None]
        if len(sizes) != 3:
            return None, (
                f"{type(model).__name__}'s latent is packed {tuple(latent.shape)} and its forward has no num_frames, "
                "height and width to give its grid"
            )
    else:
        return None, f"{type(model).__name__}'s latent has shape {tuple(latent.shape)}, not a video's"
    frames, height, width = (int(size) // step for size, step in zip(sizes, patch))
    if min(frames, height, width) < 1:
        return None, f"latent {tuple(latent.shape)} is smaller than the patch {tuple(patch)}"
    return (frames, height, width), ""


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


def _hook_safe(function: Callable) -> Callable:
    # When Dynamo traces the model's forward (a whole-model compile), the hook must run as Python, not be traced.
    return torch._dynamo.disable(function, recursive=True)


class ModelRegistry:
    """The `ModelState` of every compiled model, found from the parameters among a graph's inputs (module docstring).
    Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._states: weakref.WeakKeyDictionary[torch.nn.Module, ModelState] = weakref.WeakKeyDictionary()
        self._models: list[ModelState] = []
        self._names: collections.Counter[str] = collections.Counter()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        # Bumped by clear(): the compiled graphs' caches of owners from an earlier epoch are stale.
        self.epoch = 0

    def models(self) -> list[ModelState]:
        """Every model's state, in the order the models were first seen."""
        with self._lock:
            return list(self._models)

    def clear(self) -> None:
        """Forget every model and remove the hooks put on models."""
        with self._lock:
            for handle in self._hooks:
                handle.remove()
            self._hooks.clear()
            self._states = weakref.WeakKeyDictionary()
            self._models.clear()
            self._names.clear()
            self.epoch += 1

    def _new_state(self, label: str, module: torch.nn.Module | None) -> ModelState:
        count = self._names[label]
        self._names[label] += 1
        state = ModelState(label if count == 0 else f"{label}#{count}", module)
        self._models.append(state)
        return state

    def anonymous(self, label: str) -> ModelState:
        """A state for a compiled function that no module owns (one per compiled graph)."""
        with self._lock:
            return self._new_state(label, None)

    def state_of(self, module: torch.nn.Module) -> ModelState:
        """The state of `module` as a compiled model, created on first use. When the model is garbage collected its
        cached plans (device memory) go with it; its report records stay until `reset_report()`."""
        with self._lock:
            state = self._states.get(module)
            if state is None:
                state = self._states[module] = self._new_state(type(module).__name__, module)
                weakref.finalize(module, state.plan_cache.clear)
            return state

    def resolve(self, parameter: torch.Tensor | None, frame: FrameType | None = None) -> Owner | None:
        """The owner of a graph call whose inputs include `parameter` (None: the graph has no parameter input, so the
        innermost module being called owns it), found on the stack above `frame` (the caller's frame by default).
        None when no module on the stack holds the parameter. The callers cache the answer per graph: one parameter
        may be an input of a graph of the whole model and of a graph of one of its blocks."""
        calls = list(_module_calls(frame if frame is not None else sys._getframe(1)))
        index = next(
            (
                i
                for i, call in enumerate(calls)
                if parameter is None or any(p is parameter for p in call.module.parameters())
            ),
            None,
        )
        if index is None:
            return None
        compiled = _unwrap(calls[index].module)
        outer = [c for c in calls[index + 1 :] if _unwrap(c.module) is not compiled]
        # A block of the innermost enclosing module that takes a timestep (the denoiser). Without one: a model of its
        # own if it takes the timestep itself, else a block of the module that calls it (whose calls count steps).
        root = next((c for c in outer if _takes_timestep(c.module)), None)
        if root is None and outer and not _takes_timestep(compiled):
            root = outer[0]
        with self._lock:
            if root is not None:
                block = next((name for name, m in root.module.named_modules() if m is compiled), None)
                if block:
                    owner = Owner(self.state_of(root.module), block)
                    self._hook(owner.state, root)
                    return owner
            return Owner(self.state_of(compiled))

    # ------------------------------------------------------------------------------------------------------------
    # The forward hook of models with compiled blocks
    # ------------------------------------------------------------------------------------------------------------

    def _hook(self, state: ModelState, call: _ModuleCall) -> None:
        if state.hooked:
            return
        state.hooked = True
        model = call.module
        state_ref = weakref.ref(state)

        @_hook_safe
        def before_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            current = state_ref()
            if current is not None and _ACTIVE.get() in (None, self):
                check_nothing_sparse(current)
                current.forward = forward_context(current, module, args, kwargs)

        @_hook_safe
        def after_forward(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            current = state_ref()
            if current is not None and _ACTIVE.get() in (None, self):
                current.forward = None

        self._hooks.append(model.register_forward_pre_hook(before_forward, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(after_forward, with_kwargs=True, always_call=True))
        # This forward passed the (absent) hook already: its context comes from its call's arguments. If a graph of
        # the whole model advanced the steps in this forward (a whole-model compile whose graph breaks leave blocks
        # to compile on their own), its step stands and only the grid is added.
        if state.leader is not None and state.forward is not None:
            grid, note = latent_grid(model, _bind(model, call.args, call.kwargs))
            state.forward = dataclasses.replace(state.forward, video_grid=grid, grid_note=note)
        else:
            state.forward = forward_context(state, model, call.args, call.kwargs)


# While set (by `explain`), only this registry's hooks act: explaining a model does not advance its real steps.
_ACTIVE: contextvars.ContextVar[ModelRegistry | None] = contextvars.ContextVar("spattn_compile_registry", default=None)


@contextlib.contextmanager
def only(registry: ModelRegistry) -> Iterator[None]:
    """Inside the block, the forward hooks of other registries do nothing."""
    token = _ACTIVE.set(registry)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def forward_context(state: ModelState, model: torch.nn.Module, args: tuple, kwargs: dict) -> StepContext:
    """Advance `state`'s step tracker for a forward of `model` with these arguments, and record its latent grid."""
    arguments = _bind(model, args, kwargs)
    context = state.tracker.advance(arguments.get("timestep"))
    grid, note = latent_grid(model, arguments)
    return dataclasses.replace(context, video_grid=grid, grid_note=note)


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


def note_decisions(state: ModelState, decisions: list) -> None:
    """Add the pass's decisions for one compiled graph of the model to its tally (for `check_nothing_sparse`)."""
    with state.lock:
        state.graphs += 1
        state.sparse_calls += sum(1 for d in decisions if d.sparse)
        state.rules.update(d.rule for d in decisions if not d.sparse)


def nothing_sparse_message(state: ModelState) -> str:
    """The warning for a model none of whose attention calls became sparse: the commonest reason and its fix."""
    if state.rules:
        rule, count = state.rules.most_common(1)[0]
        total = sum(state.rules.values())
        reason = f"{count} of its {total} attention calls stay dense for the reason {rule!r}"
    elif type(getattr(state.module, "_cache_config", None)).__name__ == "MagCacheConfig":
        # MagCache's hooks are torch.compiler.disable'd: every block runs eagerly, out of the compiled graphs.
        rule, reason = "mag_cache", "diffusers' MagCache runs its transformer blocks outside torch.compile"
    else:
        rule, reason = "", "its compiled graphs hold no scaled_dot_product_attention call"
    return (
        f"spattn: no attention call of {state.name} became sparse: {reason}. Fix: {_FIXES.get(rule, _FIXES[''])}. "
        "spattn_compile.explain(model, ...) shows every call's decision."
    )


def check_nothing_sparse(state: ModelState) -> None:
    """Log one WARNING (once per model) when the model has run, was compiled, and nothing in it became sparse."""
    with state.lock:
        if state.warned or state.graphs == 0 or state.sparse_calls:
            return
        state.warned = True
    logger.warning(nothing_sparse_message(state))


class _DefaultRegistry:
    def __init__(self) -> None:
        self.registry = ModelRegistry()


_DEFAULT = _DefaultRegistry()


def default_registry() -> ModelRegistry:
    """The registry of the `spattn` backend (`report()` and `reset_schedule()` act on it)."""
    return _DEFAULT.registry
