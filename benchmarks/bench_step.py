"""Cost of an impartial training step against a plain one, measured interleaved in one process.

Model: a product-of-experts multimodal VAE (one encoder and one decoder per modality, hidden 512,
batch 256, CPU, 1 thread). Streams S = number of modalities; the branch point is the joint latent
sample fanned out to the S decoders. For each S and method, plain and impartial steps alternate
(so drifts in machine speed hit both alike); the median of the paired ratios (each impartial step
over the plain step just before it) is printed, with the ratio of the fastest steps of each kind
(``min ratio``, the least disturbed measurement on a shared machine), together with the cost
of the per-task approach (one backward per task through the shared part, as LibMTL does) and the
ratio of the peak memory a step adds (tracemalloc is blind to torch's allocator, so each
configuration runs in a fresh process and the kernel's resident-set peak is read around the steps).

Run: ``python benchmarks/bench_step.py [--streams 4 8 16] [--methods pcgrad imtl-g mgda]
[--engine auto|hook|graph]`` (``--engine``: the surgery engine, default ``auto`` as in ``wrap``;
when given, the header line names it and the JSON rows carry it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.distributions import Normal, kl_divergence


class PoEVAE(nn.Module):
    def __init__(self, modalities: int, dim: int = 64, hidden: int = 512, latent: int = 32):
        super().__init__()
        self.names = [f"m{i}" for i in range(modalities)]
        self.enc = nn.ModuleDict(
            {
                n: nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
                for n in self.names
            }
        )
        self.dec = nn.ModuleDict(
            {
                n: nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, dim))
                for n in self.names
            }
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        precision_sum, weighted_mean = 1.0, 0.0  # prior expert N(0, 1)
        for name in self.names:
            mu, logvar = self.enc[name](batch[name]).chunk(2, dim=-1)
            precision = torch.exp(-logvar)
            precision_sum = precision_sum + precision
            weighted_mean = weighted_mean + mu * precision
        var = 1.0 / precision_sum
        q = Normal(weighted_mean * var, var.sqrt())
        z = q.rsample()
        out = {
            name: -Normal(self.dec[name](z), 1.0).log_prob(batch[name]).sum(-1).mean()
            for name in self.names
        }
        prior = Normal(torch.zeros_like(z), torch.ones_like(z))
        out["kl"] = kl_divergence(q, prior).sum(-1).mean()
        return out


def make(modalities: int, batch_size: int = 256, seed: int = 0):
    torch.manual_seed(seed)
    model = PoEVAE(modalities)
    batch = {n: torch.randn(batch_size, 64) for n in model.names}
    return model, batch


def plain_step(model, batch):
    out = model(batch)
    model.zero_grad(set_to_none=True)
    sum(out.values()).backward()


def per_task_step(model, batch):
    """The per-task approach (LibMTL style): one backward per loss through the whole model."""
    out = model(batch)
    params = list(model.parameters())
    names = list(out)
    total = [torch.zeros_like(p) for p in params]
    for i, name in enumerate(names):
        grads = torch.autograd.grad(
            out[name], params, retain_graph=i < len(names) - 1, allow_unused=True
        )
        for acc, grad in zip(total, grads):
            if grad is not None:
                acc.add_(grad)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(modalities: int, method: str, reps: int, engine: str = "auto") -> dict:
    import impartial_train as it

    model, batch = make(modalities)
    imodel = it.wrap(model, batch, method=method, engine=engine)

    def impartial_step():
        out = imodel(batch)
        model.zero_grad(set_to_none=True)
        sum(out.values()).backward()

    for fn in (plain_step, impartial_step):  # warm-up (and the one-off capture)
        fn() if fn is impartial_step else fn(model, batch)
    plain, surgery, per_task = [], [], []
    for _ in range(reps):
        plain.append(timed(lambda: plain_step(model, batch)))
        surgery.append(timed(impartial_step))
        per_task.append(timed(lambda: per_task_step(model, batch)))
    # Each impartial (and per-task) step is compared with the plain step just before it, so that
    # the machine's drifts (other tenants of a shared host) cancel in the ratio; the median of
    # these paired ratios is the figure. The ratio of the fastest steps of each kind (the least
    # disturbed ones) is printed next to it.
    ratios = [s / p for s, p in zip(surgery, plain)]
    task_ratios = [t / p for t, p in zip(per_task, plain)]
    return {
        "streams": modalities,
        "method": method,
        "plain_ms": 1e3 * statistics.median(plain),
        "impartial_ms": 1e3 * statistics.median(surgery),
        "ratio": statistics.median(ratios),
        "min_ratio": min(surgery) / min(plain),
        "per_task_ratio": statistics.median(task_ratios),
    }


_STEP_MEMORY = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, "benchmarks")
import bench_step as b
import impartial_train as it

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

m, x = b.make({modalities})
if {method!r} == "plain":
    step = lambda: b.plain_step(m, x)
else:
    im = it.wrap(m, x, method={method!r}, engine={engine!r})
    def step():
        out = im(x)
        m.zero_grad(set_to_none=True)
        sum(out.values()).backward()
step(); step()  # capture, caches and allocator pools are set up outside the measurement
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # resets the peak (VmHWM) to the current RSS
for _ in range(3):
    step()
print(status("VmHWM:") - before)
"""


