"""Analysis speed: ``blockfinder.analyze`` on multimodal VAEs of growing size.

The model: M modalities, each with an encoder tower and a decoder tower of B pre-norm gated
residual blocks (15 fx nodes each), a product-of-experts joint posterior, one Gaussian
likelihood per modality and a KL term (M + 1 losses). Prints, per size: fx nodes, dependency-graph
nodes, branch points, the time of each layer (``report.timings``) and the total, best of
``--repeat`` runs after one warm-up (wall clock; the CPU column is the process's CPU time, which
shows how much of the wall time went to other processes on a shared machine). ``--export`` also
times the export fallback (much slower).

    python benchmarks/bench_analyze.py                 # default sizes
    python benchmarks/bench_analyze.py --sizes 8x24 --repeat 5 --export
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

import blockfinder
from blockfinder.analyze import run_analysis
from blockfinder.fx_capture import capture_fx


class GatedResidual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.0)
        self.gate_logit = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(self.norm(x)).chunk(2, dim=-1)
        h = self.drop(self.fc2(a * torch.sigmoid(b)))
        gate = torch.sigmoid(self.gate_logit)
        return x + gate * h * self.scale


class Tower(nn.Module):
    def __init__(self, d_in: int, d_out: int, dim: int, blocks: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, dim)
        self.blocks = nn.ModuleList(GatedResidual(dim) for _ in range(blocks))
        self.out = nn.Linear(dim, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.inp(x))
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class BigMVAE(nn.Module):
    def __init__(self, modalities: int, blocks: int, dim: int = 32, z_dim: int = 16) -> None:
        super().__init__()
        self.names = [f"m{i}" for i in range(modalities)]
        self.encoders = nn.ModuleDict({n: Tower(24, 2 * z_dim, dim, blocks) for n in self.names})
        self.decoders = nn.ModuleDict({n: Tower(z_dim, 24, dim, blocks) for n in self.names})

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        precisions, weighted = [], []
        for name, x in batch.items():
            mu, logvar = self.encoders[name](x).chunk(2, dim=-1)
            precision = torch.exp(-logvar)
            precisions.append(precision)
            weighted.append(mu * precision)
        total = 1.0 + torch.stack(precisions).sum(0)
        q = Normal(torch.stack(weighted).sum(0) / total, total.rsqrt())
        z = q.rsample()
        losses = {
            name: -Normal(self.decoders[name](z), 1.0).log_prob(x).sum(-1).mean()
            for name, x in batch.items()
        }
        prior = Normal(torch.zeros_like(z), torch.ones_like(z))
        losses["kl"] = kl_divergence(q, prior).sum(-1).mean()
        return losses


def make(modalities: int, blocks: int, batch: int = 16) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = BigMVAE(modalities, blocks)
    data = {n: torch.randn(batch, 24) for n in model.names}
    return model, data


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(
    modalities: int, blocks: int, repeat: int, captures: tuple[str, ...], threads: int | None
):
    model, data = make(modalities, blocks)
    run_analysis(model, data, captures=captures, threads=threads)  # warm-up (imports, caches)
    best, best_cpu, best_report = float("inf"), float("inf"), None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        report = run_analysis(model, data, captures=captures, threads=threads)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        best_cpu = min(best_cpu, cpu)
        if elapsed < best:
            best, best_report = elapsed, report
    fx_nodes = len(capture_fx(model, data).fx_graph.nodes) if "fx" in captures else 0
    return best, best_cpu, best_report, fx_nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="2x4,4x12,8x24,8x48", help="MxB list: modalities x blocks"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--export", action="store_true", help="also time the export fallback")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads of the process"
    )
    parser.add_argument(
        "--analysis-threads",
        default="1",
        help="run_analysis(threads=...): intra-op threads during the analysis ('none': as is)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = None if args.analysis_threads.lower() == "none" else int(args.analysis_threads)
    print(
        f"blockfinder {blockfinder.__version__}, torch {torch.__version__}, {cpu_name()}, "
        f"{os.cpu_count()} cores, process threads {torch.get_num_threads()}, analysis threads "
        f"{threads or torch.get_num_threads()}, {time.strftime('%Y-%m-%d')}"
    )
    layers = ["autograd_capture", "autograd_reach", "fx_trace", "fx_replay", "fx_convert",
              "reconcile", "analysis"]  # fmt: skip
    header = ["model", "fx nodes", "graph nodes", "BPs", *layers, "total (wall)", "CPU"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for size in args.sizes.split(","):
        m, b = (int(v) for v in size.split("x"))
        best, cpu, report, fx_nodes = measure(m, b, args.repeat, ("fx",), threads)
        assert report.capture == "fx", report.specializations
        t = report.timings
        row = [f"{m}x{b}", str(fx_nodes), str(report.graph.number_of_nodes()),
               str(len(report.branch_points))]  # fmt: skip
        row += [f"{t.get(k, 0.0):.3f}" for k in layers] + [f"**{best:.2f} s**", f"{cpu:.2f} s"]
        print("| " + " | ".join(row) + " |")
    if args.export:
        print()
        print("| model | export (fallback) total | export layer |")
        print("|---|---|---|")
        for size in args.sizes.split(","):
            m, b = (int(v) for v in size.split("x"))
            best, _, report, _ = measure(m, b, 1, ("export",), threads)
            print(f"| {m}x{b} | {best:.2f} s | {report.timings.get('export', 0.0):.2f} s |")


if __name__ == "__main__":
    main()
