"""The binding of compiled graphs to their models: which model, and which block of it, a graph call belongs to, and the
forward hook that tells the model's graphs which step runs.

**What a backend knows.** Dynamo hands a backend a graph and its example inputs, not the module they come from. It
can know, at compile time: the real parameter tensors among the example inputs (Dynamo lifts a module's parameters
into graph inputs, so that one compiled graph serves every instance of a module class: the two experts of Wan 2.2
A14B, every block of a model compiled with `compile_repeated_blocks`), and each input's source
(`L['self']._modules['blocks']._modules['0']._parameters['weight']`: a parameter's path from the compiled frame's
`self`, but not `self`). It cannot know the module being compiled, nor, for a block compiled on its own (regional
compilation), the model that calls it. Those are found on the Python call stack: `calling_modules`, the one function
of the package that reads frames, lists the modules being called (the `nn.Module._call_impl` frames: their module and
arguments, also when Dynamo runs them as compiled code).

**Binding, when a graph is compiled.** `ModelRegistry.bind(example_inputs)` places the graph: the innermost module
being called that holds the graph's parameter is the compiled one; it is a block of the innermost enclosing module
whose `forward` takes a `timestep` (the denoiser), if there is one; else a model of its own when it takes the
timestep itself or nothing calls it, and otherwise a block of the module that calls it. It registers the model's
`ModelState` (one per model), puts the forward hook on the model, and returns the graph's `Binding`: a table from the
parameters of the model (for a block graph, of every block of its class in the model) to their `Owner`, so that at
run time a call finds its owner from the identity of its parameter input, with no stack to read. Only a parameter
outside the table (another instance of the model class running the same compiled graph) is placed at run time, the
same way, once. A graph without a module (a compiled function) gets a state of its own, which its graph advances.

**The forward hook.** Once per forward of the model it advances the model's step tracker from the `timestep`
argument and reads the latent grid from the model's inputs (`families.latent_grid`, checked dim by dim against the
grid the model's 3-D patch embedding makes of the latent, `families.patch_convolutions`); the model's graphs run in
that context. The forward that compiles the first graph has already passed the (absent) hook: its context comes from its
call's arguments, read at binding. The hooks are removed by `reset_schedule()` (and `ModelRegistry.clear()`). Under
context parallelism (diffusers' Ulysses attention) the hook runs before diffusers' hooks split the sequence, so it
reads the full latent: the grid of the whole sequence that every rank's attention sees after the all-to-all.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import numbers
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..config import current_config
from ..families import latent_grid, patch_convolutions
from .model_state import ModelState, StepContext
from .plan_cache import plan_cache_limit

__all__ = [
    "Binding",
    "ModelRegistry",
    "Owner",
    "calling_modules",
    "default_registry",
    "forward_arguments",
    "only",
    "reset_schedule",
    "set_plan_cache_limit",
]


@dataclasses.dataclass(frozen=True)
class Owner:
    """Where a graph call belongs: the model's state, and the module path of the compiled block in the model ("" for
    a graph of the whole model)."""

    state: ModelState
    block: str = ""


@dataclasses.dataclass(frozen=True)
class ModuleCall:
    """A module being called, with its call's arguments."""

    module: torch.nn.Module
    args: tuple
    kwargs: dict


def calling_modules() -> list[ModuleCall]:
    """The modules being called on the Python stack, innermost first: the frames of `nn.Module._call_impl` (also when
    Dynamo runs them as compiled code, which keeps the name and the locals).

    The one place the package reads frames (module docstring): a backend is not told which module it compiles, nor
    which model calls a block compiled on its own."""
    calls = []
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_call_impl":
            local = frame.f_locals
            module = local.get("self")
            if isinstance(module, torch.nn.Module):
                calls.append(ModuleCall(module, tuple(local.get("args", ())), dict(local.get("kwargs", {}))))
        frame = frame.f_back
    return calls


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


def forward_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A forward's arguments by name (positional ones bound to their names, a `**kwargs` parameter's entries merged
    in), or {} when they do not bind."""
    try:
        signature = inspect.signature(module.forward)
        arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return {}
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and isinstance(arguments.get(name), dict):
            arguments.update(arguments.pop(name))
    return arguments




def forward_context(state: ModelState, model: torch.nn.Module, args: tuple, kwargs: dict) -> StepContext:
    """Advance `state`'s step tracker for a forward of `model` with these arguments, and record its latent grid."""
    arguments = forward_arguments(model, args, kwargs)
    context = state.advance(arguments.get("timestep"))
    if state.convolutions is None:
        state.convolutions = patch_convolutions(model)
    grid, note = latent_grid(model, arguments, state.convolutions)
    return dataclasses.replace(context, video_grid=grid, grid_note=note)


def _hook_safe(function: Callable) -> Callable:
    # When Dynamo traces the model's forward (a whole-model compile), the hook must run as Python, not be traced.
    return torch._dynamo.disable(function, recursive=True)


