"""The graph engine (rewritten fx program) against the hook engine and the eager model."""

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

import impartial_train as it
from impartial_train.engine.graph import Branch, GraphUnavailable

# ----------------------------------------------------------------------------------------------
# Models


class TabularVAE(nn.Module):
    """Shared decoder trunk (with dropout and an in-place ReLU) and one head per attribute; a
    BatchNorm in the encoder (its running statistics must move as in eager); KL regularizer."""

    def __init__(self, attributes=("a", "b", "c"), latent=3):
        super().__init__()
        self.attributes = attributes
        self.enc = nn.Sequential(
            nn.Linear(len(attributes), 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2 * latent)
        )
        self.trunk = nn.Sequential(nn.Linear(latent, 16), nn.Dropout(0.2), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({a: nn.Linear(16, 1) for a in attributes})
        self.beta = 1.0

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        q = Normal(mu, torch.exp(0.5 * logvar))
        h = self.trunk(q.rsample())
        out = {
            a: -Normal(self.heads[a](h).squeeze(-1), 1.0).log_prob(x[:, i]).mean() * (10.0**i)
            for i, a in enumerate(self.attributes)
        }
        out["kl"] = self.beta * kl_divergence(q, Normal(0.0, 1.0)).sum(-1).mean()
        return out


class PoE(nn.Module):
    """Product of experts over a dict batch; a missing modality is simply left out."""

    def __init__(self, names=("x", "y", "w")):
        super().__init__()
        self.enc = nn.ModuleDict({n: nn.Linear(4, 4) for n in names})
        self.dec = nn.ModuleDict({n: nn.Sequential(nn.Linear(2, 8), nn.Tanh()) for n in names})
        self.out = nn.ModuleDict({n: nn.Linear(8, 4) for n in names})

    def forward(self, batch):
        precision, mean = 1.0, 0.0
        for name, x in batch.items():
            mu, logvar = self.enc[name](x).chunk(2, dim=-1)
            p = torch.exp(-logvar)
            precision = precision + p
            mean = mean + mu * p
        q = Normal(mean / precision, precision.rsqrt())
        z = q.rsample()
        out = {n: (self.out[n](self.dec[n](z)) - x).pow(2).sum(-1).mean() for n, x in batch.items()}
        out["kl"] = kl_divergence(q, Normal(0.0, 1.0)).sum(-1).mean()
        return out


class MMVAE(nn.Module):
    """Mixture of experts: each unimodal sample is decoded by every decoder and scored by every
    unimodal posterior; the posterior of modality m also scores the other modalities' samples in
    m's own loss, so each posterior is used by several streams (cloned per stream). With ``split``
    every (modality, source) term is its own loss, so each decoder's weights are shared by several
    streams (parameter branch points)."""

    def __init__(self, names=("x", "y"), split=False):
        super().__init__()
        self.names, self.split = names, split
        self.enc = nn.ModuleDict({n: nn.Linear(4, 4) for n in names})
        self.dec = nn.ModuleDict({n: nn.Linear(2, 4) for n in names})

    def forward(self, batch):
        experts = {}
        for n in self.names:
            mu, logvar = self.enc[n](batch[n]).chunk(2, dim=-1)
            experts[n] = Normal(mu, torch.exp(0.5 * logvar))
        out, kl = {}, []
        for source, q in experts.items():
            z = q.rsample()
            log_q = torch.stack([e.log_prob(z).sum(-1) for e in experts.values()]).logsumexp(0)
            kl.append((log_q - Normal(0.0, 1.0).log_prob(z).sum(-1)).mean())
            for n in self.names:
                term = (self.dec[n](z) - batch[n]).pow(2).sum(-1).mean()
                if n != source:
                    term = term - 0.1 * experts[n].log_prob(z).sum(-1).mean()
                key = f"{n}_from_{source}" if self.split else n
                out[key] = out.get(key, 0.0) + term
        out["kl"] = torch.stack(kl).mean()
        return out


class SharedDecoder(nn.Module):
    """One decoder applied to two samples feeding two different losses: its weight and bias are
    parameter branch points."""

    def __init__(self):
        super().__init__()
        self.enc_a, self.enc_b = nn.Linear(3, 2), nn.Linear(3, 2)
        self.dec = nn.Linear(2, 3)

    def forward(self, batch):
        za, zb = self.enc_a(batch["a"]), self.enc_b(batch["b"])
        return {
            "a": (self.dec(za) - batch["a"]).pow(2).mean(),
            "b": 3.0 * (self.dec(zb) - batch["b"]).abs().mean(),
            "kl": za.pow(2).mean() + zb.pow(2).mean(),
        }


class ChunkHeads(nn.Module):
    """``chunk`` whose parts feed different losses (part 0 also feeds the regularizer)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 6)
        self.proj = nn.Linear(2, 2)

    def forward(self, x):
        a, b, c = torch.tanh(self.lin(x)).chunk(3, dim=1)
        return {
            "a": self.proj(a).pow(2).mean(),
            "b": (b - 1).pow(2).mean() * 0.1,
            "c": self.proj(c).sin().mean(),
            "kl": a.abs().mean(),
        }


class SidePaths(nn.Module):
    """``detach``, ``torch.no_grad()`` and non-differentiable uses of the branch value."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.head_a, self.head_b = nn.Linear(8, 1), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        with torch.no_grad():
            target = h.mean(-1, keepdim=True) * 2
        gate = (h > 0).float().mean(-1, keepdim=True)
        scale = torch.ones_like(h).sum(-1, keepdim=True)
        return {
            "a": ((self.head_a(h) - target) * gate).pow(2).mean(),
            "b": (self.head_b(h) * scale).pow(2).mean() + self.head_b(h.detach()).mean(),
            "kl": h.pow(2).mean(),
        }


class TensorIf(nn.Module):
    """A tensor-valued ``if``: not traceable."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 4)
        self.head_a, self.head_b = nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x):
        h = self.trunk(x)
        if h.sum() > 0:
            h = h * 2
        return {"a": self.head_a(h).pow(2).mean(), "b": self.head_b(h).abs().mean()}


class BroadcastScale(nn.Module):
    """``Normal(h, sigma)`` with a per-feature sigma broadcast inside the constructor: the branch
    point is the broadcast scale, a value inside the distribution (the graph engine refuses)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.log_sigma = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        q = Normal(self.lin(x), self.log_sigma.exp())
        return {"a": q.rsample().pow(2).mean(), "b": -q.log_prob(x).mean()}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def mm_batch(n=6, names=("x", "y")):
    g = gen(n)
    return {k: torch.randn(n, 4, generator=g) for k in names}


CASES = {
    "tabular": (TabularVAE, lambda n=8: torch.randn(n, 3, generator=gen(n))),
    "poe": (PoE, lambda n=6: mm_batch(n, ("x", "y", "w"))),
    "mmvae": (MMVAE, mm_batch),
    "mmvae_split": (lambda: MMVAE(split=True), mm_batch),
    "shared_decoder": (SharedDecoder, lambda n=5: {"a": torch.randn(n, 3), "b": torch.randn(n, 3)}),
    "chunk": (ChunkHeads, lambda n=7: torch.randn(n, 5, generator=gen(n))),
    "side_paths": (SidePaths, lambda n=6: torch.randn(n, 4, generator=gen(n))),
}


# ----------------------------------------------------------------------------------------------
# Helpers


pytestmark = pytest.mark.usefixtures("one_thread")


def run(case, engine, method="imtl-g", steps=3, rescale=True, batches=None, losses=None):
    build, make_batch = CASES[case]
    torch.manual_seed(0)
    model = build()
    args = {"seed": 0} if method in ("pcgrad", "graddrop", "rlw") else None
    imodel = it.wrap(
        model, losses=losses, method=method, engine=engine, rescale=rescale, method_args=args
    )
    batches = batches or [make_batch()] * steps
    results = []
    for k, batch in enumerate(batches):
        torch.manual_seed(100 + k)
        out = imodel(batch)
        model.zero_grad(set_to_none=True)
        sum(out.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({n: v.detach().clone() for n, v in out.items()}, grads))
    return imodel, model, results


def assert_same(results_a, results_b, exact_losses=True):
    assert len(results_a) == len(results_b)
    for (losses_a, grads_a), (losses_b, grads_b) in zip(results_a, results_b):
        assert losses_a.keys() == losses_b.keys()
        for name in losses_a:
            if exact_losses:
                assert torch.equal(losses_a[name], losses_b[name]), name
            else:
                torch.testing.assert_close(losses_a[name], losses_b[name])
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def ran_program(imodel):
    """The last call ran a rewritten program with at least one Branch node."""
    programs = [p for ps in imodel._programs.values() if isinstance(ps, list) for p in ps]
    return imodel.last_engine == "graph" and any(p.module is not None for p in programs)


# ----------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("method", ["mean", "imtl-g", "mgda", "pcgrad"])
@pytest.mark.parametrize("case", list(CASES))
def test_graph_engine_gives_the_hook_engines_gradients(case, method, rescale):
    hook, _, want = run(case, "hook", method, rescale=rescale)
    graph, _, got = run(case, "graph", method, rescale=rescale)
    assert ran_program(graph), graph.engine_notes
    assert_same(want, got)
    # same branch points, keys, statistics and method state in both engines
    assert list(hook.last_stats()) == list(graph.last_stats())
    for label, stat in hook.last_stats().items():
        other = graph.last_stats()[label]
        assert stat["streams"] == other["streams"]
        torch.testing.assert_close(
            torch.tensor(stat["weights"]), torch.tensor(other["weights"]), rtol=1e-4, atol=1e-6
        )
    assert list(hook.methods_state_dict()) == list(graph.methods_state_dict())


@pytest.mark.parametrize("case", ["mmvae", "mmvae_split"])
def test_parameter_and_cloned_branch_points_are_rewritten(case):
    imodel, _, _ = run(case, "graph", steps=2)
    (program,) = next(iter(imodel._programs.values()))
    assert "branch" in program.module.code
    assert program.clones > 0  # the posteriors, used by several streams, are cloned per stream
    kinds = {key.split(":")[0] for key in imodel.methods_state_dict()}
    if case == "mmvae_split":
        assert "AccumulateGrad" in kinds  # decoder weights shared by several streams


MSE = nn.MSELoss()


class Criterion(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.L1Loss()

    def forward(self, a, b):
        return self.l1(a, b) + MSE(a, b)


def losses_with_loss_modules(model, x, criterion=Criterion()):
    h = torch.tanh(model.trunk(x))
    return {"a": MSE(model.head_a(h), x[:, :1]), "b": criterion(model.head_b(h), x[:, 1:2])}


def test_losses_callable_with_stateless_loss_modules():
    _, _, want = run("side_paths", "hook", losses=losses_with_loss_modules)
    graph, _, got = run("side_paths", "graph", losses=losses_with_loss_modules)
    assert ran_program(graph)
    assert_same(want, got)


@pytest.mark.parametrize("case", ["tabular", "mmvae", "poe"])
def test_same_random_numbers_losses_and_buffers_as_eager(case):
    build, make_batch = CASES[case]
    torch.manual_seed(0)
    model, batch = build(), make_batch()
    eager = build()
    eager.load_state_dict(model.state_dict())
    imodel = it.wrap(model, method="imtl-g", engine="graph")
    for k in range(4):
        torch.manual_seed(7 + k)
        want = eager(batch)
        after_eager = torch.rand(())
        torch.manual_seed(7 + k)
        got = imodel(batch)
        after_graph = torch.rand(())
        assert torch.equal(after_eager, after_graph), "the program consumed the RNG differently"
        for name in want:
            assert torch.equal(want[name].detach(), got[name].detach()), (k, name)
        sum(got.values()).backward()
    assert ran_program(imodel)
    for (name, a), b in zip(eager.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name  # BatchNorm running statistics moved alike


def test_nothing_is_registered_on_the_model_and_state_dict_is_untouched():
    torch.manual_seed(1)
    model, x = TabularVAE(), torch.randn(8, 3)
    before_keys = list(model.state_dict())
    modules_before = [(n, id(m)) for n, m in model.named_modules()]
    imodel = it.wrap(model, method="pcgrad", engine="graph")
    for _ in range(2):
        sum(imodel(x).values()).backward()
    assert list(model.state_dict()) == before_keys
    assert [(n, id(m)) for n, m in model.named_modules()] == modules_before
    assert all(not k.startswith("_bf") for k in vars(model))
    (program,) = next(iter(imodel._programs.values()))
    # the model's own objects, not copies (the BatchNorm runs as an opaque module)
    assert {id(p) for p in program.module.parameters()} == {id(p) for p in model.parameters()}
    assert {id(b) for b in program.module.buffers()} == {id(b) for b in model.buffers()}
    assert torch.is_grad_enabled()


def test_new_batch_size_reuses_the_program_and_missing_modality_retraces_once():
    sizes = [
        mm_batch(4, ("x", "y", "w")),
        mm_batch(7, ("x", "y", "w")),
        mm_batch(5, ("x", "y")),
        mm_batch(3, ("x", "y", "w")),
        mm_batch(6, ("x", "y")),
    ]
    hook, _, want = run("poe", "hook", batches=sizes)
    graph, _, got = run("poe", "graph", batches=sizes)
    assert_same(want, got)
    assert len(graph._programs) == 2  # one per structure, not per batch size
    assert len([n for n in graph.engine_notes if "graph engine" in n]) == 2
    assert graph.last_engine == "graph"
    entry = graph.last_stats()
    assert list(entry) == list(hook.last_stats())


def test_tensor_valued_if_falls_back_under_auto_and_is_an_error_under_graph():
    torch.manual_seed(0)
    model, x = TensorIf(), torch.randn(5, 4)
    auto = it.wrap(model, method="imtl-g", engine="auto")
    hook = it.wrap(model, method="imtl-g", engine="hook")
    for imodel in (auto, hook):
        torch.manual_seed(0)
        model.zero_grad()
        sum(imodel(x).values()).backward()
        if imodel is auto:
            got = [p.grad.clone() for p in model.parameters()]
    assert auto.last_engine == "hook"
    assert any("tracing failed" in n and "control flow" in n for n in auto.engine_notes)
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad)
    forced = it.wrap(model, method="imtl-g", engine="graph")
    with pytest.raises(GraphUnavailable, match=r"graph engine unavailable.*tracing failed"):
        forced(x)


class Untraceable(nn.Module):
    """A submodule with a tensor-valued ``if``: it runs as one opaque call."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if h.mean() > 0:
            h = h * 1.5
        return h


class OpaqueParts(nn.Module):
    def __init__(self, shared_opaque=False):
        super().__init__()
        self.shared_opaque = shared_opaque
        self.enc, self.enc_b = Untraceable(), nn.Linear(4, 4)
        self.trunk = nn.Linear(4, 6)
        self.head_a, self.head_b = nn.Linear(6, 1), nn.Linear(6, 1)

    def forward(self, x):
        if self.shared_opaque:  # the opaque module decodes two samples: its weights branch
            return {
                "a": self.enc(torch.tanh(self.enc_b(x))).pow(2).mean(),
                "b": self.enc(x).abs().mean(),
            }
        h = torch.tanh(self.trunk(self.enc(x)))
        return {"a": self.head_a(h).pow(2).mean(), "b": self.head_b(h).abs().mean()}


@pytest.mark.parametrize("shared_opaque", [False, True])
def test_untraceable_submodule_runs_opaque(shared_opaque):
    x = torch.randn(5, 4, generator=gen(5))
    results = []
    for engine in ("hook", "auto"):
        torch.manual_seed(0)
        model = OpaqueParts(shared_opaque)
        imodel = it.wrap(model, method="imtl-g", engine=engine)
        steps = []
        for k in range(3):
            model.zero_grad(set_to_none=True)
            out = imodel(x)
            sum(out.values()).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            steps.append(({n: v.detach() for n, v in out.items()}, grads))
        results.append(steps)
    assert_same(*results)
    if shared_opaque:
        assert imodel.last_engine == "hook"
        assert any(
            "inside module 'enc', which could not be traced" in n for n in imodel.engine_notes
        )
    else:
        assert ran_program(imodel)
        assert "run as opaque modules: enc (TraceError" in imodel.engine_notes[0]


class BroadcastLoc(nn.Module):
    """``mu`` of shape (N, 1) is broadcast inside ``Normal``: that broadcast is one autograd
    consumer of ``mu`` whose gradient includes the KL's, so the KL cannot bypass through a copy of
    the distribution (the graph engine refuses instead of diverging)."""

    def __init__(self):
        super().__init__()
        self.lin, self.scale = nn.Linear(3, 1), nn.Linear(3, 4)

    def forward(self, x):
        mu = self.lin(x)
        q = Normal(mu, self.scale(x).exp())
        z = q.rsample()
        kl = kl_divergence(q, Normal(0.0, 1.0)).mean() + q.log_prob(z).mean()
        return {"a": z.pow(2).mean(), "b": mu.pow(2).mean(), "kl": kl}


@pytest.mark.parametrize(
    ("build", "reason"),
    [(BroadcastScale, "computed inside 'Normal'"), (BroadcastLoc, "cannot be routed")],
)
def test_unroutable_branch_points_are_refused_after_the_planning_step(build, reason):
    x = torch.randn(6, 3, generator=gen(3))
    results = {}
    for engine in ("hook", "auto"):
        torch.manual_seed(0)
        model = build()
        imodel = it.wrap(model, method="mgda", engine=engine)
        grads = []
        for k in range(2):
            torch.manual_seed(k)
            model.zero_grad()
            sum(imodel(x).values()).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        results[engine] = (imodel, grads)
    auto = results["auto"][0]
    assert auto.last_engine == "hook"
    assert any(reason in n for n in auto.engine_notes), auto.engine_notes
    for a, b in zip(results["hook"][1], results["auto"][1]):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga, gb)
    with pytest.raises(GraphUnavailable, match=reason):
        it.wrap(build(), method="mgda", engine="graph")(x)


def test_changed_attribute_or_requires_grad_retraces():
    torch.manual_seed(2)
    model, x = TabularVAE(), torch.randn(8, 3)
    eager = TabularVAE()
    eager.load_state_dict(model.state_dict())
    imodel = it.wrap(model, method="imtl-g", engine="graph")
    for beta in (1.0, 1.0, 0.5, 0.5):
        model.beta = eager.beta = beta
        torch.manual_seed(0)
        want = eager(x)["kl"]
        torch.manual_seed(0)
        got = imodel(x)["kl"]
        assert torch.equal(want.detach(), got.detach())
    assert sum("re-traced" in n for n in imodel.engine_notes) == 1
    model.heads["a"].weight.requires_grad_(False)
    imodel(x)
    assert sum("re-traced" in n for n in imodel.engine_notes) == 2
    model.heads["a"].weight.requires_grad_(True)


def test_eval_mode_and_no_grad_use_the_plain_model():
    torch.manual_seed(0)
    model, x = TabularVAE(), torch.randn(8, 3)
    imodel = it.wrap(model, method="imtl-g", engine="graph")
    imodel(x)
    model.eval()
    torch.manual_seed(0)
    out = imodel(x)
    assert imodel.last_engine == "plain"
    torch.manual_seed(0)
    assert torch.equal(out["a"], model(x)["a"])
    model.train()
    with torch.no_grad():
        imodel(x)
    assert imodel.last_engine == "plain"


def test_branch_function_combines_in_backward():
    from impartial_train.engine.graph import StepState
    from impartial_train.engine.stats import PointStats
    from impartial_train.methods import build

    x = torch.randn(3, 2, requires_grad=True)
    step = StepState([build("mean")], [PointStats("p", [["a"], ["b"]])], [None], rescale=False)
    a, b = Branch.apply(x, step, 0, 2)
    (a.sum() * 2 + (b * 4).sum()).backward()
    torch.testing.assert_close(x.grad, torch.full((3, 2), 3.0))
    assert step.stats[0].gramian.shape == (2, 2)
    x.grad = None
    a, b = Branch.apply(x, step, 0, 2)
    a.sum().backward()  # one stream sent no gradient: the other passes as it is
    torch.testing.assert_close(x.grad, torch.ones(3, 2))
