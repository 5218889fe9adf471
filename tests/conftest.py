"""Shared test set-up: strict numerics, the reference fixtures, and the fixtures several test folders use (the CLI
runner and a tiny-model config over three small local plays). Tests import no other test module."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# One persistent XLA compilation cache for the whole session, every compilation kept however small: the many CLI
# runs (subprocesses) and both xdist workers build the same tiny model and steps, and without it each process
# compiled them again (a tiny 4-step CLI run: 14-16 s -> 6 s once warm). Set before jax is imported, so this process,
# the workers and every subprocess inherit it; a cache the user set is left alone. Removed at the end (pytest_unconfigure).
CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
if CACHE_ENV not in os.environ:
    os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="peftjax-tests-xla-cache-")
    os.environ["PEFTJAX_TESTS_OWN_XLA_CACHE"] = os.environ[CACHE_ENV]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest
from hypothesis import settings

jax.config.update("jax_numpy_rank_promotion", "raise")

# The suite draws the same property-test examples on every run (CI must not pass or fail by chance);
# HYPOTHESIS_PROFILE=explore draws fresh ones and remembers failures in .hypothesis/.
settings.register_profile("repeatable", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# Outputs of bitsandbytes, transformers and HF PEFT on the real model (a second source beside the live peer tests;
# tests/fixtures/README.md says how they were made), committed so that a clone of the project alone runs every test.
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _fixture_path(name: str) -> Path:
    path = FIXTURES / name
    assert path.exists(), f"reference fixture {path} is missing from the repository"
    return path


@pytest.fixture(scope="session")
def fixture_path():
    """``fixture_path(name)``: a file of tests/fixtures (reference outputs of the peer libraries)."""
    return _fixture_path


TINY_ARGS = ("--set", "model.name=tiny", "--set", "data.seq_len=32", "--set", "train.batch_size=2",
             "--set", "data.max_eval_blocks=4", "--no-progress")
PLAY = "Enter two lords.\nFIRST LORD. What news, my lord?\nSECOND LORD. The king is dead; long live the king.\n"
CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def _run_cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftjax.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env)


def pytest_unconfigure(config):
    """The session's compilation cache goes when the controlling process ends (xdist workers leave it)."""
    own = os.environ.get("PEFTJAX_TESTS_OWN_XLA_CACHE")
    if own and not hasattr(config, "workerinput") and own == os.environ.get(CACHE_ENV):
        shutil.rmtree(own, ignore_errors=True)


@pytest.fixture(scope="session")
def cli():
    """``cli(*args, env=None)``: ``python -m peftjax.cli *args`` in a subprocess, its CompletedProcess (stdout,
    stderr)."""
    return _run_cli


@pytest.fixture(scope="session")
def tiny_args() -> tuple[str, ...]:
    """CLI overrides that put a run on the tiny random-weight model with short sequences."""
    return TINY_ARGS


@pytest.fixture
def play_files(tmp_path) -> list[Path]:
    """Three small local 'plays' (text files) for the ``files`` dataset."""
    files = []
    for i in range(3):
        files.append(tmp_path / f"play{i}.txt")
        files[-1].write_text(PLAY * 8)
    return files


@pytest.fixture
def config(tmp_path, play_files) -> Path:
    """A tiny-model LoRA rank-4 run config over the three plays (one held out)."""
    path = tmp_path / "c.yaml"
    path.write_text("name: t\npeft: {method: lora, rank: 4}\ntrain: {steps: 4, learning_rate: 0.01}\n"
                    f"data: {{dataset: files, eval_docs: 1, files: [{', '.join(map(str, play_files))}]}}\n")
    return path


@pytest.fixture(scope="session")
def chat_template() -> str:
    """A small Jinja chat template with role tags."""
    return CHAT


def _randomise(model, var_type, seed=3, scale=0.1):
    """Perturb every ``var_type`` variable in place (so updates are non-trivial); the model."""
    import jax
    from flax import nnx

    state = nnx.state(model, var_type)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape)
                                                   for k, x in zip(keys, leaves)]))
    return model


@pytest.fixture(scope="session")
def randomise():
    """``randomise(model, var_type, seed=3, scale=0.1)``: add N(0, scale^2) noise to every ``var_type`` leaf."""
    return _randomise
