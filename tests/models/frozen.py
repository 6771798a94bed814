"""Two losses on a model with no trainable parameter: no branch point to measure."""

import torch
from torch import nn


def build_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    model.requires_grad_(False)
    return model


def example_batch():
    return torch.ones(4, 3)


def compute_losses(model, batch):
    h = model(batch)
    return {"a": h[:, :2].pow(2).mean(), "b": h[:, 2:].abs().mean()}
