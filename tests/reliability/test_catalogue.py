"""The catalogue of user mistakes and faults: for each, what peftjax must answer (exit status, a part of its one
line) and which files must (not) exist afterwards. Every case runs ``peftjax.cli.main`` in this process on the tiny
model (or, for adapters, the library call), so the whole catalogue takes seconds per case.

``docs/errors.md`` is generated from :data:`CASES`; regenerate it with ``python tests/reliability/test_catalogue.py``
(a test checks the committed file is what the list generates).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
PLAY = "Enter two lords.\nFIRST LORD. What news, my lord?\nSECOND LORD. The king is dead; long live the king.\n"
TINY = ["--set", "model.name=tiny", "--set", "data.seq_len=32", "--set", "train.batch_size=2",
        "--set", "data.max_eval_blocks=4", "--no-progress"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One entry: ``args`` are CLI arguments with ``{placeholders}`` of :class:`Work` (``train`` cases get the
    tiny-model overrides appended); ``call`` replaces them for library calls. ``setup`` prepares the directory and
    may return a context manager held during the call (a lock); ``check`` makes further assertions."""

    id: str
    area: str
    mistake: str
    status: int
    message: str
    args: tuple[str, ...] = ()
    call: Callable | None = None
    setup: Callable | None = None
    check: Callable | None = None
    exists: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()  # files of the finished run whose bytes must be as before
    env: tuple[tuple[str, str], ...] = ()

    def command(self) -> str:
        if self.call is not None:
            return self.call.__doc__ or self.call.__name__
        words = ["peftjax", *self.args]
        text = " ".join(f"'{w}'" if w == "" or " " in w else w for w in words)
        text = text.replace("{finished_config}", "CONFIG")
        for key in ("config", "run", "tmp", "bad", "out"):
            text = text.replace("{" + key + "}", key.upper())
        return "".join(f"{k}={v} " for k, v in self.env).replace("{tmp}", "TMP") + text


class Work:
    """A case's directory: three plays, a tiny LoRA config over them, and (on demand) a copy of a finished run."""

    def __init__(self, tmp: Path, finished: Path):
        self.tmp, self.finished = tmp, finished
        self.files = []
        for i in range(3):
            self.files.append(tmp / f"play{i}.txt")
            self.files[-1].write_text(PLAY * 8)
        self.config = self.write_config()
        self.run = tmp / "run"
        self.bad = tmp / "bad"
        self.out = tmp / "out"

    def write_config(self, files=None, extra: str = "", name: str = "c.yaml", train: str = "") -> Path:
        files = self.files if files is None else files
        path = self.tmp / name
        path.write_text(f"name: t\npeft: {{method: lora, rank: 4}}\ntrain: {{steps: 4, learning_rate: 0.01{train}}}\n"
                        f"data: {{dataset: files, eval_docs: 1, files: [{', '.join(map(str, files))}]}}\n" + extra)
        return path

    def copy_run(self) -> Path:
        shutil.copytree(self.finished, self.run)
        return self.run

    def values(self) -> dict:
        return {"config": self.config, "run": self.run, "tmp": self.tmp, "bad": self.bad, "out": self.out,
                "finished_config": self.finished.parent / "c.yaml"}


# ------------------------------------------------------------------------------------------------ set-ups
def _files(*contents: bytes | None):
    def setup(w: Work):
        files = []
        for i, content in enumerate(contents):
            path = w.tmp / f"doc{i}.txt"
            if content is None:
                path.mkdir()
            else:
                path.write_bytes(content)
            files.append(path)
        w.config = w.write_config(files)
    return setup


def _records(content: bytes):
    def setup(w: Work):
        (w.tmp / "recs.jsonl").write_bytes(content)
    return setup


def _write(name: str, text: str | bytes):
    def setup(w: Work):
        path = w.tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        w.config = path
    return setup


def _cache_file(w: Work):
    (w.tmp / "cache").write_text("a file, not a directory")


