"""Resolved snapshots on disk: which commit a revision meant, and each commit's file list.

Layout under `<cache>/snapshots/`:
  refs/<repo-slug>/<quoted revision>   the commit a branch or tag resolved to, last time online
  trees/<repo-slug>/<commit>.json      the repo's files at that commit (path, size, content id)

A commit's tree never changes, so a tree file is written once and trusted after. Refs are
replaced atomically when the Hub says a branch moved. A mount with the Hub unreachable
starts from these files alone.
"""

import json
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

from . import errors
from .atomic import write_atomically



class RemoteFile(NamedTuple):
    """One file of a repo at a commit. A tuple: a 100k-file repo makes 100k of these at
    every start, and a frozen dataclass costs several times as much to build."""

    path: str          # path in the repo, '/'-separated, already checked to be safe
    size: int
    content_id: str    # "sha256:<hex>" (LFS) or "sha1:<hex>" (git blob)


@dataclass(frozen=True)
class Snapshot:
    repo: str
    revision: str      # what the manifest asked for
    commit: str        # 40-hex it resolved to
    files: tuple[RemoteFile, ...]

    def file(self, path):
        for remote in self.files:
            if remote.path == path:
                return remote
        return None


def repo_slug(repo):
    """`org/name` -> `models--org--name`, the Hugging Face cache's own naming."""
    return "models--" + repo.replace("/", "--")


class SnapshotStore:
    def __init__(self, cache_dir):
        self.root = Path(cache_dir) / "snapshots"

    def _ref_path(self, repo, revision):
        return self.root / "refs" / repo_slug(repo) / urllib.parse.quote(revision, safe="")

    def _tree_path(self, repo, commit):
        return self.root / "trees" / repo_slug(repo) / f"{commit}.json"

    def commit_for(self, repo, revision):
        """The commit `revision` resolved to when last seen online, or None."""
        try:
            return self._ref_path(repo, revision).read_text().strip() or None
        except OSError:
            return None

    def save_ref(self, repo, revision, commit):
        if self.commit_for(repo, revision) != commit:
            write_atomically(self._ref_path(repo, revision), commit.encode())

    def load_tree(self, repo, commit):
        """The stored files of `repo` at `commit`, or None when never seen."""
        try:
            entries = json.loads(self._tree_path(repo, commit).read_text())
            if entries and isinstance(entries[0], dict):      # written by an older version
                return tuple(RemoteFile(e["path"], int(e["size"]), e["content_id"]) for e in entries)
            return tuple(map(RemoteFile._make, entries))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def save_tree(self, repo, commit, files):
        # [path, size, content id] per file: a 100k-file tree loads in a third of the time
        # of a list of objects.
        entries = [[f.path, f.size, f.content_id] for f in files]
        write_atomically(self._tree_path(repo, commit), json.dumps(entries, separators=(",", ":")).encode())


def path_index(tree: Iterable[RemoteFile]) -> dict:
    """path -> RemoteFile, for picking many single files out of one tree."""
    return {remote.path: remote for remote in tree}


def select_files(spec, commit, tree, index=None) -> tuple:
    """The files of `tree` that `spec` shows; EntryNotFound when its single file is missing.
    `index` (path_index of the tree) spares a scan per model when many pick from one tree."""
    if spec.is_dir:
        if not spec.include and not spec.exclude:
            return tuple(tree)
        return tuple(f for f in tree if spec.wants(f.path))
    if index is not None:
        chosen = [index[spec.file]] if spec.file in index else []
    else:
        chosen = [f for f in tree if f.path == spec.file]
    if not chosen:
        raise errors.EntryNotFound(
            f"model {spec.name!r}: file {spec.file!r} is not in {spec.hf} at {spec.revision} ({commit[:12]})")
    return tuple(chosen)
