"""Heterogeneous-likelihood VAEs for tables with missing entries, and their evaluation.

Models (batches are the dicts of :mod:`examples.data.tabular`: ``x``, ``x_in``, ``observed``,
``hidden``):

- :class:`HeterogeneousVAE`: encoder q(z | observed entries); a shared decoder trunk; one output
  head per attribute with its own likelihood (Normal, LogNormal, Poisson, Categorical, Bernoulli),
  as in the tabular experiments of Javaloy et al. (2022). Three objectives:

  * ``"elbo"``: the evidence lower bound (Kingma & Welling, 2014);
  * ``"iwae"``: the importance-weighted bound with K samples (Burda et al., 2016); the decoder is
    applied to all K samples;
  * ``"dreg"``: IWAE trained with doubly reparameterised gradients (Tucker et al., 2018).

- :class:`HIVAE`: the heterogeneous-incomplete VAE of Nazabal et al. (2020): a Gumbel-softmax
  mixture component s, z | s, and per-attribute heads that read both z and s.

``model(batch)`` returns the losses: one term per attribute (named after it: minus its
log-likelihood summed over the observed entries, averaged over the batch) plus ``"kl"``. Their sum
is the negative training objective, or, for IWAE/DReG, a surrogate whose gradient is the
estimator's. The likelihood terms are where the attributes' gradients meet in the shared decoder
trunk.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import (
    Bernoulli,
    Categorical,
    Distribution,
    LogNormal,
    Normal,
    OneHotCategorical,
    Poisson,
    RelaxedOneHotCategorical,
    kl_divergence,
)

from blockfinder.errors import OptionError
from examples.data.tabular import Attribute, TabularSchema
from examples.layers import MLP, GaussianEncoder, linear, positive

MAX_LOG_RATE = 20.0
"""Poisson log-rates are clamped to [-MAX_LOG_RATE, MAX_LOG_RATE] (rates 2e-9 to 5e8), so that the
log-likelihood of any count stays finite."""

OBJECTIVES = ("elbo", "iwae", "dreg")


# ------------------------------------------------------------------------------- likelihoods
def num_params(attribute: Attribute) -> int:
    """Number of raw outputs a head produces for ``attribute``'s likelihood."""
    return {
        "real": 2,
        "positive": 2,
        "count": 1,
        "binary": 1,
        "categorical": attribute.num_categories,
    }[attribute.kind]


def likelihood(kind: str, theta: torch.Tensor) -> Distribution:
    """The likelihood of an attribute of ``kind`` from raw head outputs ``theta`` (..., n_params).

    real: Normal(loc, softplus scale); positive: LogNormal (same parameters, on the log);
    count: Poisson with log-rate ``theta``; binary: Bernoulli logits; categorical: logits.
    """
    if kind == "real":
        return Normal(theta[..., 0], positive(theta[..., 1]), validate_args=False)
    if kind == "positive":
        return LogNormal(theta[..., 0], positive(theta[..., 1]), validate_args=False)
    if kind == "count":
        return Poisson(theta[..., 0].clamp(-MAX_LOG_RATE, MAX_LOG_RATE).exp(), validate_args=False)
    if kind == "binary":
        return Bernoulli(logits=theta[..., 0], validate_args=False)
    if kind == "categorical":
        return Categorical(logits=theta, validate_args=False)
    raise ValueError(f"unknown attribute kind {kind!r}")


def marginal_bias(attribute: Attribute) -> torch.Tensor:
    """Head bias at which the likelihood is the attribute's marginal maximum-likelihood fit.

    Starting there keeps e.g. a Poisson head for prices in the thousands from spending its first
    thousands of steps just finding the scale.
    """
    bias = torch.zeros(num_params(attribute))
    if attribute.kind in ("real", "positive"):
        bias[1] = math.log(math.expm1(1.0))  # softplus^-1(1): unit scale on standardised data
    elif attribute.kind == "count":
        bias[0] = math.log(max(attribute.marginal[0], 1e-3))
    elif attribute.kind == "binary":
        p = min(max(attribute.marginal[0], 1e-3), 1 - 1e-3)
        bias[0] = math.log(p / (1 - p))
    else:
        bias[:] = torch.tensor(attribute.marginal).log()
    return bias


