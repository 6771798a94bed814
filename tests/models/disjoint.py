"""Two losses on two separate networks: they share no trainable parameter."""

import torch
from torch import nn


def build_model():
    return nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)})


def example_batch():
    return torch.ones(4, 3)


def compute_losses(model, batch):
    return {"a": model["a"](batch).pow(2).mean(), "b": model["b"](batch).pow(2).mean()}
