"""impartial_train.Trainer: outputs, exact resume (epoch boundary and mid-epoch), vanilla
equivalence, method parameter groups, data parallelism (2 CPU processes)."""

import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from impartial_train.checkpoint import (
    TrainingInterrupted,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_atomic,
)
from impartial_train.distributed import ShardedBatchSampler, launch
from impartial_train.trainer import ResumeError, Trainer, TrainingError, make_loader


class Noisy(nn.Module):
    """Shared encoder, reparameterisation noise, shared trunk, two heads, a KL term."""

    def __init__(self, hidden=8):
        super().__init__()
        self.encoder = nn.Linear(6, 4)
        self.trunk = nn.Sequential(nn.Linear(2, hidden), nn.Tanh())
        self.head_a = nn.Linear(hidden, 4)
        self.head_b = nn.Linear(hidden, 2)

    def forward(self, batch):
        (x,) = batch
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        h = self.trunk(z)
        return {
            "a": ((self.head_a(h) - x[:, :4]) ** 2).mean(),
            "b": ((self.head_b(h) - 5 * x[:, 4:]) ** 2).mean(),
            "kl": -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1).mean(),
        }


def dataset(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g))


def trainer(method="pcgrad", seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("plots", False)
    return Trainer(Noisy(), method=method, regularizers=["kl"], batch_size=8, seed=seed, **kwargs)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fit_writes_outputs_and_history(tmp_path):
    t = trainer("imtl-g", plots=True)
    history = t.fit(dataset(), epochs=2, val=dataset(16, 1), out=tmp_path)
    assert [(r["epoch"], r["split"]) for r in history] == [
        (1, "train"),
        (1, "val"),
        (2, "train"),
        (2, "val"),
    ]
    assert read_rows(tmp_path / "metrics.jsonl") == history
    train = history[0]
    assert set(train) >= {"a", "b", "kl", "total", "examples", "branch_points"}
    assert train["total"] == pytest.approx(train["a"] + train["b"] + train["kl"])
    assert train["examples"] == 40
    (point,) = train["branch_points"].values()
    assert point["streams"] == ["a", "b"] and point["steps"] == 5
    assert len(point["weights"]) == 2 and len(point["cosine"]) == 2
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["trainer"]["method"] == "imtl-g"
    assert {"torch", "python", "impartial"} <= set(config["versions"])
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")  # weights_only=True
    assert ckpt["epoch"] == 2 and ckpt["step"] == 0 and ckpt["method"] == "imtl-g"
    assert set(ckpt["model"]) == set(t.model.state_dict())
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("method", ["pcgrad", "gradnorm"])
def test_resume_at_epoch_boundary_is_exact(tmp_path, method):
    straight = trainer(method).fit(dataset(), epochs=3, val=dataset(16, 1), out=tmp_path / "a")
    trainer(method).fit(dataset(), epochs=1, val=dataset(16, 1), out=tmp_path / "b")
    # a fresh process would start from other random states: disturb them
    torch.manual_seed(123)
    resumed = trainer(method).fit(
        dataset(), epochs=3, val=dataset(16, 1), out=tmp_path / "b", resume=True
    )
    assert resumed == straight
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (
        tmp_path / "b" / "metrics.jsonl"
    ).read_text()


class StopAt(torch.utils.data.Dataset):
    """The training data; fetching item ``at`` asks the trainer to stop (like Ctrl-C): the step
    of that batch completes, then the trainer saves a checkpoint and stops."""

    def __init__(self, base, at):
        self.base, self.at, self.fetched, self.trainer = base, at, 0, None

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.fetched += 1
        if self.fetched == self.at:
            self.trainer.request_stop()
        return self.base[i]


@pytest.mark.parametrize("method", ["pcgrad", "gradnorm", "sum"])
def test_resume_mid_epoch_is_exact(tmp_path, method):
    straight = trainer(method).fit(dataset(), epochs=3, val=dataset(16, 1), out=tmp_path / "a")
    data = StopAt(dataset(), at=40 + 9)  # epoch 2 (5 batches of 8), in its second batch
    t = data.trainer = trainer(method)
    with pytest.raises(TrainingInterrupted) as info:
        t.fit(data, epochs=3, val=dataset(16, 1), out=tmp_path / "b")
    assert (info.value.epoch, info.value.step) == (1, 2)
    assert "epoch 2, step 2/5" in info.value.describe()
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 2
    torch.manual_seed(99)
    resumed = trainer(method).fit(
        dataset(), epochs=3, val=dataset(16, 1), out=tmp_path / "b", resume=True
    )
    assert resumed == straight


def test_sum_is_plain_training():
    """method "sum" through the Trainer == a hand-written loop (same seed, same data order)."""
    ds = dataset()
    t = trainer("sum")
    t.fit(make_loader(ds, 8, shuffle=True, seed=0), epochs=2)

    torch.manual_seed(0)
    model = Noisy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = make_loader(ds, 8, shuffle=True, seed=0)
    torch.manual_seed(0)
    for _ in range(2):
        for batch in loader:
            opt.zero_grad()
            sum(model(batch).values()).backward()
            opt.step()
    for (name, p), q in zip(model.state_dict().items(), t.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_validation_does_not_change_training():
    with_val = trainer().fit(dataset(), epochs=2, val=dataset(16, 1))
    without = trainer().fit(dataset(), epochs=2)
    assert [r for r in with_val if r["split"] == "train"] == without


def test_method_parameters_get_their_own_group():
    t = trainer("gradnorm", method_lr=0.05)
    t.fit(dataset(), epochs=1)
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    (weight,) = groups["methods"]["params"]
    assert groups["methods"]["lr"] == 0.05 and groups["methods"]["weight_decay"] == 0.0
    assert weight.shape == (2,) and not torch.equal(weight.detach(), torch.ones(2))


def test_evaluate_without_val_goes_to_train_rows():
    seen = []

    def evaluate(model, loader):
        seen.append((model.training, torch.is_grad_enabled()))
        return {"n": float(sum(x.shape[0] for (x,) in loader)), "acc": torch.tensor(0.5)}

    history = trainer().fit(dataset(), epochs=3, evaluate=evaluate, val_every=2)
    assert [r["epoch"] for r in history if "n" in r] == [2, 3]  # every 2 epochs and the last
    assert history[-1]["n"] == 40.0 and history[-1]["acc"] == 0.5
    assert seen == [(False, False)] * 2


def test_bad_evaluate_result_is_a_training_error():
    with pytest.raises(TrainingError, match="not a dict of metrics"):
        trainer().fit(dataset(), epochs=1, evaluate=lambda m, loader: 3.0)


def test_diverging_loss_is_reported():
    calls = []

    def losses(model, batch):  # finite at the first step (checked by wrap), then diverges
        calls.append(1)
        out = dict(model(batch))
        if len(calls) > 1:
            out["a"] = out["a"] * float("inf")
        return out

    torch.manual_seed(0)
    t = Trainer(Noisy(), losses, method="sum", regularizers=["kl"], batch_size=8)
    with pytest.raises(TrainingError, match="loss 'a' became"):
        t.fit(dataset(), epochs=1)


def test_resume_errors(tmp_path):
    with pytest.raises(ResumeError, match=r"no checkpoint\.pt"):
        trainer().fit(dataset(), epochs=1, out=tmp_path, resume=True)
    trainer("pcgrad").fit(dataset(), epochs=1, out=tmp_path)
    with pytest.raises(ResumeError, match="method 'pcgrad', not 'imtl-g'"):
        trainer("imtl-g").fit(dataset(), epochs=2, out=tmp_path, resume=True)
    other = Trainer(Noisy(hidden=5), method="pcgrad", regularizers=["kl"])
    with pytest.raises(ResumeError, match="different model"):
        other.fit(dataset(), epochs=2, out=tmp_path, resume=True)
    with pytest.raises(ResumeError, match="trained on 40 examples"):
        trainer("pcgrad").fit(dataset(30), epochs=2, out=tmp_path, resume=True)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    save_atomic({**ckpt, "format": 99}, tmp_path / "checkpoint.pt")
    with pytest.raises(ResumeError, match="has format 99"):
        trainer("pcgrad").fit(dataset(), epochs=2, out=tmp_path, resume=True)


def test_resume_refuses_another_optimizer_seed_or_regularizers(tmp_path):
    trainer("pcgrad").fit(dataset(), epochs=1, out=tmp_path)
    config = (tmp_path / "config.json").read_text()
    with pytest.raises(ResumeError, match=r"optimizer 'adam', not 'sgd'.*--optimizer adam"):
        trainer("pcgrad", optimizer="sgd").fit(dataset(), epochs=2, out=tmp_path, resume=True)
    with pytest.raises(ResumeError, match=r"seed 0, not 5.*--seed 0"):
        trainer("pcgrad", seed=5).fit(dataset(), epochs=2, out=tmp_path, resume=True)
    torch.manual_seed(0)
    other = Trainer(Noisy(), method="pcgrad", regularizers=[], batch_size=8, plots=False)
    with pytest.raises(ResumeError, match=r"regularizers \['kl'\], not \[\].*--regularizer kl"):
        other.fit(dataset(), epochs=2, out=tmp_path, resume=True)
    assert (tmp_path / "config.json").read_text() == config  # a refused resume writes nothing
    trainer("pcgrad").fit(dataset(), epochs=2, out=tmp_path, resume=True)


def test_resume_uses_this_runs_learning_rate_and_weight_decay(tmp_path):
    trainer("gradnorm").fit(dataset(), epochs=1, out=tmp_path)
    t = trainer("gradnorm", lr=0.5, weight_decay=0.1, method_lr=0.25)
    t.fit(dataset(), epochs=2, out=tmp_path, resume=True)
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    assert (groups["model"]["lr"], groups["model"]["weight_decay"]) == (0.5, 0.1)
    assert groups["methods"]["lr"] == 0.25


def test_a_batch_that_fails_to_load_is_a_training_error():
    class Ragged(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return (torch.randn(6 if i < 20 else 7),)

    with pytest.raises(TrainingError, match=r"loading batch \d+ of the training data raised"):
        trainer("pcgrad").fit(Ragged(), epochs=1)
    with pytest.raises(TrainingError, match=r"loading batch 3 of the validation data raised"):
        trainer("pcgrad").fit(dataset(), epochs=1, val=Ragged())


def test_cuda_unavailable_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(TrainingError, match="CUDA is not available"):
        trainer(device="cuda")


def test_checkpoint_helpers(tmp_path):
    save_atomic({"x": torch.ones(2)}, tmp_path / "c.pt")
    assert os.listdir(tmp_path) == ["c.pt"]
    gen = torch.Generator().manual_seed(5)
    state = capture_rng([gen])
    first = (torch.rand(3), torch.rand(2, generator=gen))
    restore_rng(state, [gen])
    assert torch.equal(first[0], torch.rand(3)) and torch.equal(
        first[1], torch.rand(2, generator=gen)
    )


def test_sharded_batch_sampler_splits_every_global_batch():
    batches = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10]]

    class Fake(list):
        batch_size, sampler = 5, list(range(11))

    shards = [list(ShardedBatchSampler(Fake(batches), r, 2)) for r in range(2)]
    assert shards[0] == [[0, 1, 2], [5, 6, 7]] and shards[1] == [[3, 4], [8, 9]]
    assert len(ShardedBatchSampler(Fake(batches), 0, 2)) == 2


# --------------------------------------------------------------------------------------------
# data parallelism: 2 CPU processes give the gradients of one process on the whole batch


class Det(nn.Module):
    """Deterministic: an activation branch point (h) and a parameter one (dec used twice)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 8)
        self.trunk = nn.Linear(8, 8)
        self.head_a = nn.Linear(8, 4)
        self.head_b = nn.Linear(8, 2)
        self.dec = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.trunk(torch.tanh(self.enc(x))))
        pa, pb = self.dec(x[:, :3]), self.dec(x[:, 3:])
        return {
            "a": ((self.head_a(h) - x[:, :4]) ** 2).mean() + ((pa - x[:, 3:]) ** 2).mean(),
            "b": ((self.head_b(h) - 3 * x[:, 4:]) ** 2).mean() + ((pb + x[:, :3]) ** 2).mean(),
            "reg": 0.1 * h.pow(2).mean(),
        }


DDP_METHODS = ("imtl-g", "mgda", "pcgrad", "gradnorm", "sum")


def _global_batch():
    return torch.randn(7, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _det_trainer(method):
    torch.manual_seed(0)
    return Trainer(Det().double(), method=method, regularizers=["reg"])


def _ddp_worker(rank, world):
    x = _global_batch()
    shard = x[:4] if rank == 0 else x[4:]  # unequal shards: 4 and 3 examples
    out = {}
    for method in DDP_METHODS:
        t = _det_trainer(method)
        t.compute_gradients(shard)
        out[method] = {
            "grads": {n: p.grad.tolist() for n, p in t.model.named_parameters()},
            "weights": {k: v["weights"] for k, v in t.imodel.last_stats().items()},
        }
    return out


@pytest.mark.slow
def test_two_processes_give_single_process_gradients():
    results = launch(_ddp_worker, 2)
    for method in DDP_METHODS:
        t = _det_trainer(method)
        t.compute_gradients(_global_batch())
        weights = {k: v["weights"] for k, v in t.imodel.last_stats().items()}
        if method != "sum":
            kinds = sorted(k.split(":")[1].split("@")[0] for k in weights)
            assert kinds == ["AccumulateGrad", "AccumulateGrad", "tanh"]  # both kinds of points
        for rank, result in enumerate(results):
            got = result[method]
            for name, p in t.model.named_parameters():
                g = torch.tensor(got["grads"][name], dtype=torch.float64)
                assert torch.allclose(g, p.grad, rtol=1e-10, atol=1e-12), (method, rank, name)
            for where, w in weights.items():
                assert got["weights"][where] == pytest.approx(w, rel=1e-10), (method, where)


def test_tensorboard_events_when_available(tmp_path, monkeypatch):
    import sys
    import types

    scalars = []

    class FakeWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def flush(self):
            pass

        def close(self):
            scalars.append(("closed", None))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    trainer("imtl-g").fit(dataset(), epochs=2, val=dataset(16, 1), out=tmp_path)
    assert ("train/a", 1) in scalars and ("val/total", 2) in scalars
    assert any(tag.startswith("weights/") for tag, _ in scalars)
    assert scalars[-1] == ("closed", None)


def test_reserved_loss_names_are_rejected():
    torch.manual_seed(0)
    t = Trainer(Noisy(), lambda m, b: {"total": sum(m(b).values())}, plots=False)
    with pytest.raises(TrainingError, match="clashes with a column"):
        t.fit(dataset(), epochs=1)
