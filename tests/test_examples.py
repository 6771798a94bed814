"""Example model files and their offline datasets (examples/)."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.distributions import Normal
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.data import polydigits as poly_data  # noqa: E402
from examples.data import tabular as tab_data  # noqa: E402

TABULAR_FILES = ["tabular_vae", "tabular_iwae", "tabular_dreg", "tabular_hivae"]
MULTIMODAL_FILES = ["mvae", "mmvae", "mmvae_iwae", "mopoe"]
MODEL_FILES = TABULAR_FILES + MULTIMODAL_FILES
PROTOCOL = ["build_model", "example_batch", "compute_losses", "train_dataset", "val_dataset"]


pytestmark = pytest.mark.usefixtures("one_thread")


def load(name):
    return importlib.import_module(f"examples.{name}")


def expected_loss_names(module, model):
    if module.__name__.split(".")[-1] in TABULAR_FILES:
        return [*module.data().schema.names, "kl"]
    return ["img0", "img1", "img2", "label", "kl"]


def batch_size(batch):
    return len(next(iter(batch.values())))


# ---------------------------------------------------------------------------- model files
@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_file_protocol(name):
    module = load(name)
    for attribute in [*PROTOCOL, "evaluate"]:
        assert callable(getattr(module, attribute)), attribute
    assert module.REGULARIZERS == ["kl"]
    torch.manual_seed(0)
    model = module.build_model()
    assert isinstance(model, torch.nn.Module)
    batch = module.example_batch()
    losses = module.compute_losses(model, batch)
    assert list(losses) == expected_loss_names(module, model)
    for loss_name, value in losses.items():
        assert value.shape == (), loss_name
        assert torch.isfinite(value), loss_name
        assert value.requires_grad, loss_name


@pytest.mark.parametrize("name", MODEL_FILES)
def test_example_batch_is_what_the_loader_yields(name):
    module = load(name)
    batch = module.example_batch()
    loaded = next(iter(DataLoader(module.train_dataset(), batch_size=batch_size(batch))))
    assert batch.keys() == loaded.keys()
    for key in batch:
        assert torch.equal(batch[key], loaded[key]), key


@pytest.mark.parametrize("name", MODEL_FILES)
def test_deterministic_given_seed(name):
    module = load(name)
    values = []
    for _ in range(2):
        torch.manual_seed(3)
        model = module.build_model()
        losses = module.compute_losses(model, module.example_batch())
        values.append(torch.stack(list(losses.values())))
    assert torch.equal(values[0], values[1])


@pytest.mark.parametrize("name", MODEL_FILES)
def test_adam_decreases_total_loss(name):
    module = load(name)
    torch.manual_seed(0)
    model = module.build_model()
    batch = module.example_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    totals = []
    for step in range(20):
        total = sum(module.compute_losses(model, batch).values())
        optimizer.zero_grad()
        total.backward()
        if step == 0:  # every parameter is trained by some loss
            missing = [n for n, p in model.named_parameters() if p.grad is None]
            assert not missing, missing
        optimizer.step()
        totals.append(total.item())
    assert all(math.isfinite(t) for t in totals)
    assert np.mean(totals[-3:]) < np.mean(totals[:3]), totals


@pytest.mark.parametrize("name", MODEL_FILES)
def test_evaluate_returns_finite_metrics(name):
    module = load(name)
    torch.manual_seed(0)
    model = module.build_model()
    loader = DataLoader(Subset(module.val_dataset(), range(200)), batch_size=64)
    model.train()
    metrics = module.evaluate(model, loader)
    assert model.training  # evaluate restores the mode
    assert metrics and all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    if name in TABULAR_FILES:
        for attribute in module.data().schema.names:
            assert f"impute_error/{attribute}" in metrics
            assert f"test_loglik/{attribute}" in metrics
        assert metrics["impute_error_worst"] >= metrics["impute_error_mean"]
        assert metrics["test_loglik_worst"] <= metrics["test_loglik_mean"]
    else:
        for key in ["coherence_mean", "joint_coherence", "probe_accuracy/joint"]:
            assert 0.0 <= metrics[key] <= 1.0, key
        for modality in ["img0", "img1", "img2", "label"]:
            assert f"coherence/{modality}" in metrics
            assert f"recon_loglik/{modality}" in metrics
        for modality in ["img0", "img1", "img2"]:  # the digit classifiers work on real data
            assert metrics[f"classifier_accuracy/{modality}"] > 0.85


@pytest.mark.parametrize("dataset", tab_data.TABULAR_DATASETS)
def test_tabular_vae_runs_on_every_dataset(dataset, monkeypatch):
    module = load("tabular_vae")
    monkeypatch.setattr(module, "OPTIONS", {**module.OPTIONS, "table": dataset})
    torch.manual_seed(0)
    model = module.build_model()
    losses = module.compute_losses(model, module.example_batch())
    assert list(losses) == [*module.data().schema.names, "kl"]
    assert all(torch.isfinite(v) for v in losses.values())


# --------------------------------------------------------------------- gradient estimators
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _library_gradients(name):
    """The example's model in float64, its batch, and the gradients of the sum of its losses;
    the gradients are then zeroed and the RNG seeded as before that backward, so that a
    reference computation draws the same samples."""
    module = load(name)
    torch.manual_seed(0)
    model = module.build_model().double()
    batch = {k: v.double() for k, v in module.example_batch().items()}
    torch.manual_seed(1)
    sum(model(batch).values()).backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    return model, batch, got


def _assert_grads_close(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_tabular_iwae_terms_have_the_iwae_gradient():
    model, batch, got = _library_gradients("tabular_iwae")
    q = model.posterior(batch)
    z = q.rsample((model.num_samples,))
    log_liks = model.log_likelihoods(model.decode(z), batch)
    log_w = sum(log_liks.values()) - q.log_prob(z).sum(-1) + model.prior().log_prob(z).sum(-1)
    bound = (torch.logsumexp(log_w, 0) - math.log(model.num_samples)).mean()
    (-bound).backward()
    _assert_grads_close(got, _grads(model))


def test_tabular_dreg_gradients_match_tucker_et_al():
    """Decoder: sum_k w_k grad log w_k; encoder: sum_k w_k^2 (d log w_k / d z_k) dz_k/dphi."""
    model, batch, got = _library_gradients("tabular_dreg")
    q = model.posterior(batch)
    z = q.rsample((model.num_samples,))
    n = z.shape[1]
    log_liks = model.log_likelihoods(model.decode(z), batch)
    q_stopped = Normal(q.loc.detach(), q.scale.detach())
    log_w = (
        sum(log_liks.values()) - q_stopped.log_prob(z).sum(-1) + model.prior().log_prob(z).sum(-1)
    )
    w = torch.softmax(log_w, 0).detach()
    decoder = [p for name, p in model.named_parameters() if not name.startswith("encoder.")]
    encoder = list(model.encoder.parameters())
    decoder_grads = torch.autograd.grad(-(w * log_w).sum() / n, decoder, retain_graph=True)
    (dlogw_dz,) = torch.autograd.grad(log_w.sum(), z, retain_graph=True)
    encoder_grads = torch.autograd.grad(z, encoder, grad_outputs=-(w**2)[..., None] * dlogw_dz / n)
    names = [name for name, _ in model.named_parameters() if not name.startswith("encoder.")]
    want = dict(zip(names, decoder_grads))
    want.update(
        {
            f"encoder.{name}": g
            for (name, _), g in zip(model.encoder.named_parameters(), encoder_grads)
        }
    )
    _assert_grads_close(got, want)


def test_mmvae_iwae_terms_have_the_stratified_iwae_gradient():
    model, batch, got = _library_gradients("mmvae_iwae")
    experts = list(model.experts(batch).values())
    bounds = []
    for q_m in experts:
        z = q_m.rsample((model.num_samples,))
        log_w = sum(p.log_prob(batch[k]) for k, p in model.decode(z).items())
        log_w = log_w + model.prior().log_prob(z).sum(-1) - model.log_mixture_density(experts, z)
        bounds.append((torch.logsumexp(log_w, 0) - math.log(model.num_samples)).mean())
    (-torch.stack(bounds).mean()).backward()
    _assert_grads_close(got, _grads(model))


@pytest.mark.parametrize(
    ("name", "n_terms"), [("mvae", 3), ("mmvae", 4), ("mmvae_iwae", 4), ("mopoe", 15)]
)
def test_split_losses_sum_to_the_per_modality_losses(name, n_terms, monkeypatch):
    module = load(name)
    batch = module.example_batch()
    torch.manual_seed(0)
    model = module.build_model()
    torch.manual_seed(1)
    losses = module.compute_losses(model, batch)
    model.split_losses = True
    torch.manual_seed(1)
    split = module.compute_losses(model, batch)
    assert len(split) == 4 * n_terms + 1 and list(split)[-1] == "kl"
    for modality in ["img0", "img1", "img2", "label"]:
        parts = [v for k, v in split.items() if k.startswith(f"{modality}_from_")]
        assert len(parts) == n_terms
        torch.testing.assert_close(sum(parts), losses[modality])
    torch.testing.assert_close(split["kl"], losses["kl"])
    monkeypatch.setattr(module, "SPLIT_LOSSES", True)
    assert module.build_model().split_losses


def test_product_of_experts_with_weights():
    from examples.multimodal import product_of_experts

    prior = Normal(torch.zeros(2), torch.ones(2))
    a = Normal(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.5]]))
    b = Normal(torch.tensor([[3.0, -2.0]]), torch.tensor([[1.0, 1.0]]))
    both = product_of_experts([a, b], prior)
    torch.testing.assert_close(both.loc, torch.tensor([[4.0 / 3.0, 6.0 / 6.0]]))
    torch.testing.assert_close(both.scale, torch.tensor([[3.0, 6.0]]).rsqrt())
    only_a = product_of_experts([a, b], prior, [torch.ones(1, 1), torch.zeros(1, 1)])
    direct = product_of_experts([a], prior)
    torch.testing.assert_close(only_a.loc, direct.loc)
    torch.testing.assert_close(only_a.scale, direct.scale)


# --------------------------------------------------------------------------- tabular data
@pytest.mark.parametrize("dataset", tab_data.TABULAR_DATASETS)
def test_tabular_dataset_shapes_types_and_masks(dataset):
    data = tab_data.load_tabular(dataset)
    schema = data.schema
    n_attributes = len(schema.attributes)
    assert data.source_rows > 0
    for split in ("train", "val"):
        tensors = data.split(split)
        n = len(tensors["x"])
        assert tensors["x"].shape == (n, n_attributes)
        assert tensors["x_in"].shape == (n, schema.input_dim)
        assert tensors["observed"].shape == tensors["hidden"].shape == (n, n_attributes)
        for tensor in tensors.values():
            assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
        observed, hidden = tensors["observed"], tensors["hidden"]
        assert not (observed * hidden).any()  # disjoint
        assert abs(hidden.mean().item() - 0.2) < 0.01  # per column, round(0.2 * n) rows
        feature_mask = observed[:, schema.feature_index()]
        assert not tensors["x_in"][feature_mask == 0].any()  # hidden inputs are zeroed
        for d, attribute in enumerate(schema.attributes):
            x = tensors["x"][:, d]
            assert attribute.kind in tab_data.KINDS
            if attribute.kind == "positive":
                assert (x > 0).all()
            if attribute.kind == "count":
                assert (x >= 0).all() and torch.equal(x, x.round())
            if attribute.kind in ("categorical", "binary"):
                assert torch.equal(x, x.round())
                assert x.min() >= 0 and x.max() < attribute.num_categories
            if attribute.kind == "binary":
                assert attribute.num_categories == 2
    n_total = len(data.train["x"]) + len(data.val["x"])
    assert n_total == min(data.source_rows, tab_data.DEFAULT_MAX_ROWS)
    assert len(data.val["x"]) == round(0.2 * n_total)


def test_tabular_observed_training_values_are_standardised():
    data = tab_data.load_tabular("diamonds")
    for d, attribute in enumerate(data.schema.attributes):
        observed = data.train["observed"][:, d] > 0
        x = data.train["x"][observed, d].double()
        if attribute.kind == "real":
            assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
        if attribute.kind == "positive":
            assert abs(x.log().mean().item()) < 1e-4 and abs(x.log().std().item() - 1) < 1e-3
    price = data.schema.attributes[data.schema.names.index("price")]
    x = data.train["x"][:, data.schema.names.index("price")]
    torch.testing.assert_close(price.to_original(x), x)  # counts are modelled as they are


def test_tabular_loading_is_deterministic_and_seeded():
    first = tab_data.load_tabular("labour")
    tab_data.load_tabular.cache_clear()
    again = tab_data.load_tabular("labour")
    assert first is not again
    for key in first.train:
        assert torch.equal(first.train[key], again.train[key])
        assert torch.equal(first.val[key], again.val[key])
    other = tab_data.load_tabular("labour", seed=1)
    assert not torch.equal(first.train["observed"], other.train["observed"])


def test_tabular_known_kinds():
    kinds = {
        "diamonds": {"price": "count", "cut": "categorical", "carat": "positive", "x": "real"},
        "cps1988": {"wage": "positive", "experience": "real", "region": "categorical"},
        "rwm5yr": {"docvis": "count", "female": "binary", "edlevel": "categorical"},
        "movies": {"year": "real", "mpaa": "categorical", "comedy": "binary"},
        "labour": {"labour": "count", "capital": "positive"},
        "wine": {"cultivar": "categorical", "magnesium": "count"},
        "breast_cancer": {"diagnosis": "binary", "mean_radius": "positive"},
    }
    for dataset, expected in kinds.items():
        schema = tab_data.load_tabular(dataset).schema
        got = {a.name: a.kind for a in schema.attributes}
        for name, kind in expected.items():
            assert got[name] == kind, (dataset, name)
    movies = tab_data.load_tabular("movies").schema
    assert "unrated" in movies.attributes[movies.names.index("mpaa")].categories
    assert "title" not in movies.names and "budget" not in movies.names


def test_infer_kind_rules():
    assert tab_data.infer_kind(pd.Series(["a", "b", "a"])) == "binary"
    assert tab_data.infer_kind(pd.Series(["a", "b", "c"])) == "categorical"
    assert tab_data.infer_kind(pd.Series([0, 1, 1, 0])) == "binary"
    assert tab_data.infer_kind(pd.Series([1, 2, 3, 4])) == "categorical"
    assert tab_data.infer_kind(pd.Series(range(50))) == "count"
    assert tab_data.infer_kind(pd.Series(range(-5, 45))) == "real"
    assert tab_data.infer_kind(pd.Series(np.linspace(0.1, 5, 50))) == "positive"
    assert tab_data.infer_kind(pd.Series(np.linspace(0.0, 5, 50))) == "real"
    assert tab_data.infer_kind(pd.Series([1.5, np.nan, 2.5, 7.0])) == "positive"


def test_prepare_table_keeps_source_missing_entries_out_of_both_masks():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "height": rng.normal(size=100),
            "weight": rng.uniform(1, 2, size=100),
            "kind": rng.choice(["a", "b", "c"], size=100),
        }
    )
    frame.loc[::5, "weight"] = np.nan
    frame.loc[::7, "kind"] = None
    schema, train, val = tab_data.prepare_table(frame, tab_data.infer_kinds(frame), seed=0)
    assert [a.kind for a in schema.attributes] == ["real", "positive", "categorical"]
    n = len(train["x"]) + len(val["x"])
    assert n == 100
    for tensors in (train, val):
        assert torch.isfinite(tensors["x"]).all()
    observed = torch.cat([train["observed"], val["observed"]])
    hidden = torch.cat([train["hidden"], val["hidden"]])
    assert (observed + hidden)[:, 1].sum() == 80  # 20 NaN weights: neither observed nor hidden
    assert (observed + hidden)[:, 2].sum() == 100 - 15


def test_docs_tables_match_the_data():
    from examples.data.describe import dataset_section

    docs = (ROOT / "docs" / "datasets.md").read_text()
    for dataset in tab_data.TABULAR_DATASETS:
        assert dataset_section(dataset).strip() in docs, (
            f"docs/datasets.md is out of date for {dataset}: regenerate the tables with "
            "`python -m examples.data.describe`"
        )


# ----------------------------------------------------------------------------- PolyDigits
def test_polydigits_shapes_classes_and_splits():
    data = poly_data.load_polydigits()
    from sklearn.datasets import load_digits

    labels = load_digits().target
    for split, sources in (("train", data.train_sources), ("val", data.val_sources)):
        tensors = data.split(split)
        n = len(tensors["label"])
        assert n == len(sources)
        for name in poly_data.IMAGE_MODALITIES:
            assert tensors[name].shape == (n, poly_data.NUM_PIXELS)
            assert tensors[name].min() >= 0 and tensors[name].max() <= 1
        assert tensors["label"].shape == (n, poly_data.NUM_CLASSES)
        assert torch.equal(tensors["label"].sum(-1), torch.ones(n))
        classes = tensors["label"].argmax(-1).numpy()
        assert (labels[sources] == classes[:, None]).all()  # same class in every modality
        assert (sources[:, 0] != sources[:, 1]).all() and (sources[:, 0] != sources[:, 2]).all()
    assert not set(data.train_sources.ravel()) & set(data.val_sources.ravel())
    assert len(data.train["label"]) == 2 * 1438 and len(data.val["label"]) == 2 * 359
    # img0 is the digit itself; img1 and img2 are transformed copies of other digits
    images = load_digits().images / 16.0
    torch.testing.assert_close(
        data.train["img0"],
        torch.from_numpy(images[data.train_sources[:, 0]].reshape(-1, 64)).float(),
    )


def test_polydigits_is_deterministic():
    first = poly_data.load_polydigits()
    poly_data.load_polydigits.cache_clear()
    again = poly_data.load_polydigits()
    for key in first.train:
        assert torch.equal(first.train[key], again.train[key])
    other = poly_data.load_polydigits(seed=1)
    assert not torch.equal(first.train["img1"], other.train["img1"])