def _finished(w: Work):
    w.copy_run()


def _damage_checkpoints(how: str, steps=("4",)):
    def setup(w: Work):
        run = w.copy_run()
        for step in steps:
            for f in sorted((run / "checkpoints" / step).rglob("*")):
                if not f.is_file():
                    continue
                if how == "garbage":
                    f.write_bytes(b"\x13\x37 not a checkpoint " * 7)
                elif how == "truncate" and f.parent.name == "d":
                    f.write_bytes(f.read_bytes()[:7])
    return setup


def _changed_values(w: Work):
    """Values that decode but differ from what was saved: the recorded checksum of one leaf no longer matches."""
    run = w.copy_run()
    meta_file = run / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["checksum"]["trainable"][0] = "0" * 16
    meta_file.write_text(json.dumps(meta))


def _local_asset(*, keep_archive: bool):
    """A fetched asset ``catalogue-local`` (its archive in the cache: no network) whose extracted file then had
    4 bytes changed with its modification time put back; registered only while the case runs."""
    @contextlib.contextmanager
    def registered(w: Work):
        import os
        import zipfile

        from peftjax import assets

        dist = w.tmp / "cache" / "catalogue-local" / "dist"
        dist.mkdir(parents=True)
        with zipfile.ZipFile(dist / "local-1.0-py3-none-any.whl", "w") as z:
            z.writestr("local/weights.bin", bytes(range(256)) * 16)
        asset = assets.Asset(name="catalogue-local", requirement="peftjax-no-such-package-xyz==1.0",
                             sha256=_digest(dist / "local-1.0-py3-none-any.whl"), members=("local/*",))
        assets.ASSETS[asset.name] = asset
        try:
            weights = assets.fetch(asset.name, quiet=True) / "local" / "weights.bin"
            if not keep_archive:
                shutil.rmtree(dist)
            st = weights.stat()
            raw = bytearray(weights.read_bytes())
            raw[100:104] = b"\xff\xff\xff\xff"
            weights.write_bytes(bytes(raw))
            os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
            yield
        finally:
            del assets.ASSETS[asset.name]

    return registered


def fetch_local(w: Work):
    """fetch("catalogue-local") (a pinned asset)"""
    from peftjax import assets

    return assets.fetch("catalogue-local", quiet=True)


def _fetched_bytes_restored(w: Work, files):
    assert (files / "local" / "weights.bin").read_bytes() == bytes(range(256)) * 16


def _hold_lock(w: Work):
    from peftjax.train.loop import lock_run_dir

    return lock_run_dir(w.run)


def _unfinished_run(w: Work):
    run = w.copy_run()
    (run / "summary.json").unlink()


def _sweep_spec(sweep: str):
    def setup(w: Work):
        w.config = w.write_config(extra="model: {name: tiny}\n" + sweep, name="spec.yaml")
    return setup


def _other_sweep(w: Work):
    from peftjax.studies.sweep import plan

    plan(str(w.write_config(extra="model: {name: tiny}\nsweep: {grid: {peft.rank: [1]}}\n", name="a.yaml")), w.out)
    w.config = w.write_config(extra="model: {name: tiny}\nsweep: {grid: {peft.rank: [2]}}\n", name="spec.yaml")


def _gguf(content: bytes):
    def setup(w: Work):
        (w.tmp / "model.gguf").write_bytes(content)
    return setup


