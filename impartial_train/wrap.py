"""``wrap(model, example_batch, ...)``: the two-line library API for impartial training."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from blockfinder.analyze import analyze, short_reason
from blockfinder.context import ModuleStack, OpRecorder, run_without_grad
from blockfinder.errors import BlockfinderError
from blockfinder.losses import LossesFn, call_losses, check_losses, default_losses
from blockfinder.report import BlockReport
from impartial_train.engine.check import (
    SurgeryCheckError,
    compare,
    likely_cause,
    parameter_gradients,
)
from impartial_train.engine.graph import GraphEngine, GraphProgram, GraphUnavailable
from impartial_train.engine.hooks import (
    IDENTITY,
    OFF,
    ON,
    HookEngine,
    Installed,
    SurgeryPoint,
    plan_surgery,
    point_keys,
    point_label,
    stream_losses,
)
from impartial_train.engine.snapshot import Snapshot
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
    forward value at a branch point, so under the hook engine GradDrop runs with
    sign(activation) = 1.

    ``verify`` (default on): on the first step of each input structure (and of each newly built
    program) the engine checks itself against plain backward: surgery with the identity
    combination (the streams summed through the engine's own machinery) must give the plain
    parameter gradients. Under ``"auto"`` a graph engine that fails falls back to the hook
    engine (checked in turn); an engine that fails with no other to take over raises
    :class:`SurgeryCheckError` naming the branch point and a likely cause. The check costs two
    extra backward passes on the step's own graph (the graph engine also runs the eager model
    once), once per structure; ``engine_notes`` gives its outcome and time. User backward hooks
    run during the check too.
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
        verify: bool = True,
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
        self.verify = verify
        self._checked: set[tuple] = set()  # structures whose hook-engine step was checked
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
        if not torch.is_grad_enabled():
            self.last_engine = "plain"
            return run_without_grad(self.losses_fn, self.module, batch)
        if not self.module.training:
            self.last_engine = "plain"
            return self.losses_fn(self.module, batch)
        leaves, spec = _flatten(batch)
        structure = _structure(leaves, spec)
        signature = _signature(leaves, structure)
        if not self.is_vanilla and self.engine_mode != "hook":
            losses = self._graph_step(batch, leaves, structure, signature)
            if losses is not None:
                return losses
        return self._hook_step(batch, structure, signature)

    # -- the hook engine ------------------------------------------------------------------
    def _hook_step(self, batch: Any, key: tuple, signature: tuple) -> Mapping[str, torch.Tensor]:
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
        names = list(losses)
        tasks = [n for n in names if n not in self.regularizers]
        trainable = {id(p) for p in self.module.parameters() if p.requires_grad}
        points = plan_surgery(losses, tasks, trainable)
        first = key not in self._checked
        self._checked.add(key)
        if points:
            methods, stats, masks = self._bind(points, names, origin, losses)
            installed = self.engine.install(
                points, methods, stats, stream_losses(losses, names, masks), losses.values()
            )
        if first:
            refused = self._programs.get(key)
            why = (
                "engine='hook'"
                if self.engine_mode == "hook"
                else f"graph engine unavailable: {refused}"
            )
            line = f"structure {self._structure_index(key)}: hook engine ({why})"
            if not points:
                line += "; no branch point"
            elif self.verify:
                line += f"; {self._check_hooks(key, losses, points, installed)}"
            else:
                line += "; self-check off"
            self._note(line)
        return losses

    def _check_hooks(
        self,
        key: tuple,
        losses: Mapping[str, torch.Tensor],
        points: list[SurgeryPoint],
        installed: Installed,
    ) -> str:
        """The hook engine's self-check on this step's own graph (see engine/check.py); returns
        its outcome for the notes, raises :class:`SurgeryCheckError` on a mismatch."""
        start = time.perf_counter()
        names, params = self._trainable()
        try:
            installed.set_mode(OFF)
            plain = parameter_gradients(losses, params)
            installed.set_mode(IDENTITY)
            result = compare(names, plain, parameter_gradients(losses, params))
        except RuntimeError as exc:
            return f"self-check could not run ({short_reason(exc)}): unchecked"
        finally:
            installed.set_mode(ON)
        result.seconds = time.perf_counter() - start
        index = self._structure_index(key)
        if result.passed:
            return result.describe()
        where = self._culprit(losses, params, names, plain, points, installed)
        graph = self._programs.get(key)
        other = (
            "; the graph engine was not tried (engine='hook')"
            if self.engine_mode == "hook"
            else f"; the graph engine cannot take over ({graph})"
        )
        raise SurgeryCheckError(
            f"surgery self-check failed on input structure {index}: under the hook engine, "
            f"{where}, the {result.describe()}{other}; please report the model "
            "(verify=False / --no-verify skips this check)"
        )

    def _culprit(self, losses, params, names, plain, points, installed) -> str:
        """The first branch point whose identity combination alone changes the gradients, and a
        likely cause."""
        try:
            for position, point in enumerate(points):
                installed.set_mode(IDENTITY, only=position)
                if not compare(names, plain, parameter_gradients(losses, params)).passed:
                    label = self._labels[point_keys(points, list(losses))[position]]
                    return f"at branch point {label} (likely cause: {likely_cause(point)})"
        finally:
            installed.set_mode(ON)
        return "where several branch points act together"

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
                return self._run_program(program, batch, leaves, signature, key)
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
        program = planned.program
        if program is None:
            if self.engine_mode == "graph":
                raise GraphUnavailable(
                    f"graph engine unavailable for this input structure: {planned.reason}; use "
                    "engine='hook' (or 'auto' to fall back to it)"
                )
            return self._refuse(key, planned.reason or "unknown")
        if program.module is not None:
            names = list(planned.losses)
            program.bind(*self._bind(planned.points, names, planned.origin, planned.losses))
        del planned
        self._programs[key] = [*programs[-(MAX_PROGRAMS - 1) :], program]
        if program.module is None or not self.verify:
            checked = "self-check off" if program.module is not None else "nothing to check"
            self._note(
                f"structure {self._structure_index(key)}: graph engine ({program.describe()}); "
                + checked
            )
        return self._run_program(program, batch, leaves, signature, key)

    def _run_program(
        self, program: GraphProgram, batch: Any, leaves: list[Any], signature: tuple, key: tuple
    ) -> Mapping[str, torch.Tensor] | None:
        if program.module is None:  # no branch point: the model itself
            losses = self.losses_fn(self.module, batch)
        else:
            tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
            if self.verify and not program.checked:
                checked = self._check_program(program, batch, tensors, key)
                if checked is None:
                    return None
                losses = checked
            else:
                losses, _ = self.graph_engine.run(
                    program, tensors, self.engine.rescale, self.engine.gramian_hook
                )
        if signature not in self._signatures:
            check_losses(losses)
            self._signatures.add(signature)
        self.last_engine = "graph"
        return losses

    def _check_program(
        self, program: GraphProgram, batch: Any, tensors: list[torch.Tensor], key: tuple
    ) -> Mapping[str, torch.Tensor] | None:
        """The graph engine's self-check: the eager model's plain backward against the program's
        identity combination, on the same random numbers and buffers. Returns the program's
        losses (this step's forward) or None when the hook engine must take over."""
        start = time.perf_counter()
        names, params = self._trainable()
        snapshot = Snapshot(self.module)
        eager = self.losses_fn(self.module, batch)
        plain = parameter_gradients(eager, params)
        eager_values = {k: v.detach() for k, v in eager.items()}
        del eager
        snapshot.restore()
        losses, step = self.graph_engine.run(
            program, tensors, self.engine.rescale, self.engine.gramian_hook, mode=IDENTITY
        )
        try:
            got = parameter_gradients(losses, params)
        finally:
            step.mode = ON
        result = compare(names, plain, got)
        result.seconds = time.perf_counter() - start
        program.checked = True
        index = self._structure_index(key)
        if result.passed:
            self._note(
                f"structure {index}: graph engine ({program.describe()}); {result.describe()}"
            )
            return losses
        same = all(
            k in losses and torch.allclose(v, losses[k].detach(), rtol=1e-5, atol=1e-7)
            for k, v in eager_values.items()
        )
        cause = (
            "the traced program records other gradient paths than the model, e.g. "
            "requires_grad_ toggled, a hook or an in-place change inside forward"
            if same
            else "the traced program computes other losses than the model: it froze a value "
            "or a branch of Python control flow"
        )
        reason = f"its self-check failed: the {result.describe()}; likely cause: {cause}"
        if self.engine_mode == "graph":
            raise SurgeryCheckError(
                f"surgery self-check failed on input structure {index}: under the graph engine, "
                f"the {result.describe()} (likely cause: {cause}); use engine='hook' or 'auto'"
            )
        del losses
        snapshot.restore()
        self._refuse(key, reason)
        return None

    def _refuse(self, key: tuple, reason: str) -> None:
        """The graph engine gives this structure up (the hook engine's first step notes why)."""
        self._programs[key] = reason
        self._checked.discard(key)
        return None

    def _note(self, line: str) -> None:
        self.engine_notes.append(line)
        del self.engine_notes[:-MAX_NOTES]

    def _structure_index(self, key: tuple) -> int:
        return self._structure_indices.setdefault(key, len(self._structure_indices) + 1)

    def _trainable(self) -> tuple[list[str], list[nn.Parameter]]:
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        return [n for n, _ in named], [p for _, p in named]

    def _bind(
        self,
        points: list[SurgeryPoint],
        names: list[str],
        origin: Mapping[Any, Any],
        losses: Mapping[str, torch.Tensor],
    ) -> tuple[list[Aggregator], list[PointStats], list[torch.Tensor | None]]:
        """Each point's method (built at its first sight), statistics and loss mask (streams x
        losses; None where the method does not read the losses)."""
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


__all__ = [
    "GraphUnavailable",
    "ImpartialModel",
    "SurgeryCheckError",
    "SurgeryPoint",
    "input_signature",
    "wrap",
]
