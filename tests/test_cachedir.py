"""The cache directory: its format marker, blob layout, LRU eviction and kept models. No root."""

import os
import shutil

import pytest

from vfs import errors
from vfs.cachedir import CacheDir

SHA = "sha256:" + "ab" * 32


def blob_of(directory, content_id, size, last_used):
    base = directory.blob_base(content_id)
    base.parent.mkdir(parents=True, exist_ok=True)
    data = base.with_suffix(".data")
    data.write_bytes(b"x" * size)
    base.with_suffix(".log").write_bytes(b"")
    os.utime(data, (last_used, last_used))
    return base


def test_a_new_cache_gets_its_format_marker_and_a_cachedir_tag(tmp_path):
    CacheDir(tmp_path / "cache", 65536)
    assert (tmp_path / "cache" / "format").read_text().splitlines() == [
        "lamina-llm-cache cache", "format 1", "block_size 65536"]
    assert (tmp_path / "cache" / "CACHEDIR.TAG").read_bytes().startswith(b"Signature: 8a477f597d28d172789f06886806bc55")


def test_an_existing_cache_keeps_its_block_size(tmp_path):
    CacheDir(tmp_path / "cache", 65536)
    assert CacheDir(tmp_path / "cache", 1 << 24).block_size == 65536


def test_a_directory_with_other_files_is_refused(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(errors.CacheError, match="not empty and not a lamina-llm-cache cache"):
        CacheDir(tmp_path / "home", 65536)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_a_cache_of_another_format_version_is_refused_with_a_way_out(tmp_path):
    CacheDir(tmp_path / "cache", 65536)
    (tmp_path / "cache" / "format").write_text("lamina-llm-cache cache\nformat 9\nblock_size 65536\n")
    with pytest.raises(errors.CacheError, match="format 9 is not supported"):
        CacheDir(tmp_path / "cache", 65536)


@pytest.mark.parametrize("content_id", ["sha256:../../etc", "md5:abcd", "sha256:", "sha256:ABCD",
                                        "sha1:ab/cd", "sha256:ab\0cd"])
def test_a_content_id_never_names_a_path_outside_the_blobs(tmp_path, content_id):
    directory = CacheDir(tmp_path / "cache", 65536)
    with pytest.raises(errors.CacheError):
        directory.blob_base(content_id)


def test_blobs_live_under_their_algorithm_and_first_two_hex_digits(tmp_path):
    directory = CacheDir(tmp_path / "cache", 65536)
    assert directory.blob_base(SHA) == tmp_path / "cache" / "blobs" / "sha256" / "ab" / ("ab" * 32)


def test_eviction_takes_the_least_recently_used_first_and_skips_protected_ones(tmp_path):
    directory = CacheDir(tmp_path / "cache", 65536)
    ids = [f"sha256:{digit * 64}" for digit in "1234"]
    for age, content_id in enumerate(ids):          # ids[0] is the oldest
        blob_of(directory, content_id, 8192, last_used=1000 + age)
    evicted = directory.evict(2 * 8192, protected={ids[0]}).evicted
    assert evicted == [ids[1], ids[2]]
    assert {blob.content_id for blob in directory.blobs()} == {ids[0], ids[3]}
    assert not directory.blob_base(ids[1]).with_suffix(".log").exists()


def test_eviction_frees_nothing_when_nothing_is_asked(tmp_path):
    directory = CacheDir(tmp_path / "cache", 65536)
    blob_of(directory, SHA, 4096, last_used=1)
    assert directory.evict(0, protected=set()).evicted == []


def test_usage_counts_the_blocks_a_sparse_blob_really_occupies(tmp_path):
    directory = CacheDir(tmp_path / "cache", 65536)
    base = directory.blob_base(SHA)
    base.parent.mkdir(parents=True)
    with open(base.with_suffix(".data"), "wb") as sparse:
        sparse.truncate(1 << 30)                    # a 1 GiB blob with nothing cached yet
        sparse.write(b"y" * 65536)
    assert 65536 <= directory.usage() < 1 << 20


def test_folders_removed_while_blobs_are_listed_are_skipped_not_raised(tmp_path, monkeypatch):
    # An eviction (or another process's gc) can empty and remove a folder between the
    # listing of its parent and its own: the listing must go on without it.
    directory = CacheDir(tmp_path / "cache", 65536)
    kept, removed = "sha256:" + "12" * 32, "sha1:" + "34" * 20
    blob_of(directory, kept, 4096, last_used=1)
    blob_of(directory, removed, 4096, last_used=2)
    real_scandir = os.scandir

    class Listed(list):             # what os.scandir gave, read to the end: a context manager too
        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return None

    def scandir_then_remove(path):
        with real_scandir(path) as entries:
            listed = Listed(entries)
        if not isinstance(path, int) and os.fspath(path) == os.fspath(tmp_path / "cache" / "blobs"):
            shutil.rmtree(tmp_path / "cache" / "blobs" / "sha1", ignore_errors=True)     # listed, then gone
        return listed

    monkeypatch.setattr(os, "scandir", scandir_then_remove)
    assert [blob.content_id for blob in directory.blobs()] == [kept]
    assert directory.usage() == 4096


def test_kept_models_survive_a_restart_and_can_be_let_go(tmp_path):
    directory = CacheDir(tmp_path / "cache", 65536)
    directory.keep("llama", {SHA})
    assert CacheDir(tmp_path / "cache", 65536).kept() == {"llama": {SHA}}
    assert directory.unkeep("llama") and not directory.unkeep("llama")
    assert directory.kept() == {}
