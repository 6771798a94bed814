"""The packages import, expose their public API and the console scripts answer --help/--version."""

import importlib

import pytest

import blockfinder


@pytest.mark.parametrize("name", ["blockfinder", "impartial_train", "cli"])
def test_packages_import(name):
    module = importlib.import_module(name)
    assert module.__doc__


def test_public_api_is_declared():
    for name in blockfinder.__all__:
        assert hasattr(blockfinder, name), name
    assert blockfinder.__version__.count(".") == 2
