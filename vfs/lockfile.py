"""models.lock: the commit and the files every model resolved to, so every node serves the same bytes.

The lock sits beside the manifest (`models.yaml` -> `models.lock`) and is meant for git:

    {
      "lamina-llm-cache lock": 1,
      "models": {
        "<name>": {
          "hf": "org/repo", "revision": "main", "select": {"file": "m.gguf"},
          "commit": "<40 hex>",
          "files": [
            {"path": "m.gguf", "size": 123, "content_id": "sha256:<hex>"}
          ]
        }
      }
    }

A `local:` model is recorded by what its files hashed to when the lock was written:

        "<name>": {
          "local": "/srv/finetunes/x/",
          "files": [
            {"path": "model.safetensors", "size": 123, "sha256": "sha256:<hex>"}
          ]
        }

`verify NAME` compares a local model's files with it; nothing is resolved from it.

It is JSON (so also YAML), written the same way byte for byte for the same content:
models sorted by name, files by path, one file per line, so a diff shows exactly which
model moved and which files changed.

A locked model is resolved from the lock alone, with no Hub call. An entry *agrees* with
the manifest when repo, revision and file selection (file / include / exclude) are the
same; a model the lock does not name, or names differently, is resolved as if there were
no lock (and `--frozen` refuses to start instead). Only `lamina-llm-cache lock` writes
the file: a mount, a /refresh or a pull never moves a locked commit by itself.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_atomically
from .errors import ManifestError
from .paths import is_commit, is_safe_repo_path
from .snapshots import RemoteFile, Snapshot

LOCK_KEY = "lamina-llm-cache lock"
LOCK_VERSION = 1


def lock_path_for(manifest_source) -> Path:
    """`models.yaml` -> `models.lock`, in the same directory."""
    return Path(manifest_source).with_suffix(".lock")


def selection_of(spec) -> dict:
    """What a spec takes from its repo, as the lock records it."""
    if not spec.is_dir:
        return {"file": spec.file}
    chosen = {}
    if spec.include:
        chosen["include"] = list(spec.include)
    if spec.exclude:
        chosen["exclude"] = list(spec.exclude)
    return chosen


@dataclass(frozen=True)
class LockedModel:
    hf: str
    revision: str
    select: dict
    commit: str
    files: tuple[RemoteFile, ...]

    def disagreement(self, spec) -> str | None:
        """Why this entry does not fit `spec` (a sentence), or None when it does."""
        if spec.hf is None:
            return "the manifest gives it no hf repo"
        for field, mine, theirs in (("hf", self.hf, spec.hf), ("revision", self.revision, spec.revision)):
            if mine != theirs:
                return f"the lock has {field} {mine!r}, the manifest {theirs!r}"
        if self.select != selection_of(spec):
            return f"the lock selects {self.select}, the manifest {selection_of(spec)}"
        return None


@dataclass(frozen=True)
class LockedLocal:
    """A local model as the lock recorded it: its path, and (path, size, 'sha256:<hex>') per file."""

    local: str
    files: tuple[tuple[str, int, str], ...]

    def disagreement(self, spec) -> str | None:
        if spec.local is None:
            return "the lock has it as local files, the manifest does not"
        if spec.local != self.local:
            return f"the lock has local {self.local!r}, the manifest {spec.local!r}"
        return None


def identity_of(entry):
    """What makes a locked (or newly resolved) model the same: its commit, or its local files' hashes."""
    return entry.files if isinstance(entry, LockedLocal) else entry.commit


class Lock:
    def __init__(self, path, models: dict):
        self.path, self.models = Path(path), models

    def snapshot_for(self, spec) -> Snapshot | None:
        """The locked snapshot of `spec`, or None when the lock does not name it as written."""
        entry = self.models.get(spec.name)
        if entry is None or isinstance(entry, LockedLocal) or entry.disagreement(spec) is not None:
            return None
        return Snapshot(entry.hf, entry.revision, entry.commit, entry.files)

    def disagreements(self, manifest) -> list[tuple[str, str]]:
        """(model, why) for every model the manifest and the lock see differently."""
        found = []
        for spec in manifest.models:
            entry = self.models.get(spec.name)
            if spec.hf is None and spec.local is None:
                if entry is not None:
                    found.append((spec.name, "the lock names it, the manifest gives it no hf repo"))
            elif entry is None:
                found.append((spec.name, "not in the lock"))
            elif (why := entry.disagreement(spec)) is not None:
                found.append((spec.name, why))
        named = {spec.name for spec in manifest.models}
        found += [(name, "in the lock, not in the manifest") for name in sorted(self.models) if name not in named]
        return found

    def refuse_disagreement(self, manifest) -> None:
        """--frozen: exit 2 naming the first model the manifest and the lock disagree on."""
        found = self.disagreements(manifest)
        if found:
            name, why = found[0]
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise ManifestError(self.path, f"{why}{more}; run `lamina-llm-cache lock` to update it",
                                model=name)

    def without(self, names) -> "Lock":
        """This lock minus the entries of `names` (all of them for None): what --upgrade resolves again."""
        kept = {} if names is None else {n: e for n, e in self.models.items() if n not in set(names)}
        return Lock(self.path, kept)


