"""Every capture on every zoo model: exact branch points and streams, parameters equal to
``torch.autograd.grad`` per loss, and the right fallback where a capture cannot handle a model."""

from __future__ import annotations

import pytest
import torch
import zoo
from torch import nn

import blockfinder
from blockfinder.analyze import run_analysis

ALL = frozenset({"fx", "export", "draft_export", "autograd"})
NO_FX = ALL - {"fx"}
DRAFT_ONLY = frozenset({"draft_export", "autograd"})

# (kind, where, streams) of every branch point; streams in report order (by first loss)
EXPECTED: dict[str, tuple[frozenset[str], list[tuple[str, str, list[list[str]]]]]] = {
    "heterogeneous_vae": (
        ALL,
        [
            ("activation", "encoder.mu", [["age", "region", "smoker", "visits"], ["kl"]]),
            ("activation", "<top>", [["age", "region", "smoker", "visits"], ["kl"]]),
            ("activation", "trunk.3", [["age"], ["smoker"], ["region"], ["visits"]]),
        ],
    ),
    "mvae": (
        ALL,
        [
            ("activation", "<top>", [["image", "text"], ["kl"]]),  # PoE mean
            ("activation", "<top>", [["image", "text"], ["kl"]]),  # PoE log-variance
            ("activation", "<top>", [["image"], ["text"]]),  # z fanned out to the decoders
        ],
    ),
    "mmvae": (
        ALL,
        [
            ("activation", "encoders.image.loc", [["image", "kl", "text"], ["kl"]]),
            ("activation", "encoders.image", [["image", "kl", "text"], ["kl"]]),
            ("activation", "<top>", [["image"], ["text"], ["kl"]]),
            ("activation", "encoders.text.loc", [["image", "kl", "text"], ["kl"]]),
            ("activation", "encoders.text", [["image", "kl", "text"], ["kl"]]),
            ("activation", "<top>", [["image"], ["text"], ["kl"]]),
        ],
    ),
    "mopoe": (
        ALL,
        # per subset (7 of them): the PoE mean and scale feed z and the KL; z feeds 3 decoders
        [("activation", "<top>", [["a", "b", "c"], ["kl"]])] * 14
        + [("activation", "<top>", [["a"], ["b"], ["c"]])] * 7,
    ),
    "shared_decoder": (
        ALL,
        [
            ("parameter", f"decoder.{i}.{p}", [["from_a"], ["from_b"]])
            for i in (0, 2)
            for p in ("weight", "bias")
        ],
    ),
    "dreg_iwae": (
        ALL,
        [
            ("activation", "<top>", [["x", "y"], ["kl"]]),  # z; q's parameters are detached
            ("activation", "trunk.1", [["x"], ["y"]]),
        ],
    ),
    "no_grad_target": (ALL, [("activation", "backbone.1", [["consistency"], ["label"]])]),
    "masked_multimodal": (
        DRAFT_ONLY,  # tensor-valued `if`: fx and export fail, draft_export specialises
        [
            ("activation", "<top>", [["image", "text"], ["kl"]]),
            ("activation", "<top>", [["image", "text"], ["kl"]]),
            ("activation", "<top>", [["image"], ["text"]]),
        ],
    ),
    "tied_weights": (
        ALL,
        [
            ("parameter", "embed.weight", [["tokens"], ["length", "tokens"]]),
            ("activation", "<top>", [["tokens"], ["length"]]),
        ],
    ),
    "custom_function": (ALL, [("activation", "features.1", [["label"], ["domain"]])]),
    "single_loss": (ALL, []),
    "sequence": (
        NO_FX,  # a Python loop over a traced size: export handles it
        [
            ("activation", "cell", [["recon"], ["recon", "summary"]]),
            ("activation", "cell", [["recon"], ["recon", "summary"]]),
            ("activation", "cell", [["recon"], ["summary"]]),
        ],
    ),
    "hidden_detach": (ALL, [("activation", "refine", [["a"], ["b"]])]),
    "tuple_ops": (ALL, [("activation", "lin_c", [["p"], ["q"]])]),
}

SLOW_EXPORT = {"mopoe", "mmvae", "heterogeneous_vae"}
# (case, capture) -> how many differences from the autograd graph reconcile reports
KNOWN_DIFFERENCES: dict[tuple[str, str], int] = {
    # its backward returns None for log_coeff, which the traced graph still links to a loss
    ("custom_function", "fx"): 1,
}


def _key(report):
    return sorted(
        (bp.kind, bp.where, [sorted(stream) for stream in bp.streams])
        for bp in report.branch_points
    )


def _params():
    out = []
    for name in zoo.CASES:
        for capture in ("fx", "export", "draft_export", "autograd"):
            marks = []
            if capture == "draft_export" or (capture == "export" and name in SLOW_EXPORT):
                marks.append(pytest.mark.slow)
            out.append(pytest.param(name, capture, id=f"{name}-{capture}", marks=marks))
    return out


def test_expectations_cover_the_zoo():
    assert set(EXPECTED) == set(zoo.CASES)


