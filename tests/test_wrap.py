"""wrap(): the library API, end to end on small multimodal models."""

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

import impartial_train as it


class TabularVAE(nn.Module):
    """Shared decoder trunk with one head per attribute; KL regularizer."""

    def __init__(self, attributes=("a", "b", "c"), latent=3):
        super().__init__()
        self.attributes = attributes
        self.enc = nn.Sequential(
            nn.Linear(len(attributes), 16), nn.Tanh(), nn.Linear(16, 2 * latent)
        )
        self.trunk = nn.Sequential(nn.Linear(latent, 16), nn.Tanh())
        self.heads = nn.ModuleDict({a: nn.Linear(16, 1) for a in attributes})

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        q = Normal(mu, torch.exp(0.5 * logvar))
        z = q.rsample()
        h = self.trunk(z)
        out = {
            a: -Normal(self.heads[a](h).squeeze(-1), 1.0).log_prob(x[:, i]).mean() * (10.0**i)
            for i, a in enumerate(self.attributes)
        }
        out["kl"] = kl_divergence(q, Normal(0.0, 1.0)).sum(-1).mean()
        return out


class PoE(nn.Module):
    """Product of experts over a dict batch; a missing modality is simply left out."""

    def __init__(self, names=("x", "y")):
        super().__init__()
        self.enc = nn.ModuleDict({n: nn.Linear(4, 4) for n in names})
        self.dec = nn.ModuleDict({n: nn.Linear(2, 4) for n in names})

    def forward(self, batch):
        precision, mean = 1.0, 0.0
        for name, x in batch.items():
            mu, logvar = self.enc[name](x).chunk(2, dim=-1)
            p = torch.exp(-logvar)
            precision = precision + p
            mean = mean + mu * p
        q = Normal(mean / precision, precision.rsqrt())
        z = q.rsample()
        out = {n: (self.dec[n](z) - x).pow(2).sum(-1).mean() for n, x in batch.items()}
        out["kl"] = kl_divergence(q, Normal(0.0, 1.0)).sum(-1).mean()
        return out


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def step(model, call, seed=0):
    torch.manual_seed(seed)
    out = call()
    model.zero_grad(set_to_none=True)
    sum(out.values()).backward()
    return out, grads_of(model)


def test_sum_method_gives_exactly_plain_backward():
    torch.manual_seed(0)
    model, x = TabularVAE(), torch.randn(8, 3)
    imodel = it.wrap(model, x, method="sum")
    _, plain = step(model, lambda: model(x))
    _, wrapped = step(model, lambda: imodel(x))
    for name in plain:
        assert torch.equal(plain[name], wrapped[name]), name


def imtlg_reference(J):
    """IMTL-G closed form (Liu et al. 2021), written independently of the library."""
    u = J / J.norm(dim=1, keepdim=True)
    D = J[:1] - J[1:]
    U = u[:1] - u[1:]
    alpha_rest = J[0] @ U.T @ torch.linalg.inv(D @ U.T)
    alpha = torch.cat([1 - alpha_rest.sum(0, keepdim=True), alpha_rest])
    return alpha @ J


def test_imtlg_step_equals_hand_computation():
    torch.manual_seed(1)
    model, x = TabularVAE(), torch.randn(16, 3)
    imodel = it.wrap(model, x, method="imtl-g")
    _, got = step(model, lambda: imodel(x), seed=3)

    # By hand: stream gradients at the trunk output, IMTL-G, rescale, backprop + KL.
    torch.manual_seed(3)
    mu, logvar = model.enc(x).chunk(2, dim=-1)
    q = Normal(mu, torch.exp(0.5 * logvar))
    z = q.rsample()
    h = model.trunk(z)
    hd = h.detach().requires_grad_()
    task = {
        a: -Normal(model.heads[a](hd).squeeze(-1), 1.0).log_prob(x[:, i]).mean() * (10.0**i)
        for i, a in enumerate(model.attributes)
    }
    J = torch.stack(
        [torch.autograd.grad(t, hd, retain_graph=True)[0].flatten() for t in task.values()]
    )
    g = imtlg_reference(J.double())
    g = (g * J.double().sum(0).norm() / g.norm()).float().view_as(h)
    kl = kl_divergence(q, Normal(0.0, 1.0)).sum(-1).mean()
    shared = [(n, p) for n, p in model.named_parameters() if not n.startswith("heads")]
    via_h = torch.autograd.grad(h, [p for _, p in shared], g, retain_graph=True, allow_unused=True)
    via_kl = torch.autograd.grad(kl, [p for _, p in shared], allow_unused=True)
    for (name, _), a, b in zip(shared, via_h, via_kl):
        expected = (a if a is not None else 0) + (b if b is not None else 0)
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-5)
    for a, loss in task.items():
        expected = torch.autograd.grad(loss, model.heads[a].weight, retain_graph=True)[0]
        torch.testing.assert_close(got[f"heads.{a}.weight"], expected, rtol=1e-4, atol=1e-6)


