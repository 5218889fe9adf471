"""Checkpoints of a run with orbax-checkpoint: trainable parameters, optimizer state, step, data position, RNG.

The frozen base is never saved: it is rebuilt from the run's config, so a LoRA checkpoint of SmolLM2 is megabytes.
Each checkpoint is ``run/checkpoints/<step>/`` with three items:

    trainable   the trainable leaves (the flattened pytree, in ``jax.tree`` order)
    opt_state   the optimizer-state leaves (restored only to continue training)
    meta    JSON: step, data position, RNG seed, non-finite counters, the leaf paths/shapes/dtypes, and the
            identity of the model (base, method, rank, targets, quantization) the leaves belong to

Orbax writes a checkpoint into a temporary directory and renames it when complete, so a process killed during a
save leaves the previous checkpoint usable (the half-written one is ignored and cleaned up later). Restoring into a
model whose identity differs raises :class:`PeftjaxError` naming the field that differs.

Leaves are saved as they lie: a leaf sharded over a mesh (and over processes) is written by the processes that hold
its shards, never gathered, and a restore reads each leaf straight into the sharding of the template it is given
(another mesh, or one device), so a checkpoint moves between meshes.

Orbax checks its own index, not the values, so ``meta`` also holds a 64-bit checksum of every saved leaf's bits
(:func:`leaf_checksums`: computed where the leaf lies, the same on any mesh); a restore compares them (checkpoints of
earlier versions hold sha256s of the gathered bytes, checked as such). A latest checkpoint that is corrupt or
truncated is skipped with a one-line warning for the previous intact one; when none is intact (or an explicitly
named step is corrupt) the error names the directory.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from peftjax.errors import PeftjaxError
from peftjax.sharding import host_value


class CorruptCheckpoint(PeftjaxError):
    """A checkpoint whose files cannot be read or whose leaves do not match their recorded checksums."""


def leaf_hashes(leaves: list) -> list[str]:
    """sha256 of each leaf's bytes (C order): what checkpoints of earlier versions record."""
    return [hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in leaves]


@jax.jit
def _checksum(x):
    """Two position-weighted sums (mod 2^32) of the leaf's bits, mixed: integer sums are exact in any order, so the
    value does not depend on how the leaf is sharded."""
    import jax.numpy as jnp

    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
    i = jnp.arange(bits.shape[0], dtype=jnp.uint32)
    out = []
    for a, b in ((0x9E3779B1, 0x85EBCA77), (0xC2B2AE3D, 0x27D4EB2F)):
        h = (bits ^ (i * jnp.uint32(a))) * jnp.uint32(b)
        out.append(jnp.sum(h ^ (h >> 15), dtype=jnp.uint32))
    return jnp.stack(out)


def leaf_checksums(leaves: list) -> list[str]:
    """A 64-bit checksum (hex) of each leaf's bits, computed on its devices (every process must call it for leaves
    sharded over processes); what ``meta`` records and a restore checks."""
    out = []
    for x in leaves:
        value = _checksum(x)
        pair = np.asarray(value.addressable_data(0) if isinstance(value, jax.Array) else value)
        out.append(f"{int(pair[0]):08x}{int(pair[1]):08x}")
    return out


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def identity(config) -> dict:
    """What a checkpoint must match to be restored, as ``{"peft.rank": 8, ...}``: the base model, the quantization
    rules and the method's own identity hook (:mod:`peftjax.peft.registry`; default: every field of its config)."""
    from peftjax.config import to_dict
    from peftjax.peft import get_method

    d = to_dict(config)
    out = {"model.name": d["model"]["name"], "model.num_layers": d["model"]["num_layers"],
           "peft.method": config.method, "quant": d["quant"]}
    for key, value in get_method(config.method).identity(config.peft).items():
        out[f"peft.{key}"] = value
    return out


