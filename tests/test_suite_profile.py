"""The suite's Hypothesis profile: every run draws the same examples and keeps no database, so a
fresh clone, CI and a rerun after a failure all give the same verdict."""

import os

import pytest
import test_methods
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.skipif(
    os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci", reason='checks the fixed profile "ci"'
)


def test_the_fixed_profile_is_loaded():
    current = settings.default
    assert current.derandomize and current.database is None and current.deadline is None
    # settings objects made by test modules inherit it
    assert test_methods.SETTINGS.derandomize and test_methods.SETTINGS.database is None


def test_two_runs_draw_the_same_examples():
    drawn: list[list[float]] = []

    @given(st.lists(st.floats(allow_nan=False), min_size=1, max_size=4))
    @settings(max_examples=20)
    def prop(xs):
        drawn[-1].append(xs)

    for _ in range(2):
        drawn.append([])
        prop()
    assert drawn[0] == drawn[1] and len(drawn[0]) == 20


def test_a_failure_is_the_same_on_every_run():
    failures: list[int] = []

    @given(st.integers(0, 10_000))
    @settings(max_examples=50)
    def prop(x):
        if x >= 1000:
            failures.append(x)
            raise AssertionError(x)

    verdicts = []
    for _ in range(2):
        failures.clear()
        try:
            prop()
        except AssertionError as exc:
            verdicts.append((str(exc), list(failures)))
        else:  # pragma: no cover - most of 0..10000 fails
            verdicts.append(None)
    assert verdicts[0] is not None and verdicts[0] == verdicts[1]
