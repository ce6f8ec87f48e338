"""Which path strings are safe to use: the one validator, for paths inside a repo, absolute paths and commits.

Every path a user or a server hands us is checked here before it is joined to anything:

- A path inside a repository (a tree listing's entry, a manifest's `file:`, a file of
  models.lock) is joined under the mount's directories and the cache's. It must be
  relative, '/'-separated, with no empty, '.' or '..' component, no backslash, no control
  character, and no component longer than a file name may be: then it cannot name
  anything outside the directory it lands in, however hostile its source.
- An absolute path from the manifest (the mount root, a model's path, a `local:` source)
  must be absolute and already normal (no '//', '.' or '..'), so that one string
  comparison tells whether it lies inside another.
- A commit id names files of the cache (snapshots/trees/<commit>.json): it is exactly 40
  lowercase hex digits (`is_commit`), nothing before or after.

Each check answers with what is wrong (a message that quotes the path) or None; the
messages are what a user reads in a manifest error. A tree listing of 100k files is
checked entry by entry at every start, so the common case is a few string operations.
Imports nothing from vfs.
"""

import re

COMPONENT_MAX_BYTES = 255       # NAME_MAX on Linux: a component is a file or directory name
# One regex search, not a Python loop per character.
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_commit(text: object) -> bool:
    """Whether `text` is a full commit id as the Hub spells it (40 lowercase hex digits)."""
    return isinstance(text, str) and _COMMIT.fullmatch(text) is not None


def repo_path_problem(path: object) -> str | None:
    """What is wrong with `path` as the path of a file inside a repository, or None."""
    if not isinstance(path, str):
        return f"{path!r} is not a string"
    if not path:
        return "is empty"
    if CONTROL_CHARACTER.search(path):
        return f"{path!r} contains a control character"
    if "\\" in path:
        return f"{path!r} contains a backslash; repo paths use '/'"
    if path.startswith("/"):
        return f"{path!r} is absolute; expected a path inside the repo such as 'model.Q4_K_M.gguf'"
    if path.endswith("/"):
        return f"{path!r} ends with '/'; expected a file, not a folder"
    if not path.isascii() and not _is_utf8(path):
        return f"{path!r} is not valid UTF-8"      # a lone surrogate from a JSON escape: no file has that name
    return _components_problem(path, path.split("/"))


def is_safe_repo_path(path: object) -> bool:
    """Whether `path` is a relative '/'-separated path with no way out of the directory it lands in."""
    return repo_path_problem(path) is None


def absolute_path_problem(path: str, example: str) -> str | None:
    """What is wrong with `path` as an absolute, normal path, or None; `example` ends the
    message for a relative path ("such as '/models'")."""
    if CONTROL_CHARACTER.search(path):
        return f"{path!r} contains a control character"
    if not path.startswith("/"):
        return f"{path!r} is relative; expected an absolute path {example}"
    inner = path.strip("/")
    return _components_problem(path, inner.split("/")) if inner or "//" in path else None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _components_problem(path: str, components: list[str]) -> str | None:
    for component in components:
        if not component:
            return f"{path!r} contains an empty component ('//')"
        if component in (".", ".."):
            return f"{path!r} contains a {component!r} component"
        size = len(component.encode("utf-8", "surrogatepass"))
        if size > COMPONENT_MAX_BYTES:
            return f"{path!r} has a component of {size} bytes; at most {COMPONENT_MAX_BYTES}"
    return None
