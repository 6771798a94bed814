"""Test models written like research code: multimodal VAEs and other multi-loss models.

Each ``Case`` gives a model, an example batch, the losses callable (``None``: the model's forward
returns the mapping) and the regularizers. The models import distributions the way papers' code
does (``from torch.distributions import Normal``, ``import torch.distributions as dist``, a class
stored as an attribute) so that the tracer's name patching is exercised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import combinations, pairwise
from typing import Any

import torch
import torch.distributions as dist
import torch.nn.functional as F
from torch import nn
from torch.distributions import (
    Bernoulli,
    Categorical,
    Independent,
    Normal,
    Poisson,
    kl_divergence,
)

# ----------------------------------------------------------------------------------------------
# Building blocks


def mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU, last_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_act:
            layers.append(act())
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """x -> (mu, logvar)"""

    def __init__(self, x_dim: int, z_dim: int, hidden: int = 16) -> None:
        super().__init__()
        self.body = mlp([x_dim, hidden], last_act=True)
        self.mu = nn.Linear(hidden, z_dim)
        self.logvar = nn.Linear(hidden, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.mu(h), self.logvar(h)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    return mu + eps * std


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1).mean()


# ----------------------------------------------------------------------------------------------
# 1. Tabular heterogeneous VAE (HI-VAE style heads with mixed likelihoods)


class HeterogeneousVAE(nn.Module):
    """Shared encoder and decoder trunk; one head per attribute with its own likelihood."""

    def __init__(self, z_dim: int = 4, hidden: int = 16, n_regions: int = 3) -> None:
        super().__init__()
        self.n_regions = n_regions
        x_dim = 1 + 1 + n_regions + 1
        self.encoder = GaussianEncoder(x_dim, z_dim, hidden)
        self.trunk = mlp([z_dim, hidden, hidden], last_act=True)
        self.heads = nn.ModuleDict(
            {
                "age": nn.Linear(hidden, 2),  # Normal: loc, log-scale
                "smoker": nn.Linear(hidden, 1),  # Bernoulli logits
                "region": nn.Linear(hidden, n_regions),  # Categorical logits
                "visits": nn.Linear(hidden, 1),  # Poisson log-rate
            }
        )

    def encode_input(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        region = F.one_hot(batch["region"], self.n_regions).float()
        return torch.cat([batch["age"], batch["smoker"], region, batch["visits"].log1p()], dim=-1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mu, logvar = self.encoder(self.encode_input(batch))
        q = Normal(mu, torch.exp(0.5 * logvar))
        z = q.rsample()
        h = self.trunk(z)
        loc, log_scale = self.heads["age"](h).chunk(2, dim=-1)
        p_age = Normal(loc, F.softplus(log_scale) + 1e-3)
        p_smoker = Bernoulli(logits=self.heads["smoker"](h))
        p_region = Categorical(logits=self.heads["region"](h))
        p_visits = Poisson(self.heads["visits"](h).exp())
        prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
        return {
            "age": -p_age.log_prob(batch["age"]).sum(-1).mean(),
            "smoker": -p_smoker.log_prob(batch["smoker"]).sum(-1).mean(),
            "region": -p_region.log_prob(batch["region"]).mean(),
            "visits": -p_visits.log_prob(batch["visits"]).sum(-1).mean(),
            "kl": kl_divergence(q, prior).sum(-1).mean(),
        }


def tabular_batch(n: int = 8, n_regions: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "age": torch.randn(n, 1, generator=g),
        "smoker": torch.randint(0, 2, (n, 1), generator=g).float(),
        "region": torch.randint(0, n_regions, (n,), generator=g),
        "visits": torch.randint(0, 5, (n, 1), generator=g).float(),
    }


# ----------------------------------------------------------------------------------------------
# 2. MVAE: product of experts over a dict batch (Wu & Goodman 2018)


def product_of_experts(mus: torch.Tensor, logvars: torch.Tensor, eps: float = 1e-8):
    var = torch.exp(logvars) + eps
    precision = 1.0 / var
    pd_mu = torch.sum(mus * precision, dim=0) / torch.sum(precision, dim=0)
    pd_var = 1.0 / torch.sum(precision, dim=0)
    return pd_mu, torch.log(pd_var + eps)


class MVAE(nn.Module):
    def __init__(self, dims: Mapping[str, int] | None = None, z_dim: int = 4) -> None:
        super().__init__()
        self.dims = dict(dims or {"image": 12, "text": 6})
        self.z_dim = z_dim
        self.encoders = nn.ModuleDict({m: GaussianEncoder(d, z_dim) for m, d in self.dims.items()})
        self.decoders = nn.ModuleDict({m: mlp([z_dim, 16, d]) for m, d in self.dims.items()})

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x0 = next(iter(batch.values()))
        prior_mu = torch.zeros(1, x0.size(0), self.z_dim)
        prior_logvar = torch.zeros(1, x0.size(0), self.z_dim)
        mus, logvars = [prior_mu], [prior_logvar]
        for m, x in batch.items():
            mu, logvar = self.encoders[m](x)
            mus.append(mu.unsqueeze(0))
            logvars.append(logvar.unsqueeze(0))
        mu, logvar = product_of_experts(torch.cat(mus, dim=0), torch.cat(logvars, dim=0))
        z = reparameterize(mu, logvar)
        losses = {}
        for m, x in batch.items():
            recon = self.decoders[m](z)
            losses[m] = F.mse_loss(recon, x, reduction="sum") / x.size(0)
        losses["kl"] = gaussian_kl(mu, logvar)
        return losses


def mvae_batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 12, generator=g), "text": torch.randn(n, 6, generator=g)}


# ----------------------------------------------------------------------------------------------
# 3. MMVAE: mixture of unimodal posteriors, every sample decoded by every decoder (Shi et al.)


class LaplaceEncoder(nn.Module):
    def __init__(self, x_dim: int, z_dim: int) -> None:
        super().__init__()
        self.net = mlp([x_dim, 16], last_act=True)
        self.loc = nn.Linear(16, z_dim)
        self.scale = nn.Linear(16, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(x)
        return self.loc(h), F.softmax(self.scale(h), dim=-1) * h.size(-1) + 1e-6


class MMVAE(nn.Module):
    """As in the official code: distribution classes stored as attributes and called later."""

    def __init__(self, dims: Mapping[str, int] | None = None, z_dim: int = 4) -> None:
        super().__init__()
        self.dims = dict(dims or {"image": 12, "text": 6})
        self.qz_x = dist.Laplace
        self.px_z = dist.Normal
        self.encoders = nn.ModuleDict({m: LaplaceEncoder(d, z_dim) for m, d in self.dims.items()})
        self.decoders = nn.ModuleDict({m: mlp([z_dim, 16, d]) for m, d in self.dims.items()})
        self.register_buffer("pz_loc", torch.zeros(1, z_dim))
        self.register_buffer("pz_scale", torch.ones(1, z_dim))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        qz_xs, zss = [], []
        for m, x in batch.items():
            qz_x = self.qz_x(*self.encoders[m](x))
            qz_xs.append(qz_x)
            zss.append(qz_x.rsample())
        losses: dict[str, torch.Tensor] = {m: 0.0 for m in batch}  # type: ignore[misc]
        regularizer = 0.0
        pz = dist.Laplace(self.pz_loc, self.pz_scale)
        for zs in zss:
            for m, x in batch.items():
                px_z = self.px_z(self.decoders[m](zs), 0.75)
                losses[m] = losses[m] - px_z.log_prob(x).sum(-1).mean() / len(zss)
            lqz_x = torch.stack([qz_x.log_prob(zs).sum(-1) for qz_x in qz_xs])
            log_mixture = torch.logsumexp(lqz_x, dim=0) - math.log(len(qz_xs))
            regularizer = regularizer + (log_mixture - pz.log_prob(zs).sum(-1)).mean() / len(zss)
        losses["kl"] = regularizer
        return losses


# ----------------------------------------------------------------------------------------------
# 4. MoPoE: mixture of products of experts over every subset (Sutter et al. 2021)


class MoPoE(nn.Module):
    def __init__(self, dims: Mapping[str, int] | None = None, z_dim: int = 4) -> None:
        super().__init__()
        self.dims = dict(dims or {"a": 5, "b": 6, "c": 7})
        self.z_dim = z_dim
        self.encoders = nn.ModuleDict({m: GaussianEncoder(d, z_dim) for m, d in self.dims.items()})
        self.decoders = nn.ModuleDict({m: mlp([z_dim, 16, d]) for m, d in self.dims.items()})
        names = list(self.dims)
        self.subsets = [s for k in range(1, len(names) + 1) for s in combinations(names, k)]

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        experts = {m: self.encoders[m](x) for m, x in batch.items()}
        losses = {m: torch.zeros(()) for m in batch}
        kl = torch.zeros(())
        for subset in self.subsets:
            mus = torch.stack([experts[m][0] for m in subset])
            logvars = torch.stack([experts[m][1] for m in subset])
            mu, logvar = product_of_experts(mus, logvars)
            q = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
            z = q.rsample()
            for m, x in batch.items():
                recon = self.decoders[m](z)
                losses[m] = losses[m] + F.mse_loss(recon, x) / len(self.subsets)
            prior = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
            kl = kl + kl_divergence(q, prior).mean() / len(self.subsets)
        losses["kl"] = kl
        return losses


def mopoe_batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {m: torch.randn(n, d, generator=g) for m, d in {"a": 5, "b": 6, "c": 7}.items()}


# ----------------------------------------------------------------------------------------------
# 5. One decoder reused for several latent samples feeding different losses


class SharedDecoderAE(nn.Module):
    """Two views encoded separately; one decoder reconstructs from each view's code."""

    def __init__(self) -> None:
        super().__init__()
        self.enc_a = mlp([6, 8, 3])
        self.enc_b = mlp([5, 8, 3])
        self.decoder = mlp([3, 8, 6])

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        x_a, x_b, target = batch
        return {
            "from_a": F.mse_loss(self.decoder(self.enc_a(x_a)), target),
            "from_b": F.mse_loss(self.decoder(self.enc_b(x_b)), target),
        }


