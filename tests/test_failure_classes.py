"""One small model per failure class of real research code (issue 11), each under the hook and
graph engines and ``engine="auto"``: surgery with ``mean`` (rescaled: the plain sum) must equal
plain backward, and IMTL-G an independent reference built from per-stream ``torch.autograd.grad``.

The models follow one protocol so that the reference needs no library code: ``encode(batch)``
gives the branch value ``z``, ``decode(z, batch)`` the losses (``kl`` is the regularizer), and
``hook(total)`` what the model's own hooks on ``z`` do to its total gradient.
"""

import pytest
import torch
from torch import nn

import impartial_train as it
from impartial_train.engine.graph import GraphUnavailable

pytestmark = pytest.mark.usefixtures("one_thread")
ENGINES = ("hook", "graph", "auto")


class Protocol(nn.Module):
    def forward(self, batch):
        return self.decode(self.encode(batch), batch)

    def hook(self, total):
        return total


class HookOnBranch(Protocol):
    """Class 1: a DReG-style tensor hook on the branch value, with weights from the losses. Its
    semantics: it sees z's total gradient, which under surgery is the combined one."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.head_a, self.head_b = nn.Linear(3, 2), nn.Linear(3, 2)

    def encode(self, batch):
        return torch.tanh(self.enc(batch[0]))

    def decode(self, z, batch):
        _, ya, yb = batch
        la = (self.head_a(z) - ya).pow(2).sum(-1)
        lb = 3 * (self.head_b(z) - yb).abs().sum(-1)
        with torch.no_grad():
            self.w = torch.softmax(-(la + lb), 0).unsqueeze(-1) * len(z)
        if z.requires_grad and not z.is_leaf:  # (the reference applies it by hand)
            z.register_hook(self.hook)
        return {"a": la.mean(), "b": lb.mean(), "kl": z.pow(2).mean()}

    def hook(self, total):
        return self.w * total


class ModuleHookOnBranch(HookOnBranch):
    """Class 1: a module backward hook on the module whose output is the branch value: it sees
    the combined gradient of the output and doubles its input's gradient."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.enc.register_full_backward_hook(self._module_hook)
        self.seen = []

    def _module_hook(self, module, grad_input, grad_output):
        self.seen.append(grad_output[0].clone())
        return (2 * grad_input[0],)

    def encode(self, batch):
        return self.enc(torch.tanh(self.pre(batch[0])))

    def decode(self, z, batch):
        _, ya, yb = batch
        return {
            "a": (self.head_a(z) - ya).pow(2).mean(),
            "b": 3 * (self.head_b(z) - yb).abs().mean(),
            "kl": z.pow(2).mean(),
        }

    def hook(self, total):
        return total


class FreezeInForward(Protocol):
    """Class 2: the authors' DReG idiom. The decoders train on ``z.detach()``; the encoder gets
    its gradient through the decoders frozen with ``requires_grad_(False)`` inside forward and
    unfrozen before returning. Also a ``no_grad`` block, ``set_grad_enabled(False)`` and an
    in-place change of a parameter under ``no_grad`` (a max-norm constraint)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.dec_a, self.dec_b = nn.Linear(3, 2), nn.Linear(3, 2)

    def encode(self, batch):
        with torch.no_grad():
            self.enc.weight.clamp_(-0.4, 0.4)
        return torch.tanh(self.enc(batch[0]))

    def decode(self, z, batch):
        _, ya, yb = batch
        fit_a = (self.dec_a(z.detach()) - ya).pow(2).mean()
        fit_b = (self.dec_b(z.detach()) - yb).abs().mean()
        with torch.no_grad():
            scale = (self.dec_a(z) - ya).pow(2).mean() + 1
        with torch.set_grad_enabled(False):
            offset = self.dec_b(z).mean()
        self.dec_a.requires_grad_(False)
        self.dec_b.requires_grad_(False)
        push_a = (self.dec_a(z) - ya).pow(2).mean() / scale
        push_b = 3 * (self.dec_b(z) - yb - offset).abs().mean()
        self.dec_a.requires_grad_(True)
        self.dec_b.requires_grad_(True)
        return {"a": fit_a + push_a, "b": fit_b + push_b, "kl": z.pow(2).mean()}


def batch_of(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g), torch.rand(n, 2)]


# ----------------------------------------------------------------------------------------------
# References, computed without the library


def imtlg(J):
    """IMTL-G closed form (Liu et al. 2021), rescaled to the plain sum's norm."""
    u = J / J.norm(dim=1, keepdim=True)
    D, U = J[:1] - J[1:], u[:1] - u[1:]
    alpha_rest = J[0] @ U.T @ torch.linalg.inv(D @ U.T)
    alpha = torch.cat([1 - alpha_rest.sum(0, keepdim=True), alpha_rest])
    g = alpha @ J
    return g * J.sum(0).norm() / g.norm()


