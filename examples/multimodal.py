"""Multimodal VAEs (MVAE, MMVAE, MoPoE) on PolyDigits, and their evaluation.

Every model has one Gaussian encoder q_m(z | x_m) and one decoder p(x_m | z) per modality, and
differs in how it combines the unimodal posteriors and which ELBO terms it trains:

- :class:`MVAE` (Wu & Goodman, 2018): product of experts, prior expert included; the sub-sampled
  objective sums the ELBO of the joint posterior, of every single modality, and of random subsets.
- :class:`MMVAE` (Shi et al., 2019): mixture of experts; each unimodal posterior's sample is
  decoded by every decoder (stratified sampling), so every decoder's weights are shared across the
  M samples.
  Objectives: ``"elbo"`` and ``"iwae"`` (K importance samples per component).
- :class:`MoPoE` (Sutter et al., 2021): mixture over the products of experts of every non-empty
  subset of modalities; each subset's sample is decoded by every decoder.

``model(batch)`` returns one loss per modality (minus its reconstruction log-likelihood, summed
over the terms of the objective, averaged over the batch) plus ``"kl"``. No likelihood is rescaled
(MMVAE's ``llik_scaling``): balancing the modalities is left to impartial training.

With ``split_losses=True`` every reconstruction term is its own loss, named
``<modality>_from_<source>`` where the source is the latent sample it is decoded from (the MMVAE
component, the MoPoE/MVAE subset joined by ``_``, ``all`` for every modality, ``random`` for MVAE's
random subsets), as in the paper's split MMVAE objective. The losses sum to the same total; the
decoder of a modality is then shared by several losses (a parameter-level branch point).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import (
    Bernoulli,
    Distribution,
    Independent,
    Laplace,
    Normal,
    OneHotCategorical,
    kl_divergence,
)

from examples.data.polydigits import IMAGE_MODALITIES, NUM_CLASSES, NUM_PIXELS, load_polydigits
from examples.layers import MIN_SCALE, MLP, GaussianEncoder, positive

LIKELIHOODS = ("bernoulli", "normal", "laplace", "categorical")


@dataclass(frozen=True)
class Modality:
    """A modality: batch key, dimension and likelihood (one of :data:`LIKELIHOODS`)."""

    name: str
    dim: int
    likelihood: str


POLYDIGITS_MODALITIES = (
    Modality("img0", NUM_PIXELS, "bernoulli"),  # grey levels scored as Bernoulli probabilities
    Modality("img1", NUM_PIXELS, "normal"),  # textured background: Normal, learned pixel scales
    Modality("img2", NUM_PIXELS, "laplace"),  # inverted and blurred: Laplace, learned pixel scales
    Modality("label", NUM_CLASSES, "categorical"),
)


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class ModalityDecoder(nn.Module):
    """``z -> p(x_m | z)``, the pixels (or classes) independent given z.

    Normal and Laplace likelihoods have a learned scale per dimension (not depending on z).
    """

    def __init__(self, modality: Modality, latent_dim: int, hidden_dim: int, init_scale=0.2):
        super().__init__()
        if modality.likelihood not in LIKELIHOODS:
            raise ValueError(
                f"unknown likelihood {modality.likelihood!r}; use one of {LIKELIHOODS}"
            )
        self.likelihood = modality.likelihood
        self.net = MLP([latent_dim, hidden_dim, hidden_dim, modality.dim], nn.ReLU)
        self.raw_scale = None
        if self.likelihood in ("normal", "laplace"):
            raw = _inverse_softplus(init_scale - MIN_SCALE)
            self.raw_scale = nn.Parameter(torch.full((modality.dim,), raw))

    def forward(self, z: torch.Tensor) -> Distribution:
        out = self.net(z)
        if self.likelihood == "bernoulli":
            return Independent(Bernoulli(logits=out, validate_args=False), 1)
        if self.likelihood == "categorical":
            return OneHotCategorical(logits=out, validate_args=False)
        scale = positive(self.raw_scale).expand_as(out)
        base = Normal if self.likelihood == "normal" else Laplace
        return Independent(base(out, scale, validate_args=False), 1)


def product_of_experts(
    experts: Sequence[Normal], prior: Normal, weights: Sequence[torch.Tensor] | None = None
) -> Normal:
    """Product of Gaussian experts and the prior expert (Wu & Goodman, 2018).

    Precisions add up; the location is the precision-weighted mean. ``weights`` (one (N, 1) tensor
    of 0/1 per expert) switch experts off per example (a weight of 0 removes the expert).
    """
    prior_precision = prior.scale.pow(-2)
    precision = prior_precision.expand_as(experts[0].loc)
    weighted_loc = (prior.loc * prior_precision).expand_as(experts[0].loc)
    for i, expert in enumerate(experts):
        expert_precision = expert.scale.pow(-2)
        if weights is not None:
            expert_precision = expert_precision * weights[i]
        precision = precision + expert_precision
        weighted_loc = weighted_loc + expert.loc * expert_precision
    return Normal(weighted_loc / precision, precision.rsqrt(), validate_args=False)


class MultimodalVAE(nn.Module):
    """Encoders, decoders and prior shared by the multimodal models."""

    def __init__(
        self,
        modalities: Sequence[Modality] = POLYDIGITS_MODALITIES,
        latent_dim: int = 16,
        hidden_dim: int = 128,
        split_losses: bool = False,
    ):
        super().__init__()
        self.modalities = tuple(m.name for m in modalities)
        self.split_losses = split_losses
        if "kl" in self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modality names must be unique and differ from 'kl': {modalities}")
        self.latent_dim = latent_dim
        self.encoders = nn.ModuleDict(
            {m.name: GaussianEncoder(m.dim, hidden_dim, latent_dim) for m in modalities}
        )
        self.decoders = nn.ModuleDict(
            {m.name: ModalityDecoder(m, latent_dim, hidden_dim) for m in modalities}
        )
        self.register_buffer("prior_loc", torch.zeros(latent_dim))
        self.register_buffer("prior_scale", torch.ones(latent_dim))

    def prior(self) -> Normal:
        return Normal(self.prior_loc, self.prior_scale, validate_args=False)

    def experts(
        self, batch: Mapping[str, torch.Tensor], names: Iterable[str] | None = None
    ) -> dict[str, Normal]:
        """The unimodal posteriors q_m(z | x_m) of ``names`` (default: every modality)."""
        names = self.modalities if names is None else names
        return {name: self.encoders[name](batch[name]) for name in names}

    def decode(
        self, z: torch.Tensor, names: Iterable[str] | None = None
    ) -> dict[str, Distribution]:
        """p(x_m | z) for ``names`` (default: every modality)."""
        names = self.modalities if names is None else names
        return {name: self.decoders[name](z) for name in names}

    def latent_mean(self, batch: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
        """Mean of the model's posterior given only the modalities ``names``."""
        raise NotImplementedError

    def source_label(self, subset: Sequence[str]) -> str:
        """Name of the latent sample of ``subset`` in split loss names."""
        return "all" if tuple(subset) == self.modalities else "_".join(subset)

    def _collect(
        self,
        terms: Mapping[str, list[tuple[str, torch.Tensor]]],
        kl: list[torch.Tensor],
        average: bool,
    ) -> dict[str, torch.Tensor]:
        """Losses from the reconstruction log-likelihood terms (modality -> [(source, value)]) and
        the KL terms: summed over the terms of the objective, or averaged when ``average``."""
        losses: dict[str, torch.Tensor] = {}
        for name in self.modalities:
            scale = 1.0 / len(terms[name]) if average else 1.0
            if self.split_losses:
                for source, value in terms[name]:
                    losses[f"{name}_from_{source}"] = -scale * value
            else:
                losses[name] = -scale * torch.stack([value for _, value in terms[name]]).sum()
        kl_terms = torch.stack(kl)
        losses["kl"] = kl_terms.mean() if average else kl_terms.sum()
        return losses


