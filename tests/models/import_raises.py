"""Broken: raises while being imported."""

import os

DATA_DIR = os.environ["IMPARTIAL_TEST_SURELY_UNSET_VARIABLE"]


def build_model():
    raise AssertionError("never reached")
