"""The hand-over's record of open files: a snapshot and a journal, read back exactly (no root)."""

import json

import pytest

from vfs import opensrecord
from vfs.opensrecord import JOURNAL, SNAPSHOT, OpensRecord, read_record


def export(opens, inodes):
    """The shape Passthrough.export() gives: string keys, list values."""
    return {"opens": {str(fh): [inode, passed] for fh, (inode, passed) in opens.items()},
            "inodes": {str(inode): list(state) for inode, state in inodes.items()}}


STEPS = [
    export({}, {}),
    export({1: (7, True)}, {7: (0, 1, 3)}),
    export({1: (7, True), 2: (7, True)}, {7: (0, 2, 3)}),
    export({1: (7, True), 2: (7, True), 3: (9, False)}, {7: (0, 2, 3), 9: (1, 0, 0)}),
    export({2: (7, True), 3: (9, False)}, {7: (0, 1, 3), 9: (1, 0, 0)}),
    export({3: (9, False)}, {9: (1, 0, 0)}),
]


def test_every_open_and_release_reads_back_exactly_and_appends_one_line(tmp_path):
    record = OpensRecord(tmp_path)
    record.write(STEPS[0])
    snapshot = (tmp_path / SNAPSHOT).stat()
    for number, step in enumerate(STEPS[1:], start=1):
        record.write(step)
        assert read_record(tmp_path) == step
        assert len((tmp_path / JOURNAL).read_text().splitlines()) == number
    assert (tmp_path / SNAPSHOT).stat().st_ino == snapshot.st_ino      # not rewritten per change
    record.write(STEPS[-1])                                             # nothing changed: nothing appended
    assert len((tmp_path / JOURNAL).read_text().splitlines()) == len(STEPS) - 1


def test_a_line_cut_short_by_a_kill_counts_as_never_written(tmp_path):
    record = OpensRecord(tmp_path)
    for step in STEPS[:3]:
        record.write(step)
    with open(tmp_path / JOURNAL, "a") as journal:
        journal.write(json.dumps([["opens", "5", [8, True]]])[:-3])    # the open it records was never answered
    assert read_record(tmp_path) == STEPS[2]


def test_the_journal_is_folded_into_the_snapshot_and_a_crash_between_the_two_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(opensrecord, "COMPACT_AFTER", 3)
    record = OpensRecord(tmp_path)
    for step in STEPS[:3]:
        record.write(step)
    real_truncate = opensrecord.os.ftruncate
    monkeypatch.setattr(opensrecord.os, "ftruncate", lambda fd, size: None)    # killed before emptying it
    record.write(STEPS[3])                          # the third change: a new snapshot
    assert json.loads((tmp_path / SNAPSHOT).read_text()) == STEPS[3]
    assert read_record(tmp_path) == STEPS[3]
    monkeypatch.setattr(opensrecord.os, "ftruncate", real_truncate)
    record.write(STEPS[4])
    record.write(STEPS[5])
    record.write(STEPS[4])                          # the third change since: folded again
    assert (tmp_path / JOURNAL).read_text() == ""
    assert read_record(tmp_path) == STEPS[4]


def test_a_new_daemon_starts_the_record_afresh_over_its_predecessors(tmp_path):
    old = OpensRecord(tmp_path)
    for step in STEPS[:4]:
        old.write(step)
    new = OpensRecord(tmp_path)                     # a successor, after adopting STEPS[3]
    new.write(STEPS[3])
    assert (tmp_path / JOURNAL).read_text() == ""
    new.write(STEPS[4])
    assert read_record(tmp_path) == STEPS[4]


def test_without_its_directory_nothing_is_recorded_and_the_next_write_is_a_snapshot(tmp_path):
    record = OpensRecord(tmp_path / "later")
    with pytest.raises(FileNotFoundError):
        record.write(STEPS[1])
    (tmp_path / "later").mkdir()
    record.write(STEPS[2])
    assert json.loads((tmp_path / "later" / SNAPSHOT).read_text()) == STEPS[2]