def point_estimate(kind: str, distribution: Distribution) -> torch.Tensor:
    """Imputation in likelihood space: mean (Normal, Poisson), median (LogNormal), mode (others)."""
    if kind in ("real", "count"):
        return distribution.mean
    if kind == "positive":
        return distribution.base_dist.loc.exp()
    if kind == "binary":
        return (distribution.logits > 0).to(distribution.logits.dtype)
    return distribution.logits.argmax(dim=-1).to(distribution.logits.dtype)


class AttributeHead(nn.Module):
    """Linear map from decoder features to one attribute's likelihood."""

    def __init__(self, attribute: Attribute, input_dim: int):
        super().__init__()
        self.kind = attribute.kind
        self.linear = nn.Linear(input_dim, num_params(attribute))
        with torch.no_grad():
            self.linear.weight.mul_(0.1)
            self.linear.bias.copy_(marginal_bias(attribute))

    def forward(self, h: torch.Tensor, detach_params: bool = False) -> Distribution:
        return likelihood(self.kind, linear(self.linear, h, detach_params))


def latent_size(options: Mapping[str, object], schema: TabularSchema) -> int:
    """Size of z from a model file's options: ``latent``, or with ``latent_frac > 0`` that
    fraction of the number of attributes, rounded, at least 1 (the authors' code uses 50%)."""
    fraction = float(options.get("latent_frac", 0.0))
    if fraction > 0:
        return max(1, int(len(schema.attributes) * fraction + 0.5))
    latent = int(options["latent"])
    if latent < 1:
        raise OptionError(f"latent={latent}: the latent size must be >= 1")
    return latent


