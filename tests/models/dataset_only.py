"""model(batch) returns the losses; no example_batch(): the CLI takes one from train_dataset()."""

import torch
from torch import nn
from torch.utils.data import TensorDataset


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 8)
        self.a = nn.Linear(8, 1)
        self.b = nn.Linear(8, 1)

    def forward(self, batch):
        x, y = batch
        h = torch.tanh(self.shared(x))
        return {
            "a": ((self.a(h).squeeze(-1) - y) ** 2).mean(),
            "b": ((self.b(h).squeeze(-1) + y) ** 2).mean(),
        }


def build_model():
    return Model()


def train_dataset():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(40, 5, generator=g), torch.randn(40, generator=g))
