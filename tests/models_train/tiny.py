"""A tiny VAE-like model for the impartial-train tests: shared encoder and decoder trunk, two
attribute heads, a KL term, reparameterisation noise (so that RNG restoring matters)."""

import os
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

REGULARIZERS = ["kl"]
METRICS = {"accuracy_b": "max"}  # rmse_a left undeclared: it gets no direction
BATCH_SIZE = 16
HIDDEN = int(os.environ.get("TINY_HIDDEN", "8"))
SLEEP = float(os.environ.get("TINY_SLEEP", "0"))  # seconds per training batch (SIGINT test)
ROWS = int(os.environ.get("TINY_ROWS", "64"))
# signal tests: a training step that cannot finish. After TINY_BLOCK_AFTER training steps,
# every step waits (at most 60 s) while the file TINY_BLOCK exists, and touches TINY_BLOCK.waiting
BLOCK = os.environ.get("TINY_BLOCK")
BLOCK_AFTER = int(os.environ.get("TINY_BLOCK_AFTER", "0"))
_steps = [0]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 4))
        self.trunk = nn.Sequential(nn.Linear(2, HIDDEN), nn.Tanh())
        self.head_a = nn.Linear(HIDDEN, 4)
        self.head_b = nn.Linear(HIDDEN, 2)

    def forward(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        h = self.trunk(z)
        return self.head_a(h), self.head_b(h), mu, logvar


def build_model():
    return Tiny()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    x[:, 4:] *= 10.0  # attribute b on a larger scale: its gradients dominate
    return TensorDataset(x)


def train_dataset():
    return _data(ROWS, 0)


def val_dataset():
    return _data(24, 1)


def compute_losses(model, batch):
    (x,) = batch
    if SLEEP and model.training:
        time.sleep(SLEEP)
    if BLOCK and model.training and torch.is_grad_enabled():
        _steps[0] += 1
        if _steps[0] > BLOCK_AFTER and os.path.exists(BLOCK):
            open(BLOCK + ".waiting", "w").close()
            deadline = time.time() + 60
            while os.path.exists(BLOCK) and time.time() < deadline:
                time.sleep(0.02)
    out_a, out_b, mu, logvar = model(x)
    return {
        "attr_a": ((out_a - x[:, :4]) ** 2).mean(),
        "attr_b": ((out_b - x[:, 4:]) ** 2).mean(),
        "kl": -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1).mean(),
    }


def evaluate(model, loader):
    err, acc, n = 0.0, 0.0, 0
    for (x,) in loader:
        out_a, out_b, _, _ = model(x)
        err += float(((out_a - x[:, :4]) ** 2).sum())
        acc += float(((out_b > 0) == (x[:, 4:] > 0)).float().sum())
        n += x.shape[0]
    return {"rmse_a": (err / (4 * n)) ** 0.5, "accuracy_b": acc / (2 * n)}
