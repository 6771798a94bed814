"""Context managers that change global state during a capture and always restore it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributions import Distribution
from torch.overrides import TorchFunctionMode


@contextlib.contextmanager
def preserved_modules(model: nn.Module) -> Iterator[None]:
    """Restore every module's training flag and hook dictionaries after the block."""
    modules = list(model.modules())
    training = [m.training for m in modules]
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