def shared_decoder_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g), torch.randn(n, 6))


# ----------------------------------------------------------------------------------------------
# 6. IWAE with DReG-style gradients (Tucker et al. 2019): detach in several places


class DReGIWAE(nn.Module):
    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.k = k
        self.encoder = GaussianEncoder(7, 3)
        self.trunk = mlp([3, 16], last_act=True)
        self.head_x = nn.Linear(16, 4)
        self.head_y = nn.Linear(16, 3)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch["x"], batch["y"]
        mu, logvar = self.encoder(torch.cat([x, y], dim=-1))
        std = torch.exp(0.5 * logvar)
        z = Normal(mu, std).rsample((self.k,))  # K x B x D
        q_stop = Normal(mu.detach(), std.detach())  # DReG: no score-function term
        log_q = q_stop.log_prob(z).sum(-1)
        log_pz = Normal(torch.zeros_like(z), torch.ones_like(z)).log_prob(z).sum(-1)
        h = self.trunk(z)
        log_px = Normal(self.head_x(h), 1.0).log_prob(x).sum(-1)
        log_py = Normal(self.head_y(h), 1.0).log_prob(y).sum(-1)
        log_w = log_px + log_py + log_pz - log_q
        w = torch.softmax(log_w, dim=0).detach()
        return {
            "x": -(w * log_px).sum(0).mean(),
            "y": -(w * log_py).sum(0).mean(),
            "kl": -((w**2) * (log_pz - log_q)).sum(0).mean(),
        }


