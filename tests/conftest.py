"""Shared test set-up: strict numerics and the location of the reference fixtures."""
from pathlib import Path

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def fixture_path(name: str) -> Path:
    """Path of a file in ../shared/fixtures; skips the test (with the reason) when it is not there."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} not found (the fixtures live in ../shared/fixtures beside the repo)")
    return path
