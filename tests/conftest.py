"""Shared fixtures, and the Hypothesis profile every pytest run (CI included) uses."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests must give the same verdict on every run and every fresh clone: "ci" derives its
# examples from each test's own code (derandomize) and keeps no example database, so a failure
# seen once is neither saved in .hypothesis/ nor replayed by later runs. "explore" draws fresh
# random examples (and keeps a database) for hunting bugs by hand:
# HYPOTHESIS_PROFILE=explore pytest tests/test_methods.py
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", deadline=None, print_blob=True)
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if _PROFILE not in ("ci", "explore"):
    raise pytest.UsageError(f"HYPOTHESIS_PROFILE={_PROFILE!r}: use 'ci' (default) or 'explore'")
settings.load_profile(_PROFILE)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny models and S x S solves: on a busy 2-core machine
    the multi-threaded path costs more than it saves. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