def xy_batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return {"x": torch.randn(n, 4, generator=g), "y": torch.randn(n, 3, generator=g)}


# ----------------------------------------------------------------------------------------------
# 7. A torch.no_grad side path (a target computed without gradient feeds a loss)


class NoGradTarget(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = mlp([6, 12], last_act=True)
        self.online = nn.Linear(12, 4)
        self.target = nn.Linear(12, 4)
        self.classifier = nn.Linear(12, 3)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = self.backbone(batch["x"])
        with torch.no_grad():
            target = self.target(h)
        return {
            "consistency": F.mse_loss(self.online(h), target),
            "label": F.cross_entropy(self.classifier(h), batch["label"]),
        }


def label_batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"x": torch.randn(n, 6, generator=g), "label": torch.randint(0, 3, (n,), generator=g)}


# ----------------------------------------------------------------------------------------------
# 8. Tensor-valued `if`: a missing modality


class MaskedMultimodal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc_image = GaussianEncoder(8, 3)
        self.enc_text = GaussianEncoder(5, 3)
        self.dec_image = mlp([3, 8, 8])
        self.dec_text = mlp([3, 8, 5])

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mu, logvar = self.enc_image(batch["image"])
        if batch["has_text"].any():  # the text modality is present in this batch
            mu_t, logvar_t = self.enc_text(batch["text"])
            mu, logvar = product_of_experts(
                torch.stack([mu, mu_t]), torch.stack([logvar, logvar_t])
            )
        z = reparameterize(mu, logvar)
        text = F.mse_loss(self.dec_text(z), batch["text"], reduction="none").mean(-1)
        return {
            "image": F.mse_loss(self.dec_image(z), batch["image"]),
            "text": (text * batch["has_text"].float()).mean(),
            "kl": gaussian_kl(mu, logvar),
        }


