"""The fx capture: opaque distributions, patched names restored, containers, gradient edges,
leaf depth, placeholders and parameters in the dependency-graph contract."""

from __future__ import annotations

import collections

import networkx as nx
import pytest
import torch
import torch.distributions as dist
import zoo
from torch import nn
from torch.autograd.function import Function

from blockfinder.analyze import run_analysis
from blockfinder.blocks import analyze_graph
from blockfinder.fx_capture import capture_fx, flatten_batch

CONTRACT_OPS = {"parameter", "buffer", "input", "call", "loss"}


def _targets(graph: nx.DiGraph) -> collections.Counter:
    return collections.Counter(a["target"] for _, a in graph.nodes(data=True))


def test_distributions_are_one_opaque_node_each():
    model, batch, _ = zoo.make("heterogeneous_vae")
    capture = capture_fx(model, batch)
    targets = _targets(capture.graph)
    assert targets["Normal"] == 3  # q(z|x), p(age|z), prior
    for name in ("Bernoulli", "Categorical", "Poisson", "kl_divergence", "Normal.rsample"):
        assert targets[name] == 1, name
    assert targets["Normal.log_prob"] == 1
    for name in ("Bernoulli.log_prob", "Categorical.log_prob", "Poisson.log_prob"):
        assert targets[name] == 1, name
    # nothing of the distributions' internals leaks into the graph
    assert not any("broadcast" in t or "lgamma" in t for t in targets)
    for node, attrs in capture.graph.nodes(data=True):
        if attrs["target"] in ("Normal", "Bernoulli", "Categorical", "Poisson"):
            assert attrs.get("container") and attrs.get("distribution"), node


def test_every_distribution_family_and_property_is_opaque():
    torch.manual_seed(0)
    model, x = zoo.ManyDistributions(), torch.randn(8, 4)
    capture = capture_fx(model, x)
    targets = _targets(capture.graph)
    expected = [
        "LogNormal",
        "LogNormal.rsample",
        "LogNormal.log_prob",
        "LogNormal.mean",
        "LogNormal.entropy",
        "RelaxedOneHotCategorical",
        "RelaxedOneHotCategorical.rsample",
        "Beta",
        "Beta.log_prob",
        "Beta.variance",
        "Independent",
        "Independent.entropy",
        "Independent.stddev",
        "ContinuousBernoulli",
        "ContinuousBernoulli.log_prob",
    ]
    for name in expected:
        assert targets[name] == 1, name
    report = run_analysis(model, x, regularizers=(), captures=("fx",))
    assert report.capture == "fx" and report.differences == []
    assert report.parameters == zoo.autograd_reach(model, x)


def _patched_names_snapshot():
    return (
        zoo.Normal,
        zoo.kl_divergence,
        zoo.dist.Laplace,
        torch.distributions.Normal,
        torch.distributions.kl_divergence,
        torch.distributions.kl.kl_divergence,
        Function.__dict__["apply"],
        torch.rand,
        torch.zeros,
    )


@pytest.mark.parametrize("name", ["mmvae", "masked_multimodal", "custom_function"])
def test_patched_names_are_restored_after_success_and_failure(name):
    before = _patched_names_snapshot()
    model, batch, case = zoo.make(name)
    attrs = {k: v for k, v in vars(model).items() if not k.startswith("_")}
    if name == "masked_multimodal":
        with pytest.raises(torch.fx.proxy.TraceError):
            capture_fx(model, batch)
    else:
        capture_fx(model, batch, case.losses)
    assert _patched_names_snapshot() == before
    assert zoo.Normal is dist.normal.Normal
    assert {k: v for k, v in vars(model).items() if not k.startswith("_")} == attrs
    if name == "mmvae":
        assert model.qz_x is dist.Laplace and model.px_z is dist.Normal


class RandomMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.a = nn.Linear(4, 1)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        h = self.enc(x)
        keep = (torch.rand(x.shape[0], 1, device=x.device) < 0.5).to(h.dtype)
        noise = torch.zeros(x.size(0), 4, device=h.device)
        return {"a": self.a(h * keep).pow(2).mean(), "b": self.b(h + noise).abs().mean()}