class Binding:
    """One compiled graph's link to its models (module docstring): the owner of a call, from the identity of the
    parameter at `parameter_position` among its inputs (None: the graph has no parameter input, and the innermost
    module being called when it was bound owns it)."""

    def __init__(self, registry: ModelRegistry, parameter_position: int | None) -> None:
        self.registry = registry
        self.parameter_position = parameter_position
        self.owner: Owner | None = None
        # Parameter -> owner. Valid for one epoch of the registry (reset_schedule() forgets every model).
        self.owners: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.epoch = registry.epoch

    def owner_of(self, args: Sequence[object]) -> Owner:
        """The owner of a call of the graph with these inputs."""
        if self.epoch != self.registry.epoch:
            self.epoch = self.registry.epoch
            self.owners = WeakIdKeyDictionary()
            self.owner = None
        if self.parameter_position is None:
            if self.owner is None:
                self.owner = self.registry.place(None, self) or Owner(self.registry.anonymous("function"))
            return self.owner
        parameter = args[self.parameter_position]
        found = self.owners.get(parameter)
        if found is None:
            assert isinstance(parameter, torch.Tensor)
            found = self.registry.place(parameter, self) or self.owner or Owner(self.registry.anonymous("function"))
            self.owner = self.owner or found
            self.owners[parameter] = found
        return found


class ModelRegistry:
    """The `ModelState` of every compiled model and the hooks on them (module docstring). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._states: weakref.WeakKeyDictionary[torch.nn.Module, ModelState] = weakref.WeakKeyDictionary()
        self._models: list[ModelState] = []
        self._names: collections.Counter[str] = collections.Counter()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        # Bumped by clear(): the bindings' tables of an earlier epoch are stale.
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

    def bind(self, example_inputs: Sequence[object]) -> Binding:
        """Bind a graph being compiled to its model (module docstring)."""
        position = next((i for i, value in enumerate(example_inputs) if isinstance(value, torch.nn.Parameter)), None)
        binding = Binding(self, position)
        binding.owner_of(example_inputs)
        return binding

    def place(self, parameter: torch.Tensor | None, binding: Binding) -> Owner | None:
        """The owner of a call of `binding`'s graph whose inputs include `parameter` (None: the graph has no parameter
        input), from the modules being called (module docstring); None when no module being called holds it. The
        owners of the model's other parameters go into `binding`'s table."""
        calls = calling_modules()
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
                    state = self.state_of(root.module)
                    self._hook(state, root)
                    # Every block of the compiled one's class runs this graph (Dynamo shares it): their parameters
                    # name them at run time.
                    for name, module in root.module.named_modules():
                        if type(module) is type(compiled):
                            owner = Owner(state, name)
                            for owned in module.parameters():
                                binding.owners[owned] = owner
                    return Owner(state, block)
            whole = Owner(self.state_of(compiled))
            self._hook(whole.state, ModuleCall(compiled, calls[index].args, calls[index].kwargs))
            for owned in compiled.parameters():
                binding.owners[owned] = whole
            return whole

    def _hook(self, state: ModelState, call: ModuleCall) -> None:
        """Put the forward hook on the model of `call` (module docstring), and give the running forward its context."""
        if state.hooked:
            return
        state.hooked = True
        model = call.module
        state_ref = weakref.ref(state)

        @_hook_safe
        def before_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            current = state_ref()
            if current is not None and _ACTIVE.get() in (None, self):
                current.check_nothing_sparse(current_config().video_grid)
                current.forward = forward_context(current, module, args, kwargs)

        @_hook_safe
        def after_forward(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            current = state_ref()
            if current is not None and _ACTIVE.get() in (None, self):
                current.forward = None

        self._hooks.append(model.register_forward_pre_hook(before_forward, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(after_forward, with_kwargs=True, always_call=True))
        # This forward passed the (absent) hook already: its context comes from its call's arguments.
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


class _DefaultRegistry:
    def __init__(self) -> None:
        self.registry = ModelRegistry()


_DEFAULT = _DefaultRegistry()


def default_registry() -> ModelRegistry:
    """The registry of the `spattn` backend (`report()` and `reset_schedule()` act on it)."""
    return _DEFAULT.registry


def reset_schedule() -> None:
    """Forget every model's state (trackers, cached plans, layer numbering and report records) and remove the hooks
    the backend put on models (for tests, or after `torch._dynamo.reset()`)."""
    default_registry().clear()


def set_plan_cache_limit(max_bytes: int) -> None:
    """Cap the bytes of each compiled model's cached plans (default 8 GiB); least recently used plans are evicted
    beyond it."""
    if not isinstance(max_bytes, numbers.Integral) or isinstance(max_bytes, bool):
        raise TypeError(f"max_bytes must be an int >= 0, got {max_bytes!r} of type {type(max_bytes).__name__}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes}")
    max_bytes = int(max_bytes)
    plan_cache_limit().max_bytes = max_bytes
    for model in default_registry().models():
        model.plan_cache.set_limit(max_bytes)
