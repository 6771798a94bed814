"""cli.loader: importing model files, protocol checks and one-line errors."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from blockfinder.errors import BlockfinderError, LossError, ModelRunError
from cli.loader import (
    ModelFileError,
    batch_size_of,
    call_build_model,
    call_example_batch,
    call_train_dataset,
    load_model_file,
    make_batches,
    make_losses_fn,
    validate_losses,
)

MODELS = Path(__file__).parent / "models"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg
    assert isinstance(exc, BlockfinderError)
    return msg


def test_good_file_exposes_protocol_names():
    mf = load_model_file(MODELS / "two_heads.py")
    assert callable(mf.build_model) and callable(mf.example_batch)
    assert callable(mf.compute_losses)
    assert mf.regularizers == ["kl"]
    assert mf.train_dataset is None and mf.val_dataset is None and mf.evaluate is None
    assert mf.path == (MODELS / "two_heads.py").resolve()
    model = call_build_model(mf)
    assert isinstance(model, torch.nn.Module)
    losses = make_losses_fn(mf)(model, call_example_batch(mf))
    assert list(losses) == ["attr_a", "attr_b", "kl"]


def test_package_import_allows_absolute_imports_of_siblings(tmp_path):
    pkg = f"pkg_{_uid()}"
    _write(tmp_path / pkg / "__init__.py", "")
    _write(tmp_path / pkg / "common.py", "WIDTH = 3\n")
    _write(tmp_path / pkg / "models" / "__init__.py", "")
    model = _write(
        tmp_path / pkg / "models" / "net.py",
        f"""
        import torch
        from {pkg}.common import WIDTH
        from ..common import WIDTH as W2

        def build_model():
            return torch.nn.Linear(WIDTH, W2)

        def example_batch():
            return torch.ones(2, WIDTH)
        """,
    )
    mf = load_model_file(model)
    assert mf.module.__name__ == f"{pkg}.models.net"
    assert call_build_model(mf).in_features == 3


def test_standalone_import_can_import_neighbours(tmp_path):
    helper = f"helper_{_uid()}"
    _write(tmp_path / f"{helper}.py", "def width():\n    return 4\n")
    model = _write(
        tmp_path / "my-model.py",  # not an identifier: imported under a safe name
        f"""
        import torch
        from {helper} import width

        def build_model():
            return torch.nn.Linear(width(), 1)

        def example_batch():
            return torch.ones(2, width())
        """,
    )
    mf = load_model_file(model)
    assert call_build_model(mf).in_features == 4


def test_file_errors(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist") as e:
        load_model_file(tmp_path / "nope.py")
    _one_line(e.value)
    with pytest.raises(ModelFileError, match="is a directory"):
        load_model_file(tmp_path)
    txt = _write(tmp_path / "model.txt", "hello")
    with pytest.raises(ModelFileError, match="not a Python file"):
        load_model_file(txt)
    binary = tmp_path / f"bin_{_uid()}.py"
    binary.write_bytes(b"\x80\x00\x01PK")
    with pytest.raises(ModelFileError, match="binary data"):
        load_model_file(binary)


def test_syntax_error_names_file_and_line(tmp_path):
    bad = _write(tmp_path / f"syn_{_uid()}.py", "import torch\n\ndef build_model(:\n    pass\n")
    with pytest.raises(ModelFileError) as e:
        load_model_file(bad)
    msg = _one_line(e.value)
    assert msg.startswith("syntax error in ") and f"{bad.name}:3" in msg
    yaml = _write(tmp_path / f"yaml_{_uid()}.py", "model:\n  layers: [3, 4]\n  - bad: yes\n")
    with pytest.raises(ModelFileError, match=r"syntax error in .*:\d"):
        load_model_file(yaml)


def test_exception_while_importing_names_the_line():
    with pytest.raises(ModelFileError) as e:
        load_model_file(MODELS / "import_raises.py")
    msg = _one_line(e.value)
    assert "importing" in msg and "KeyError" in msg
    assert "IMPARTIAL_TEST_SURELY_UNSET_VARIABLE" in msg
    assert "import_raises.py:5" in msg


def test_exception_in_a_sibling_module_of_a_package(tmp_path):
    pkg = f"pkg_{_uid()}"
    _write(tmp_path / pkg / "__init__.py", "")
    _write(tmp_path / pkg / "helper.py", "x = 1\nraise RuntimeError('helper broke')\n")
    model = _write(tmp_path / pkg / "model.py", f"import {pkg}.helper\n")
    with pytest.raises(ModelFileError) as e:
        load_model_file(model)
    msg = _one_line(e.value)
    assert "RuntimeError: helper broke" in msg and "helper.py:2" in msg


def test_protocol_errors(tmp_path):
    with pytest.raises(ModelFileError, match=r"defines no build_model\(\)"):
        load_model_file(MODELS / "no_build_model.py")
    with pytest.raises(ModelFileError, match=r"neither example_batch\(\) nor train_dataset\(\)"):
        load_model_file(MODELS / "no_example_batch.py")
    notfn = _write(tmp_path / f"nf_{_uid()}.py", "build_model = 3\n")
    with pytest.raises(ModelFileError, match=r"build_model in .* is an int, not a function"):
        load_model_file(notfn)
    regs = _write(
        tmp_path / f"rg_{_uid()}.py",
        "REGULARIZERS = 'kl'\ndef build_model():\n    pass\ndef example_batch():\n    pass\n",
    )
    with pytest.raises(ModelFileError, match=r"REGULARIZERS .* not a list of names"):
        load_model_file(regs)


def test_build_model_errors():
    mf = load_model_file(MODELS / "build_raises.py")
    with pytest.raises(ModelFileError) as e:
        call_build_model(mf)
    msg = _one_line(e.value)
    assert "build_model()" in msg and "ValueError: width must be positive, got -3" in msg
    assert "build_raises.py:8" in msg  # the innermost frame in the user's file
    mf = load_model_file(MODELS / "build_not_module.py")
    with pytest.raises(ModelFileError, match=r"returned a dict, not a torch.nn.Module"):
        call_build_model(mf)


def test_build_model_returning_a_class(tmp_path):
    f = _write(
        tmp_path / f"cls_{_uid()}.py",
        """
        import torch
        def build_model():
            return torch.nn.Identity
        def example_batch():
            return torch.ones(1)
        """,
    )
    with pytest.raises(ModelFileError, match=r"returned the class Identity.*Identity\(\.\.\.\)"):
        call_build_model(load_model_file(f))


def test_example_batch_from_train_dataset():
    mf = load_model_file(MODELS / "dataset_only.py")
    x, y = call_example_batch(mf)
    assert x.shape == (32, 5) and y.shape == (32,)  # min(len=40, 32)
    assert batch_size_of((x, y)) == 32
    batches = make_batches(mf, 3, batch_size=16, seed=0)
    assert len(batches) == 3 and batches[0][0].shape == (16, 5)
    again = make_batches(mf, 3, batch_size=16, seed=0)
    assert torch.equal(batches[2][0], again[2][0])  # seeded
    many = make_batches(mf, 5, batch_size=16)  # cycles over the 3 batches of an epoch
    assert len(many) == 5
    two = make_batches(load_model_file(MODELS / "two_heads.py"), 2)
    assert len(two) == 2 and torch.equal(two[0], two[1])  # example_batch repeated


def test_example_batch_from_a_dataset_already_built(monkeypatch):
    mf = load_model_file(MODELS / "dataset_only.py")
    ds = call_train_dataset(mf)
    monkeypatch.setattr(mf, "train_dataset", None)  # must not be called again
    x, _ = call_example_batch(mf, ds)
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(32)]))


def test_example_batch_errors(tmp_path):
    f = _write(
        tmp_path / f"eb_{_uid()}.py",
        """
        import torch
        def build_model():
            return torch.nn.Linear(1, 1)
        def example_batch():
            return torch.load("/definitely/missing/file.pt")
        """,
    )
    with pytest.raises(ModelFileError) as e:
        call_example_batch(load_model_file(f))
    msg = _one_line(e.value)
    assert msg.startswith("example_batch() in ") and "FileNotFoundError" in msg
    assert f"{f.name}:6" in msg
    small = _write(
        tmp_path / f"ds_{_uid()}.py",
        """
        import torch
        from torch.utils.data import TensorDataset
        def build_model():
            return torch.nn.Linear(2, 1)
        def train_dataset():
            return TensorDataset(torch.ones(5, 2))
        """,
    )
    (x,) = call_example_batch(load_model_file(small))
    assert x.shape == (5, 2)


def test_losses_errors():
    model = torch.nn.Linear(3, 1)
    mf = load_model_file(MODELS / "returns_tensor.py")
    with pytest.raises(LossError) as e:
        make_losses_fn(mf)(call_build_model(mf), call_example_batch(mf))
    msg = _one_line(e.value)
    assert msg.startswith("model(batch) returned a Tensor, not a mapping of named losses")
    assert "define compute_losses(model, batch) in" in msg and "returns_tensor.py" in msg
    mf = load_model_file(MODELS / "nonscalar_loss.py")
    with pytest.raises(LossError, match=r"loss 'recon' .* has shape \(4,\), not a scalar"):
        make_losses_fn(mf)(call_build_model(mf), call_example_batch(mf))
    mf = load_model_file(MODELS / "nonfinite_loss.py")
    with pytest.raises(LossError, match=r"loss 'logp' .* is -inf \(not finite\)"):
        make_losses_fn(mf)(call_build_model(mf), call_example_batch(mf))
    mf = load_model_file(MODELS / "forward_raises.py")
    with pytest.raises(ModelRunError) as e:
        make_losses_fn(mf)(call_build_model(mf), call_example_batch(mf))
    msg = _one_line(e.value)
    assert "model(batch)" in msg and "RuntimeError" in msg and "forward_raises.py:13" in msg
    with pytest.raises(LossError, match="empty mapping"):
        validate_losses({}, "model(batch)", "m.py")
    with pytest.raises(LossError, match="is a float, not a tensor"):
        validate_losses({"a": 1.0}, "model(batch)", "m.py")
    del model


def test_compute_losses_raising(tmp_path):
    f = _write(
        tmp_path / f"cl_{_uid()}.py",
        """
        import torch
        def build_model():
            return torch.nn.Linear(2, 1)
        def example_batch():
            return torch.ones(3, 2)
        def compute_losses(model, batch):
            out = model(batch)
            return {"a": out.no_such_attribute}
        """,
    )
    mf = load_model_file(f)
    with pytest.raises(LossError) as e:
        make_losses_fn(mf)(call_build_model(mf), call_example_batch(mf))
    msg = _one_line(e.value)
    assert msg.startswith("compute_losses(model, batch) in ") and f"{f.name}:9" in msg
    assert "AttributeError" in msg and "no_such_attribute" in msg


def test_losses_fn_is_transparent_to_fx_tracing():
    mf = load_model_file(MODELS / "two_heads.py")
    losses_fn = make_losses_fn(mf)
    inner = call_build_model(mf)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return losses_fn(self.inner, x)

    traced = torch.fx.symbolic_trace(Wrapper())
    out = traced(call_example_batch(mf))
    assert set(out) == {"attr_a", "attr_b", "kl"}


def test_package_name_clashing_with_an_imported_module(tmp_path):
    _write(tmp_path / "json" / "__init__.py", "")
    model = _write(tmp_path / "json" / "model.py", "def build_model():\n    pass\n")
    with pytest.raises(ModelFileError, match="clashes with the already imported module 'json'"):
        load_model_file(model)


def test_examples_are_imported_as_package_modules():
    path = Path(__file__).resolve().parent.parent / "examples" / "tabular_vae.py"
    mf = load_model_file(path)
    assert mf.module.__name__ == "examples.tabular_vae"


def test_finiteness_check_on_first_call_only(tmp_path):
    f = _write(
        tmp_path / f"cnt_{_uid()}.py",
        """
        import torch
        CALLS = []
        def build_model():
            return torch.nn.Linear(2, 1)
        def example_batch():
            return torch.ones(3, 2)
        def compute_losses(model, batch):
            CALLS.append(1)
            scale = 1.0 if len(CALLS) == 1 else float("inf")
            return {"a": model(batch).mean() * scale}
        """,
    )
    mf = load_model_file(f)
    model, batch = call_build_model(mf), call_example_batch(mf)
    first = make_losses_fn(mf, check_finite="first")
    first(model, batch)
    assert first(model, batch)["a"].isinf()  # not checked after the first call
    with pytest.raises(LossError, match="not finite"):
        make_losses_fn(mf)(model, batch)  # "always" (the default)
    assert make_losses_fn(mf, check_finite="never")(model, batch)["a"].isinf()
