"""Broken: the model's forward fails on the example batch (wrong width)."""

import torch
from torch import nn


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 2)

    def forward(self, x):
        h = self.lin(x)
        return {"a": h[:, 0].mean(), "b": h[:, 1].mean()}


def build_model():
    return Model()


def example_batch():
    return torch.ones(4, 3)
