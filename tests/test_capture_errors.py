"""Bad inputs give blockfinder exceptions with one-line messages; failing captures fall back
without tracebacks; global state is the same afterwards whatever happened."""

from __future__ import annotations

import gc
import math

import pytest
import torch
import zoo
from torch import nn
from torch.autograd.function import Function
from torch.distributions import Distribution

import blockfinder
from blockfinder import BlockfinderError, LossError, ModelRunError
from blockfinder.analyze import run_analysis


def _state(model: nn.Module):
    return (
        Distribution._validate_args,
        torch.is_grad_enabled(),
        torch.get_num_threads(),
        gc.isenabled(),
        Function.__dict__["apply"],
        zoo.Normal,
        torch.distributions.Normal,
        [(dict(m._forward_hooks), dict(m._forward_pre_hooks), m.training) for m in model.modules()],
    )


def _raises(model, batch, losses, exc_type, match):
    before = _state(model)
    with pytest.raises(exc_type) as info:
        blockfinder.analyze(model, batch, losses)
    message = str(info.value)
    assert "\n" not in message and match in message
    assert _state(model) == before
    return message


def test_losses_callable_raising():
    def losses(model, batch):
        raise KeyError("image")

    model, batch, _ = zoo.make("mvae")
    message = _raises(model, batch, losses, ModelRunError, "computing the losses failed")
    assert "KeyError" in message and "test_capture_errors.py" in message


def test_losses_not_a_mapping():
    model, batch, _ = zoo.make("mvae")
    _raises(model, batch, lambda m, b: list(m(b).values()), LossError, "list, not a mapping")


def test_forward_returning_a_tensor():
    torch.manual_seed(0)
    message = _raises(zoo.ReturnsTensor(), torch.randn(4, 6), None, LossError, "Tensor")
    assert "not a mapping of named losses" in message


def test_non_scalar_loss():
    model, batch, _ = zoo.make("mvae")

    def losses(m, b):
        out = dict(m(b))
        out["image"] = out["image"] * torch.ones(3)
        return out

    _raises(model, batch, losses, LossError, "loss 'image' is not a scalar")


def test_non_finite_loss():
    model, batch, _ = zoo.make("mvae")

    def losses(m, b):
        out = dict(m(b))
        out["kl"] = out["kl"] * math.inf
        return out

    _raises(model, batch, losses, LossError, "loss 'kl' is not finite")


def test_complex_loss():
    model, batch, _ = zoo.make("mvae")

    def losses(m, b):
        out = dict(m(b))
        out["kl"] = torch.complex(out["kl"], out["kl"])
        return out

    _raises(model, batch, losses, LossError, "loss 'kl' has dtype torch.complex64")


def test_model_that_cannot_run_on_the_batch():
    model, _, _ = zoo.make("mvae")
    batch = {"image": torch.randn(4, 5), "text": torch.randn(4, 6)}  # wrong image width
    _raises(model, batch, None, ModelRunError, "computing the losses failed")


def test_not_a_module_and_unknown_regularizer():
    with pytest.raises(BlockfinderError, match=r"must be a torch\.nn\.Module"):
        blockfinder.analyze(lambda b: b, torch.zeros(1))
    model, batch, _ = zoo.make("mvae")
    with pytest.raises(BlockfinderError, match="unknown regularizer 'kll'"):
        blockfinder.analyze(model, batch, regularizers=("kll",), strict_regularizers=True)
    report = blockfinder.analyze(model, batch, regularizers=("kll", "kl"))
    assert report.regularizers == ("kl",)
    with pytest.raises(BlockfinderError, match="unknown capture"):
        run_analysis(model, batch, captures=("jit",))


class TraceHostile(nn.Module):
    """Raises while being traced or exported (not in eager): every structural layer fails."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.a = nn.Linear(4, 1)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        h = self.body(x)
        if not isinstance(h, torch.Tensor) or torch.compiler.is_compiling() or _fake(h):
            raise RuntimeError("no tracing here\nsecond line of the message")
        return {"a": self.a(h).pow(2).mean(), "b": self.b(h).pow(2).mean()}


def _fake(t):
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or type(t).__name__ == "FunctionalTensor"


def test_failing_structural_layers_are_recorded_and_state_restored(capsys):
    torch.manual_seed(0)
    model, x = TraceHostile(), torch.randn(5, 3)
    handle = model.body.register_forward_hook(lambda m, i, o: None)
    Distribution.set_default_validate_args(False)
    try:
        before = _state(model)
        report = blockfinder.analyze(model, x, regularizers=())
        after = _state(model)
    finally:
        Distribution.set_default_validate_args(True)
        handle.remove()
    assert after == before
    assert report.capture == "autograd"
    assert report.specializations == []
    assert len(report.notes) == 3
    for note, layer in zip(report.notes, ("fx", "export", "draft_export")):
        assert note.startswith(f"{layer} capture failed (")
        assert "\n" not in note and len(note) < 220
    assert "RuntimeError: no tracing here" in report.notes[0]
    assert [(bp.kind, bp.where) for bp in report.branch_points] == [("activation", "body")]
    assert report.parameters == zoo.autograd_reach(model, x)
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "Traceback" not in out.out


def test_validation_flag_restored_when_the_losses_fail():
    model, batch, _ = zoo.make("heterogeneous_vae")
    for flag in (True, False):
        Distribution.set_default_validate_args(flag)
        try:
            with pytest.raises(ModelRunError):
                blockfinder.analyze(model, batch, lambda m, b: 1 / 0)
            assert Distribution._validate_args is flag
        finally:
            Distribution.set_default_validate_args(True)


def test_analysis_under_no_grad_restores_it():
    model, batch, _ = zoo.make("shared_decoder")
    with torch.no_grad():
        report = blockfinder.analyze(model, batch, regularizers=())
        assert not torch.is_grad_enabled()
    assert report.capture == "fx" and len(report.branch_points) == 4
