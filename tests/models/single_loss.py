"""One loss only: nothing to be impartial about."""

import torch
from torch import nn


def build_model():
    return nn.Linear(3, 1)


def example_batch():
    return torch.ones(4, 3)


def compute_losses(model, batch):
    return {"mse": (model(batch) ** 2).mean()}