class TabularVAEBase(nn.Module):
    """What the tabular models share: schema, encoder input, masked log-likelihoods.

    ``dropout``: dropout on the encoder's observed features (not on the mask), as the input
    dropout of the paper's code (0.1 there).
    """

    def __init__(self, schema: TabularSchema, dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise OptionError(f"dropout={dropout}: the input dropout must be in [0, 1)")
        self.schema = schema
        self.attribute_names = schema.names
        self.input_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("feature_attribute", schema.feature_index(), persistent=False)

    def encoder_input(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Observed entries (one-hot / standardised, zero where not observed) and the mask."""
        observed = batch["observed"]
        feature_mask = observed.index_select(-1, self.feature_attribute)
        features = self.input_dropout(batch["x_in"] * feature_mask)
        return torch.cat([features, observed], dim=-1)

    def log_likelihoods(
        self,
        distributions: Mapping[str, Distribution],
        batch: Mapping[str, torch.Tensor],
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per attribute, log p(x_d | ...) times ``mask`` (default: the observed entries)."""
        x = batch["x"]
        mask = batch["observed"] if mask is None else mask
        return {
            name: distributions[name].log_prob(x[..., d]) * mask[..., d]
            for d, name in enumerate(self.attribute_names)
        }

    def impute(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Distribution]:
        """The likelihood of every attribute given the observed entries, at the posterior mode."""
        raise NotImplementedError


class HeterogeneousVAE(TabularVAEBase):
    """VAE with one likelihood head per attribute on a shared decoder trunk.

    Args:
        schema: the table's attributes (:class:`examples.data.tabular.TabularSchema`).
        latent_dim, hidden_dim: sizes of z and of the hidden layers.
        objective: ``"elbo"``, ``"iwae"`` or ``"dreg"`` (see the module docstring).
        num_samples: K, the number of importance samples (``"iwae"``/``"dreg"``; 1 for the ELBO).
        num_layers: hidden layers of the encoder and of the decoder trunk (3 in the paper's code).
        dropout: input dropout of the encoder (:class:`TabularVAEBase`).
    """

    def __init__(
        self,
        schema: TabularSchema,
        latent_dim: int = 8,
        hidden_dim: int = 64,
        objective: str = "elbo",
        num_samples: int = 1,
        num_layers: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__(schema, dropout)
        if num_layers < 1 or hidden_dim < 1:
            raise OptionError(f"layers={num_layers}, hidden={hidden_dim}: both must be >= 1")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if num_samples < 1 or (objective == "elbo" and num_samples != 1):
            raise ValueError("num_samples must be >= 1, and 1 for the ELBO (use 'iwae' for K > 1)")
        self.objective = objective
        self.num_samples = num_samples
        self.latent_dim = latent_dim
        n_attributes = len(schema.attributes)
        self.encoder = GaussianEncoder(
            schema.input_dim + n_attributes, hidden_dim, latent_dim, num_layers
        )
        self.trunk = MLP([latent_dim] + [hidden_dim] * num_layers, nn.ReLU, activate_output=True)
        self.heads = nn.ModuleDict(
            {a.name: AttributeHead(a, hidden_dim) for a in schema.attributes}
        )
        self.register_buffer("prior_loc", torch.zeros(latent_dim))
        self.register_buffer("prior_scale", torch.ones(latent_dim))

    def prior(self) -> Normal:
        return Normal(self.prior_loc, self.prior_scale, validate_args=False)

    def posterior(self, batch: Mapping[str, torch.Tensor]) -> Normal:
        """q(z | observed entries of x)."""
        return self.encoder(self.encoder_input(batch))

    def decode(self, z: torch.Tensor, detach_params: bool = False) -> dict[str, Distribution]:
        """p(x_d | z) for every attribute d: the shared trunk's output fans out to the heads."""
        h = self.trunk(z, detach_params)
        return {name: head(h, detach_params) for name, head in self.heads.items()}

    def impute(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Distribution]:
        return self.decode(self.posterior(batch).mean)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q = self.posterior(batch)
        if self.objective == "elbo":
            return self._elbo(q, batch)
        if self.objective == "iwae":
            return self._iwae(q, batch)
        return self._dreg(q, batch)

    def _elbo(self, q: Normal, batch) -> dict[str, torch.Tensor]:
        z = q.rsample()
        log_liks = self.log_likelihoods(self.decode(z), batch)
        losses = {name: -log_lik.mean() for name, log_lik in log_liks.items()}
        losses["kl"] = kl_divergence(q, self.prior()).sum(-1).mean()
        return losses

    def _iwae(self, q: Normal, batch) -> dict[str, torch.Tensor]:
        """IWAE: grad log mean_k w_k = sum_k w~_k grad log w_k, with w~ the normalised weights.

        Each term is weighted by the (detached) normalised importance weights, so the terms sum to a
        surrogate whose gradient is exactly the IWAE gradient (Burda et al., 2016, eq. 14).
        """
        z = q.rsample((self.num_samples,))  # (K, N, L)
        log_liks = self.log_likelihoods(self.decode(z), batch)  # each (K, N)
        log_ratio = q.log_prob(z).sum(-1) - self.prior().log_prob(z).sum(-1)
        log_w = torch.stack(list(log_liks.values())).sum(0) - log_ratio
        weights = torch.softmax(log_w, dim=0).detach()
        losses = {name: -(weights * ll).sum(0).mean() for name, ll in log_liks.items()}
        losses["kl"] = (weights * log_ratio).sum(0).mean()
        return losses

    def _dreg(self, q: Normal, batch) -> dict[str, torch.Tensor]:
        """Doubly reparameterised IWAE gradients (Tucker et al., 2018), as in the paper's code.

        Decoder path: the decoder scores the *detached* samples, weighted by w~ (the IWAE gradient
        of the generative model). Encoder path: the decoder (weights detached) scores the samples,
        and log q uses detached variational parameters, so the encoder learns only through the
        samples, weighted by w~^2. Each likelihood term holds both paths; ``"kl"`` holds the encoder
        path's log q(z) - log p(z).
        """
        z = q.rsample((self.num_samples,))
        decoder_log_liks = self.log_likelihoods(self.decode(z.detach()), batch)
        encoder_log_liks = self.log_likelihoods(self.decode(z, detach_params=True), batch)
        q_stopped = Normal(q.loc.detach(), q.scale.detach(), validate_args=False)
        log_ratio = q_stopped.log_prob(z).sum(-1) - self.prior().log_prob(z).sum(-1)
        log_w = torch.stack(list(encoder_log_liks.values())).sum(0) - log_ratio
        weights = torch.softmax(log_w, dim=0).detach()
        losses = {
            name: -(
                (weights * decoder_log_liks[name]).sum(0)
                + (weights.square() * encoder_log_liks[name]).sum(0)
            ).mean()
            for name in self.attribute_names
        }
        losses["kl"] = (weights.square() * log_ratio).sum(0).mean()
        return losses


class HIVAEHead(nn.Module):
    """HI-VAE head (Nazabal et al., 2020): y_d = W_d z; the location / rate / logits from [y_d, s];
    the scale of Normal / LogNormal attributes from s alone (one scale per mixture component)."""

    def __init__(self, attribute: Attribute, latent_dim: int, mixture_dim: int, y_dim: int):
        super().__init__()
        self.kind = attribute.kind
        self.project = nn.Linear(latent_dim, y_dim)
        n_first = 1 if self.kind in ("real", "positive") else num_params(attribute)
        self.first = nn.Linear(y_dim + mixture_dim, n_first)
        self.scale = nn.Linear(mixture_dim, 1) if self.kind in ("real", "positive") else None
        bias = marginal_bias(attribute)
        with torch.no_grad():
            self.first.weight.mul_(0.1)
            self.first.bias.copy_(bias[:n_first])
            if self.scale is not None:
                self.scale.weight.zero_()
                self.scale.bias.copy_(bias[1:])

    def forward(self, z: torch.Tensor, s: torch.Tensor) -> Distribution:
        y = self.project(z)
        theta = self.first(torch.cat([y, s], dim=-1))
        if self.scale is not None:
            theta = torch.cat([theta, self.scale(s)], dim=-1)
        return likelihood(self.kind, theta)


class HIVAE(TabularVAEBase):
    """Heterogeneous-incomplete VAE (Nazabal et al., 2020).

    Generative model: s ~ Cat(uniform) over ``mixture_dim`` components; z | s ~ N(mu(s), I);
    x_d | z, s from head d. Inference: q(s | x) (relaxed to a Gumbel-softmax sample at
    ``temperature`` while training, Jang et al., 2017) and q(z | x, s). Both z and s fan out to
    every attribute head. ``"kl"`` = KL(q(s|x) || p(s)) (exact) + log q(z|x,s) - log p(z|s) (one
    sample).
    """

    def __init__(
        self,
        schema: TabularSchema,
        latent_dim: int = 8,
        hidden_dim: int = 64,
        mixture_dim: int = 8,
        y_dim: int = 8,
        temperature: float = 0.5,
        dropout: float = 0.0,
    ):
        super().__init__(schema, dropout)
        self.latent_dim = latent_dim
        self.mixture_dim = mixture_dim
        self.temperature = temperature
        input_dim = schema.input_dim + len(schema.attributes)
        self.body = MLP([input_dim, hidden_dim, hidden_dim], nn.Tanh, activate_output=True)
        self.s_logits = nn.Linear(hidden_dim, mixture_dim)
        self.z_loc = nn.Linear(hidden_dim + mixture_dim, latent_dim)
        self.z_raw_scale = nn.Linear(hidden_dim + mixture_dim, latent_dim)
        self.prior_z_loc = nn.Linear(mixture_dim, latent_dim)
        self.heads = nn.ModuleDict(
            {a.name: HIVAEHead(a, latent_dim, mixture_dim, y_dim) for a in schema.attributes}
        )
        self.register_buffer("prior_s_logits", torch.zeros(mixture_dim))

    def posterior_s(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features h and the logits of q(s | x)."""
        h = self.body(self.encoder_input(batch))
        return h, self.s_logits(h)

    def posterior_z(self, h: torch.Tensor, s: torch.Tensor) -> Normal:
        hs = torch.cat([h, s], dim=-1)
        return Normal(self.z_loc(hs), positive(self.z_raw_scale(hs)), validate_args=False)

    def prior_z(self, s: torch.Tensor) -> Normal:
        loc = self.prior_z_loc(s)
        return Normal(loc, torch.ones_like(loc), validate_args=False)

    def decode(self, z: torch.Tensor, s: torch.Tensor) -> dict[str, Distribution]:
        return {name: head(z, s) for name, head in self.heads.items()}

    def impute(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Distribution]:
        h, logits = self.posterior_s(batch)
        s = F.one_hot(logits.argmax(-1), self.mixture_dim).to(h.dtype)
        return self.decode(self.posterior_z(h, s).mean, s)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h, logits = self.posterior_s(batch)
        temperature = logits.new_tensor(self.temperature)
        s = RelaxedOneHotCategorical(temperature, logits=logits, validate_args=False).rsample()
        q_z = self.posterior_z(h, s)
        z = q_z.rsample()
        log_liks = self.log_likelihoods(self.decode(z, s), batch)
        losses = {name: -log_lik.mean() for name, log_lik in log_liks.items()}
        kl_s = kl_divergence(
            OneHotCategorical(logits=logits, validate_args=False),
            OneHotCategorical(logits=self.prior_s_logits.expand_as(logits), validate_args=False),
        )
        kl_z = q_z.log_prob(z).sum(-1) - self.prior_z(s).log_prob(z).sum(-1)
        losses["kl"] = (kl_s + kl_z).mean()
        return losses


# -------------------------------------------------------------------------------- evaluation
TABULAR_METRICS = {
    "impute_error*": "min",
    "test_loglik*": "max",
    "baseline_impute_error*": "min",
    "baseline_test_loglik*": "max",
}
"""Directions of :func:`evaluate_tabular`'s metrics (``METRICS`` of the tabular model files)."""


def baseline_distribution(attribute: Attribute) -> Distribution:
    """The attribute's marginal maximum-likelihood fit on the observed training entries, in
    likelihood space: Normal(0, 1) / LogNormal(0, 1) for standardised real / positive values,
    Poisson(mean), Bernoulli(P(1)), Categorical(frequencies)."""
    if attribute.kind == "real":
        return Normal(0.0, 1.0, validate_args=False)
    if attribute.kind == "positive":
        return LogNormal(0.0, 1.0, validate_args=False)
    if attribute.kind == "count":
        return Poisson(torch.tensor(max(attribute.marginal[0], 1e-9)), validate_args=False)
    if attribute.kind == "binary":
        return Bernoulli(probs=torch.tensor(attribute.marginal[0]), validate_args=False)
    return Categorical(probs=torch.tensor(attribute.marginal), validate_args=False)


def baseline_guess(attribute: Attribute) -> float:
    """Mean/mode imputation from the training split: the mean of the observed training values
    (original units) for numeric attributes, the most frequent level (code) otherwise."""
    if attribute.is_numeric:
        return attribute.mean
    if attribute.kind == "binary":
        return float(attribute.marginal[0] > 0.5)
    return float(max(range(len(attribute.marginal)), key=attribute.marginal.__getitem__))


@torch.no_grad()
def evaluate_tabular(
    model: TabularVAEBase, loader: Iterable[Mapping[str, torch.Tensor]]
) -> dict[str, float]:
    """Imputation of the hidden entries from the observed ones, per attribute, beside the
    trivial baseline.

    Returns ``impute_error/<attr>`` (numeric: RMSE in original units divided by the attribute's
    observed training range, as in Nazabal et al. 2020; categorical/binary: error rate),
    ``test_loglik/<attr>`` (mean log-likelihood of the hidden entries, in likelihood space), and
    for both their mean over attributes (``..._mean``) and worst attribute (``..._worst``).

    The baseline imputes every hidden entry with the attribute's training mean (numeric) or most
    frequent level, and scores it with the attribute's marginal fit (:func:`baseline_guess`,
    :func:`baseline_distribution`): ``baseline_impute_error/<attr>``,
    ``baseline_impute_error_mean`` / ``_worst``, ``baseline_test_loglik_mean`` / ``_worst``, and
    ``impute_error_rel_baseline`` = ``impute_error_mean / baseline_impute_error_mean`` (below 1:
    the model imputes better than the baseline). A model that does not beat it is not learning.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        attributes = model.schema.attributes
        sums = {
            key: torch.zeros(len(attributes), dtype=torch.float64)
            for key in ("error", "loglik", "base_error", "base_loglik", "count")
        }
        baselines = [baseline_distribution(a) for a in attributes]
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            distributions = model.impute(batch)
            hidden = batch["hidden"]
            log_liks = model.log_likelihoods(distributions, batch, mask=hidden)
            for d, attribute in enumerate(attributes):
                mask = hidden[:, d] > 0
                if not mask.any():
                    continue
                guess = point_estimate(attribute.kind, distributions[attribute.name])[mask]
                truth = batch["x"][mask, d]
                base = torch.full_like(truth, baseline_guess(attribute))
                if attribute.is_numeric:
                    true_value = attribute.to_original(truth).double()
                    error = (attribute.to_original(guess).double() - true_value).square()
                    base_error = (base.double() - true_value).square()
                else:
                    error, base_error = (guess != truth).double(), (base != truth).double()
                sums["error"][d] += error.sum().cpu()
                sums["base_error"][d] += base_error.sum().cpu()
                sums["loglik"][d] += log_liks[attribute.name][mask].double().sum().cpu()
                sums["base_loglik"][d] += baselines[d].log_prob(truth.cpu()).double().sum()
                sums["count"][d] += mask.sum().cpu()
    finally:
        model.train(was_training)

    metrics: dict[str, float] = {}
    summary: dict[str, list[float]] = {key: [] for key in ("error", "loglik", "base", "base_ll")}
    for d, attribute in enumerate(attributes):
        n = sums["count"][d].item()
        if n == 0:
            continue
        error, base = sums["error"][d].item() / n, sums["base_error"][d].item() / n
        if attribute.is_numeric:
            error = math.sqrt(error) / attribute.value_range
            base = math.sqrt(base) / attribute.value_range
        loglik = sums["loglik"][d].item() / n
        metrics[f"impute_error/{attribute.name}"] = error
        metrics[f"test_loglik/{attribute.name}"] = loglik
        metrics[f"baseline_impute_error/{attribute.name}"] = base
        summary["error"].append(error)
        summary["loglik"].append(loglik)
        summary["base"].append(base)
        summary["base_ll"].append(sums["base_loglik"][d].item() / n)
    if summary["error"]:
        metrics["impute_error_mean"] = statistics.fmean(summary["error"])
        metrics["impute_error_worst"] = max(summary["error"])
        metrics["test_loglik_mean"] = statistics.fmean(summary["loglik"])
        metrics["test_loglik_worst"] = min(summary["loglik"])
        metrics["baseline_impute_error_mean"] = statistics.fmean(summary["base"])
        metrics["baseline_impute_error_worst"] = max(summary["base"])
        metrics["baseline_test_loglik_mean"] = statistics.fmean(summary["base_ll"])
        metrics["baseline_test_loglik_worst"] = min(summary["base_ll"])
        if metrics["baseline_impute_error_mean"] > 0:
            metrics["impute_error_rel_baseline"] = (
                metrics["impute_error_mean"] / metrics["baseline_impute_error_mean"]
            )
    return metrics
