"""One run per output directory: an OS lock that a killed process releases, and a second run
refused in one line that names the holder's pid (library and CLI, with real second processes)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.train import main
from impartial_train.runlock import LOCK_NAME, RunDirectoryBusy, RunLock

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "models_train" / "tiny.py")
# another process holding the lock as RunLock does (flock + its record), without importing torch
HOLD = """
import fcntl, json, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], sys.argv[2]), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"pid": os.getpid(), "started": "now"}).encode())
print("held", flush=True)
time.sleep(120)
"""


def env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture
def holder(tmp_path):
    """A second process holding the lock of tmp_path/run (killed at the end)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out), LOCK_NAME],
        env=env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    proc.kill()
    proc.wait()


def test_a_held_directory_is_refused_with_the_holders_pid(holder):
    out, proc = holder
    with pytest.raises(RunDirectoryBusy, match=f"in use by another training run \\(pid {proc.pid}"):
        RunLock(out).acquire()
    # a killed holder releases the lock: the stale lock file does not block
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid
    with RunLock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_the_lock_is_reentrant_within_a_process_and_cleans_up_what_it_created(tmp_path):
    out = tmp_path / "a" / "b"
    with RunLock(out), RunLock(out):
        assert (out / LOCK_NAME).is_file()
    assert not (tmp_path / "a").exists()  # created for the lock only: removed again
    out.mkdir(parents=True)
    with RunLock(out):
        (out / "metrics.jsonl").write_text("")
    assert (out / "metrics.jsonl").is_file() and (out / LOCK_NAME).is_file()


@pytest.mark.slow
def test_the_cli_refuses_a_second_run_and_resumes_after_a_kill(tmp_path, capsys):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "cli.train", TINY, "--method", "sum", "--epochs", "500"]
    first = subprocess.Popen(
        [*command, "--out", str(out)],
        cwd=ROOT,
        env=env(TINY_SLEEP="0.03"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 90
        while not (out / "checkpoint.pt").exists():
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the first run wrote no checkpoint"
            time.sleep(0.05)
        config = (out / "config.json").read_text()
        for argv in (
            [TINY, "--method", "imtl-g", "--epochs", "1", "--out", str(out)],
            [TINY, "--resume", "--epochs", "3", "--out", str(out)],
        ):
            capsys.readouterr()
            assert main(argv) == 2
            err = capsys.readouterr().err
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert len(lines) == 1 and "Traceback" not in err, err
            assert f"in use by another training run (pid {first.pid}" in lines[0]
        assert (out / "config.json").read_text() == config  # nothing of the first run touched
        rows = (out / "metrics.jsonl").read_text().splitlines()
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    epochs = len({json.loads(r)["epoch"] for r in rows})
    assert main([TINY, "--resume", "--epochs", str(epochs + 1), "--out", str(out)]) == 0
    history = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history if r["split"] == "train"] == list(range(1, epochs + 2))