def masked_batch(n: int = 8, text: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    return {
        "image": torch.randn(n, 8, generator=g),
        "text": torch.randn(n, 5, generator=g),
        "has_text": torch.full((n,), text),
    }


# ----------------------------------------------------------------------------------------------
# 9. Tied weights (embedding shared with the output projection)


class TiedTextModel(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.trunk = mlp([dim, dim], act=nn.Tanh, last_act=True)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight
        self.length_head = nn.Linear(dim, 1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        h = self.embed(tokens).mean(dim=1)
        logits = self.out(self.trunk(h))
        return {
            "tokens": F.cross_entropy(logits, tokens[:, 0]),
            "length": F.mse_loss(self.length_head(h).squeeze(-1), batch["length"]),
        }


def tokens_batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "tokens": torch.randint(0, 11, (n, 5), generator=g),
        "length": torch.rand(n, generator=g) * 5,
    }


# ----------------------------------------------------------------------------------------------
# 10. A custom autograd.Function: gradient reversal with a learned coefficient (DANN)


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(coeff)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (coeff,) = ctx.saved_tensors
        return -coeff * grad, None  # no gradient for the coefficient


class DomainAdversarial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = mlp([6, 10], last_act=True)
        self.label_head = nn.Linear(10, 3)
        self.domain_head = mlp([10, 8, 1])
        self.log_coeff = nn.Parameter(torch.zeros(()))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = self.features(batch["x"])
        reversed_h = GradReverse.apply(h, self.log_coeff.exp())
        domain_logit = self.domain_head(reversed_h).squeeze(-1)
        return {
            "label": F.cross_entropy(self.label_head(h), batch["label"]),
            "domain": F.binary_cross_entropy_with_logits(domain_logit, batch["domain"]),
        }


def domain_batch(n: int = 8) -> dict[str, torch.Tensor]:
    b = label_batch(n)
    b["domain"] = (torch.arange(n) % 2).float()
    return b


# ----------------------------------------------------------------------------------------------
# 11. A single-loss model, a model returning a tensor


class SingleLossVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = GaussianEncoder(6, 2)
        self.decoder = mlp([2, 8, 6])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, logvar = self.encoder(x)
        z = reparameterize(mu, logvar)
        return {"elbo": F.mse_loss(self.decoder(z), x) + gaussian_kl(mu, logvar)}


class ReturnsTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).pow(2).mean()


# ----------------------------------------------------------------------------------------------
# 12. A sequence model fx cannot trace (Python loop over a traced size): export handles it


class SequenceAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(3, 6)
        self.readout = nn.Linear(6, 3)
        self.summary = nn.Linear(6, 2)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seq = batch["seq"]
        h = seq.new_zeros(seq.size(0), 6)
        steps = []
        for t in range(seq.size(1)):
            h = self.cell(seq[:, t], h)
            steps.append(self.readout(h))
        recon = torch.stack(steps, dim=1)
        return {
            "recon": F.mse_loss(recon, seq),
            "summary": F.mse_loss(self.summary(h), batch["stats"]),
        }


def sequence_batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(8)
    return {"seq": torch.randn(n, 3, 3, generator=g), "stats": torch.randn(n, 2, generator=g)}


# ----------------------------------------------------------------------------------------------
# 13. A detach inside a module the tracer keeps opaque (leaf_depth=1): reconciliation cuts it


class Refiner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj(h).detach()  # a stop-gradient residual


class HiddenDetach(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = mlp([4, 6], last_act=True)
        self.refine = Refiner()
        self.head_a = nn.Linear(6, 1)
        self.head_b = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.refine(self.trunk(x))
        return {"a": self.head_a(h).pow(2).mean(), "b": self.head_b(h).abs().mean()}


# ----------------------------------------------------------------------------------------------
# 14. Tuple-returning ops feeding different losses (per-output reasoning at the aten level)


class TupleOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin_a = nn.Linear(4, 3)
        self.lin_b = nn.Linear(4, 3)
        self.lin_c = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.lin_a(x)  # (B, 3)
        b = self.lin_b(x[:1])  # (1, 3)
        wide_a, wide_b = torch.broadcast_tensors(a, b)
        first, second = self.lin_c(x).split(3, dim=-1)
        return {
            "p": wide_a.pow(2).mean() + F.mse_loss(first, x[:, :3]),
            "q": wide_b.abs().mean() + second.pow(2).mean(),
        }


# ----------------------------------------------------------------------------------------------
# 15. Non-differentiable users of a shared activation: they must not create streams


class NonDiffUsers(nn.Module):
    """``h`` reaches loss ``a`` differentiably; loss ``b`` sees it only through detach, no_grad,
    comparisons, argmax, zeros_like, shape queries, integer casts and a sampled category."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.head_a = nn.Linear(4, 1)
        self.head_b = nn.Linear(4, 1)
        self.embed = nn.Embedding(4, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.body(x))
        mask = (h > 0).float()
        index = h.argmax(dim=-1)
        category = Categorical(logits=h).sample()
        with torch.no_grad():
            scale = h.abs().mean()
        width = h.size(-1)
        counts = h.long().clamp(min=0)
        base = torch.zeros_like(h) + h.detach()
        b_in = base * mask + self.embed(index) + self.embed(category) + counts / width
        return {
            "a": self.head_a(h).pow(2).mean(),
            "b": (self.head_b(b_in) * scale).pow(2).mean(),
        }


# ----------------------------------------------------------------------------------------------
# 16. Many distribution families, their properties and methods


class ManyDistributions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 12)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.net(x)
        a, b, c, d, e, f = p.split(2, dim=-1)
        lognormal = dist.LogNormal(a, F.softplus(b) + 0.1)
        relaxed = dist.RelaxedOneHotCategorical(torch.tensor(0.5), logits=c)
        beta = dist.Beta(F.softplus(d) + 1.0, F.softplus(e) + 1.0)
        gauss = Independent(Normal(f, 1.0), 1)
        cb = dist.ContinuousBernoulli(logits=d)
        y = lognormal.rsample()
        return {
            "lognormal": -lognormal.log_prob(y.detach() + 1.0).mean() + lognormal.mean.mean(),
            "relaxed": relaxed.rsample().pow(2).sum(-1).mean() + lognormal.entropy().mean(),
            "beta": -beta.log_prob(torch.full_like(d, 0.5)).mean() + beta.variance.mean(),
            "gauss": gauss.entropy().mean()
            + gauss.stddev.mean()
            - cb.log_prob(torch.sigmoid(x[:, :2])).mean(),
        }


# ----------------------------------------------------------------------------------------------
# The cases


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], Any]
    losses: Callable[[nn.Module, Any], Mapping[str, torch.Tensor]] | None = None
    regularizers: tuple[str, ...] = ("kl",)
    options: dict[str, Any] = field(default_factory=dict)


def x_batch(n: int = 8, d: int = 6) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(9))


CASES = {
    c.name: c
    for c in [
        Case("heterogeneous_vae", HeterogeneousVAE, tabular_batch),
        Case("mvae", MVAE, mvae_batch),
        Case("mmvae", MMVAE, mvae_batch),
        Case("mopoe", MoPoE, mopoe_batch),
        Case("shared_decoder", SharedDecoderAE, shared_decoder_batch, regularizers=()),
        Case("dreg_iwae", DReGIWAE, xy_batch),
        Case("no_grad_target", NoGradTarget, label_batch, regularizers=()),
        Case("masked_multimodal", MaskedMultimodal, masked_batch),
        Case("tied_weights", TiedTextModel, tokens_batch, regularizers=()),
        Case("custom_function", DomainAdversarial, domain_batch, regularizers=()),
        Case("single_loss", SingleLossVAE, x_batch, regularizers=()),
        Case("sequence", SequenceAE, sequence_batch, regularizers=()),
        Case(
            "hidden_detach",
            HiddenDetach,
            lambda: x_batch(8, 4),
            regularizers=(),
            options={"leaf_depth": 1},
        ),
        Case("tuple_ops", TupleOps, lambda: x_batch(8, 4), regularizers=()),
    ]
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, Any, Case]:
    case = CASES[name]
    torch.manual_seed(seed)
    return case.build(), case.batch(), case


def autograd_reach(
    model: nn.Module, batch: Any, losses: Callable[[nn.Module, Any], Any] | None = None
) -> dict[str, frozenset[str]]:
    """Parameter -> losses whose ``torch.autograd.grad(loss, params, allow_unused=True)`` is not
    None: the reference every capture's ``report.parameters`` must equal."""
    out = (losses or (lambda m, b: m(b)))(model, batch)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reached: dict[str, set[str]] = {n: set() for n in params}
    for name, loss in out.items():
        if not loss.requires_grad:
            continue
        grads = torch.autograd.grad(
            loss, list(params.values()), allow_unused=True, retain_graph=True
        )
        for pname, grad in zip(params, grads):
            if grad is not None:
                reached[pname].add(name)
    return {k: frozenset(v) for k, v in reached.items()}
