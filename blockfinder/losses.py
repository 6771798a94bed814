"""Calling the user's losses function and checking what it returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from blockfinder.errors import BlockfinderError, LossError, ModelRunError

LossesFn = Callable[[nn.Module, Any], Mapping[str, torch.Tensor]]


def default_losses(model: nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
    """The default losses function: the model's forward returns the mapping of named losses."""
    return model(batch)


def _describe_error(exc: BaseException) -> str:
    message = str(exc).strip().splitlines()
    first = message[0] if message else ""
    tb = exc.__traceback__
    where = ""
    while tb is not None:
        frame = tb.tb_frame
        if "site-packages" not in frame.f_code.co_filename and "/torch/" not in (
            frame.f_code.co_filename
        ):
            where = f" at {frame.f_code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    message = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"{message}{where}"


def call_losses(losses_fn: LossesFn, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
    """Run ``losses_fn(model, batch)`` and check it returns named finite scalar tensors.

    Raises :class:`LossError` (bad result) or :class:`ModelRunError` (the call raised), each with a
    one-line message naming the loss or the place in the user's code.
    """
    try:
        out = losses_fn(model, batch)
    except BlockfinderError:
        raise
    except Exception as exc:
        raise ModelRunError(
            f"computing the losses failed: {_describe_error(exc)}; check that the model runs on "
            "the example batch"
        ) from exc
    return check_losses(out)


def check_losses(out: Any) -> dict[str, torch.Tensor]:
    """Validate a mapping of named losses: string keys, scalar tensors, finite values."""
    if isinstance(out, torch.Tensor):
        raise LossError(
            f"the losses are a Tensor of shape {tuple(out.shape)}, not a mapping of named losses: "
            "return a dict like {'image': loss1, 'label': loss2, 'kl': kl} or define "
            "compute_losses(model, batch)"
        )
    if not isinstance(out, Mapping):
        raise LossError(
            f"the losses are a {type(out).__name__}, not a mapping of named scalar losses: "
            "return a dict like {'image': loss1, 'label': loss2, 'kl': kl}"
        )
    if len(out) == 0:
        raise LossError("the losses mapping is empty: return at least one named loss")
    losses: dict[str, torch.Tensor] = {}
    for name, value in out.items():
        if not isinstance(name, str):
            raise LossError(f"loss names must be strings, got {name!r}")
        if not isinstance(value, torch.Tensor):
            raise LossError(
                f"loss '{name}' is a {type(value).__name__}, not a scalar tensor: keep it a tensor "
                "so that gradients can flow"
            )
        if value.numel() != 1 or value.dim() > 1:
            raise LossError(
                f"loss '{name}' is not a scalar: shape {tuple(value.shape)}; reduce it "
                "(e.g. .sum() or .mean()) before returning it"
            )
        if not value.is_floating_point():
            raise LossError(f"loss '{name}' has dtype {value.dtype}; losses must be floating point")
        if not bool(torch.isfinite(value.detach()).all()):
            raise LossError(
                f"loss '{name}' is not finite ({value.detach().reshape(()).item()}): check the "
                "model's output and the batch for that term"
            )
        losses[name] = value
    return losses
