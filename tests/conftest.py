"""Shared test setup: the repo root on sys.path, quiet transformers, seeded torch."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # import gemma, gemma2

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, so a failure reproduces."""
    torch.manual_seed(0)


def pytest_configure(config):
    import transformers

    # The test models are tiny: one op is microseconds of work, and a second
    # intra-op thread only adds synchronisation. On a busy 2-core machine that
    # synchronisation made each op take milliseconds (a 54-token generate went
    # from 0.06 s to 8 s), so run single-threaded.
    torch.set_num_threads(1)
    # The oracle's warnings (e.g. "generation flags are not valid") are noise here.
    transformers.logging.set_verbosity_error()