def _flatten(tree) -> tuple[list, list[dict]]:
    """(the leaves as they lie, sharded ones not gathered; their paths, shapes and dtypes)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [x for _, x in flat]
    specs = [{"path": jax.tree_util.keystr(p, simple=True, separator="/"), "shape": list(np.shape(x)),
              "dtype": str(x.dtype)} for (p, _), x in zip(flat, leaves)]
    return leaves, specs


def _target(x):
    """What orbax restores a leaf into: the template's sharding when it has one, else a host array."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return np.zeros(np.shape(x), x.dtype)


def _manager(directory: Path, keep: int | None = None):
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.WARNING)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=("trainable", "opt_state", "meta"))


class Checkpointer:
    """Save and restore the training state of one run under ``directory``; keeps the last ``keep`` checkpoints."""

    def __init__(self, directory: Path, keep: int = 2):
        self.directory = Path(directory)
        self._mgr = _manager(self.directory, keep)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, trainable, opt_state, *, config, data_position: int, extra: dict | None = None) -> int:
        """Write checkpoint ``step`` (blocking until it is complete on disk); returns its size in bytes."""
        import orbax.checkpoint as ocp

        t_leaves, t_specs = _flatten(trainable)
        o_leaves, o_specs = _flatten(opt_state)
        meta = {"step": step, "data_position": data_position, "seed": config.train.seed,
                "rng": {"seed": config.train.seed, "step": step}, "identity": identity(config),
                "trainable": t_specs, "opt_state": o_specs,
                "checksum": {"trainable": leaf_checksums(t_leaves), "opt_state": leaf_checksums(o_leaves)},
                **(extra or {})}
        try:
            self._mgr.save(step, args=ocp.args.Composite(
                trainable=ocp.args.StandardSave(t_leaves), opt_state=ocp.args.StandardSave(o_leaves),
                meta=ocp.args.JsonSave(meta)), force=True)
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - a full disk or a read-only directory, wrapped by orbax
            cause = _os_error(e)
            if cause is None:
                raise
            previous = [s for s in self.steps() if s < step]
            kept = f"checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise PeftjaxError(f"could not save checkpoint {step} in {self.directory} ({cause.strerror or cause}); "
                               f"{kept}: free space or fix the directory, then --resume") from None
        return directory_bytes(self.directory / str(step))

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def restore(self, trainable, opt_state=None, *, config, step: int | None = None, warn=None):
        """(trainable, opt_state, meta) of checkpoint ``step`` (default: the latest intact one), shaped like the
        given trees; ``opt_state`` is restored only when given (None otherwise).

        Raises :class:`PeftjaxError` when the checkpoint belongs to a different model (the differing field is
        named) or when its leaves do not match ``trainable`` / ``opt_state``; :class:`CorruptCheckpoint` when
        ``step`` (or, without ``step``, every checkpoint) is unreadable or fails its checksums. Without ``step`` a
        corrupt latest checkpoint is skipped for the previous one with a one-line warning (``warn``, default:
        stderr).
        """
        if step is not None:
            return self._restore_step(step, trainable, opt_state, config)
        steps = self.steps()
        if not steps:
            raise PeftjaxError(f"no checkpoint in {self.directory}")
        corrupt = []
        for s in reversed(steps):
            try:
                result = self._restore_step(s, trainable, opt_state, config)
            except CorruptCheckpoint as e:
                corrupt.append(str(e))
                continue
            if corrupt:
                (warn or _stderr)(f"peftjax: warning: {corrupt[0]}; using the previous intact checkpoint, step {s}")
            return result
        raise CorruptCheckpoint(corrupt[0] + ("; no earlier intact checkpoint" if len(corrupt) > 1 else ""))

    def _restore_step(self, step: int, trainable, opt_state, config):
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.CRITICAL)  # a damaged file is reported once, in the exception's one line
        try:
            return self._restore_step_quietly(step, trainable, opt_state, config)
        finally:
            absl.setLevel(level)

    def _restore_step_quietly(self, step: int, trainable, opt_state, config):
        import orbax.checkpoint as ocp

        where = self.directory / str(step)
        if not where.is_dir():
            raise PeftjaxError(f"no checkpoint {where}")
        try:
            meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            missing = [k for k in ("identity", "step", "data_position", "trainable", "opt_state")
                       if not isinstance(meta, dict) or k not in meta]
            if missing:
                raise ValueError(f"meta lacks {missing[0]!r}")
        except Exception as e:  # noqa: BLE001 - whatever orbax / tensorstore raise for damaged files
            raise CorruptCheckpoint(f"checkpoint {where} is unreadable ({_reason(e)})") from None
        check_identity(meta["identity"], identity(config), where=where)
        trees = {"trainable": trainable, "opt_state": opt_state}
        trees = {k: v for k, v in trees.items() if v is not None}
        for name, tree in trees.items():
            _check_specs(name.replace("_", " "), meta[name], _flatten(tree)[1])
        try:
            restored = self._mgr.restore(step, args=ocp.args.Composite(**{
                name: ocp.args.StandardRestore([_target(x) for x in jax.tree.leaves(tree)])
                for name, tree in trees.items()}))
            leaves = {name: [x if isinstance(x, jax.Array) else jax.numpy.asarray(x) for x in restored[name]]
                      for name in trees}
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpoint(f"checkpoint {where} is unreadable ({_reason(e)})") from None
        # checksums of this version, or sha256s of earlier ones (of the gathered bytes), or none (older still)
        kind, recorded, digest = "checksum", meta.get("checksum"), leaf_checksums
        if recorded is None:
            kind, recorded = "sha256", meta.get("sha256") or {}
            digest = lambda leaves: leaf_hashes([host_value(x) for x in leaves])  # noqa: E731
        for name in trees:
            if name not in recorded:
                continue
            for i, (got, want) in enumerate(zip(digest(leaves[name]), recorded[name], strict=True)):
                if got != want:
                    raise CorruptCheckpoint(f"checkpoint {where / name} is corrupt: leaf {meta[name][i]['path']} "
                                            f"does not match its recorded {kind}")
        out = {name: jax.tree.unflatten(jax.tree.structure(tree), leaves[name]) for name, tree in trees.items()}
        return out["trainable"], out.get("opt_state"), meta

    def discard_after(self, step: int) -> None:
        """Delete the checkpoints later than ``step`` (corrupt ones a resumed run will write again)."""
        for s in self.steps():
            if s > step:
                shutil.rmtree(self.directory / str(s), ignore_errors=True)
        self._mgr.reload()

    def close(self):
        self._mgr.close()


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind ``e`` (orbax and tensorstore wrap them), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        if "No space left on device" in str(e) or "Read-only file system" in str(e):
            return OSError(str(e).split(":")[-1].strip())
        e = e.__cause__ or e.__context__
    return None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def check_identity(saved: dict, current: dict, *, where) -> None:
    for key in [*current, *(k for k in saved if k not in current)]:  # identity order: model, method, then options
        if saved.get(key) != current.get(key):
            raise PeftjaxError(f"checkpoint {where} was saved with {key}={saved.get(key)!r} but this model has "
                               f"{key}={current.get(key)!r}")


def _check_specs(what: str, saved: list[dict], current: list[dict]) -> None:
    saved_by_path = {s["path"]: s for s in saved}
    for spec in current:
        s = saved_by_path.get(spec["path"])
        if s is None:
            raise PeftjaxError(f"checkpoint has no {what} leaf {spec['path']}; it belongs to a different model")
        if s["shape"] != spec["shape"] or s["dtype"] != spec["dtype"]:
            raise PeftjaxError(f"checkpoint {what} leaf {spec['path']} is {s['dtype']}{s['shape']} but this model "
                               f"has {spec['dtype']}{spec['shape']}")
    if len(saved) != len(current):
        extra = sorted(set(saved_by_path) - {s["path"] for s in current})
        raise PeftjaxError(f"checkpoint has {what} leaves this model lacks: {', '.join(extra[:3])}")


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