class MVAE(MultimodalVAE):
    """Multimodal VAE with a product-of-experts posterior (Wu & Goodman, 2018).

    q(z | X_S) ∝ p(z) prod_{m in S} q_m(z | x_m). The training objective is the sum of the ELBOs of
    the joint posterior (all modalities), of every single modality (each reconstructing itself), and
    of ``num_random_subsets`` random subsets drawn per example (each modality in with probability
    1/2; the random subset enters as 0/1 expert weights, so the computation graph is the same at
    every step). Each sample of a term is fanned out to the decoders of that term.
    """

    def __init__(self, *args, num_random_subsets: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_random_subsets = num_random_subsets

    def joint_posterior(self, experts: Mapping[str, Normal], weights=None) -> Normal:
        return product_of_experts(list(experts.values()), self.prior(), weights)

    def latent_mean(self, batch, names):
        return self.joint_posterior(self.experts(batch, names)).mean

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        experts = self.experts(batch)
        terms: dict[str, list[tuple[str, torch.Tensor]]] = {name: [] for name in self.modalities}
        kl: list[torch.Tensor] = []
        subsets = [self.modalities] + [(name,) for name in self.modalities]
        for subset in subsets:
            q = self.joint_posterior({name: experts[name] for name in subset})
            z = q.rsample()
            source = self.source_label(subset)
            for name, p_x in self.decode(z, subset).items():
                terms[name].append((source, p_x.log_prob(batch[name]).mean()))
            kl.append(kl_divergence(q, self.prior()).sum(-1).mean())
        first = batch[self.modalities[0]]
        for r in range(self.num_random_subsets):
            keep = (torch.rand(first.shape[0], len(self.modalities), device=first.device) < 0.5).to(
                first.dtype
            )
            weights = [keep[:, i : i + 1] for i in range(len(self.modalities))]
            q = self.joint_posterior(experts, weights)
            z = q.rsample()
            source = f"random{r}" if r else "random"
            for i, (name, p_x) in enumerate(self.decode(z).items()):
                terms[name].append((source, (keep[:, i] * p_x.log_prob(batch[name])).mean()))
            kl.append(kl_divergence(q, self.prior()).sum(-1).mean())
        return self._collect(terms, kl, average=False)


class MMVAE(MultimodalVAE):
    """Mixture-of-experts multimodal VAE (Shi et al., 2019).

    q(z | X) = (1/M) sum_m q_m(z | x_m). Stratified over the components: K samples of each q_m are
    decoded by every decoder, and each sample is scored by every unimodal posterior to evaluate the
    mixture density. ``"elbo"``: (1/M) sum_m E_{q_m}[log p(X | z) + log p(z) - log q(z | X)];
    ``"iwae"``: (1/M) sum_m log (1/K) sum_k w_mk, trained (like the tabular IWAE) through terms
    weighted by the detached normalised weights.
    """

    def __init__(self, *args, objective: str = "elbo", num_samples: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if objective not in ("elbo", "iwae"):
            raise ValueError(f"objective must be 'elbo' or 'iwae', got {objective!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.objective = objective
        self.num_samples = num_samples

    @staticmethod
    def log_mixture_density(experts: Sequence[Normal], z: torch.Tensor) -> torch.Tensor:
        """log (1/M) sum_m q_m(z): the sample z is fanned out to every unimodal posterior."""
        log_probs = torch.stack([expert.log_prob(z).sum(-1) for expert in experts])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(experts))

    def latent_mean(self, batch, names):
        return torch.stack([q.mean for q in self.experts(batch, names).values()]).mean(0)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        experts = self.experts(batch)
        components = list(experts.values())
        terms: dict[str, list[tuple[str, torch.Tensor]]] = {name: [] for name in self.modalities}
        kl: list[torch.Tensor] = []
        for source, q_m in experts.items():
            z = q_m.rsample((self.num_samples,))  # (K, N, L)
            log_ratio = self.log_mixture_density(components, z) - self.prior().log_prob(z).sum(-1)
            log_liks = {name: p_x.log_prob(batch[name]) for name, p_x in self.decode(z).items()}
            if self.objective == "iwae":
                log_w = torch.stack(list(log_liks.values())).sum(0) - log_ratio
                weights = torch.softmax(log_w, dim=0).detach()
            else:
                weights = torch.full_like(log_ratio, 1.0 / self.num_samples)
            for name, log_lik in log_liks.items():
                terms[name].append((source, (weights * log_lik).sum(0).mean()))
            kl.append((weights * log_ratio).sum(0).mean())
        return self._collect(terms, kl, average=True)


class MoPoE(MultimodalVAE):
    """Mixture-of-products-of-experts multimodal VAE (Sutter et al., 2021).

    q(z | X) = (1/|P|) sum_{S in P} PoE({q_m : m in S}) over the non-empty subsets P of the
    modalities (prior expert included in each product). The objective is stratified over the
    subsets: each subset posterior's sample is decoded by every decoder; the KL of the mixture is
    bounded by the mean KL of its components, as in Sutter et al. (Sutter et al.'s code instead
    assigns each example of a batch to one subset; the expectation is the same).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.subsets = nonempty_subsets(self.modalities)

    def subset_posterior(self, experts: Mapping[str, Normal], subset: Sequence[str]) -> Normal:
        return product_of_experts([experts[name] for name in subset], self.prior())

    def latent_mean(self, batch, names):
        experts = self.experts(batch, names)
        means = [self.subset_posterior(experts, s).mean for s in nonempty_subsets(tuple(names))]
        return torch.stack(means).mean(0)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        experts = self.experts(batch)
        terms: dict[str, list[tuple[str, torch.Tensor]]] = {name: [] for name in self.modalities}
        kl: list[torch.Tensor] = []
        for subset in self.subsets:
            q = self.subset_posterior(experts, subset)
            z = q.rsample()
            source = self.source_label(subset)
            for name, p_x in self.decode(z).items():
                terms[name].append((source, p_x.log_prob(batch[name]).mean()))
            kl.append(kl_divergence(q, self.prior()).sum(-1).mean())
        return self._collect(terms, kl, average=True)


def nonempty_subsets(names: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``names``, by size, in the order of ``names``."""
    return [
        subset
        for size in range(1, len(names) + 1)
        for subset in itertools.combinations(names, size)
    ]


# -------------------------------------------------------------------------------- evaluation
class SoftmaxRegression:
    """Multinomial logistic regression on standardised features, fit by full-batch L-BFGS.

    Deterministic (zero initialisation, no mini-batches) and fast at these sizes; used for the digit
    classifiers that score generated images and for the linear probes of the latent space.
    """

    def __init__(self, num_classes: int, l2: float = 1e-3, max_iter: int = 100):
        self.num_classes = num_classes
        self.l2 = l2
        self.max_iter = max_iter

    @torch.enable_grad()
    def fit(self, x: torch.Tensor, y: torch.Tensor) -> SoftmaxRegression:
        x = x.detach().float().cpu()
        y = y.detach().long().cpu()
        self.mean = x.mean(0)
        self.std = x.std(0) + 1e-3
        x = (x - self.mean) / self.std
        self.weight = torch.zeros(x.shape[1], self.num_classes, dtype=x.dtype, requires_grad=True)
        self.bias = torch.zeros(self.num_classes, dtype=x.dtype, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [self.weight, self.bias],
            max_iter=self.max_iter,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure():
            optimizer.zero_grad()
            logits = x @ self.weight + self.bias
            loss = F.cross_entropy(logits, y) + self.l2 * self.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.detach().float().cpu() - self.mean) / self.std
        return (x @ self.weight + self.bias).argmax(-1)


@lru_cache(maxsize=4)
def digit_classifiers(pairs_per_digit: int = 2, seed: int = 0) -> dict[str, SoftmaxRegression]:
    """One digit classifier per image modality, fit on PolyDigits' training split (cached: trained
    once per process)."""
    train = load_polydigits(pairs_per_digit, seed=seed).train
    classes = train["label"].argmax(-1)
    return {
        name: SoftmaxRegression(NUM_CLASSES).fit(train[name], classes) for name in IMAGE_MODALITIES
    }


def _predict(classifiers: Mapping[str, SoftmaxRegression], name: str, x: torch.Tensor):
    if name == "label":
        return x.argmax(-1).cpu()
    return classifiers[name].predict(x)


def probe_accuracy(features: torch.Tensor, classes: torch.Tensor, seed: int = 0) -> float:
    """2-fold cross-validated accuracy of a softmax regression of ``classes`` on ``features``."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(classes), generator=generator)
    folds = (order[: len(order) // 2], order[len(order) // 2 :])
    features, classes = features.detach().cpu(), classes.cpu()
    correct = 0
    for train, test in (folds, folds[::-1]):
        probe = SoftmaxRegression(NUM_CLASSES).fit(features[train], classes[train])
        correct += (probe.predict(features[test]) == classes[test]).sum().item()
    return correct / len(classes)


@torch.no_grad()
def evaluate_multimodal(
    model: MultimodalVAE,
    loader: Iterable[Mapping[str, torch.Tensor]],
    classifiers: Mapping[str, SoftmaxRegression],
    num_prior_samples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Reconstruction, coherence and latent-probe metrics on the items of ``loader``.

    - ``classifier_accuracy/<m>``: accuracy of the digit classifier of image modality m on real data
      (the ceiling of the coherence numbers);
    - ``recon_loglik/<m>``: mean log p(x_m | z) with z the posterior mean given all modalities;
    - ``coherence/<m>``: x_m generated (decoder mean) from the posterior mean given the OTHER
      modalities, classified; fraction matching the item's class (``coherence_mean``: their mean);
    - ``joint_coherence``: fraction of prior samples whose decoded modalities all get one class;
    - ``probe_accuracy/joint`` and ``probe_accuracy/<m>``: 2-fold cross-validated softmax-regression
      accuracy of the class from the posterior mean given all modalities / modality m alone.
    Deterministic: the prior samples come from a generator seeded with ``seed``.
    """
    was_training = model.training
    model.eval()
    try:
        device = model.prior_loc.device
        batches = list(loader)
        batch = {
            name: torch.cat([b[name] for b in batches]).to(device) for name in model.modalities
        }
        classes = batch["label"].argmax(-1).cpu()
        names = model.modalities
        metrics: dict[str, float] = {}
        for name in names:
            if name in classifiers:
                accuracy = (_predict(classifiers, name, batch[name]) == classes).double().mean()
                metrics[f"classifier_accuracy/{name}"] = accuracy.item()

        z = model.latent_mean(batch, names)
        for name, p_x in model.decode(z).items():
            metrics[f"recon_loglik/{name}"] = p_x.log_prob(batch[name]).mean().item()

        coherences = []
        for name in names:
            others = [other for other in names if other != name]
            generated = model.decode(model.latent_mean(batch, others), [name])[name].mean
            coherence = (_predict(classifiers, name, generated) == classes).double().mean().item()
            metrics[f"coherence/{name}"] = coherence
            coherences.append(coherence)
        metrics["coherence_mean"] = sum(coherences) / len(coherences)

        generator = torch.Generator().manual_seed(seed)
        z_prior = torch.randn(num_prior_samples, model.latent_dim, generator=generator).to(device)
        predictions = torch.stack(
            [_predict(classifiers, name, p_x.mean) for name, p_x in model.decode(z_prior).items()]
        )
        agree = (predictions == predictions[:1]).all(0).double().mean()
        metrics["joint_coherence"] = agree.item()

        metrics["probe_accuracy/joint"] = probe_accuracy(z, classes, seed)
        for name in names:
            metrics[f"probe_accuracy/{name}"] = probe_accuracy(
                model.latent_mean(batch, [name]), classes, seed
            )
    finally:
        model.train(was_training)
    return metrics