@pytest.mark.parametrize(("name", "capture"), _params())
def test_branch_points_and_parameters(name, capture):
    model, batch, case = zoo.make(name)
    handled, expected = EXPECTED[name]
    captures = () if capture == "autograd" else (capture,)
    report = run_analysis(
        model, batch, case.losses, case.regularizers, captures=captures, **case.options
    )
    if capture in handled:
        assert report.capture == capture, report.notes
    else:
        assert report.capture == "autograd"
        assert any(s.startswith(f"{capture} capture failed (") for s in report.notes)
    assert _key(report) == sorted(
        (kind, where, [sorted(s) for s in streams]) for kind, where, streams in expected
    )
    # streams are ordered by their first loss in the report's loss order
    for bp in report.branch_points:
        firsts = [min(report.losses.index(loss) for loss in s) for s in bp.streams]
        assert firsts == sorted(firsts)
        assert bp.shape is not None
    assert report.parameters == zoo.autograd_reach(model, batch, case.losses)
    # the parameters come from autograd whatever the capture: what tests the structural capture
    # is that it agrees with autograd edge for edge (reconcile lists every disagreement)
    assert len(report.differences) == KNOWN_DIFFERENCES.get((name, report.capture), 0), (
        report.differences
    )
    assert set(report.regularizers) <= set(report.losses)
    if capture in ("export", "draft_export") and capture in handled:
        assert any("input shapes specialised" in s for s in report.specializations)


def test_default_order_uses_fx_when_it_works():
    model, batch, _ = zoo.make("heterogeneous_vae")
    report = blockfinder.analyze(model, batch, regularizers=("kl",))
    assert report.capture == "fx"
    assert report.specializations == []
    assert report.regularizers == ("kl",)
    assert report.tasks == ("age", "smoker", "region", "visits")
    assert report.to_json()["capture"] == "fx"
    # the graph users see is the fx graph: fx node names, canonical parameter names
    assert "trunk_3" in report.graph and "encoder.mu.weight" in report.graph
    assert report.graph.nodes["encoder.mu.weight"]["op"] == "parameter"


def test_default_order_falls_back_to_export_then_draft_export():
    model, batch, _ = zoo.make("sequence")
    report = blockfinder.analyze(model, batch, regularizers=())
    assert report.capture == "export"
    assert report.notes[0].startswith("fx capture failed (TypeError:")
    assert "\n" not in report.notes[0]


@pytest.mark.slow
def test_tensor_valued_if_is_specialised_by_draft_export():
    model, batch, _ = zoo.make("masked_multimodal")
    report = blockfinder.analyze(model, batch)
    assert report.capture == "draft_export"
    notes = report.notes
    assert notes[0].startswith("fx capture failed (TraceError:")
    assert notes[1].startswith("export capture failed (")
    branch = [n for n in report.specializations if "data-dependent branch" in n]
    assert len(branch) == 1
    assert 'if batch["has_text"].any():' in branch[0] and "zoo.py:" in branch[0]
    assert "-> True" in branch[0]  # the branch the example batch took
    assert all("\n" not in n for n in notes)


def test_single_loss_model_has_no_blocks():
    model, batch, _ = zoo.make("single_loss")
    report = blockfinder.analyze(model, batch)
    assert report.blocks == [] and report.branch_points == []
    assert report.losses == ("elbo",) and report.regularizers == ()
    assert all(v == frozenset({"elbo"}) for v in report.parameters.values())


def test_tied_weights_appear_once_with_their_alias():
    model, batch, _ = zoo.make("tied_weights")
    report = blockfinder.analyze(model, batch, regularizers=())
    assert "out.weight" not in report.parameters
    assert report.aliases == {"embed.weight": ("out.weight",)}
    params = [n for n, a in report.graph.nodes(data=True) if a.get("op") == "parameter"]
    assert "embed.weight" in params and "out.weight" not in params


def test_missing_modality_batch_gives_a_different_structure():
    model, _, _ = zoo.make("masked_multimodal")
    report = run_analysis(model, zoo.masked_batch(text=False), captures=())
    # without text, the joint posterior is the image expert alone: still z fans out
    assert report.parameters["enc_text.mu.weight"] == frozenset()
    assert report.capture == "autograd"


class BatchNormTwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.a = nn.Linear(6, 1)
        self.b = nn.Linear(6, 1)

    def forward(self, x):
        h = self.body(x)
        return {"a": self.a(h).pow(2).mean(), "b": self.b(h).abs().mean()}


@pytest.mark.parametrize("captures", [("fx",), ("export",), ()])
def test_analysis_leaves_rng_and_buffers_alone(captures):
    torch.manual_seed(0)
    model = BatchNormTwoHeads()
    batch = torch.randn(8, 4)
    state = torch.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = run_analysis(model, batch, captures=captures)
    assert report.capture == (captures[0] if captures else "autograd")
    assert [(bp.kind, bp.where) for bp in report.branch_points] == [("activation", "body.2")]
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and int(model.body[1].num_batches_tracked) == 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