def test_factory_functions_with_traced_sizes_and_devices():
    torch.manual_seed(0)
    model, x = RandomMask(), torch.randn(6, 4)
    before = (torch.rand, torch.zeros)
    capture = capture_fx(model, x)
    assert (torch.rand, torch.zeros) == before
    targets = _targets(capture.graph)
    assert targets["torch.rand"] == 1 and targets["torch.zeros"] == 1
    rand = next(n for n, a in capture.graph.nodes(data=True) if a["target"] == "torch.rand")
    assert not any(e["grad"] for _, _, e in capture.graph.in_edges(rand, data=True))
    report = run_analysis(model, x, regularizers=(), captures=("fx",))
    assert [(bp.kind, bp.where) for bp in report.branch_points] == [("activation", "enc")]


def test_custom_function_is_one_opaque_node():
    model, batch, _ = zoo.make("custom_function")
    capture = capture_fx(model, batch)
    nodes = [n for n, a in capture.graph.nodes(data=True) if "GradReverse" in a["target"]]
    assert nodes == ["grad_reverse_apply"]
    preds = set(capture.graph.pred["grad_reverse_apply"])
    assert preds == {"features_1", "exp"}


def test_non_differentiable_uses_are_not_gradient_edges():
    torch.manual_seed(0)
    model, x = zoo.NonDiffUsers(), torch.randn(8, 5)
    capture = capture_fx(model, x)
    graph = capture.graph
    users = {v: e["grad"] for _, v, e in graph.out_edges("tanh", data=True)}
    # every use of h except head_a (and the distribution object, sampled below) carries no grad
    grad_users = sorted(v for v, g in users.items() if g)
    assert grad_users == ["categorical", "head_a"]
    targets = {graph.nodes[v]["target"] for v in users}
    assert {"gt", "Tensor.argmax", "Categorical", "Tensor.abs", "Tensor.size"} <= targets
    assert {"Tensor.long", "torch.zeros_like", "Tensor.detach"} <= targets  # abs: in no_grad
    # a sampled category carries no gradient into the embedding
    assert graph.edges["categorical", "sample"]["grad"] is False
    analysis = analyze_graph(graph, capture.losses)
    assert analysis.branch_points == []
    report = run_analysis(model, x, regularizers=(), captures=("fx",))
    assert report.parameters == zoo.autograd_reach(model, x)


def test_tuple_outputs_are_containers_with_per_output_users():
    model, batch, _ = zoo.make("tuple_ops")
    graph = capture_fx(model, batch).graph
    assert graph.nodes["split"].get("container") is True
    first, second = sorted(graph.succ["split"])
    assert graph.nodes[first]["target"] == "getitem" and graph.nodes[first]["shape"] == (8, 3)
    analysis = analyze_graph(graph, ("p", "q"))
    (bp,) = analysis.branch_points
    assert bp.node == "lin_c" and bp.users == ((first,), (second,))
    assert graph.nodes[first]["reach"] == 0b01 and graph.nodes[second]["reach"] == 0b10
    assert not any(graph.nodes[b.node].get("container") for b in analysis.branch_points)
    # broadcast_tensors: each output depends on its own input only
    assert graph.nodes["lin_a.weight"]["reach"] == 0b01
    assert graph.nodes["lin_b.weight"]["reach"] == 0b10


class LSTMTwoLosses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.a = nn.Linear(4, 1)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        return {"a": self.a(out).pow(2).mean(), "b": self.b(h[-1]).pow(2).mean() + c.mean()}


def test_tuple_outputs_of_leaf_modules_are_containers():
    torch.manual_seed(0)
    model, x = LSTMTwoLosses(), torch.randn(2, 5, 3)
    graph = capture_fx(model, x).graph
    assert graph.nodes["rnn"]["container"] is True
    assert graph.nodes["rnn"]["target"] == "nn.LSTM"
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l0"} <= set(graph.pred["rnn"])
    report = run_analysis(model, x, regularizers=(), captures=("fx",))
    assert report.capture == "fx"
    assert report.parameters == zoo.autograd_reach(model, x)
    # the LSTM weights feed both losses through the tuple: a parameter branch point
    kinds = {(bp.kind, bp.where) for bp in report.branch_points}
    assert ("parameter", "rnn.weight_ih_l0") in kinds


