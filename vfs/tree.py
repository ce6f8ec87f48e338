"""The immutable namespace built from the manifest and the resolved snapshots.

Inodes, names, attributes and listings. Built once per manifest load and never changed:
content is fixed by commits, so a refresh builds a new Tree with new inodes rather than
invalidating what the kernel caches.
"""

import logging
import stat
from dataclasses import dataclass, field
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from .localsource import LocalFile, LocalSnapshot
from .snapshots import Snapshot

if TYPE_CHECKING:
    from .manifest import Manifest, ModelSpec

log = logging.getLogger(__name__)

ROOT_INODE = 1


class FileRef(NamedTuple):
    """Where a file's bytes come from and what they must hash to (a tuple: cheap to build
    by the hundred thousand)."""

    model: str
    repo: str
    revision: str
    commit: str
    repo_path: str
    size: int
    content_id: str

    @property
    def describe(self) -> str:
        return f"{self.model}/{self.repo_path}"

    @property
    def identity(self) -> tuple[str, int]:
        """Equal for the same bytes: a refresh keeps the inode of an unchanged file."""
        return (self.content_id, self.size)


@dataclass(slots=True)
class Node:
    inode: int
    name: str
    parent: int
    is_dir: bool
    size: int = 0
    children: dict[str, int] | None = field(default_factory=dict)   # name -> inode (directories; None for files)
    file: FileRef | LocalFile | None = None
    model: str | None = None

    @property
    def mode(self) -> int:
        return (stat.S_IFDIR | 0o555) if self.is_dir else (stat.S_IFREG | 0o444)


def _same_content(a: "FileRef | LocalFile | None", b: "FileRef | LocalFile | None") -> bool:
    if a is None or b is None:
        return a is b
    return a.identity == b.identity


def _shown_files(model: str, snapshot: Snapshot | LocalSnapshot) -> Iterator[tuple[str, "FileRef | LocalFile"]]:
    """(path under the model, ref) of each file of a Hub or local snapshot."""
    if isinstance(snapshot, LocalSnapshot):
        return ((local.path, local) for local in snapshot.files)
    return ((remote.path, FileRef(model, snapshot.repo, snapshot.revision, snapshot.commit,
                                  remote.path, remote.size, remote.content_id))
            for remote in snapshot.files)


class Tree:
    """Inode numbers are never reused for different content: a rebuilt tree keeps the inode
    of every entry whose path and content are unchanged (so the kernel keeps its page cache
    for them) and gives everything else a number the previous tree never used."""

    def __init__(self, previous: "Tree | None" = None):
        self.nodes = {ROOT_INODE: Node(ROOT_INODE, "", ROOT_INODE, True)}
        self.paths = {ROOT_INODE: ""}
        self._listings: dict[int, list[Node]] = {}         # directory inode -> its sorted entries, made on first readdir
        self._previous = previous
        self._next_inode = max(previous.nodes) + 1 if previous else ROOT_INODE + 1

    @classmethod
    def build(cls, manifest: "Manifest", snapshots: Mapping[str, Snapshot | LocalSnapshot | None],
              previous: "Tree | None" = None) -> "Tree":
        """A tree with every manifest model; `snapshots` maps model name -> Snapshot or None."""
        tree = cls(previous)
        for spec in manifest.models:
            tree._add_model(spec, snapshots.get(spec.name))
        tree._previous = None
        return tree

    def changed_entries(self, previous: "Tree") -> list[tuple[int, str]]:
        """(parent inode, name) of every entry of `previous` that is gone or now another inode."""
        stale = []
        for inode, node in previous.nodes.items():
            if inode == ROOT_INODE:
                continue
            current = self.lookup(node.parent, node.name)
            if current is None or current.inode != inode:
                stale.append((node.parent, node.name))
        return stale

    def node(self, inode: int) -> Node | None:
        return self.nodes.get(inode)

    def lookup(self, parent: int, name: str) -> Node | None:
        directory = self.nodes.get(parent)
        if directory is None or directory.children is None:     # no such directory, or a file
            return None
        inode = directory.children.get(name)
        return None if inode is None else self.nodes[inode]

    def listing(self, inode: int) -> list[Node]:
        """A directory's entries in name order; kept, since the kernel asks for a big
        directory's listing once per page of `readdir` replies and the tree never changes."""
        listed = self._listings.get(inode)
        if listed is None:
            directory = self.nodes[inode]
            listed = self._listings[inode] = [self.nodes[child] for _, child in sorted(_entries(directory).items())]
        return listed

    def files(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.file is not None]

    def hub_files(self) -> list[Node]:
        """The files whose bytes come from the Hub through the block cache (not local ones)."""
        return [node for node in self.files() if isinstance(node.file, FileRef)]

    def _add_model(self, spec: "ModelSpec", snapshot: Snapshot | LocalSnapshot | None) -> None:
        folders = spec.parts if spec.is_dir else spec.parts[:-1]
        top = self._make_dirs(ROOT_INODE, folders, spec.name)
        if snapshot is None:
            return
        folders_made = {"": top}       # repo folder -> inode: a 100k-file repo has few folders
        for path, ref in _shown_files(spec.name, snapshot):
            if not spec.is_dir:
                self._add_file(top, spec.parts[-1], ref)
                continue
            folder, _, leaf = path.rpartition("/")
            try:
                parent = folders_made.get(folder)
                if parent is None:
                    parent = folders_made[folder] = self._make_dirs(top, folder.split("/"), spec.name)
                self._add_file(parent, leaf, ref)
            except ValueError as exc:
                log.warning("%s; skipping %r", exc, path)

    def _make_dirs(self, parent: int, names: Iterable[str], model: str) -> int:
        for name in names:
            existing = self.lookup(parent, name)
            if existing is None:
                existing = self._new_node(parent, name, is_dir=True, model=model)
            elif not existing.is_dir:
                raise ValueError(f"model {model!r}: {name!r} is both a file and a folder")
            parent = existing.inode
        return parent

    def _add_file(self, parent: int, name: str, ref: "FileRef | LocalFile") -> None:
        if name in _entries(self.nodes[parent]):
            log.warning("%s appears twice; keeping the first", ref.describe)
            return
        node = self._new_node(parent, name, is_dir=False, model=ref.model, ref=ref)
        node.size, node.file = ref.size, ref

    def _new_node(self, parent: int, name: str, is_dir: bool, model: str,
                  ref: "FileRef | LocalFile | None" = None) -> Node:
        path = f"{self.paths[parent]}/{name}"
        # A file has no children: no empty dict for each of a big repo's files.
        node = Node(self._inode_for(path, is_dir, ref), name, parent, is_dir, model=model,
                    children={} if is_dir else None)
        self.nodes[node.inode] = node
        self.paths[node.inode] = path
        _entries(self.nodes[parent])[name] = node.inode
        return node

    def _inode_for(self, path: str, is_dir: bool, ref: "FileRef | LocalFile | None") -> int:
        old = self._previous.node_at(path) if self._previous else None
        if old is not None and old.is_dir == is_dir and _same_content(old.file, ref):
            return old.inode
        self._next_inode += 1
        return self._next_inode - 1

    def node_at(self, path: str) -> Node | None:
        node = self.nodes[ROOT_INODE]
        for name in path.strip("/").split("/") if path.strip("/") else []:
            found = self.lookup(node.inode, name)
            if found is None:
                return None
            node = found
        return node


def _entries(directory: Node) -> dict[str, int]:
    """A directory's name -> inode map (a file has none: asking is a bug)."""
    if directory.children is None:
        raise ValueError(f"{directory.name!r} is a file, not a folder")
    return directory.children