def _step_memory(modalities: int, method: str, engine: str = "auto") -> float:
    """Peak resident memory a training step adds above the process's resident set before it (KiB).

    Measured in a fresh process per configuration (glibc told to return large blocks to the
    kernel), after two warm-up steps, with the kernel's peak counter reset
    (``/proc/self/clear_refs``): what the step itself allocates (activations, gradients, stream
    stashes), not what importing and capturing left resident.
    """
    code = _STEP_MEMORY.format(modalities=modalities, method=method, engine=engine)
    # Large blocks through mmap go back to the kernel when freed, so the resident set follows
    # the live tensors instead of glibc's retained heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return float(out.stdout.strip().splitlines()[-1])


def _median_memory(modalities: int, method: str, engine: str, runs: int) -> float:
    """Median of ``runs`` fresh-process measurements (a single one varies by about +-10 %)."""
    return statistics.median(_step_memory(modalities, method, engine) for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=["pcgrad", "imtl-g", "mgda"])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument(
        "--memory",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="RUNS",
        help="peak step memory (Linux): median of RUNS fresh processes (default 3)",
    )
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument(
        "--engine", choices=["auto", "hook", "graph"], help="surgery engine (default: auto)"
    )
    args = parser.parse_args()
    engine = args.engine or "auto"
    torch.set_num_threads(1)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        "1 thread, PoE VAE hidden 512, batch 256" + (f", engine {engine}" if args.engine else "")
    )
    print(
        f"{'S':>3} {'method':<8} {'plain ms':>9} {'impartial ms':>13} {'ratio':>6} "
        f"{'min ratio':>9} {'per-task':>9} {'mem':>6}"
    )
    rows = []
    for streams in args.streams:
        base_rss = _median_memory(streams, "plain", "auto", args.memory) if args.memory else None
        for method in args.methods:
            row = measure(streams, method, args.reps, engine)
            if args.engine:
                row["engine"] = engine
            if base_rss:
                row["memory_ratio"] = (
                    _median_memory(streams, method, engine, args.memory) / base_rss
                )
            rows.append(row)
            mem = f"{row['memory_ratio']:.3f}" if "memory_ratio" in row else "-"
            print(
                f"{streams:>3} {method:<8} {row['plain_ms']:>9.1f} {row['impartial_ms']:>13.1f} "
                f"{row['ratio']:>6.3f} {row['min_ratio']:>9.3f} {row['per_task_ratio']:>8.2f}x "
                f"{mem:>6}"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
