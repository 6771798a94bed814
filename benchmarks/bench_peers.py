"""An impartial step against its peers, and the aggregators alone against torchjd's.

Steps (the PoE VAE of ``bench_step.py``: S modalities, hidden 512, batch 256, the joint latent
sample z fanned out to the S decoders; 1 intra-op thread, CPU time). Every round runs a plain step
and then each configuration once, in the same order, so that a drift of the shared machine hits
them alike; each figure is the median over the rounds of (configuration / the round's plain step).
Configurations:

- ``graph <m>`` / ``hook <m>``: ``impartial_train.wrap(..., method=m, engine=...)``, one backward.
- ``hand hook``: the authors' trick, placed by hand: the decoders read S copies of z (one
  ``expand``), and a tensor hook on them applies IMTL-G (the paper's closed form, in torch) to the
  S per-task gradients and rescales to the plain sum's norm; one backward.
- ``per task at z``: LibMTL's ``rep_grad``: each task loss is backpropagated from its own detached
  copy of z (its decoder only), IMTL-G combines the S gradients at z, one more backward through
  the encoders (with the KL term).
- ``per task params``: LibMTL's default: the gradient of each task loss w.r.t. the shared
  (encoder) parameters, IMTL-G on the S x P matrix, the decoders' own gradients as usual.
- ``torchjd mtl_backward``: ``torchjd.autojac.mtl_backward`` (Jacobian of the task losses w.r.t.
  the encoders' parameters, features z) then ``jac_to_grad(..., IMTLG())``.
- ``torchjd autogram``: ``torchjd.autogram.Engine(encoders)``'s Gramian of the task losses,
  ``IMTLGWeighting`` weights, one weighted backward.
The KL term joins every step as a regularizer (its own backward where the peer needs it).

Aggregators alone (``--aggregators``): the S x S work on the Gramian of a random S x 10,000 J with
conflicting rows: ours (``weights`` on the float64 Gramian) and torchjd's weighting (on the float32
Gramian, its usual input), median CPU ms; and the distance of UPGrad's and DualProj's outputs from a
float64 quadprog solution of the same problems, relative to the largest row.

Peers need the optional ``bench`` extra (``pip install -e ".[bench]"``: torchjd with its quadprog
projector; torch stays the installed one). Without torchjd its columns are left out.

Run: ``python benchmarks/bench_peers.py [--streams 4 8 16] [--rounds 15] [--aggregators]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
from torch.distributions import Normal, kl_divergence

sys.path.insert(0, str(Path(__file__).parent))
from bench_step import make, plain_step

import impartial_train as it

try:
    import torchjd
    from torchjd import aggregation as tja
    from torchjd.autogram import Engine
    from torchjd.autojac import jac_to_grad, mtl_backward
except ImportError:  # the optional bench extra is not installed
    torchjd = None

GRAPH_METHODS = ("pcgrad", "imtl-g", "mgda", "upgrad", "dualproj")
HOOK_METHODS = ("imtl-g", "upgrad")


def encode(model, batch):
    """The PoE posterior and its sample z (as in bench_step.PoEVAE.forward)."""
    precision_sum, weighted_mean = 1.0, 0.0
    for name in model.names:
        mu, logvar = model.enc[name](batch[name]).chunk(2, dim=-1)
        precision = torch.exp(-logvar)
        precision_sum = precision_sum + precision
        weighted_mean = weighted_mean + mu * precision
    var = 1.0 / precision_sum
    q = Normal(weighted_mean * var, var.sqrt())
    return q, q.rsample()


def decode(model, zs, batch) -> list[torch.Tensor]:
    """Task losses, decoder i reading zs[i]."""
    return [
        -Normal(model.dec[n](zs[i]), 1.0).log_prob(batch[n]).sum(-1).mean()
        for i, n in enumerate(model.names)
    ]


def kl_of(q, z) -> torch.Tensor:
    prior = Normal(torch.zeros_like(z), torch.ones_like(z))
    return kl_divergence(q, prior).sum(-1).mean()


def imtlg_closed_form(g: torch.Tensor) -> torch.Tensor:
    """IMTL-G as in the paper (and LibMTL): alpha_{2:S} = g_1 U^T (D U^T)^-1; returns d."""
    u = g / g.norm(dim=1, keepdim=True)
    d_rows = g[:1] - g[1:]
    u_rows = u[:1] - u[1:]
    alpha = g[0] @ u_rows.T @ torch.linalg.inv(d_rows @ u_rows.T)
    alpha = torch.cat((1 - alpha.sum().reshape(1), alpha))
    return alpha @ g


def rescaled_imtlg(g: torch.Tensor) -> torch.Tensor:
    d = imtlg_closed_form(g)
    return d * (g.sum(0).norm() / d.norm())


def hand_hook_step(model, batch):
    model.zero_grad(set_to_none=True)
    q, z = encode(model, batch)
    s = len(model.names)
    zs = z.unsqueeze(0).expand(s, *z.shape)

    def hook(grad):
        d = rescaled_imtlg(grad.reshape(s, -1))
        return (d / s).reshape(1, *z.shape).expand(s, *z.shape)

    if zs.requires_grad:
        zs.register_hook(hook)
    losses = decode(model, zs, batch)
    (sum(losses) + kl_of(q, z)).backward()


def per_task_at_z_step(model, batch):
    model.zero_grad(set_to_none=True)
    q, z = encode(model, batch)
    copies = [z.detach().requires_grad_() for _ in model.names]
    losses = decode(model, copies, batch)
    for loss in losses:
        loss.backward()
    d = rescaled_imtlg(torch.stack([c.grad.reshape(-1) for c in copies]))
    torch.autograd.backward([z, kl_of(q, z)], [d.reshape(z.shape), None])


def per_task_params_step(model, batch):
    model.zero_grad(set_to_none=True)
    q, z = encode(model, batch)
    shared = list(model.enc.parameters())
    losses = decode(model, [z] * len(model.names), batch)
    kl_of(q, z).backward(retain_graph=True)
    rows = []
    for i, (loss, name) in enumerate(zip(losses, model.names)):
        own = list(model.dec[name].parameters())
        grads = torch.autograd.grad(loss, shared + own, retain_graph=i < len(losses) - 1)
        rows.append(torch.cat([g.reshape(-1) for g in grads[: len(shared)]]))
        for p, g in zip(own, grads[len(shared) :]):
            p.grad = g
    flat = rescaled_imtlg(torch.stack(rows))
    offset = 0
    for p in shared:
        n = p.numel()
        p.grad = p.grad + flat[offset : offset + n].view_as(p)
        offset += n


def torchjd_mtl_step(model, batch, aggregator):
    model.zero_grad(set_to_none=True)
    q, z = encode(model, batch)
    losses = decode(model, [z] * len(model.names), batch)
    kl_of(q, z).backward(retain_graph=True)
    mtl_backward(losses, features=z)
    jac_to_grad(list(model.enc.parameters()), aggregator)


def torchjd_autogram_step(model, batch, engine, weighting):
    model.zero_grad(set_to_none=True)
    q, z = encode(model, batch)
    losses = torch.stack(decode(model, [z] * len(model.names), batch))
    gramian = engine.compute_gramian(losses)
    kl_of(q, z).backward(retain_graph=True)
    losses.backward(weighting(gramian))


def configurations(streams: int, methods_graph, methods_hook) -> dict[str, Callable[[], None]]:
    model, batch = make(streams)
    steps: dict[str, Callable[[], None]] = {"plain": lambda: plain_step(model, batch)}
    for engine, methods in (("graph", methods_graph), ("hook", methods_hook)):
        for m in methods:
            imodel = it.wrap(model, batch, method=m, engine=engine)

            def step(imodel=imodel):
                out = imodel(batch)
                model.zero_grad(set_to_none=True)
                sum(out.values()).backward()

            steps[f"{engine} {m}"] = step
    steps["hand hook"] = lambda: hand_hook_step(model, batch)
    steps["per task at z"] = lambda: per_task_at_z_step(model, batch)
    steps["per task params"] = lambda: per_task_params_step(model, batch)
    if torchjd is not None:
        imtlg = tja.IMTLG()
        steps["torchjd mtl_backward"] = lambda: torchjd_mtl_step(model, batch, imtlg)
        # autogram hooks the modules it is given: on a model of its own (same seed, same
        # weights), so that the graph engine's model carries no foreign hooks
        gram_model, gram_batch = make(streams)
        engine = Engine(gram_model.enc, batch_dim=None)
        weighting = tja.IMTLGWeighting()
        steps["torchjd autogram"] = lambda: torchjd_autogram_step(
            gram_model, gram_batch, engine, weighting
        )
    return steps


def cpu_time(fn: Callable[[], None]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def measure_steps(streams: int, rounds: int, methods_graph, methods_hook) -> dict[str, dict]:
    steps = configurations(streams, methods_graph, methods_hook)
    for fn in steps.values():  # warm-up (and the one-off capture)
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            times[name].append(cpu_time(fn))
    plain = times["plain"]
    return {
        name: {
            "ms": 1e3 * statistics.median(ts),
            "ratio": statistics.median(t / p for t, p in zip(ts, plain)),
        }
        for name, ts in times.items()
    }


def _conflicting(s: int, d: int = 10_000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(s, d, generator=gen)
    return j - 0.6 * torch.randn(1, d, generator=gen) * torch.rand(s, 1, generator=gen)


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    fn()
    return 1e3 * statistics.median(cpu_time(fn) for _ in range(reps))


AGGREGATORS = {
    "upgrad": "UPGradWeighting",
    "dualproj": "DualProjWeighting",
    "imtl-g": "IMTLGWeighting",
    "mgda": "MGDAWeighting",
    "pcgrad": "PCGradWeighting",
    "cagrad": "CAGradWeighting",
}


def _quadprog_reference(gramian, lowers, rows: torch.Tensor, reg: float = 1e-10):
    """sum_k J^T v_k with v_k = argmin_{v >= lower_k} v^T (G + reg N^2) v, by quadprog."""
    import numpy as np
    import quadprog

    g = gramian.numpy()
    n2 = np.diag(g).copy()
    p = g + reg * np.diag(n2) + 1e-15 * n2.mean() * np.eye(len(n2))
    v = sum(quadprog.solve_qp(p, np.zeros(len(n2)), np.eye(len(n2)), low)[0] for low in lowers)
    return torch.from_numpy(v) @ rows


def measure_aggregators(streams, reps: int) -> list[dict]:
    import numpy as np

    rows = []
    for s in streams:
        j = _conflicting(s)
        g64 = j.double() @ j.double().T
        g32 = j @ j.T
        scale = float(j.double().norm(dim=1).max())
        for name, weighting in AGGREGATORS.items():
            ours = it.methods.build(name)
            row = {
                "streams": s,
                "method": name,
                "ours_ms": _median_ms(lambda a=ours, g=g64: a.weights(g, None), reps),
            }
            if torchjd is not None:
                kwargs = {"c": 0.5} if name == "cagrad" else {}
                theirs = getattr(tja, weighting)(**kwargs)
                row["torchjd_ms"] = _median_ms(lambda a=theirs, g=g32: a(g), reps)
            if name in ("upgrad", "dualproj") and torchjd is not None:
                lowers = np.eye(s) / s if name == "upgrad" else np.full((1, s), 1.0 / s)
                ref = _quadprog_reference(g64, lowers, j.double())
                row["ours_error"] = (
                    float((ours.weights(g64, None) @ j.double() - ref).norm()) / scale
                )
                theirs_w = getattr(tja, weighting)()(g32).double()
                row["torchjd_error"] = float((theirs_w @ j.double() - ref).norm()) / scale
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--graph-methods", nargs="+", default=list(GRAPH_METHODS))
    parser.add_argument("--hook-methods", nargs="+", default=list(HOOK_METHODS))
    parser.add_argument("--aggregators", action="store_true", help="also time the aggregators")
    parser.add_argument("--aggregator-streams", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--no-steps", action="store_true", help="only the aggregators")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    peers = f", torchjd {version('torchjd')}" if torchjd is not None else ", torchjd not installed"
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}{peers}, "
        "1 thread, CPU time; PoE VAE hidden 512, batch 256"
    )
    result: dict = {"steps": {}, "aggregators": []}
    if not args.no_steps:
        for s in args.streams:
            res = measure_steps(s, args.rounds, args.graph_methods, args.hook_methods)
            result["steps"][s] = res
            print(f"S = {s} (plain step {res['plain']['ms']:.1f} ms):")
            for name, r in res.items():
                if name != "plain":
                    print(f"  {name:<22} {r['ratio']:6.3f}x  ({r['ms']:.1f} ms)")
    if args.aggregators:
        rows = measure_aggregators(args.aggregator_streams, max(args.rounds, 11))
        result["aggregators"] = rows
        print("aggregators alone (D = 10,000; CPU ms ours / torchjd; error vs float64 QP):")
        for r in rows:
            tj = f"{r['torchjd_ms']:.3f}" if "torchjd_ms" in r else "-"
            err = ""
            if "ours_error" in r:
                err = f"  error {r['ours_error']:.1e} / {r['torchjd_error']:.1e}"
            print(f"  S={r['streams']:>2} {r['method']:<9} {r['ours_ms']:.3f} / {tj}{err}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