def test_leaf_depth_makes_modules_opaque():
    model, batch, _ = zoo.make("heterogeneous_vae")
    deep = capture_fx(model, batch)
    shallow = capture_fx(model, batch, leaf_depth=1)
    assert shallow.graph.number_of_nodes() < deep.graph.number_of_nodes()
    calls = {a["module"] for _, a in shallow.graph.nodes(data=True) if a["op"] == "call"}
    assert {"encoder", "trunk"} <= calls
    assert not any(m.startswith("trunk.") for m in calls)
    assert shallow.graph.nodes["trunk"]["target"] == "nn.Sequential"
    assert {"trunk.0.weight", "trunk.2.bias"} <= set(shallow.graph.pred["trunk"])
    analysis = analyze_graph(shallow.graph, shallow.losses)
    assert ("trunk", (("age",), ("smoker",), ("region",), ("visits",))) in [
        (bp.where, tuple(tuple(sorted(s)) for s in bp.streams)) for bp in analysis.branch_points
    ]


def test_contract_attributes():
    model, batch, _ = zoo.make("mvae")
    capture = capture_fx(model, batch)
    graph = capture.graph
    assert nx.is_directed_acyclic_graph(graph)
    for node, attrs in graph.nodes(data=True):
        assert attrs["op"] in CONTRACT_OPS, node
        assert isinstance(attrs["module"], str)
        if attrs["op"] == "parameter":
            assert attrs["param"] == node and attrs["shape"] is not None
        if attrs["op"] == "loss":
            assert graph.out_degree(node) == 0 and attrs["loss"] in capture.losses
    for _, _, e in graph.edges(data=True):
        assert isinstance(e["grad"], bool)
    inputs = sorted(n for n, a in graph.nodes(data=True) if a["op"] == "input")
    assert inputs == ["image", "text"]
    assert graph.nodes["image"]["shape"] == (8, 12)
    assert capture.losses == ("image", "text", "kl")
    modules = {a["module"] for _, a in graph.nodes(data=True)}
    assert {"encoders.image.mu", "decoders.text.2"} <= modules


def test_nested_batch_and_constants():
    def losses(model, batch):
        (a, b), opts = batch["pair"], batch["opts"]
        h = model(a) * opts["scale"]
        return {"a": h.pow(2).mean(), "b": (model(b) + h).abs().mean()}

    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    batch = {"pair": (torch.randn(2, 3), torch.randn(2, 3)), "opts": {"scale": 2.0}}
    flat = flatten_batch(batch)
    assert flat.names == ["pair_0", "pair_1"]
    capture = capture_fx(model, batch, losses)
    assert capture.specializations == [
        "fx: non-tensor batch entries traced as constants: opts_scale=2.0"
    ]
    report = run_analysis(model, batch, losses, regularizers=(), captures=("fx",))
    assert report.capture == "fx"
    assert sorted((bp.kind, bp.where) for bp in report.branch_points) == [
        ("activation", "<top>"),  # h: used by both losses
        ("parameter", "bias"),  # the model applied to both halves of the pair
        ("parameter", "weight"),
    ]


def test_buffers_and_frozen_parameters():
    model, batch, _ = zoo.make("mmvae")
    for p in model.decoders["text"].parameters():
        p.requires_grad_(False)
    capture = capture_fx(model, batch)
    graph = capture.graph
    assert graph.nodes["pz_loc"]["op"] == "buffer"
    assert graph.nodes["decoders.text.0.weight"]["op"] == "buffer"
    assert graph.nodes["decoders.text.0.weight"]["frozen"] is True
    report = run_analysis(model, batch, captures=("fx",))
    assert "decoders.text.0.weight" not in report.parameters
    assert report.parameters == zoo.autograd_reach(model, batch)
    assert not any(bp.where.startswith("decoders.text") for bp in report.branch_points)


def test_no_grad_region_is_seen_by_the_tracer():
    model, batch, _ = zoo.make("no_grad_target")
    graph = capture_fx(model, batch).graph
    assert graph.edges["backbone_1", "target"]["grad"] is False
    assert graph.edges["target.weight", "target"]["grad"] is False
    analysis = analyze_graph(graph, ("consistency", "label"))
    assert graph.nodes["target.weight"]["reach"] == 0
    assert len(analysis.branch_points) == 1
