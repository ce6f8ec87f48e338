"""What each command is built from (vfs/assembly.py), without a mount or a network."""

from vfs.assembly import HubPolicy, build_filesystem, open_catalog
from vfs.cachedir import CacheDir
from vfs.manifest import parse_manifest
from vfs.settings import Settings

MiB = 1024 * 1024

BY_HAND = """
models:
  by-hand:
    path: /models/by-hand/
    backend: llama.cpp
"""


def test_parts_take_the_block_size_of_the_cache_directory_not_of_the_settings(tmp_path):
    CacheDir(tmp_path / "cache", 4 * MiB)                               # made by an earlier run
    settings = Settings(cache_dir=tmp_path / "cache", block_size=16 * MiB, endpoint="http://127.0.0.1:9")
    manifest = parse_manifest(BY_HAND, source=str(tmp_path / "models.yaml"))
    catalog = open_catalog(settings, manifest, HubPolicy.NEVER)
    sources = catalog.sources()
    try:
        # The fetcher's failure memory is per block of the cache: a 16 MiB span would make a
        # failed read fail reads of three blocks that never failed.
        assert sources.fetcher.block_size == catalog.cache.block_size == 4 * MiB
    finally:
        sources.close()
    fs = build_filesystem(settings, manifest, HubPolicy.NEVER)
    try:
        assert fs.fetcher.block_size == fs.cache.block_size == fs.reader.cache.block_size == 4 * MiB
    finally:
        fs.sources.close()


def test_a_catalog_builds_only_what_it_is_asked_for(tmp_path):
    settings = Settings(cache_dir=tmp_path / "cache", endpoint="http://127.0.0.1:9")
    catalog = open_catalog(settings, parse_manifest(BY_HAND, source="models.yaml"), HubPolicy.NEVER)
    assert catalog.directory.usage() == 0
    assert "cache" not in vars(catalog) and "tree" not in vars(catalog)     # gc and keep never build them
    assert [report["name"] for report in catalog.reports()] == ["by-hand"]
    assert "cache" in vars(catalog)
