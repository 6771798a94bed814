"""``wrap(model, example_batch, ...)``: the two-line library API for impartial training."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from blockfinder.analyze import analyze
from blockfinder.context import ModuleStack, OpRecorder
from blockfinder.errors import BlockfinderError
from blockfinder.losses import LossesFn, call_losses, check_losses, default_losses
from blockfinder.report import BlockReport
from impartial_train.engine.graph import GraphEngine, GraphProgram, GraphUnavailable
from impartial_train.engine.hooks import (
    HookEngine,
    SurgeryPoint,
    plan_surgery,
    point_keys,
    point_label,
    stream_losses,
)
from impartial_train.engine.stats import PointStats
from impartial_train.methods import Aggregator, build

ENGINES = ("auto", "hook", "graph")
# A program re-traced this often for one input structure (a guarded value changes every step)
# is given up for the hook engine under engine="auto".
MAX_RETRACES = 3
# Programs kept per input structure (one per combination of the modules' train/eval modes).
MAX_PROGRAMS = 4
MAX_NOTES = 100  # engine_notes keeps the latest lines


def input_signature(batch: Any) -> tuple:
    """Structure, shapes and dtypes of a batch: a new signature re-captures once."""
    leaves, spec = _flatten(batch)
    return _signature(leaves, _structure(leaves, spec))


def _flatten(batch: Any) -> tuple[list[Any], Any]:
    """The batch's leaves (in pytree order) and a hashable key of its layout.

    A tensor, a dict of tensors and a tuple or list of tensors (what nearly every training loop
    passes) are read directly: pytree's general flattening and the string of its spec cost tens of
    microseconds on every step. Anything else goes through pytree.
    """
    kind = type(batch)
    if kind is torch.Tensor:
        return [batch], kind
    if kind is dict:
        values = list(batch.values())
        if all(type(v) is torch.Tensor for v in values):
            return values, (kind, tuple(batch))
    elif (kind is tuple or kind is list) and all(type(v) is torch.Tensor for v in batch):
        return list(batch), (kind, len(batch))
    leaves, spec = tree_flatten(batch)
    return leaves, str(spec)


def _signature(leaves: list[Any], structure: tuple) -> tuple:
    """The structure and the tensors' shapes."""
    return (structure, tuple([leaf.shape for leaf in leaves if isinstance(leaf, torch.Tensor)]))


def _structure(leaves: list[Any], spec: Any) -> tuple:
    """What a traced program is specialised on: structure, dtypes, devices and non-tensor leaves
    (traced as constants), not shapes."""
    parts: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((leaf.dtype, leaf.device, leaf.requires_grad))
        else:
            try:
                hash(leaf)
                parts.append(("constant", type(leaf), leaf))
            except TypeError:
                parts.append(("constant", type(leaf), id(leaf)))
    return (spec, tuple(parts))


