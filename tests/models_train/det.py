"""A deterministic float64 model (no sampling) for the data-parallel tests: a shared trunk
(activation branch point) and a decoder applied to two inputs (parameter branch point)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

REGULARIZERS = ["reg"]
BATCH_SIZE = 10


class Det(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 8)
        self.trunk = nn.Linear(8, 8)
        self.head_a = nn.Linear(8, 4)
        self.head_b = nn.Linear(8, 2)
        self.dec = nn.Linear(3, 3)

    def forward(self, batch):
        (x,) = batch
        h = torch.tanh(self.trunk(torch.tanh(self.enc(x))))
        pa, pb = self.dec(x[:, :3]), self.dec(x[:, 3:])
        return {
            "a": ((self.head_a(h) - x[:, :4]) ** 2).mean() + ((pa - x[:, 3:]) ** 2).mean(),
            "b": ((self.head_b(h) - 3 * x[:, 4:]) ** 2).mean() + ((pb + x[:, :3]) ** 2).mean(),
            "reg": 0.1 * h.pow(2).mean(),
        }


def build_model():
    return Det().double()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g, dtype=torch.float64))


def train_dataset():
    return _data(29, 0)  # batches of 10, 10, 9: the last one splits 5/4 over two processes


def val_dataset():
    return _data(12, 1)


def evaluate(model, loader):
    total, n = 0.0, 0
    for (x,) in loader:
        h = torch.tanh(model.trunk(torch.tanh(model.enc(x))))
        total += float(((model.head_a(h) - x[:, :4]) ** 2).sum())
        n += x.shape[0]
    return {"error_a": total / n}