def plain_grads(model, batch):
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    sum(model(batch).values()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def imtlg_reference(model, batch):
    """Stream gradients at z from torch.autograd.grad, IMTL-G, plus the regularizer's gradient,
    through the model's hook, back into the encoder; the decoders get their plain gradients."""
    torch.manual_seed(0)
    z = model.encode(batch)
    zd = z.detach().requires_grad_()
    out = model.decode(zd, batch)
    J = torch.stack(
        [torch.autograd.grad(out[t], zd, retain_graph=True)[0].flatten() for t in ("a", "b")]
    )
    combined = imtlg(J.double()).float().view_as(z)
    total = model.hook(combined + torch.autograd.grad(out["kl"], zd, retain_graph=True)[0])
    named = [(n, p) for n, p in model.named_parameters()]
    via_z = torch.autograd.grad(z, [p for _, p in named], total, allow_unused=True)
    rest = torch.autograd.grad(sum(out.values()), [p for _, p in named], allow_unused=True)
    grads = {}
    for (name, _), a, b in zip(named, via_z, rest):
        if a is not None or b is not None:
            grads[name] = (a if a is not None else 0) + (b if b is not None else 0)
    return grads, total


def surgery_grads(model, batch, method, engine):
    imodel = it.wrap(model, method=method, engine=engine)
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    sum(imodel(batch).values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, imodel


def assert_same(want, got):
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def check_engines(build, refused=()):
    """mean == plain backward and IMTL-G == the reference under every engine; the graph engine
    either runs the model (and then exactly) or refuses it for one of the ``refused`` reasons."""
    for engine in ENGINES:
        torch.manual_seed(0)
        model, batch = build(), batch_of()
        want = plain_grads(model, batch)
        try:
            got, imodel = surgery_grads(model, batch, "mean", engine)
        except GraphUnavailable as exc:
            assert engine == "graph" and any(r in str(exc) for r in refused), str(exc)
            continue
        assert_same(want, got)
        reference, _ = imtlg_reference(model, batch)
        got, imodel = surgery_grads(model, batch, "imtl-g", engine)
        assert_same(reference, got)
        if engine == "graph":
            assert imodel.last_engine == "graph"
    return imodel


# ----------------------------------------------------------------------------------------------
# Class 1: hooks see the combined gradient


def test_tensor_hook_on_the_branch_value_sees_the_combined_gradient():
    check_engines(HookOnBranch, refused=("hook",))


def test_module_backward_hook_on_the_branch_module_sees_the_combined_gradient():
    imodel = check_engines(ModuleHookOnBranch, refused=("module hooks",))
    model = imodel.module
    _, total = imtlg_reference(model, batch_of())
    model.seen.clear()
    surgery_grads(model, batch_of(), "imtl-g", "hook")
    # the self-check's two backward passes call it first, then the step's own
    assert len(model.seen) == 3
    torch.testing.assert_close(model.seen[-1], total, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Class 2: what autograd records at run time is honoured


def test_requires_grad_toggled_no_grad_blocks_and_in_place_parameter_changes_are_honoured():
    check_engines(FreezeInForward)
    torch.manual_seed(0)
    model, batch = FreezeInForward(), batch_of()
    imodel = it.wrap(model, method="mean", engine="auto")
    imodel(batch)
    assert imodel.last_engine == "graph", imodel.engine_notes
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Class 6: models that register hooks unconditionally still validate under no_grad


def test_hooks_registered_under_no_grad_do_not_stop_validation_or_the_plain_call():
    class Unconditional(HookOnBranch):
        def decode(self, z, batch):
            out = super().decode(z, batch)
            z.register_hook(self.hook)  # whatever the grad mode, as MultiVae's DReG does
            return out

    torch.manual_seed(0)
    model = Unconditional()
    data = torch.utils.data.TensorDataset(*batch_of(16))
    trainer = it.Trainer(model, method="imtl-g", batch_size=8, plots=False)
    trainer.fit(data, epochs=1, val=data)
    assert {"a", "b", "kl"} <= set(trainer.history[-1]) and trainer.history[-1]["split"] == "val"
    imodel = it.wrap(model, method="imtl-g")
    with torch.no_grad():
        out = imodel(batch_of())
    assert imodel.last_engine == "plain" and not out["a"].requires_grad
