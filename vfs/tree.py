"""The immutable namespace built from the manifest and the pinned snapshots.

Inodes, names, attributes and listings. Built once per manifest load and never changed:
content is pinned to commits, so a refresh builds a new Tree with new inodes rather than
invalidating what the kernel caches.
"""

import logging
import stat
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ROOT_INODE = 1


@dataclass(frozen=True)
class FileRef:
    """Where a file's bytes come from and what they must hash to."""

    model: str
    repo: str
    revision: str
    commit: str
    repo_path: str
    size: int
    content_id: str

    @property
    def describe(self):
        return f"{self.model}/{self.repo_path}"


@dataclass
class Node:
    inode: int
    name: str
    parent: int
    is_dir: bool
    size: int = 0
    children: dict = field(default_factory=dict)     # name -> inode (directories)
    file: FileRef | None = None
    model: str | None = None

    @property
    def mode(self):
        return (stat.S_IFDIR | 0o555) if self.is_dir else (stat.S_IFREG | 0o444)


class Tree:
    def __init__(self):
        self.nodes = {ROOT_INODE: Node(ROOT_INODE, "", ROOT_INODE, True)}

    @classmethod
    def build(cls, manifest, snapshots):
        """A tree with every manifest model; `snapshots` maps model name -> Snapshot or None."""
        tree = cls()
        for spec in manifest.models:
            tree._add_model(spec, snapshots.get(spec.name))
        return tree

    def node(self, inode):
        return self.nodes.get(inode)

    def lookup(self, parent, name):
        directory = self.nodes.get(parent)
        if directory is None or not directory.is_dir:
            return None
        inode = directory.children.get(name)
        return None if inode is None else self.nodes[inode]

    def listing(self, inode):
        directory = self.nodes[inode]
        return [self.nodes[child] for _, child in sorted(directory.children.items())]

    def files(self):
        return [node for node in self.nodes.values() if node.file is not None]

    def _add_model(self, spec, snapshot):
        folders = spec.parts if spec.is_dir else spec.parts[:-1]
        top = self._make_dirs(ROOT_INODE, folders, spec.name)
        if snapshot is None:
            return
        for remote in snapshot.files:
            ref = FileRef(spec.name, snapshot.repo, snapshot.revision, snapshot.commit,
                          remote.path, remote.size, remote.content_id)
            if not spec.is_dir:
                self._add_file(top, spec.parts[-1], ref)
                continue
            *subdirs, leaf = remote.path.split("/")
            try:
                self._add_file(self._make_dirs(top, subdirs, spec.name), leaf, ref)
            except ValueError as exc:
                log.warning("%s; skipping %r", exc, remote.path)

    def _make_dirs(self, parent, names, model):
        for name in names:
            existing = self.lookup(parent, name)
            if existing is None:
                existing = self._new_node(parent, name, is_dir=True, model=model)
            elif not existing.is_dir:
                raise ValueError(f"model {model!r}: {name!r} is both a file and a folder")
            parent = existing.inode
        return parent

    def _add_file(self, parent, name, ref):
        if self.lookup(parent, name) is not None:
            log.warning("model %r: %r appears twice; keeping the first", ref.model, ref.repo_path)
            return
        node = self._new_node(parent, name, is_dir=False, model=ref.model)
        node.size, node.file = ref.size, ref

    def _new_node(self, parent, name, is_dir, model):
        node = Node(len(self.nodes) + 1, name, parent, is_dir, model=model)
        self.nodes[node.inode] = node
        self.nodes[parent].children[name] = node.inode
        return node
