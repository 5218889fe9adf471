"""Checkpoints: a SIGKILLed run resumes to bitwise the uninterrupted result; a kill during a save leaves the
previous checkpoint usable; a checkpoint of another model is refused naming the field; load_run for inference."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from peftjax import partition
from peftjax.train.checkpoint import Checkpointer, leaf_checksums, leaf_hashes
from peftjax.config import from_dict
from peftjax.errors import PeftjaxError
from peftjax.train import load_run, make_optimizer, build_model

ROOT = Path(__file__).resolve().parents[2]


def _config_file(tmp_path, files, steps):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: k
        model: {{name: tiny}}
        peft: {{method: lora, rank: 4, dropout: 0.1}}  # dropout: the resumed run must draw the same masks
        data: {{dataset: files, eval_docs: 1, seq_len: 32, max_eval_blocks: 2, files: [{', '.join(map(str, files))}]}}
        train: {{steps: {steps}, batch_size: 2, learning_rate: 0.01, warmup_steps: 5, grad_accum: 2,
                 save_every: 10, keep_checkpoints: 2, log_every: 1}}
        """))
    return path


def _trainable(run_dir):
    _, trainable, _ = partition.split(load_run(run_dir)[0])
    return jax.tree.leaves(trainable)


# Where the kills land: for each seed, four (phase, step) points drawn by random.Random(seed) -- a phase is
# "step" (kill once the metrics reach that step) or "save" (kill as soon as a checkpoint write is under way at or
# after that step) -- the run killed at each in turn and resumed after each. Add seeds for more repetitions.
KILL_SEEDS = (1,)  # step 16, then writes at or after steps 20, 28, 48


def _kill_points(seed: int, steps: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(rng.choice(["step", "save"]), s) for s in sorted(rng.sample(range(12, steps - 4), 4))]


