"""The ``blockfinder`` CLI: exit codes, one-line errors, JSON, pictures, missing graphviz.

Most checks call ``cli.analyze.main(argv)`` in-process (fast); a few run the CLI as a subprocess
(``python -m cli.analyze``) to check the real process: exit status, no traceback, PATH without dot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from blockfinder.errors import BlockfinderError
from cli._console import run_cli
from cli.analyze import main

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(__file__).parent / "models"
TABULAR = ROOT / "examples" / "tabular_vae.py"
HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="graphviz 'dot' not installed")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_of(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def cli(*argv: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    base = dict(os.environ)
    base["PYTHONPATH"] = str(ROOT) + os.pathsep + base.get("PYTHONPATH", "")
    base["COLUMNS"] = "200"
    if env:
        base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "cli.analyze", *argv],
        cwd=cwd,
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# --------------------------------------------------------------------------------------------
# errors: one line on stderr, exit 2


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("missing.py", ["missing.py does not exist"]),
        ("no_build_model.py", ["defines no build_model()", "def build_model()"]),
        ("build_raises.py", ["build_model()", "ValueError: width must be positive, got -3", ":8"]),
        ("build_not_module.py", ["returned a dict, not a torch.nn.Module"]),
        ("no_example_batch.py", ["neither example_batch() nor train_dataset()"]),
        ("import_raises.py", ["KeyError", "import_raises.py:5"]),
        (
            "returns_tensor.py",
            [
                "model(batch) returned a Tensor, not a mapping of named losses",
                "define compute_losses(model, batch) in",
            ],
        ),
        ("nonscalar_loss.py", ["loss 'recon'", "shape (4,)", "not a scalar"]),
        ("nonfinite_loss.py", ["loss 'logp'", "not finite"]),
        ("complex_loss.py", ["loss 'phase'", "complex64", "floating-point"]),
        ("forward_raises.py", ["model(batch)", "RuntimeError", "forward_raises.py:13"]),
    ],
)
def test_user_errors_are_one_line(capsys, model, expected):
    code, _out, err = run(capsys, "analyze", str(MODELS / model))
    assert code == 2
    line = error_of(err)
    for text in expected:
        assert text in line, line
    assert not Path("blocks.svg").exists()


def test_not_python_and_syntax_error(capsys, tmp_path):
    txt = tmp_path / "model.txt"
    txt.write_text("not python")
    code, _, err = run(capsys, "analyze", str(txt))
    assert code == 2 and "not a Python file" in error_of(err)
    bad = tmp_path / f"broken_{uuid.uuid4().hex[:6]}.py"
    bad.write_text("import torch\n\ndef build_model()\n    return None\n")
    code, _, err = run(capsys, "analyze", str(bad))
    line = error_of(err)
    assert code == 2 and "syntax error in" in line and f"{bad.name}:3" in line


def test_unknown_regularizer_lists_valid_names(capsys, tmp_path):
    code, _, err = run(capsys, "analyze", str(MODELS / "two_heads.py"), "--regularizer", "prior")
    line = error_of(err)
    assert code == 2 and "unknown regularizer 'prior'" in line
    assert "attr_a, attr_b, kl" in line
    f = tmp_path / f"regs_{uuid.uuid4().hex[:6]}.py"
    f.write_text(
        (MODELS / "two_heads.py")
        .read_text()
        .replace('REGULARIZERS = ["kl"]', 'REGULARIZERS = ["KL"]')
    )
    code, _, err = run(capsys, "analyze", str(f))
    line = error_of(err)
    assert code == 2 and "'KL'" in line and "REGULARIZERS in" in line and "attr_a" in line


def test_usage_errors(capsys):
    code, _, err = run(capsys, "analyze", str(MODELS / "two_heads.py"), "-o", "pic.jpg")
    assert code == 2 and ".svg, .png, .pdf or .dot" in error_of(err)
    code, _, err = run(capsys, "analyze", str(MODELS / "two_heads.py"), "--depth", "0")
    assert code == 2 and "positive integer" in error_of(err)
    code, _, err = run(capsys, "analyze", "m.py", "--depth", "2", "--ops")
    assert code == 2 and "not allowed with" in error_of(err)
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in error_of(err)
    code, _, err = run(capsys)
    assert code == 2 and "blockfinder analyze MODEL.py" in error_of(err)
    code, _, err = run(capsys, "analyze", "m.py", "--seed", str(2**64))
    assert code == 2 and "out of range" in error_of(err)


def test_output_paths_that_cannot_be_written_are_one_line(capsys, tmp_path):
    (tmp_path / "taken").mkdir()
    model = str(MODELS / "two_heads.py")
    code, _, err = run(capsys, "analyze", model, "--no-render", "--json", "taken")
    assert code == 2 and error_of(err).endswith(": taken") and "directory" in error_of(err)
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "analyze", model, "-o", "file/blocks.svg")
    assert code == 2 and "file" in error_of(err)
    assert (tmp_path / "file").read_text() == "x"


def test_measure_without_trainable_parameters_measures_nothing(capsys):
    code, out, _ = run(
        capsys, "analyze", str(MODELS / "frozen.py"), "--measure", "2", "--no-render"
    )
    assert code == 0 and "no branch points to measure" in out


def test_version_and_help(capsys):
    from blockfinder import __version__

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"blockfinder {__version__}"
    code, out, _ = run(capsys, "analyze", "--help")
    assert code == 0 and "--regularizer" in out and "--measure" in out


# --------------------------------------------------------------------------------------------
# console helpers


def test_run_cli_exit_codes(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    def broken(argv):
        raise ZeroDivisionError("division by zero\nsecond line")

    def user(argv):
        raise BlockfinderError("bad thing\nmore")

    assert run_cli(interrupted, []) == 130
    capsys.readouterr()
    assert run_cli(broken, []) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "internal error: ZeroDivisionError: division by zero second line" in err
    assert "rerun with --debug" in err
    assert run_cli(user, []) == 2
    assert capsys.readouterr().err.strip() == "error: bad thing more"
    assert run_cli(user, ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("error: bad thing more")
    assert run_cli(lambda argv: None, []) == 0


# --------------------------------------------------------------------------------------------
# valid runs


@needs_dot
def test_valid_run_json_svg_and_terminal_report(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "analyze",
        str(MODELS / "two_heads.py"),
        "-o",
        "out/blocks.svg",
        "--json",
        "out/blocks.json",
    )
    assert code == 0, err
    data = json.loads(Path("out/blocks.json").read_text())
    assert data["schema"] == 1
    for key in ("capture", "losses", "regularizers", "parameters", "blocks", "branch_points"):
        assert key in data
    assert data["losses"] == ["attr_a", "attr_b", "kl"] and data["regularizers"] == ["kl"]
    streams = [bp["streams"] for bp in data["branch_points"]]
    assert [["attr_a"], ["attr_b"]] in streams  # the decoder trunk output feeds both heads
    assert all(set(bp) >= {"id", "block", "kind", "where", "shape"} for bp in data["branch_points"])
    ET.parse("out/blocks.svg")  # well-formed XML
    assert "BP" in Path("out/blocks.svg").read_text()
    # terminal report
    for text in ("losses", "regularizer", "capture: ", "impartiality blocks"):
        assert text in out
    assert "branch points" in out and "attr_a | attr_b" in out
    assert "parameters shared by two or more losses" in out and "trunk.0" in out
    assert "wrote report: out/blocks.json" in out and "wrote picture: out/blocks.svg" in out
    assert not list(tmp_path.glob("out/.*"))  # no temporary files left


def test_dataset_only_dot_output_and_ops(capsys):
    code, out, err = run(capsys, "analyze", str(MODELS / "dataset_only.py"), "-o", "g.dot", "--ops")
    assert code == 0, err
    assert Path("g.dot").read_text().startswith("digraph")
    assert "a | b" in out  # branch point streams


def test_sentences_without_blocks(capsys):
    code, out, err = run(capsys, "analyze", str(MODELS / "single_loss.py"), "--no-render")
    assert code == 0, err
    assert "single loss: no impartiality blocks" in out
    assert not Path("blocks.svg").exists()
    code, out, err = run(capsys, "analyze", str(MODELS / "disjoint.py"), "--no-render")
    assert code == 0, err
    assert "the losses share no trainable parameters" in out


def test_regularizer_option_overrides_file(capsys):
    code, _out, err = run(
        capsys,
        "analyze",
        str(MODELS / "two_heads.py"),
        "--no-render",
        "--json",
        "r.json",
        "--regularizer",
        "kl,attr_b",
    )
    assert code == 0, err
    assert json.loads(Path("r.json").read_text())["regularizers"] == ["kl", "attr_b"]


def test_measure_wiring_with_a_stub(capsys, monkeypatch):
    import types

    import blockfinder

    seen = {}

    def measure(model, batches, losses_fn, report):
        seen["batches"] = batches
        seen["losses"] = sorted(losses_fn(model, batches[0]))
        rows = [
            {
                "id": bp.id,
                "cosine": [[1.0, -0.5], [-0.5, 1.0]],
                "mean_cosine": -0.5,
                "min_cosine": -0.5,
                "norm_ratio": 12.5,
                "conflict_share": 0.25,
                "norms": [1.0, 12.5],
            }
            for bp in report.branch_points
        ]
        return {"batches": len(batches), "branch_points": rows}

    stub = types.ModuleType("blockfinder.diagnostics")
    stub.measure = measure
    monkeypatch.setitem(sys.modules, "blockfinder.diagnostics", stub)
    monkeypatch.setattr(blockfinder, "diagnostics", stub, raising=False)
    code, out, err = run(
        capsys, "analyze", str(MODELS / "dataset_only.py"), "--measure", "4", "--no-render",
        "--json", "m.json",
    )  # fmt: skip
    assert code == 0, err
    assert len(seen["batches"]) == 4 and seen["losses"] == ["a", "b"]
    assert seen["batches"][0][0].shape == (32, 5)  # batch size of the example batch
    assert "gradient conflicts" in out and "-0.500" in out and "12.5" in out and "25%" in out
    diag = json.loads(Path("m.json").read_text())["diagnostics"]
    assert diag["batches"] == 4 and diag["branch_points"][0]["norm_ratio"] == 12.5


def test_measure(capsys):
    code, out, err = run(
        capsys,
        "analyze",
        str(MODELS / "dataset_only.py"),
        "--measure",
        "3",
        "--no-render",
        "--json",
        "m.json",
    )
    assert code == 0, err
    assert "gradient conflicts" in out and "mean cosine" in out
    diag = json.loads(Path("m.json").read_text())["diagnostics"]
    assert diag["batches"] == 3 and diag["branch_points"]


# --------------------------------------------------------------------------------------------
# real processes


def test_subprocess_error_exit_status(tmp_path):
    proc = cli("analyze", str(MODELS / "build_raises.py"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert error_of(proc.stderr).startswith("error: build_model() in")


def test_debug_shows_the_traceback(capsys):
    code, _, err = run(capsys, "analyze", str(MODELS / "build_raises.py"), "--debug")
    assert code == 2 and "Traceback" in err and "make_layer" in err
    assert err.strip().splitlines()[-1].startswith("error: build_model() in")


@needs_dot
def test_png(capsys, tmp_path):
    code, _, err = run(capsys, "analyze", str(MODELS / "two_heads.py"), "-o", "b.png", "--ops")
    assert code == 0, err
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_subprocess_missing_dot(tmp_path):
    # hide graphviz: PATH holds only the interpreter's directory
    env = {"PATH": str(Path(sys.executable).parent)}
    proc = cli("analyze", str(MODELS / "two_heads.py"), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "blocks.dot").read_text().startswith("digraph")
    assert not (tmp_path / "blocks.svg").exists()
    assert "apt-get install graphviz" in proc.stderr and "brew install graphviz" in proc.stderr
    assert "blocks.dot" in proc.stdout


def test_tabular_vae_example(tmp_path):
    proc = cli("analyze", str(TABULAR), "-o", "t.svg", "--json", "t.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["branch_points"], data
    tasks = [n for n in data["losses"] if n not in data["regularizers"]]
    assert len(tasks) >= 2
    # the shared decoder trunk's output feeds one stream per attribute head
    assert any(len(bp["streams"]) >= 2 for bp in data["branch_points"])
    if HAS_DOT:
        ET.parse(tmp_path / "t.svg")
