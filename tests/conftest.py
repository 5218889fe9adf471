"""Shared test set-up: strict numerics and the location of the reference fixtures."""
import os
from pathlib import Path

import jax
import pytest
from hypothesis import settings

jax.config.update("jax_numpy_rank_promotion", "raise")

# The suite draws the same property-test examples on every run (CI must not pass or fail by chance);
# HYPOTHESIS_PROFILE=explore draws fresh ones and remembers failures in .hypothesis/.
settings.register_profile("repeatable", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def fixture_path(name: str) -> Path:
    """Path of a file in ../shared/fixtures; skips the test (with the reason) when it is not there."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} not found (the fixtures live in ../shared/fixtures beside the repo)")
    return path
