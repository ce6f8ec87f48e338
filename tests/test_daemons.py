"""The mount point's real path, found without a stat of the mount point (daemons.real_mountpoint)."""

import os

import pytest

from vfs.daemons import pid_file, real_mountpoint


@pytest.fixture
def no_stat_of(monkeypatch):
    """Make any stat of the given paths fail the test, as a stat of a serverless mount would hang."""
    forbidden = set()
    real_lstat, real_stat = os.lstat, os.stat

    def guarded(original):
        def call(path, *args, **kwargs):
            assert os.fspath(path) not in forbidden, f"stat of the mount point {path}"
            return original(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "lstat", guarded(real_lstat))
    monkeypatch.setattr(os, "stat", guarded(real_stat))
    return forbidden.add


def test_the_mount_point_is_never_stated(tmp_path, no_stat_of):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    mountpoint = tmp_path / "real" / "models"
    mountpoint.mkdir()
    no_stat_of(str(mountpoint))
    assert real_mountpoint(tmp_path / "link" / "models") == str(mountpoint)
    assert pid_file(tmp_path / "link" / "models") == pid_file(mountpoint)


def test_a_relative_path_and_a_symlinked_mount_point_resolve_as_realpath_does(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "to-models").symlink_to("models")
    (tmp_path / "chain").symlink_to("to-models")
    monkeypatch.chdir(tmp_path)
    for given in ("models", "./models/", "to-models", "chain", str(tmp_path / "chain")):
        assert real_mountpoint(given) == os.path.realpath(given)
    assert real_mountpoint("not-there") == os.path.realpath("not-there")