class ImpartialModel:
    """A model whose backward pass applies multitask gradient surgery at its branch points.

    Call it like the model (``out = imodel(batch)`` returns the same mapping of losses); then
    ``sum(out.values()).backward()`` runs ONE backward pass in which, at every branch point, the
    gradients of the task streams are combined by ``method`` instead of summed (regularizer
    streams bypass it) and, with ``rescale``, scaled back to the norm of the plain sum.

    Parameters, buffers and ``state_dict()`` are the user's model's; in eval mode or under
    ``torch.no_grad()`` the call is the plain model. Method state (e.g. GradNorm's weights) is kept
    per branch point: ``method_parameters()``, ``methods_state_dict()``.

    ``engine``: ``"hook"`` applies the surgery with hooks on each step's autograd graph (any model
    that runs eagerly); ``"graph"`` traces the losses callable once per input structure and runs a
    rewritten ``torch.fx`` program whose branch points aggregate in backward (raises
    :class:`GraphUnavailable` where it cannot); ``"auto"`` uses the graph engine where it can be
    built and the hook engine otherwise. ``engine_notes`` says which engine each input structure
    got and why; ``last_engine`` which engine ran the last call. Both engines give the same
    gradients, method state and statistics, except for GradDrop: only the graph engine has the
    forward value at a branch point, so under the hook engine (and on the first step of each
    input structure, which plans through hooks) GradDrop runs with sign(activation) = 1.
    """

    def __init__(
        self,
        model: nn.Module,
        example_batch: Any = None,
        losses: LossesFn | None = None,
        method: str | Aggregator = "pcgrad",
        regularizers: Iterable[str] = ("kl",),
        rescale: bool = True,
        engine: str = "auto",
        method_args: Mapping[str, Any] | None = None,
        gramian_hook=None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise BlockfinderError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        self.module = model
        self.losses_fn = losses or default_losses
        self.method_spec = method
        self.method_args = dict(method_args or {})
        build(method, **self.method_args)  # fail early on a bad name or argument
        self.regularizers = tuple(regularizers)
        self.rescale = rescale
        self.engine_mode = engine
        self.engine = HookEngine(rescale=rescale, gramian_hook=gramian_hook)
        self.graph_engine = GraphEngine()
        self._programs: dict[tuple, list[GraphProgram] | str] = {}
        self._retraces: dict[tuple, int] = {}
        self._structure_indices: dict[tuple, int] = {}
        self.engine_notes: list[str] = []
        self.last_engine: str | None = None
        self._methods: dict[tuple, Aggregator] = {}
        # loaded method states whose branch point has not been seen yet (restored when it is)
        self._pending_state: dict[str, Any] = {}
        self._labels: dict[tuple, str] = {}
        self._stats: dict[tuple, PointStats] = {}
        self._signatures: set[tuple] = set()
        self.report: BlockReport | None = None
        if example_batch is not None:
            self.report = analyze(model, example_batch, losses, regularizers)

    # -- the user's model, unchanged -------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.module.parameters(recurse)

    def named_parameters(self, *args, **kwargs):
        return self.module.named_parameters(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)

    def train(self, mode: bool = True) -> ImpartialModel:
        self.module.train(mode)
        return self

    def eval(self) -> ImpartialModel:
        self.module.eval()
        return self

    def to(self, *args, **kwargs) -> ImpartialModel:
        self.module.to(*args, **kwargs)
        for method in self._methods.values():
            method.to(*args, **kwargs)
        return self

    # -- methods ---------------------------------------------------------------------------
    @property
    def is_vanilla(self) -> bool:
        return isinstance(self.method_spec, str) and self.method_spec == "sum"

    def method_parameters(self) -> Iterator[nn.Parameter]:
        """Learnable parameters of the methods (e.g. GradNorm's weights), apart from the model's."""
        for method in self._methods.values():
            yield from method.parameters()

    def methods_state_dict(self) -> dict[str, Any]:
        """Method state per branch point, including loaded states not yet restored."""
        built = {self._key_name(k): m.state_dict() for k, m in self._methods.items()}
        return {**self._pending_state, **built}

    def load_methods_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pending_state = dict(state)
        for key, method in self._methods.items():
            name = self._key_name(key)
            if name in self._pending_state:
                method.load_state_dict(self._pending_state.pop(name))

    def last_stats(self) -> dict[str, dict[str, Any]]:
        """Per branch point: stream norms, cosine matrix and weights used in the last backward."""
        return {self._labels.get(k, str(k)): s.to_dict() for k, s in self._stats.items()}

    @staticmethod
    def _key_name(key: tuple) -> str:
        node_type, index, streams, rank = key
        return f"{node_type}:{index}:{'|'.join('+'.join(s) for s in streams)}:{rank}"

    # -- the step --------------------------------------------------------------------------
    def __call__(self, batch: Any) -> Mapping[str, torch.Tensor]:
        if not self.module.training or not torch.is_grad_enabled():
            self.last_engine = "plain"
            return self.losses_fn(self.module, batch)
        leaves, spec = _flatten(batch)
        structure = _structure(leaves, spec)
        signature = _signature(leaves, structure)
        if not self.is_vanilla and self.engine_mode != "hook":
            losses = self._graph_step(batch, leaves, structure, signature)
            if losses is not None:
                return losses
        self.last_engine = "plain" if self.is_vanilla else "hook"
        origin: dict[Any, tuple[str, str]] = {}
        if signature not in self._signatures:
            modules = ModuleStack(self.module)
            recorder = OpRecorder(modules)
            with modules, recorder:
                losses = call_losses(self.losses_fn, self.module, batch)
            origin = recorder.origin
            self._signatures.add(signature)
        else:
            losses = self.losses_fn(self.module, batch)
        if self.is_vanilla:
            return losses
        self._install(losses, origin)
        return losses

    # -- the graph engine -----------------------------------------------------------------
    def _graph_step(
        self, batch: Any, leaves: list[Any], key: tuple, signature: tuple
    ) -> Mapping[str, torch.Tensor] | None:
        """Run the step with the graph engine (``key``: the batch's structure); None: use the hook
        engine for it."""
        programs = self._programs.get(key)
        if isinstance(programs, str):
            return None  # refused for this structure (engine="auto" only)
        programs = programs or []
        for program in programs:
            if not program.guards.mode_matches():
                continue  # another program serves this combination of train/eval modes
            stale = program.guards.changed()
            if stale is None:
                return self._run_program(program, batch, leaves, signature)
            programs.remove(program)
            count = self._retraces[key] = self._retraces.get(key, 0) + 1
            self._note(f"structure {self._structure_index(key)}: re-traced, {stale}")
            if count >= MAX_RETRACES and self.engine_mode == "auto":
                return self._refuse(key, f"re-traced {count} times ({stale})")
            break
        if type(self.engine) is not HookEngine:
            reason = (
                f"a custom hook engine ({type(self.engine).__name__}, e.g. for distributed "
                "training) is installed; the graph engine does not support it"
            )
            if self.engine_mode == "graph":
                raise GraphUnavailable(f"graph engine unavailable: {reason}; use engine='hook'")
            return self._refuse(key, reason)
        try:
            planned = self.graph_engine.build(self.module, self.losses_fn, batch, self.regularizers)
        except GraphUnavailable as exc:
            if self.engine_mode == "graph":
                raise GraphUnavailable(
                    f"graph engine unavailable for this input structure: {exc}; use "
                    "engine='hook' (or 'auto' to fall back to it)"
                ) from exc
            return self._refuse(key, str(exc))
        self._signatures.add(signature)
        losses = planned.losses
        entries = self._install(losses, planned.origin, planned.points)
        self.last_engine = "graph"
        if planned.program is None:
            if self.engine_mode == "graph":
                raise GraphUnavailable(
                    f"graph engine unavailable for this input structure: {planned.reason}; use "
                    "engine='hook' (or 'auto' to fall back to it)"
                )
            self.last_engine = "hook"
            self._refuse(key, planned.reason or "unknown")
            return losses
        planned.program.bind(*entries)
        self._programs[key] = [*programs[-(MAX_PROGRAMS - 1) :], planned.program]
        self._note(
            f"structure {self._structure_index(key)}: graph engine ({planned.program.describe()})"
        )
        return losses

    def _run_program(
        self, program: GraphProgram, batch: Any, leaves: list[Any], signature: tuple
    ) -> Mapping[str, torch.Tensor]:
        if program.module is None:  # no branch point: the model itself
            losses = self.losses_fn(self.module, batch)
        else:
            tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
            losses = self.graph_engine.run(
                program, tensors, self.engine.rescale, self.engine.gramian_hook
            )
        if signature not in self._signatures:
            check_losses(losses)
            self._signatures.add(signature)
        self.last_engine = "graph"
        return losses

    def _refuse(self, key: tuple, reason: str) -> None:
        self._programs[key] = reason
        self._note(
            f"structure {self._structure_index(key)}: hook engine (graph engine unavailable: "
            f"{reason})"
        )
        return None

    def _note(self, line: str) -> None:
        self.engine_notes.append(line)
        del self.engine_notes[:-MAX_NOTES]

    def _structure_index(self, key: tuple) -> int:
        return self._structure_indices.setdefault(key, len(self._structure_indices) + 1)

    def _install(
        self,
        losses: Mapping[str, torch.Tensor],
        origin: Mapping[Any, Any],
        points: list[SurgeryPoint] | None = None,
    ) -> tuple[list[Aggregator], list[PointStats], list[torch.Tensor | None]]:
        """Plan (unless ``points`` are given) and install the hook engine on this step's graph.
        Returns each point's method, statistics and loss mask (streams x losses; None where the
        method does not read the losses)."""
        names = list(losses)
        if points is None:
            tasks = [n for n in names if n not in self.regularizers]
            trainable = {id(p) for p in self.module.parameters() if p.requires_grad}
            points = plan_surgery(losses, tasks, trainable)
        if not points:
            return [], [], []
        methods, stats, masks_of = [], [], []
        for point, key in zip(points, point_keys(points, names)):
            streams = key[2]
            if key not in self._methods:
                method = build(self.method_spec, **self.method_args)
                if method is self.method_spec:
                    # an instance given by the user: each branch point gets its own copy, so
                    # that state (GradVac targets, GradNorm weights) is per branch point
                    method = copy.deepcopy(method)
                if self._key_name(key) in self._pending_state:
                    method.load_state_dict(self._pending_state.pop(self._key_name(key)))
                self._methods[key] = method
            if key not in self._labels:
                self._labels[key] = f"bp{len(self._labels)}:{point_label(point, origin)}"
            stat = self._stats.get(key)
            if stat is None:
                stat = PointStats(where=self._labels[key], streams=[list(s) for s in streams])
                self._stats[key] = stat
            method = self._methods[key]
            methods.append(method)
            stats.append(stat)
            # only methods that read them get the stream losses
            masks_of.append(
                torch.tensor(
                    [[b >> i & 1 for i in range(len(names))] for b in point.streams],
                    dtype=losses[names[0]].dtype,
                    device=losses[names[0]].device,
                )
                if getattr(method, "uses_losses", True)
                else None
            )
        losses_of = stream_losses(losses, names, masks_of)
        self.engine.install(points, methods, stats, losses_of)
        return methods, stats, masks_of


def wrap(
    model: nn.Module,
    example_batch: Any = None,
    losses: LossesFn | None = None,
    method: str | Aggregator = "pcgrad",
    regularizers: Iterable[str] = ("kl",),
    rescale: bool = True,
    **kwargs: Any,
) -> ImpartialModel:
    """Wrap ``model`` for impartial training; see :class:`ImpartialModel`.

    >>> imodel = wrap(model, example_batch, losses=compute_losses, method="imtl-g")
    >>> out = imodel(batch); sum(out.values()).backward(); optimizer.step()
    """
    return ImpartialModel(model, example_batch, losses, method, regularizers, rescale, **kwargs)


__all__ = ["GraphUnavailable", "ImpartialModel", "SurgeryPoint", "input_signature", "wrap"]
