"""The impartial-train CLI: outputs, exact resume, Ctrl-C, --compare, --devices, errors.

End-to-end runs are subprocesses (``python -m cli.train``); error cases and the runs they need
call ``cli.train.main`` in-process (same code path, no torch import per case).
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli.train import main
from impartial_train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "models_train"
TINY = str(MODELS / "tiny.py")
DET = str(MODELS / "det.py")
PNG = b"\x89PNG\r\n\x1a\n"


def run(*args, env=None, timeout=120):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cli.train", *map(str, args)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def one_error_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def test_train_writes_all_outputs(tmp_path):
    out = tmp_path / "run"
    proc = run(TINY, "--method", "imtl-g", "--epochs", "2", "--out", out, "--lr", "0.01")
    assert proc.returncode == 0, proc.stderr
    assert (
        "training summary" in proc.stdout
        and "at 1 branch point(s): bp0:tanh@trunk.1" in proc.stdout
    )
    # the first lines say which engine runs and the outcome of its self-check
    assert "engine: structure 1: graph engine (1 branch point(s)" in proc.stdout
    assert "self-check passed" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    options = config["options"]
    assert options["method"] == "imtl-g" and options["epochs"] == 2 and options["lr"] == 0.01
    assert {"seed", "batch_size", "optimizer", "weight_decay", "device", "val_every"} <= set(
        options
    )
    assert config["model_file"]["sha256"] == hashlib.sha256(Path(TINY).read_bytes()).hexdigest()
    assert {"torch", "python", "impartial"} <= set(config["versions"])
    assert config["trainer"]["batch_size"] == 16  # the model file's BATCH_SIZE
    history = rows(out)
    assert [(r["epoch"], r["split"]) for r in history] == [
        (1, "train"),
        (1, "val"),
        (2, "train"),
        (2, "val"),
    ]
    assert {"attr_a", "attr_b", "kl", "total", "branch_points"} <= set(history[0])
    assert {"attr_a", "rmse_a", "accuracy_b"} <= set(history[1])  # evaluate() on val rows
    (point,) = history[2]["branch_points"].values()
    assert point["streams"] == ["attr_a", "attr_b"] and sum(point["weights"]) > 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["method"] == "imtl-g"
    assert {"model", "optimizer", "methods", "ranks", "model_sha256"} <= set(ckpt)
    assert {"torch", "python", "numpy", "generators"} <= set(ckpt["ranks"][0]["rng"])
    assert (out / "curves.png").read_bytes()[:8] == PNG


def test_resume_reproduces_a_straight_run(tmp_path, capsys):
    common = [TINY, "--method", "pcgrad", "--lr", "0.01"]
    assert main([*common, "--epochs", "3", "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    torch.manual_seed(7)  # whatever the process did in between
    assert main([TINY, "--out", str(tmp_path / "b"), "--resume", "--epochs", "3"]) == 0
    a, b = (tmp_path / "a" / "metrics.jsonl"), (tmp_path / "b" / "metrics.jsonl")
    assert a.read_text() == b.read_text()  # bit for bit
    assert len(rows(tmp_path / "a")) == 6
    resumes = json.loads((tmp_path / "b" / "config.json").read_text())["resumes"]
    assert resumes[0]["from_epoch"] == 1


def test_sigint_saves_a_checkpoint_and_resume_completes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    # epochs of ~1.2 s, so the interrupt lands in epoch 2 even on a fast, idle machine. The
    # sleep sits in compute_losses, which the graph engine traces once (Python side effects do
    # not rerun in the rewritten program), so this run uses the plain loop of --method sum.
    env = {"TINY_SLEEP": "0.04", "TINY_ROWS": "480", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "cli.train", TINY, "--method", "sum", "--epochs", "3"]
    proc = subprocess.Popen(
        [*command, "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 90
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no checkpoint written"
            time.sleep(0.02)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted (SIGINT) at" in stderr and "checkpoint saved to" in stderr
    assert f"resume with: impartial-train {TINY} --out {out} --resume" in stderr
    assert "Traceback" not in stderr
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] < 3

    # resume (in-process) and compare with an uninterrupted run: identical metrics
    monkeypatch.setenv("TINY_ROWS", "480")
    assert main([TINY, "--out", str(out), "--resume"]) == 0
    straight = [TINY, "--method", "sum", "--epochs", "3", "--out", str(tmp_path / "straight")]
    assert main(straight) == 0
    assert rows(out) == rows(tmp_path / "straight")


def test_compare_trains_each_method_alike(tmp_path, capsys):
    out = tmp_path / "cmp"
    proc = run(TINY, "--compare", "sum,pcgrad,imtl-g", "--epochs", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "final val values" in proc.stdout and "*" in proc.stdout
    summary = json.loads((out / "compare.json").read_text())
    assert summary["split"] == "val"
    assert list(summary["methods"]) == ["sum", "pcgrad", "imtl-g"]
    assert {"attr_a", "attr_b", "kl", "total", "rmse_a", "accuracy_b"} <= set(summary["columns"])
    assert summary["direction"]["accuracy_b"] == "max" and summary["direction"]["rmse_a"] is None
    assert summary["direction"]["attr_a"] == summary["direction"]["total"] == "min"
    assert "rmse_a" not in summary["best"] and "attr_a" in summary["best"]
    for column, winner in summary["best"].items():  # one seed: strictly the best value
        values = {m: e["final"][column] for m, e in summary["methods"].items()}
        better = min if summary["direction"][column] == "min" else max
        assert values[winner] == better(values.values())
        assert list(values.values()).count(values[winner]) == 1
    for method in ("sum", "pcgrad", "imtl-g"):
        assert len(rows(out / method)) == 4
        final = summary["methods"][method]["final"]
        assert final["attr_a"] == rows(out / method)[-1]["attr_a"]
    assert (out / "compare.png").read_bytes()[:8] == PNG
    # same seed and data order as a run of its own
    assert main([TINY, "--method", "sum", "--epochs", "2", "--out", str(tmp_path / "s")]) == 0
    assert rows(tmp_path / "s") == rows(out / "sum")


@pytest.mark.slow
def test_two_devices_match_one(tmp_path, capsys):
    args = ["--method", "imtl-g", "--epochs", "2", "--lr", "0.01"]
    proc = run(DET, *args, "--devices", "2", "--out", tmp_path / "ddp", timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["trainer"]["world_size"] == 2
    assert main([DET, *args, "--out", str(tmp_path / "one")]) == 0
    ddp, one = rows(tmp_path / "ddp"), rows(tmp_path / "one")
    assert [(r["epoch"], r["split"]) for r in ddp] == [(r["epoch"], r["split"]) for r in one]
    for r, s in zip(ddp, one):
        for key in ("a", "b", "reg", "total", "error_a"):
            if key in s:
                assert r[key] == pytest.approx(s[key], rel=1e-10), (r["epoch"], key)
        for where, point in s.get("branch_points", {}).items():
            assert r["branch_points"][where]["weights"] == pytest.approx(point["weights"])


def test_default_out_and_resume_of_the_latest_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([TINY, "--method", "imtl-g", "--epochs", "1"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("tiny-imtl-g-") and len(run_dir.name) == len(
        "tiny-imtl-g-20260101-120000"
    )
    assert main([TINY, "--resume", "--epochs", "2"]) == 0
    assert [r["epoch"] for r in rows(run_dir) if r["split"] == "train"] == [1, 2]


def test_no_verify_switches_the_self_check_off(tmp_path, capsys):
    out = tmp_path / "nv"
    assert (
        main([TINY, "--method", "imtl-g", "--epochs", "1", "--no-verify", "--out", str(out)]) == 0
    )
    assert "self-check off" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["verify"] is False and config["trainer"]["verify"] is False


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in (
        "--method",
        "--method-arg",
        "--epochs",
        "--batch-size",
        "--lr",
        "--optimizer",
        "--weight-decay",
        "--seed",
        "--device",
        "--out",
        "--resume",
        "--val-every",
        "--no-rescale",
        "--regularizer",
        "--compare",
        "--devices",
        "--debug",
    ):
        assert flag in text
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("impartial-train ")


# --------------------------------------------------------------------------------------------
# errors: one line, exit 2, no traceback


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main([TINY, "--method", "pcgrad", "--epochs", "1", "--out", str(out)]) == 0
    return out


def error_of(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 2
    return one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([str(MODELS / "no_train.py")], "defines no train_dataset(): add 'def train_dataset()"),
        ([TINY, "--method", "nope"], "unknown aggregation method 'nope'"),
        ([TINY, "--method", "pcgrad", "--method-arg", "foo=1"], "bad --method-arg"),
        ([TINY, "--method-arg", "alpha"], "--method-arg expects KEY=VALUE"),
        ([TINY, "--method", "gradnorm", "--method-arg", "alpha=x"], "bad --method-arg"),
        ([TINY, "--method", "rlw", "--method-arg", "seed=abc"], "seed must be an integer"),
        ([TINY, "--seed", "1e30"], "invalid seed"),
        ([TINY, "--regularizer", "nope"], "unknown regularizer 'nope'"),
        ([TINY, "--compare", "sum,pcgrad", "--method", "sum"], "exclude each other"),
        ([TINY, "--compare", "sum,nope"], "unknown aggregation method 'nope'"),
        ([str(MODELS / "bad_build.py")], "build_model() in"),
        ([str(MODELS / "missing.py")], "does not exist"),
        ([TINY, "--epochs", "-1"], "--epochs"),
    ],
)
def test_user_errors(capsys, tmp_path, argv, expected):
    line = error_of(capsys, [*argv, "--out", str(tmp_path / "x")])
    assert expected in line
    if "unknown aggregation" in expected:
        assert "imtl-g" in line and "pcgrad" in line  # lists the methods


def test_resume_errors(capsys, tmp_path, trained, monkeypatch):
    line = error_of(capsys, [TINY, "--resume", "--out", str(tmp_path / "empty")])
    assert "no checkpoint.pt in" in line
    line = error_of(capsys, [TINY, "--resume", "--out", str(trained), "--method", "imtl-g"])
    assert "trained with method 'pcgrad', not 'imtl-g'" in line
    line = error_of(capsys, [TINY, "--out", str(trained)])
    assert "already holds a run" in line and "--resume" in line
    monkeypatch.setenv("TINY_HIDDEN", "5")  # same file, another model
    line = error_of(capsys, [TINY, "--resume", "--out", str(trained), "--epochs", "2"])
    assert "different model" in line
    monkeypatch.delenv("TINY_HIDDEN")
    edited = tmp_path / "tiny.py"
    edited.write_text(Path(TINY).read_text() + "\n# edited\n")
    line = error_of(capsys, [str(edited), "--resume", "--out", str(trained), "--epochs", "2"])
    assert "different model file" in line


def test_cuda_unavailable(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    line = error_of(capsys, [TINY, "--device", "cuda", "--out", str(tmp_path / "x")])
    assert "CUDA is not available" in line and "--device cpu" in line


def test_error_in_a_subprocess_has_no_traceback_unless_debug(capsys):
    proc = run(MODELS / "no_train.py")
    assert proc.returncode == 2
    assert "train_dataset()" in one_error_line(proc.stderr)
    assert main([str(MODELS / "no_train.py"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