def _hf_dir(**edit):
    """A Hugging Face model directory ``hf/`` whose config.json (a tiny Qwen3's keys) has ``edit`` applied; no
    weights: every case below is refused while the config is read, before any tensor."""
    def setup(w: Work):
        cfg = {"model_type": "qwen3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "max_position_embeddings": 256, **edit}
        (w.tmp / "hf").mkdir()
        (w.tmp / "hf" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return setup


def _adapter(config: dict | str | None, truncate: bool = False):
    """An HF PEFT adapter directory ``bad/`` for the tiny model (q_proj, v_proj, r=4), with ``config`` written
    over its adapter_config.json and, with ``truncate``, its weights cut in half."""
    def setup(w: Work):
        from peftjax.models.llama import tiny_model
        from peftjax.peft import LoRAConfig, apply, save_hf_adapter

        w.bad.parent.mkdir(parents=True, exist_ok=True)
        save_hf_adapter(apply(tiny_model(), LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))), w.bad)
        if config is not None:
            text = config if isinstance(config, str) else json.dumps(config)
            (w.bad / "adapter_config.json").write_text(text)
        if truncate:
            path = w.bad / "adapter_model.safetensors"
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return setup


HF = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def load_adapter(w: Work):
    """load_hf_adapter(tiny model, BAD)"""
    from peftjax.models.llama import tiny_model
    from peftjax.peft import load_hf_adapter

    return load_hf_adapter(tiny_model(), w.bad)