def test_same_samples_same_losses_state_dict_and_eval_untouched():
    torch.manual_seed(2)
    model, x = TabularVAE(), torch.randn(8, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    imodel = it.wrap(model, x, method="pcgrad")
    assert imodel.state_dict().keys() == before.keys()
    for k, v in imodel.state_dict().items():
        assert torch.equal(v, before[k])
    torch.manual_seed(5)
    eager = model(x)
    torch.manual_seed(5)
    wrapped = imodel(x)
    for k in eager:
        assert torch.equal(eager[k].detach(), wrapped[k].detach())
    model.eval()
    with torch.no_grad():
        out = imodel(x)
    assert set(out) == {"a", "b", "c", "kl"}


def test_new_batch_size_and_missing_modality_keep_working():
    torch.manual_seed(3)
    model = PoE()
    imodel = it.wrap(model, {"x": torch.randn(4, 4), "y": torch.randn(4, 4)}, method="imtl-g")
    for batch in (
        {"x": torch.randn(4, 4), "y": torch.randn(4, 4)},
        {"x": torch.randn(7, 4), "y": torch.randn(7, 4)},
        {"x": torch.randn(5, 4)},
    ):
        out = imodel(batch)
        model.zero_grad()
        sum(out.values()).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    stats = imodel.last_stats()
    assert stats, "the two-modality steps used a branch point"
    entry = next(iter(stats.values()))
    assert len(entry["weights"]) == len(entry["streams"]) == 2
    assert len(entry["cosine"]) == 2 and abs(entry["cosine"][0][0] - 1) < 1e-5


def test_gradnorm_weights_are_separate_learnable_parameters():
    torch.manual_seed(4)
    model, x = TabularVAE(), torch.randn(8, 3)
    imodel = it.wrap(model, x, method="gradnorm")
    out = imodel(x)
    sum(out.values()).backward()
    extra = list(imodel.method_parameters())
    assert extra, "GradNorm exposes its weights"
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) not in ids for p in extra)
    state = imodel.methods_state_dict()
    fresh = it.wrap(model, x, method="gradnorm")
    fresh.load_methods_state_dict(state)
    loaded = fresh.methods_state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        for name, tensor in value.items():
            torch.testing.assert_close(loaded[key][name], tensor)
    out = fresh(x)
    sum(out.values()).backward()
    for key, value in fresh.methods_state_dict().items():
        for name, tensor in value.items():
            assert tensor.shape == state[key][name].shape


def test_bad_method_name_is_a_clear_error():
    model, x = TabularVAE(), torch.randn(4, 3)
    with pytest.raises(ValueError, match="pcgrad"):
        it.wrap(model, x, method="no-such-method")


SEEN = []


class _ActivationSpy(it.methods.Aggregator):
    """An aggregator that asks for the activation and records what it gets."""

    name = "activation-spy"
    uses_activation = True

    def forward(self, J, *, gramian=None, losses=None, activation=None):
        SEEN.append(None if activation is None else tuple(activation.shape))
        weights = torch.ones(J.shape[0], dtype=J.dtype)
        return it.methods.Aggregation(gradient=J.sum(0), weights=weights)


@pytest.mark.parametrize("engine", ["graph", "hook"])
def test_activation_reaches_methods_that_ask_for_it_under_the_graph_engine(engine):
    torch.manual_seed(6)
    model, x = TabularVAE(), torch.randn(8, 3)
    SEEN.clear()
    imodel = it.wrap(model, x, method=_ActivationSpy(), engine=engine)
    for _ in range(2):  # the graph engine's first step of a structure runs through hooks
        out = imodel(x)
        sum(out.values()).backward()
    expected = (8, 16) if engine == "graph" else None
    assert SEEN[-1] == expected


def test_graddrop_trains_with_the_activation_sign():
    torch.manual_seed(7)
    model, x = TabularVAE(), torch.randn(8, 3)
    imodel = it.wrap(model, x, method="graddrop", method_args={"seed": 0})
    for _ in range(2):
        model.zero_grad()
        out = imodel(x)
        sum(out.values()).backward()
    assert imodel.last_engine == "graph"  # the engine that gives GradDrop the activation
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


class _LossSpy(it.methods.Aggregator):
    """A user's aggregator (reads the stream losses unless it says it does not)."""

    name = "loss-spy"

    def __init__(self, uses_losses: bool) -> None:
        super().__init__()
        self.uses_losses = uses_losses
        self.seen: list = []

    def forward(self, J, *, gramian=None, losses=None, activation=None):
        self.seen.append(None if losses is None else losses.detach().clone())
        weights = torch.ones(J.shape[0], dtype=torch.float64)
        return it.methods.Aggregation(gradient=J.sum(0), weights=weights)


@pytest.mark.parametrize("engine", ["graph", "hook"])
def test_stream_losses_reach_methods_that_read_them_only(engine):
    torch.manual_seed(8)
    model, x = TabularVAE(), torch.randn(8, 3)
    for uses in (True, False):
        spy = _LossSpy(uses)
        imodel = it.wrap(model, x, method=spy, engine=engine)
        for _ in range(3):  # the graph engine's first step of a structure runs through hooks
            out = imodel(x)
            sum(out.values()).backward()
        # wrap copies an instance per branch point: read the copy's record
        (method,) = imodel._methods.values()
        assert len(method.seen) == 3
        if uses:
            tasks = [name for name in out if name != "kl"]
            want = torch.stack([out[name].detach() for name in tasks]).double()
            assert all(seen is not None for seen in method.seen)
            torch.testing.assert_close(method.seen[-1].double(), want)
        else:
            assert all(seen is None for seen in method.seen)
