"""The local source without a mount: what a scan keeps and skips, and reads that refuse changed files."""

import hashlib
import logging
import os

import pytest

from vfs import errors
from vfs.localsource import open_local, scan, sha256_of
from vfs.manifest import parse_manifest


def spec_for(local, path="/models/m/", backend="vllm", extra=""):
    text = f"models:\n  m:\n    path: {path}\n    backend: {backend}\n    local: {local}\n{extra}"
    return parse_manifest(text).models[0]


@pytest.fixture
def model(tmp_path):
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"a" * 1000)
    (root / "sub" / "b.json").write_text("{}")
    (root / "notes.md").write_text("hi")
    os.symlink("a.bin", root / "alias.bin")
    os.symlink(tmp_path, root / "up")
    os.symlink(root / "sub", root / "sub-link")
    os.mkfifo(root / "fifo")
    return root


def test_a_scan_keeps_regular_files_and_inside_symlinks_and_filters(model):
    snapshot = scan(spec_for(model, extra='    exclude: ["*.md"]\n'))
    assert [f.path for f in snapshot.files] == ["a.bin", "alias.bin", "sub/b.json"]
    alias = snapshot.files[1]
    assert alias.source == str(model / "a.bin") and alias.size == 1000 and alias.readable


def test_a_scan_says_what_it_skipped_once_per_kind(model, caplog):
    caplog.set_level(logging.INFO)
    scan(spec_for(model))
    lines = [r.getMessage() for r in caplog.records]
    assert any("1 symlinks that point outside" in line and "'up -> " in line for line in lines)
    assert any("1 symlinks to folders (not followed)" in line for line in lines)
    assert any("1 special files" in line for line in lines)
    assert len(lines) == 3


def read_all(local):
    handle = open_local(local)
    try:
        return handle.read(0, local.size + 10)
    finally:
        handle.close()


def test_reads_give_the_scanned_bytes_and_sha256(model):
    local = scan(spec_for(model)).files[0]
    assert read_all(local) == b"a" * 1000
    handle = open_local(local)
    try:
        cached = handle.read_cached(990, 100, memoryview(bytearray(64)))   # the page was just read
        assert cached is not None and bytes(cached) == b"a" * 10
        assert handle.read_cached(0, 100, memoryview(bytearray(64))) is None   # too big for the buffer
    finally:
        handle.close()
    assert sha256_of(local) == "sha256:" + hashlib.sha256(b"a" * 1000).hexdigest()


@pytest.mark.parametrize("change, what", [
    (lambda p: os.truncate(p, 10), "size 1000 -> 10"),
    (lambda p: p.write_bytes(b"b" * 1000), "modified"),
    (lambda p: os.unlink(p), "deleted"),
], ids=["truncated", "rewritten-same-size", "deleted"])
def test_an_open_handle_refuses_a_file_changed_under_it(model, change, what):
    local = scan(spec_for(model)).files[0]
    handle = open_local(local)
    try:
        assert handle.read(0, 4) == b"aaaa"
        change(model / "a.bin")
        with pytest.raises(errors.LocalFileChanged, match=what):
            handle.read(0, 4)
        with pytest.raises(errors.LocalFileChanged):
            handle.read_cached(0, 4, memoryview(bytearray(16)))
    finally:
        handle.close()


def test_opening_a_file_replaced_since_the_scan_fails(model, tmp_path):
    local = scan(spec_for(model)).files[0]
    (tmp_path / "new").write_bytes(b"a" * 1000)       # the same bytes, another inode
    os.replace(tmp_path / "new", model / "a.bin")
    with pytest.raises(errors.LocalFileChanged, match="replaced by another file"):
        open_local(local)
    assert local.reported                           # logged once; later failures stay quiet


def test_a_single_file_model_is_scanned_as_its_file(model):
    snapshot = scan(spec_for(model / "a.bin", path="/models/m/weights.bin", backend="transformers"))
    assert [(f.path, f.size) for f in snapshot.files] == [("weights.bin", 1000)]
