"""Context managers that change global state during a capture and always restore it."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.distributions import Distribution
from torch.overrides import TorchFunctionMode


@contextlib.contextmanager
def preserved_modules(model: nn.Module) -> Iterator[None]:
    """Restore every module's training flag and hook dictionaries, and every parameter's
    ``requires_grad`` (a forward that freezes parameters may stop before unfreezing them), after
    the block."""
    modules = list(model.modules())
    training = [m.training for m in modules]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    hook_attrs = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
    )
    hooks = [{a: dict(getattr(m, a, {})) for a in hook_attrs if hasattr(m, a)} for m in modules]
    grad_enabled = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch._C._set_grad_enabled(grad_enabled)
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, flag, saved in zip(modules, training, hooks):
            module.training = flag
            for attr, value in saved.items():
                current = getattr(module, attr)
                if current.keys() != value.keys():
                    current.clear()
                    current.update(value)


@contextlib.contextmanager
def distribution_validation_off() -> Iterator[None]:
    """Switch off distribution argument validation (it calls ``.item()``); restore it after."""
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(previous)


class ModuleStack:
    """Keeps the dotted path of the module whose forward is running, via per-module hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stack: list[str] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else ""

    def __enter__(self) -> ModuleStack:
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            # always_call: pop the stack even when the forward raises
            self._handles.append(module.register_forward_hook(self._post_hook, always_call=True))
        return self

    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: object) -> None:
            self.stack.append(name)

        return hook

    def _post_hook(self, module: nn.Module, args: object, output: object) -> None:
        if self.stack:
            self.stack.pop()

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.stack.clear()


class OpRecorder(TorchFunctionMode):
    """Records, for every autograd node created, the torch function and the module that made it."""

    def __init__(self, modules: ModuleStack) -> None:
        super().__init__()
        self.modules = modules
        self.origin: dict[object, tuple[str, str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._record(out, func)
        return out

    def _record(self, out: object, func: object) -> None:
        if isinstance(out, torch.Tensor):
            node = out.grad_fn
            if node is not None and node not in self.origin:
                self.origin[node] = (_function_name(func), self.modules.current)
        elif isinstance(out, (tuple, list)):
            for item in out:
                if isinstance(item, torch.Tensor):
                    self._record(item, func)


def _function_name(func: object) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # properties such as Tensor.T
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name.strip("_") or name


class HooksWithoutGrad(TorchFunctionMode):
    """``register_hook`` and ``retain_grad`` on a tensor that does not require grad do nothing
    (no backward could ever call them) instead of raising, as they do under ``no_grad``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOOK_REGISTRATIONS and args and not args[0].requires_grad:
            return _NoHandle() if func is torch.Tensor.register_hook else None
        return func(*args, **(kwargs or {}))


class _NoHandle:
    """What ``register_hook`` returns for a hook that was never registered."""

    def remove(self) -> None:
        pass


_HOOK_REGISTRATIONS = (torch.Tensor.register_hook, torch.Tensor.retain_grad)
_HOOK_ERRORS = ("cannot register a hook on a tensor that doesn't require gradient", "retain_grad")
# models seen registering hooks unconditionally: they run under HooksWithoutGrad from then on
_UNCONDITIONAL_HOOKS: weakref.WeakSet = weakref.WeakSet()
T = TypeVar("T")


def run_without_grad(fn: Callable[..., T], model: Any, *args: Any) -> T:
    """``fn(model, *args)`` under ``torch.no_grad()`` (validation, evaluation, probes).

    Research code often registers tensor hooks whatever the grad mode (MultiVae's DReG
    objectives), which PyTorch refuses under ``no_grad``; such a model runs again with those
    registrations ignored (:class:`HooksWithoutGrad`), and is remembered so that later calls go
    straight there. Other models pay nothing."""
    with torch.no_grad():
        if model in _UNCONDITIONAL_HOOKS:
            with HooksWithoutGrad():
                return fn(model, *args)
        try:
            return fn(model, *args)
        except Exception as exc:  # (a wrapper may have turned it into a one-line user error)
            if not _refused_hook(exc):
                raise
        _UNCONDITIONAL_HOOKS.add(model)
        with HooksWithoutGrad():
            return fn(model, *args)


def _refused_hook(exc: BaseException | None) -> bool:
    """``exc``, or an exception it was raised from, is PyTorch refusing a hook under no_grad."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, RuntimeError) and any(text in str(exc) for text in _HOOK_ERRORS):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