def load_lock(manifest_source) -> Lock | None:
    """The lock beside `manifest_source`, or None when there is none."""
    path = lock_path_for(manifest_source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, f"cannot read the lock: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_lock(text, path)


def parse_lock(text, path) -> Lock:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ManifestError(path, f"not a lock file (invalid JSON: {exc})") from None
    if not isinstance(document, dict) or document.get(LOCK_KEY) != LOCK_VERSION:
        raise ManifestError(path, f"not a version {LOCK_VERSION} lock file; rewrite it with `lamina-llm-cache lock`")
    models = document.get("models")
    if not isinstance(models, dict):
        raise ManifestError(path, "the lock has no 'models' mapping")
    return Lock(path, {name: _entry(path, name, entry) for name, entry in models.items()})


def _entry(path, name, entry) -> LockedModel | LockedLocal:
    try:
        if "local" in entry:
            return LockedLocal(str(entry["local"]), tuple(_local_file(raw) for raw in entry["files"]))
        commit = entry["commit"]
        if not is_commit(commit):
            raise ValueError(f"commit {commit!r} is not 40 hex digits")
        files = tuple(_file(raw) for raw in entry["files"])
        return LockedModel(str(entry["hf"]), str(entry["revision"]), dict(entry["select"]), commit, files)
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(path, f"malformed lock entry ({exc})", model=name) from None


def _file(raw) -> RemoteFile:
    path, size, content_id = raw["path"], raw["size"], raw["content_id"]
    algo, _, digest = content_id.partition(":")
    if not is_safe_repo_path(path) or not isinstance(size, int) or size < 0 or algo not in ("sha256", "sha1"):
        raise ValueError(f"bad file entry {raw!r:.200}")
    if len(digest) != (64 if algo == "sha256" else 40) or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"bad content id {content_id!r}")
    return RemoteFile(path, size, content_id)


def _local_file(raw) -> tuple[str, int, str]:
    path, size, digest = raw["path"], raw["size"], raw["sha256"]
    hexdigest = digest.removeprefix("sha256:")
    if not is_safe_repo_path(path) or not isinstance(size, int) or size < 0 or len(hexdigest) != 64 \
            or not digest.startswith("sha256:") or not all(c in "0123456789abcdef" for c in hexdigest):
        raise ValueError(f"bad local file entry {raw!r:.200}")
    return path, size, digest


def render_lock(manifest, snapshots) -> str:
    """The lock's text for `manifest` resolved to `snapshots`: the same bytes for the same commits."""
    lines = ["{", f'  {json.dumps(LOCK_KEY)}: {LOCK_VERSION},', '  "models": {']
    specs = sorted((spec for spec in manifest.models if (spec.hf or spec.local) and snapshots.get(spec.name)),
                   key=lambda s: s.name)
    for number, spec in enumerate(specs):
        lines += _model_lines(spec, snapshots[spec.name], last=number == len(specs) - 1)
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _local_lines(spec, locked, last):
    files = sorted(locked.files)
    head = [f"    {json.dumps(spec.name)}: {{", f'      "local": {json.dumps(locked.local)},', '      "files": [']
    body = [f'        {{"path": {json.dumps(path)}, "size": {size}, "sha256": {json.dumps(digest)}}}'
            + ("," if number < len(files) - 1 else "") for number, (path, size, digest) in enumerate(files)]
    return head + body + ["      ]", "    }" + ("" if last else ",")]


def _model_lines(spec, snapshot, last):
    if isinstance(snapshot, LockedLocal):
        return _local_lines(spec, snapshot, last)
    files = sorted(snapshot.files, key=lambda f: f.path)
    head = [f"    {json.dumps(spec.name)}: {{",
            f'      "hf": {json.dumps(spec.hf)}, "revision": {json.dumps(spec.revision)}, '
            f'"select": {json.dumps(selection_of(spec), sort_keys=True)},',
            f'      "commit": {json.dumps(snapshot.commit)},',
            '      "files": [']
    body = [f'        {{"path": {json.dumps(f.path)}, "size": {f.size}, "content_id": {json.dumps(f.content_id)}}}'
            + ("," if number < len(files) - 1 else "") for number, f in enumerate(files)]
    return head + body + ["      ]", "    }" + ("" if last else ",")]


def write_lock(manifest, snapshots) -> Path:
    """Write the lock beside the manifest atomically; returns its path."""
    path = lock_path_for(manifest.source)
    write_atomically(os.path.realpath(path), render_lock(manifest, snapshots).encode("utf-8"))
    return path
