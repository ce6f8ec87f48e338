"""The hand-over's record of open files: a snapshot and a journal of changes.

The serving daemon records the open files the kernel knows of (`Passthrough.export()`:
sections "opens" and "inodes", each a dict) before it answers an open or a release, so
that a successor knows them even after a SIGKILL. Rewriting the whole record each time
(a new file, then a rename) cost 270-370 µs per open on a /run that is not tmpfs; an
append of the keys that changed costs a few microseconds.

- `opens.json`: a snapshot, written whole at the first record and every COMPACT_AFTER
  changes;
- `opens.log`: one line per change since the snapshot, each setting keys to their new
  values (null: removed).

A line sets absolute values, and a snapshot is written only once the journal holds the
change it records: so replaying the journal over the newer snapshot (a crash between
writing the snapshot and emptying the journal) ends in the snapshot's values, as the last
line touching a key holds the value the snapshot has.
"""

import json
import os
from pathlib import Path

SNAPSHOT = "opens.json"
JOURNAL = "opens.log"
COMPACT_AFTER = 1000            # changes appended before the snapshot is written again


class OpensRecord:
    """The record of one serving daemon; its first `write` starts it afresh."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._last: dict | None = None
        self._journal: int | None = None
        self._lines = 0

    def write(self, opens: dict) -> None:
        """Record `opens` (a fresh export). FileNotFoundError if the directory is missing."""
        if self._last is None:
            self._write_snapshot(opens)
        else:
            changes = changes_between(self._last, opens)
            if not changes:
                return
            os.write(self._journal_fd(), (json.dumps(changes) + "\n").encode())
            self._lines += 1
            if self._lines >= COMPACT_AFTER:
                self._write_snapshot(opens)     # the journal already holds this change
        self._last = opens

    def close(self) -> None:
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None

    def _write_snapshot(self, opens: dict) -> None:
        path = self.directory / SNAPSHOT
        fresh = path.with_name(f".{path.name}.{os.getpid()}")
        fresh.write_text(json.dumps(opens))
        os.replace(fresh, path)     # tmpfs as a rule, read by a successor on this boot: no fsync
        os.ftruncate(self._journal_fd(), 0)
        self._lines = 0

    def _journal_fd(self) -> int:
        if self._journal is None:
            self._journal = os.open(self.directory / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                    0o600)
        return self._journal


def changes_between(old: dict, new: dict) -> list:
    """[section, key, value] for every key whose value `new` changes; value None: removed."""
    changes = []
    for section in old.keys() | new.keys():
        before, after = old.get(section, {}), new.get(section, {})
        changes += [[section, key, value] for key, value in after.items() if before.get(key) != value]
        changes += [[section, key, None] for key in before.keys() - after.keys()]
    return changes


def read_record(directory: Path) -> dict:
    """The record as its daemon last wrote it: the snapshot with the journal replayed.
    A line cut short (the daemon killed while appending) is ignored, as unanswered."""
    try:
        record = json.loads((directory / SNAPSHOT).read_text())
    except (OSError, ValueError):
        record = {}
    try:
        lines = (directory / JOURNAL).read_text().split("\n")[:-1]     # the last piece is unfinished
    except OSError:
        lines = []
    for line in lines:
        try:
            changes = json.loads(line)
        except ValueError:
            continue
        for section, key, value in changes:
            if value is None:
                record.setdefault(section, {}).pop(key, None)
            else:
                record.setdefault(section, {})[key] = value
    return record
