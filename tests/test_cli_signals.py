"""Stopping on signals with real processes: SIGTERM like Ctrl-C (finish the step, save, exit
143, resume exactly), and a second signal that stops at once and names the checkpoint that can
still be resumed."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cli.train import main
from impartial_train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "models_train" / "tiny.py")
# 4 steps an epoch (64 rows, BATCH_SIZE 16); --method sum runs compute_losses on every step
BLOCKED = (TINY, "--method", "sum", "--epochs", "3")


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


class Run:
    """``impartial-train`` in a subprocess, its stderr collected line by line."""

    def __init__(self, *args, **env):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.train", *map(str, args)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, condition, what, timeout=90):
        deadline = time.time() + timeout
        while not condition():
            assert self.proc.poll() is None, "".join(self.lines)
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def finish(self, timeout=60):
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code, "".join(self.lines)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_exits_143_and_resumes_exactly(tmp_path, capsys):
    out, block = tmp_path / "run", tmp_path / "block"
    block.touch()  # epoch 2's first step waits: the signal lands inside it
    run = Run(*BLOCKED, "--out", out, TINY_BLOCK=block, TINY_BLOCK_AFTER="4")
    try:
        run.wait_for(Path(f"{block}.waiting").exists, "the blocked step")
        run.proc.send_signal(signal.SIGTERM)
        run.wait_for(lambda: "SIGTERM: stopping after this step" in "".join(run.lines), "stop")
        block.unlink()
        code, err = run.finish()
    finally:
        block.unlink(missing_ok=True)
        run.kill()
    assert code == 143, err
    assert "interrupted (SIGTERM) at epoch 2, step" in err and "checkpoint saved to" in err
    assert f"resume with: impartial-train {TINY} --out {out} --resume" in err
    assert "Traceback" not in err
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 1  # inside epoch 2
    assert main([TINY, "--out", str(out), "--resume"]) == 0
    assert main([TINY, "--method", "sum", "--epochs", "3", "--out", str(tmp_path / "s")]) == 0
    assert rows(out) == rows(tmp_path / "s")


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_the_last_checkpoint_resumes(tmp_path, capsys):
    out, block = tmp_path / "run", tmp_path / "block"
    block.touch()  # epoch 2's first step waits until the file is gone
    run = Run(*BLOCKED, "--out", out, TINY_BLOCK=block, TINY_BLOCK_AFTER="4")
    try:
        run.wait_for(Path(f"{block}.waiting").exists, "the blocked step")
        run.proc.send_signal(signal.SIGINT)
        run.wait_for(lambda: "stopping after this step" in "".join(run.lines), "the first stop")
        time.sleep(1.2)  # a second request, not the first one relayed
        run.proc.send_signal(signal.SIGINT)
        code, err = run.finish()
    finally:
        block.unlink(missing_ok=True)
        run.kill()
    assert code == 130, err
    assert "Traceback" not in err
    assert "stopped at once on a second SIGINT, without saving" in err
    assert f"the last checkpoint, {out / 'checkpoint.pt'} (end of epoch 1), can still be" in err
    assert f"impartial-train {TINY} --out {out} --resume" in err
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert main([TINY, "--out", str(out), "--resume"]) == 0
    assert [r["epoch"] for r in rows(out) if r["split"] == "train"] == [1, 2, 3]
