"""A tiny VAE-like model: shared encoder and decoder trunk, two attribute heads and a KL term."""

import torch
from torch import nn

REGULARIZERS = ["kl"]


class TwoHeads(nn.Module):
    def __init__(self, d_in: int = 6, d_z: int = 3, d_h: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, d_h), nn.ReLU(), nn.Linear(d_h, 2 * d_z))
        self.trunk = nn.Sequential(nn.Linear(d_z, d_h), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(d_h, 4), nn.Linear(d_h, 2)])

    def forward(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        h = self.trunk(z)
        return [head(h) for head in self.heads], mu, logvar


def build_model():
    return TwoHeads()


def example_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 6, generator=g)


def compute_losses(model, batch):
    (out_a, out_b), mu, logvar = model(batch)
    rec_a = ((out_a - batch[:, :4]) ** 2).mean()
    rec_b = ((out_b - batch[:, 4:]) ** 2).mean()
    kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1).mean()
    return {"attr_a": rec_a, "attr_b": rec_b, "kl": kl}