def _layer_1_adapter(w: Work):
    from peftjax.models.llama import tiny_model
    from peftjax.peft import LoRAConfig, apply, save_hf_adapter

    save_hf_adapter(apply(tiny_model(), LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"),
                                                   layers_to_transform=(1,))), w.bad)
    config = json.loads((w.bad / "adapter_config.json").read_text())
    (w.bad / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": 1}))


def _alpha_is_hf_default(w: Work, model):
    from peftjax.peft import LoRALinear
    from peftjax.peft.hf_format import adapter_modules

    assert {layer.alpha for layer in adapter_modules(model, LoRALinear).values()} == {8.0}


def _only_layer_1(w: Work, model):
    from peftjax.peft import LoRALinear
    from peftjax.peft.hf_format import adapter_modules

    assert sorted(adapter_modules(model, LoRALinear)) == ["layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]


def _metrics_are_json(w: Work, _=None):
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
               for line in (w.run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("skipped") and r["loss"] is None for r in records)  # the non-finite losses, as null
    assert [p.name for p in (w.run / "checkpoints").iterdir() if p.name.isdigit()]  # saved, but none good


# ------------------------------------------------------------------------------------------------ the list
CASES = [
    # config
    Case("unknown-key", "config", "a misspelt config key", 2, "unknown config key train.stpes; did you mean "
         "train.steps?", ("train", "{config}", "--out", "{run}", "--set", "train.stpes=5"), absent=("run",)),
    Case("bad-type", "config", "a value of the wrong type", 2, "config key train.steps must be int",
         ("train", "{config}", "--out", "{run}", "--set", "train.steps=many"), absent=("run",)),
    Case("empty-yaml", "config", "an empty config file (would start the full default run)", 2, "is empty",
         ("train", "{config}", "--out", "{run}"), setup=_write("empty.yaml", ""), absent=("run",)),
    Case("bad-yaml", "config", "a config file that is not YAML", 2, "is not valid YAML",
         ("train", "{config}", "--out", "{run}"), setup=_write("bad.yaml", "peft: {rank: [4\n"), absent=("run",)),
    Case("no-config", "config", "a config file that does not exist", 2, "config file",
         ("train", "{tmp}/missing.yaml", "--out", "{run}"), absent=("run",)),
    Case("alpha-zero", "config", "peft.alpha=0 (the update would be scaled to zero)", 2, "peft.alpha is 0",
         ("train", "{config}", "--out", "{run}", "--set", "peft.alpha=0"), absent=("run",)),
    Case("unknown-method", "config", "an unknown PEFT method", 2, "lorra",
         ("train", "{config}", "--out", "{run}", "--set", "peft.method=lorra"), absent=("run",)),
    Case("rank-too-large", "config", "a rank larger than a layer", 2, "LoRA rank 1000 does not fit",
         ("train", "{config}", "--out", "{run}", "--set", "peft.rank=1000"), absent=("run",)),
    Case("target-matches-nothing", "config", "a target rule that matches no module", 2, "matches no module",
         ("train", "{config}", "--out", "{run}", "--set", "peft.targets=[qkv_proj]"), absent=("run",)),
    Case("layers-int", "config", "peft.layers_to_transform given as one int", 2,
         "config key peft.layers_to_transform must be", ("train", "{config}", "--out", "{run}", "--set",
                                                         "peft.layers_to_transform=5"), absent=("run",)),
    Case("config-is-directory", "config", "a directory given as the config file", 2, "is not a file",
         ("train", "{tmp}", "--out", "{run}"), absent=("run",)),
    Case("seq-len-past-context", "config", "data.seq_len past the model's context, with --overwrite of a finished "
         "run", 2, "data.seq_len 400 exceeds the model's context of 256",
         ("train", "{finished_config}", "--out", "{run}", "--overwrite", "--set", "data.seq_len=400"),
         setup=_finished, unchanged=("summary.json", "metrics.jsonl", "config.yaml")),
    Case("prompt-past-context", "config", "prompt tuning whose virtual tokens push a block past the context", 2,
         "250 virtual prompt tokens", ("train", "{config}", "--out", "{run}", "--set", "peft.method=prompt",
                                       "--set", "peft.num_tokens=250"), absent=("run",)),
    # data
    Case("data-empty", "data", "every data file empty", 2, "every data file is empty",
         ("train", "{config}", "--out", "{run}"), setup=_files(b"", b"", b""), absent=("run",)),
    Case("data-short-held-out", "data", "a held-out document shorter than one block", 2,
         "documents (doc", ("train", "{config}", "--out", "{run}", "--set", "data.eval_docs=1"),
         setup=_files(PLAY.encode() * 8, b"Exit.", PLAY.encode() * 8), absent=("run",)),
    Case("data-not-utf8", "data", "a data file that is not UTF-8", 2, "is not UTF-8 text (byte 0xe9",
         ("train", "{config}", "--out", "{run}"),
         setup=_files(PLAY.encode() * 8, "caf\u00e9 ".encode("latin-1") * 50, PLAY.encode() * 8), absent=("run",)),
    Case("data-directory", "data", "a directory listed in data.files", 2, "is not a regular file (a directory?)",
         ("train", "{config}", "--out", "{run}"), setup=_files(PLAY.encode() * 8, None, PLAY.encode() * 8),
         absent=("run",)),
    Case("records-bad-json", "data", "an SFT records file that is not JSON lines", 2, "could not read the json "
         "records in recs.jsonl", ("train", "{config}", "--out", "{run}", "--set", "data.task=sft", "--set",
                                   "data.files=[{tmp}/recs.jsonl]"), setup=_records(b'{"prompt": "a", "resp'),
         absent=("run",)),
    Case("records-empty", "data", "an empty SFT records file", 2, "no records in recs.jsonl",
         ("train", "{config}", "--out", "{run}", "--set", "data.task=sft", "--set", "data.files=[{tmp}/recs.jsonl]"),
         setup=_records(b""), absent=("run",)),
    Case("data-missing", "data", "a data file that does not exist", 2, "not found (data.files)",
         ("train", "{config}", "--out", "{run}", "--set", "data.files=[{tmp}/nope.txt]"), absent=("run",)),
    Case("forgetting-unknown", "data", "a data.forgetting that names no general text", 2,
         "data.forgetting must be one of auto, shakespeare, polarity, off or a .txt file",
         ("train", "{config}", "--out", "{run}", "--set", "data.forgetting=novel"), absent=("run",)),
    Case("attention-unknown", "config", "a model.attention that names no implementation", 2,
         "model.attention must be one of auto, xla, got 'flash'",
         ("train", "{config}", "--out", "{run}", "--set", "model.attention=flash"), absent=("run",)),
    Case("forgetting-missing", "data", "a data.forgetting file that does not exist", 2,
         "data.forgetting file", ("train", "{config}", "--out", "{run}", "--set", "data.forgetting={tmp}/nope.txt"),
         absent=("run",)),
    # runs
    Case("run-exists", "runs", "--out holds a run, neither --resume nor --overwrite", 2,
         "already exists and is not empty; pass --resume", ("train", "{finished_config}", "--out", "{run}"),
         setup=_finished, unchanged=("summary.json", "metrics.jsonl")),
    Case("resume-finished", "runs", "--resume of a finished run", 0, "already finished all 4 steps",
         ("train", "{finished_config}", "--out", "{run}", "--resume"), setup=_finished,
         unchanged=("summary.json", "metrics.jsonl", "config.yaml")),
    Case("resume-overwrite", "runs", "--resume and --overwrite together", 2, "contradict each other",
         ("train", "{config}", "--out", "{run}", "--resume", "--overwrite"), absent=("run",)),
    Case("out-is-file", "runs", "--out names a file", 2, "is a file; choose another --out",
         ("train", "{config}", "--out", "{config}")),
    Case("out-under-a-file", "runs", "--out inside a regular file", 2, "cannot write in",
         ("train", "{config}", "--out", "{tmp}/play0.txt/run")),
    Case("run-locked", "runs", "another peftjax process trains into the same --out", 2,
         "is in use by another peftjax process", ("train", "{config}", "--out", "{run}"), setup=_hold_lock,
         absent=("run",)),
    Case("resume-more-steps", "runs", "--resume with more train.steps under a cosine schedule", 2,
         "the cosine schedule depends on train.steps",
         ("train", "{finished_config}", "--out", "{run}", "--resume", "--set", "train.steps=8"),
         setup=_unfinished_run, unchanged=("metrics.jsonl", "config.yaml")),
    Case("resume-other-config", "runs", "--resume with a changed learning rate", 2,
         "--resume: train.learning_rate is 0.01",
         ("train", "{finished_config}", "--out", "{run}", "--resume", "--set", "train.learning_rate=0.5"),
         setup=_finished, unchanged=("summary.json", "metrics.jsonl")),
    # checkpoints
    Case("ckpt-latest-garbage", "checkpoints", "the latest checkpoint's files overwritten with garbage", 0,
         "using the previous intact checkpoint, step 2", ("generate", "{run}", "Enter", "--max-new-tokens", "2"),
         setup=_damage_checkpoints("garbage")),
    Case("ckpt-latest-changed-values", "checkpoints", "the latest checkpoint's values changed (orbax reads them "
         "back without complaint)", 0, "does not match its recorded checksum; using the previous intact checkpoint, "
         "step 2", ("generate", "{run}", "Enter", "--max-new-tokens", "2"), setup=_changed_values),
    Case("ckpt-all-truncated", "checkpoints", "every checkpoint's data files truncated", 2,
         "is unreadable", ("generate", "{run}", "Enter", "--max-new-tokens", "2"),
         setup=_damage_checkpoints("truncate", ("2", "4"))),
    Case("ckpt-garbage-resume", "checkpoints", "--resume when every checkpoint is garbage", 2, "checkpoint ",
         ("train", "{finished_config}", "--out", "{run}", "--resume"),
         setup=_damage_checkpoints("garbage", ("2", "4")), unchanged=("summary.json", "metrics.jsonl")),
    # generate / export
    Case("generate-empty-prompt", "generate/export", "an empty prompt", 2, "the prompt is empty",
         ("generate", "{run}", ""), setup=_finished),
    Case("generate-negative-tokens", "generate/export", "--max-new-tokens -1", 2, "--max-new-tokens must be >= 1",
         ("generate", "{run}", "Enter", "--max-new-tokens", "-1"), setup=_finished),
    Case("generate-negative-temperature", "generate/export", "--temperature -1", 2, "--temperature must be >= 0",
         ("generate", "{run}", "Enter", "--temperature", "-1"), setup=_finished),
    Case("generate-past-context", "generate/export", "--max-new-tokens past the model's context", 2,
         "exceed the model's context of 256", ("generate", "{run}", "Enter", "--max-new-tokens", "300"),
         setup=_finished),
    Case("generate-unfinished", "generate/export", "generate from a run that did not finish (killed or "
         "diverged)", 0, "did not finish (no summary.json); using its latest checkpoint",
         ("generate", "{run}", "Enter", "--max-new-tokens", "2"), setup=_unfinished_run),
    Case("generate-not-a-run", "generate/export", "generate from a directory that is no run", 2,
         "is not a run directory", ("generate", "{tmp}", "Enter")),
    Case("export-non-empty", "generate/export", "export into a non-empty directory", 2, "exists and is not empty",
         ("export", "{run}", "--format", "hf-peft", "{tmp}"), setup=_finished),
    Case("export-into-file", "generate/export", "export to a path that is a file", 2, "is a file",
         ("export", "{run}", "--format", "hf-peft", "{config}"), setup=_finished),
    # adapters
    Case("hf-no-r", "adapters", "an HF adapter_config.json without r", 2, "has no 'r'", call=load_adapter,
         setup=_adapter({k: v for k, v in HF.items() if k != "r"})),
    Case("hf-r-not-a-number", "adapters", "an HF adapter whose r is not a number", 2, "r must be an integer",
         call=load_adapter, setup=_adapter({**HF, "r": "four"})),
    Case("hf-bad-json", "adapters", "an HF adapter_config.json that is not JSON", 2, "is not valid JSON",
         call=load_adapter, setup=_adapter('{"r": 4,')),
    Case("hf-truncated-weights", "adapters", "truncated adapter_model.safetensors", 2,
         "is not a readable safetensors file", call=load_adapter, setup=_adapter(None, truncate=True)),
    Case("hf-targets-not-names", "adapters", "an HF adapter whose target_modules is a number", 2,
         "target_modules must be a string or a list", call=load_adapter, setup=_adapter({**HF, "target_modules": 7})),
    Case("hf-rank-pattern-list", "adapters", "an HF adapter whose rank_pattern is a list", 2,
         "rank_pattern must be a mapping", call=load_adapter, setup=_adapter({**HF, "rank_pattern": [4]})),
    Case("hf-no-alpha", "adapters", "an HF adapter without lora_alpha: HF's default 8, not r", 0, "",
         call=load_adapter, setup=_adapter({**{k: v for k, v in HF.items() if k != "lora_alpha"}, "r": 4}),
         check=_alpha_is_hf_default),
    Case("hf-layers-int", "adapters", "layers_to_transform given as one int", 0, "", call=load_adapter,
         setup=_layer_1_adapter, check=_only_layer_1),
    # sweeps
    Case("sweep-workers-0", "sweeps", "--workers 0", 2, "--workers must be >= 1",
         ("sweep", "{config}", "--out", "{out}", "--workers", "0"),
         setup=_sweep_spec("sweep: {grid: {peft.rank: [1, 2]}}\n"), absent=("out",)),
    Case("sweep-other", "sweeps", "--out holds another sweep", 2, "belongs to another sweep",
         ("sweep", "{config}", "--out", "{out}"), setup=_other_sweep, absent=("out/rank=2",)),
    Case("sweep-bad-shard", "sweeps", "--shard 3/2", 2, "--shard expects I/N",
         ("sweep", "{config}", "--out", "{out}", "--shard", "3/2"),
         setup=_sweep_spec("sweep: {grid: {peft.rank: [1]}}\n")),
    Case("sweep-bad-key", "sweeps", "a misspelt key in the sweep grid", 2, "did you mean peft.rank?",
         ("sweep", "{config}", "--out", "{out}"), setup=_sweep_spec("sweep: {grid: {peft.rnak: [1]}}\n"),
         absent=("out",)),
    Case("report-no-results", "sweeps", "report on a directory that holds no sweep", 2, "results.jsonl not found",
         ("report", "{tmp}")),
    # numerics
    Case("diverging-run", "numerics", "learning_rate 1e30 with a checkpoint every step", 2,
         "Last good checkpoint: none", ("train", "{config}", "--out", "{run}", "--set", "train.learning_rate=1e30",
                                        "--set", "train.save_every=1", "--set", "train.steps=12"),
         exists=("run/metrics.jsonl",), absent=("run/summary.json",), check=_metrics_are_json),
    Case("memory-negative-seq", "numerics", "memory --seq-len -5", 2, "seq",
         ("memory", "--model", "tiny", "--seq-len", "-5")),
    Case("memory-mesh-size", "scale", "memory --mesh with a size that is not a number", 2,
         "--mesh expects axis=size pairs", ("memory", "--model", "tiny", "--mesh", "fsdp=two")),
    Case("memory-measure-devices", "scale", "memory --measure on a mesh of more devices than the process has", 2,
         "needs 8 devices", ("memory", "--model", "tiny", "--mesh", "fsdp=8", "--measure")),
    Case("bench-zero-steps", "numerics", "bench --steps 0", 2, "--steps >= 1",
         ("bench", "--model", "tiny", "--steps", "0")),
    # assets
    Case("cache-is-a-file", "assets", "PEFTJAX_CACHE names a file (local data, tiny model)", 2,
         "is not a writable directory", ("train", "{config}", "--out", "{run}"),
         setup=_cache_file, env=(("PEFTJAX_CACHE", "{tmp}/cache"),), absent=("run",)),
    Case("asset-changed", "assets", "a cached asset file whose bytes changed (mtime put back)", 0,
         "changed since it was fetched; extracting it again from the sha256-checked archive", call=fetch_local,
         setup=_local_asset(keep_archive=True), env=(("PEFTJAX_CACHE", "{tmp}/cache"),),
         check=_fetched_bytes_restored),
    Case("asset-changed-offline", "assets", "a changed cached asset whose archive is gone, offline", 2,
         "then run `peftjax fetch catalogue-local`", call=fetch_local,
         setup=_local_asset(keep_archive=False), env=(("PEFTJAX_CACHE", "{tmp}/cache"),),
         absent=("cache/catalogue-local/.complete",)),
    Case("unknown-asset", "assets", "fetch of an unknown asset", 2, "known assets:", ("fetch", "llama")),
    # models
    Case("model-type-unknown", "models", "a Hugging Face directory of a family peftjax does not implement", 2,
         "model_type 'falcon' ['FalconForCausalLM'] is not supported; peftjax loads llama, mistral",
         ("train", "{config}", "--out", "{run}", "--set", "model.name={tmp}/hf"),
         setup=_hf_dir(model_type="falcon", architectures=["FalconForCausalLM"]), absent=("run",)),
    Case("rope-type-unknown", "models", "a RoPE scaling type peftjax does not implement (never ignored)", 2,
         "RoPE scaling type 'longrope' is not supported", ("memory", "--model", "{tmp}/hf"),
         setup=_hf_dir(rope_scaling={"rope_type": "longrope", "factor": 4.0})),
    Case("config-key-missing", "models", "a config.json without a key the architecture needs", 2,
         "lacks 'hidden_size'", ("memory", "--model", "{tmp}/hf"), setup=_hf_dir(hidden_size=None)),
    Case("attention-dropout", "models", "a config.json with attention dropout (not applied: would be ignored)", 2,
         "attention_dropout 0.1 is not supported", ("memory", "--model", "{tmp}/hf"),
         setup=_hf_dir(attention_dropout=0.1)),
    Case("pooling-on-decoder", "models", "data.pooling (an encoder's classifier) on a decoder", 2,
         "data.pooling is for encoders", ("train", "{config}", "--out", "{run}", "--set", "data.pooling=cls"),
         absent=("run",)),
    Case("gguf-bad-magic", "assets", "a .gguf model file that is not GGUF", 2, "model.gguf",
         ("train", "{config}", "--out", "{run}", "--set", "model.name={tmp}/model.gguf"),
         setup=_gguf(b"NOPE" + bytes(64)), absent=("run",)),
]
# ------------------------------------------------------------------------------------------------ running
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run (4 steps, checkpoints at 2 and 4), trained once for the module."""
    from peftjax.cli import main

    root = tmp_path_factory.mktemp("finished")
    w = Work(root, root / "run")
    config = w.write_config(train=", save_every: 2")
    assert main(["train", str(config), *TINY, "--out", str(root / "run")]) == 0
    return root / "run"


def _fill(text: str, values: dict) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_case(case: Case, w: Work, capsys, monkeypatch) -> tuple[int, str, object]:
    held = case.setup(w) if case.setup else None
    for key, value in case.env:
        monkeypatch.setenv(key, _fill(value, w.values()))
    capsys.readouterr()
    result = None
    with held if isinstance(held, contextlib.AbstractContextManager) else contextlib.nullcontext():
        if case.call is not None:
            from peftjax.errors import PeftjaxError

            try:
                result, status = case.call(w), 0
            except PeftjaxError as e:
                print(f"peftjax: error: {e}", file=sys.stderr)
                status = 2
        else:
            from peftjax.cli import main

            args = [_fill(a, w.values()) for a in case.args]
            if args[0] == "train":  # the tiny model first: the case's own --set overrides come after
                args = args[:2] + TINY + args[2:]
            try:
                status = main(args)
            except SystemExit as e:
                status = e.code
    out = capsys.readouterr()
    return status, out.out + out.err, result


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue(case: Case, finished, tmp_path, capsys, monkeypatch):
    w = Work(tmp_path, finished)
    status, output, result = run_case(case, w, capsys, monkeypatch)
    assert status == case.status, output
    assert case.message in output, output
    assert "Traceback" not in output
    if status == 2:  # one line, and it says what was wrong
        errors = [line for line in output.splitlines() if line.startswith("peftjax: error:")]
        assert len(errors) == 1, output
    for rel in case.exists:
        assert (tmp_path / rel).exists(), rel
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), rel
    for rel in case.unchanged:
        assert _digest(w.run / rel) == _digest(finished / rel), rel
    if case.check:
        case.check(w, result)


# ------------------------------------------------------------------------------------------------ the doc
def render_doc() -> str:
    lines = ["# Errors and faults: what peftjax answers", "",
             "Generated from `tests/reliability/test_catalogue.py` (`python tests/reliability/test_catalogue.py`"
             " rewrites it); every row is a test case. Exit 2 is a user mistake: one line `peftjax: error: ...`,"
             " and nothing written or changed in the run directory. `train` runs on the tiny model (`--set"
             " model.name=tiny ...`); CONFIG is a LoRA config over three small local plays, RUN a run directory (a"
             " finished 4-step run with checkpoints 2 and 4 where the case needs one), TMP the case's directory.",
             "",
             "| area | mistake or fault | command | exit | the answer contains |", "|---|---|---|---|---|"]
    for c in CASES:
        message = c.message.replace("|", "\\|") or "(loads; checked by the test)"
        lines.append(f"| {c.area} | {c.mistake} | `{c.command()}` | {c.status} | {message} |")
    return "\n".join(lines) + "\n"


def test_errors_doc_is_generated_from_the_catalogue():
    assert DOC.read_text() == render_doc(), "docs/errors.md is stale: run python tests/reliability/test_catalogue.py"


if __name__ == "__main__":
    DOC.write_text(render_doc())
    print(f"wrote {DOC} ({len(CASES)} cases)")
