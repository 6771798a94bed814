"""Broken: loss 'phase' is complex (a loss must be a real number to be minimised)."""

import torch
from torch import nn


def build_model():
    return nn.Linear(3, 2)


def example_batch():
    return torch.ones(4, 3)


def compute_losses(model, batch):
    out = model(batch)
    return {"fine": out.mean(), "phase": torch.complex(out, out).mean()}