def run_until(cmd, run_dir, phase: str, step: int, env=None):
    """Start ``cmd`` and SIGKILL it at (phase, step); the checkpoint step it leaves behind."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics, checkpoints = run_dir / "metrics.jsonl", run_dir / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []  # complete lines only
        done = max((json.loads(line)["step"] for line in lines), default=0)
        saving = checkpoints.exists() and any("tmp" in p.name for p in checkpoints.iterdir())
        if done >= step and (phase == "step" or saving):
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill at {phase} {step}"
    return Checkpointer(checkpoints).latest_step()


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_sigkill_at_random_points_then_resume_is_bitwise_equal_to_uninterrupted(cli, play_files, tmp_path, seed):
    """Killed four times (during steps or checkpoint writes, dropout on) and resumed after each, the last time from
    a corrupt latest checkpoint (so from the one before), the run ends bitwise where the uninterrupted one does,
    with every metrics record once."""
    config = _config_file(tmp_path, play_files, steps=60)
    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd = [sys.executable, "-m", "peftjax.cli", "train", str(config), "--no-progress", "--out", str(killed)]
    resumed_from = []
    for i, (phase, step) in enumerate(_kill_points(seed, 60)):
        resumed_from.append(run_until(cmd + (["--resume"] if i else []), killed, phase, step))
        assert resumed_from[-1] is not None and resumed_from[-1] <= step
    assert not (killed / "summary.json").exists()
    # and the last kill's checkpoint is corrupt (4 bytes flipped in a data file): the resume falls back a checkpoint
    kept = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert kept[-1] == resumed_from[-1] and len(kept) == 2
    _damage(killed / "checkpoints" / str(kept[-1]), "flip")

    resumed = cli(*cmd[3:], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"using the previous intact checkpoint, step {kept[0]}" in resumed.stderr
    done = cli("train", str(config), "--no-progress", "--out", str(full))
    assert done.returncode == 0, done.stderr

    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from_step"] == kept[0] and summary["steps"] == 60
    train_steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
                   if "loss" in json.loads(line)]
    assert train_steps == list(range(1, 61))  # records after the checkpoint were rewritten, none doubled
    for a, b in zip(_trainable(full), _trainable(killed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit()) == [50, 60]


def _state(config):
    model, _ = build_model(config)
    _, trainable, _ = partition.split(model)
    optimizer = make_optimizer(config.train)
    return trainable, optimizer.init(trainable)


TINY = {"model": {"name": "tiny"}, "peft": {"method": "lora", "rank": 4}}


def test_kill_during_save_leaves_previous_checkpoint_usable(tmp_path):
    """A child saves step 1, then is SIGKILLed while step 2 is being written (its meta item stalls)."""
    ckpt = tmp_path / "ckpt"
    child = textwrap.dedent(f"""
        import sys, time
        import orbax.checkpoint as ocp
        from peftjax.train.checkpoint import Checkpointer, leaf_checksums, leaf_hashes
        from peftjax.config import from_dict
        from peftjax import partition
        from peftjax.train import build_model, make_optimizer
        config = from_dict({TINY!r})
        _, trainable, _ = partition.split(build_model(config)[0])
        opt_state = make_optimizer(config.train).init(trainable)
        c = Checkpointer({str(ckpt)!r})
        c.save(1, trainable, opt_state, config=config, data_position=1)
        original = ocp.JsonCheckpointHandler._save_fn
        def stalled(self, *a, **k):
            result = original(self, *a, **k)
            print("stalled", flush=True)
            time.sleep(600)
            return result
        ocp.JsonCheckpointHandler._save_fn = stalled
        c.save(2, trainable, opt_state, config=config, data_position=2)
        """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "stalled"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any("tmp" in p.name for p in ckpt.iterdir())  # the half-written step 2 is there, uncommitted
    config = from_dict(TINY)
    trainable, opt_state = _state(config)
    c = Checkpointer(ckpt)
    assert c.latest_step() == 1
    restored, restored_opt, meta = c.restore(trainable, opt_state, config=config)
    assert meta["step"] == 1 and meta["data_position"] == 1
    for a, b in zip(jax.tree.leaves(trainable), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c.save(2, restored, restored_opt, config=config, data_position=2)  # and saving goes on past the debris
    assert c.latest_step() == 2


@pytest.mark.parametrize("change, field", [
    ({"peft": {"method": "lora", "rank": 8}}, "peft.rank"),
    ({"peft": {"method": "lora", "rank": 4, "targets": ["q_proj", "v_proj"]}}, "peft.targets"),
    ({"peft": {"method": "full"}}, "peft.method"),
    ({"model": {"name": "tiny", "num_layers": 1}}, "model.num_layers"),
])
def test_checkpoint_of_another_model_names_the_field(tmp_path, change, field):
    config = from_dict(TINY)
    trainable, opt_state = _state(config)
    Checkpointer(tmp_path).save(3, trainable, opt_state, config=config, data_position=3)
    other = from_dict({**TINY, **change})
    other_trainable, _ = _state(other)
    with pytest.raises(PeftjaxError, match=rf"saved with {field}=.* but this model has {field}="):
        Checkpointer(tmp_path).restore(other_trainable, config=other)


def test_checkpoint_holds_only_the_trainable_tree(tmp_path):
    config = from_dict(TINY)
    trainable, opt_state = _state(config)
    size = Checkpointer(tmp_path).save(1, trainable, opt_state, config=config, data_position=0)
    model, _ = build_model(config)
    frozen_bytes = partition.tree_nbytes(partition.split(model)[2])
    assert 0 < size < frozen_bytes // 2  # never the frozen base (orbax also compresses the zero-initialised leaves)
    meta = json.loads((tmp_path / "1" / "meta" / "metadata").read_text())
    assert meta["trainable"] and all("lora_" in leaf["path"] for leaf in meta["trainable"])


def _damage(step_dir: Path, how: str) -> None:
    """Flip 4 bytes in the middle of a trainable data file (orbax does not notice), or truncate / empty it."""
    data = next(f for f in sorted((step_dir / "trainable").rglob("*")) if f.is_file() and f.parent.name == "d")
    raw = bytearray(data.read_bytes())
    if how == "flip":
        i = len(raw) // 2
        raw[i:i + 4] = bytes(255 - b for b in raw[i:i + 4])
    elif how == "truncate":
        raw = raw[: len(raw) // 3]
    else:
        raw = bytearray()
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["flip", "truncate", "empty"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path, how):
    config = from_dict(TINY)
    trainable, opt_state = _state(config)
    first = jax.tree.map(lambda x: x + 1.0, trainable)
    c = Checkpointer(tmp_path)
    c.save(1, first, opt_state, config=config, data_position=1)
    c.save(2, trainable, opt_state, config=config, data_position=2)
    _damage(tmp_path / "2", how)
    warnings = []
    restored, _, meta = Checkpointer(tmp_path).restore(trainable, opt_state, config=config, warn=warnings.append)
    assert meta["step"] == 1
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(warnings) == 1 and str(tmp_path / "2") in warnings[0] and "previous intact checkpoint, step 1" in \
        warnings[0]
    with pytest.raises(PeftjaxError, match=rf"checkpoint {tmp_path / '2'}.* (corrupt|unreadable)"):
        Checkpointer(tmp_path).restore(trainable, config=config, step=2)  # a named step never falls back


def test_no_intact_checkpoint_is_one_line_naming_it(tmp_path):
    config = from_dict(TINY)
    trainable, opt_state = _state(config)
    Checkpointer(tmp_path).save(1, trainable, opt_state, config=config, data_position=1)
    _damage(tmp_path / "1", "flip")
    with pytest.raises(PeftjaxError) as info:
        Checkpointer(tmp_path).restore(trainable, config=config)
    message = str(info.value)  # orbax may fail to decode a damaged chunk, or decode it to the wrong values
    assert message.startswith(f"checkpoint {tmp_path / '1'}") and "\n" not in message
    assert " is corrupt: leaf " in message or " is unreadable (" in message


def test_values_that_differ_from_their_recorded_checksum_are_refused(tmp_path):
    """Orbax reads back whatever bytes decode; only the recorded checksums tell a changed value (and a checkpoint of
    an earlier version, with sha256s, is checked by them)."""
    config = from_dict(TINY)
    trainable, opt_state = _state(config)
    Checkpointer(tmp_path).save(1, trainable, opt_state, config=config, data_position=1)
    meta_file = tmp_path / "1" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    saved = meta["checksum"]["trainable"][3]
    meta["checksum"]["trainable"][3] = "0" * 16
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(PeftjaxError, match=rf"checkpoint {tmp_path / '1' / 'trainable'} is corrupt: leaf "
                                           rf"{meta['trainable'][3]['path']} does not match its recorded checksum"):
        Checkpointer(tmp_path).restore(trainable, config=config, step=1)
    # a one-bit change of a value changes its checksum
    leaves = jax.tree.leaves(trainable)
    flipped = np.asarray(leaves[3]).copy()
    flipped.view(np.uint32).reshape(-1)[5] ^= 1
    assert leaf_checksums([flipped])[0] != saved == leaf_checksums([leaves[3]])[0]
    # an earlier version's checkpoint (sha256 of the bytes, no checksums) is still checked
    del meta["checksum"]
    meta["sha256"] = {"trainable": leaf_hashes([np.asarray(x) for x in leaves]), "opt_state": []}
    meta["sha256"]["trainable"][3] = "0" * 64
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(PeftjaxError, match="does not match its recorded sha256"):
        Checkpointer(tmp_path).restore(trainable, config=config, step=1)


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    import orbax.checkpoint as ocp

    config = from_dict(TINY)
    trainable, opt_state = _state(config)
    c = Checkpointer(tmp_path)
    c.save(1, trainable, opt_state, config=config, data_position=1)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full)
    with pytest.raises(PeftjaxError) as info:
        c.save(2, trainable, opt_state, config=config, data_position=2)
    message = str(info.value)
    assert message.startswith(f"could not save checkpoint 2 in {tmp_path} (No space left on device)")
    assert "checkpoint 1 is intact" in message and "\n" not in message
    monkeypatch.undo()
    restored, _, meta = Checkpointer(tmp_path).restore(trainable, config=config)
    assert meta["step"] == 1
