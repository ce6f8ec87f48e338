"""Load, validate and extend models.yaml; the only importer of yaml, and never on the network.

The manifest says which models the mount shows, where, and where their bytes come from:

    root: /models                  # optional: the mount root the paths are written against
    models:
      name:                        # [A-Za-z0-9._-]+, unique; also the model's folder
        path: /models/name/...     # inside <root>/<name>/; a trailing '/' makes a directory model
        backend: llama.cpp         # llama.cpp | mlc | vllm | transformers
        hf: org/repo               # optional: no hf = the seed's "populate manually" (no source)
        local: /srv/finetunes/x/   # or: an absolute local directory (or file) served instead
        file: x.Q4_K_M.gguf        # single-file models with hf: the repo file shown at path
        revision: main             # branch, tag or 40-hex commit (lowercased)
        include: ["*.safetensors"] # directory models with hf or local: fnmatch filters on paths
        exclude: ["original/*"]
        keep: false                # keep out of cache eviction (`pin:`, its old name, still works)

Validation is strict and stops at the first problem: every bad input becomes exactly one
`ManifestError` naming the file, the model and the field, so nothing starts half-configured.
`parse_manifest` is pure (text in, frozen specs out); `load_manifest` adds the file read
and checks that every `local` path exists and is of the model's kind (file or directory);
`add_model` is the CLI's `add`, which edits the file as text so the user's comments survive.
"""

import contextlib
import difflib
import fcntl
import fnmatch
import json
import os
import re
import stat
from dataclasses import dataclass

import yaml

from .atomic import write_atomically
from .daemons import real_mountpoint
from .errors import ManifestError, UsageError
from .paths import COMPONENT_MAX_BYTES, CONTROL_CHARACTER, absolute_path_problem, is_commit, repo_path_problem

DEFAULT_ROOT = "/models"
DEFAULT_REVISION = "main"
BACKENDS = ("llama.cpp", "mlc", "vllm", "transformers")
TOP_LEVEL_KEYS = ("models", "root")
MODEL_KEYS = ("path", "backend", "hf", "local", "file", "revision", "include", "exclude", "keep")
OLD_KEYS = {"pin": "keep"}     # accepted under their old names; never both
REPO_ID_MAX = 96

_NAME = re.compile(r"[A-Za-z0-9._-]+")
# The Hub's own rule (huggingface_hub.validate_repo_id): starts and ends with a word character.
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
# Characters git's check-ref-format refuses anywhere in a ref name.
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


@dataclass(frozen=True)
class ModelSpec:
    """One validated manifest entry."""

    name: str
    backend: str
    path: str  # as written in the manifest, e.g. "/models/x/model.gguf"
    parts: tuple[str, ...]  # path components relative to root, e.g. ("x", "model.gguf")
    is_dir: bool
    hf: str | None = None
    local: str | None = None  # an absolute local directory or file, as written
    file: str | None = None
    revision: str = DEFAULT_REVISION
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep: bool = False

    @property
    def source_kind(self):
        """Where the bytes come from: "hf", "local", or None (the seed's hand-populated form)."""
        return "hf" if self.hf else "local" if self.local else None

    def wants(self, repo_path):
        """Whether the repo (or local directory) file `repo_path` is shown for this model.

        A single-file model shows only its `file`. A directory model shows everything its
        include patterns match (no include: everything) unless an exclude pattern matches.
        """
        if not self.is_dir:
            return repo_path == self.file
        if self.include and not _matches_any(repo_path, self.include):
            return False
        return not _matches_any(repo_path, self.exclude)


@dataclass(frozen=True)
class Manifest:
    """A whole validated manifest: the mount root and the models in file order."""

    source: str  # the file path as given
    root: str
    models: tuple[ModelSpec, ...]

    def get(self, name):
        """The model called `name`; UsageError when there is none (a user typed it)."""
        for spec in self.models:
            if spec.name == name:
                return spec
        raise UsageError(f"no model named {name!r} in {self.source}")


def _matches_any(repo_path, patterns):
    # huggingface_hub's allow_patterns convention: "folder/" means everything under it.
    # fnmatchcase, because Hub paths are case-sensitive on every platform.
    return any(
        fnmatch.fnmatchcase(repo_path, p + "*" if p.endswith("/") else p) for p in patterns
    )


# ---------------------------------------------------------------- reading YAML


class _DuplicateKey(Exception):
    """A mapping key seen twice; `trail` is the keys leading to that mapping."""

    def __init__(self, trail, key, first_line, line):
        super().__init__(key)
        self.trail, self.key, self.first_line, self.line = trail, key, first_line, line


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys; the stock one keeps the last silently."""

    def construct_document(self, node):
        # Checked on the node graph before construction, because only here is the trail
        # (models -> name -> field) known, which the error message needs.
        self._refuse_duplicates(node, (), set())
        return super().construct_document(node)

    def _refuse_duplicates(self, node, trail, visited):
        if id(node) in visited:  # aliases may point back up the graph
            return
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._refuse_duplicates(item, trail + (index,), visited)
        elif isinstance(node, yaml.MappingNode):
            self._refuse_duplicate_keys(node, trail, visited)

    def _refuse_duplicate_keys(self, node, trail, visited):
        first_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            # Merge keys (<<: *defaults) may repeat and be overridden: that is their purpose.
            merge = key_node.tag == "tag:yaml.org,2002:merge"
            if merge or not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first_lines:
                raise _DuplicateKey(trail, key, first_lines[key], line)
            first_lines[key] = line
            self._refuse_duplicates(value_node, trail + (key,), visited)


def _load_yaml(text, source):
    """The YAML document in `text` as Python data; one ManifestError for any YAML problem."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as dup:
        raise _duplicate_error(source, dup) from None
    except yaml.MarkedYAMLError as exc:
        raise ManifestError(source, _marked_message(exc)) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ManifestError(
            source, f"invalid YAML at line {line}: character U+{exc.character:04X} is not allowed"
        ) from None


def _marked_message(exc):
    mark = exc.problem_mark or exc.context_mark
    where = f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}"
    if exc.context and exc.problem.startswith("but "):
        # PyYAML splits "expected X, but found Y" in two; the halves only read well together.
        return f"{where}: {exc.context}, {exc.problem}"
    if exc.context and exc.context_mark is not None:
        return f"{where}: {exc.problem} ({exc.context} at line {exc.context_mark.line + 1})"
    return f"{where}: {exc.problem}"


def _duplicate_error(source, dup):
    lines = f"lines {dup.first_line} and {dup.line}"
    if dup.trail == ():
        return ManifestError(source, f"top-level key {dup.key!r} appears twice ({lines})")
    if dup.trail == ("models",):
        return ManifestError(source, f"defined twice ({lines})", model=dup.key)
    if len(dup.trail) == 2 and dup.trail[0] == "models":
        return ManifestError(source, f"given twice ({lines})", model=dup.trail[1], field=dup.key)
    return ManifestError(source, f"key {dup.key!r} appears twice ({lines})")


# ---------------------------------------------------------------- the document


def load_manifest(path):
    """Read and validate the manifest file at `path`."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise _not_utf8(source, exc) from None
    except OSError as exc:
        raise _unreadable(source, exc) from None
    manifest = parse_manifest(text, source)
    for spec in manifest.models:
        check_local_path(manifest.source, spec)
    return manifest


def check_local_path(source, spec):
    """Refuse a `local` path that is missing or of the wrong kind for its model (reads the disk)."""
    if spec.local is None:
        return
    problem = _local_path_problem(spec)
    if problem:
        raise ManifestError(source, problem, model=spec.name, field="local")


def refuse_overlap(manifest, mountpoint):
    """Refuse a `local` path that contains the mountpoint or lies under it: the mount would
    serve (and, at a /refresh, scan) its own files."""
    mounted = real_mountpoint(mountpoint)    # a stat of a mount point being adopted would wait for ever
    for spec in manifest.models:
        if spec.local is None:
            continue
        local = os.path.realpath(spec.local)
        if any(inner == outer or inner.startswith(outer.rstrip("/") + "/")
               for inner, outer in ((mounted, local), (local, mounted))):
            raise ManifestError(manifest.source, f"{spec.local!r} and the mountpoint {str(mountpoint)!r} "
                                "overlap; the mount would serve its own files", model=spec.name, field="local")


def _local_path_problem(spec):
    try:
        info = os.stat(spec.local)
    except FileNotFoundError:
        return f"{spec.local!r} does not exist"
    except OSError as exc:
        return f"{spec.local!r} cannot be used: {exc.strerror}"
    if spec.is_dir and not stat.S_ISDIR(info.st_mode):
        return (f"{spec.local!r} is {_file_kind(info)}; a directory model (a path ending in '/') "
                "needs a directory")
    if not spec.is_dir and not stat.S_ISREG(info.st_mode):
        return (f"{spec.local!r} is {_file_kind(info)}; a single-file model needs a regular file "
                "(end path with '/' for a directory model)")
    return None


def _file_kind(info):
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a file"),
                        (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(info.st_mode):
            return words
    return "a device"


def _not_utf8(source, exc):
    return ManifestError(source, f"is not UTF-8 text (bad byte at offset {exc.start})")


def _unreadable(source, exc):
    return ManifestError(source, f"cannot read the manifest: {exc.strerror or exc}")


def parse_manifest(text, source="models.yaml"):
    """Validate manifest `text`; `source` names the file in error messages."""
    source = os.fspath(source)
    document = _load_yaml(text, source)
    if document is None:
        raise ManifestError(source, "the manifest is empty; expected a 'models:' mapping")
    if not isinstance(document, dict):
        raise ManifestError(
            source, f"expected a mapping with a 'models:' key at the top, got {_kind(document)}"
        )
    _refuse_unknown_keys(
        document, TOP_LEVEL_KEYS,
        lambda key, hint: ManifestError(source, f"unknown top-level key {key!r}; {hint}"),
    )
    root = _root(source, document.get("root", DEFAULT_ROOT))
    entries = _models_mapping(source, document)
    models = tuple(_model(source, root, name, entry) for name, entry in entries.items())
    return Manifest(source=source, root=root, models=models)


def _models_mapping(source, document):
    if "models" not in document:
        raise ManifestError(
            source, "no 'models:' key; expected a mapping of model names to entries"
        )
    models = document["models"]
    if models is None:  # a bare `models:` is the natural way to write an empty manifest
        return {}
    if not isinstance(models, dict):
        raise ManifestError(
            source, f"'models' must be a mapping of model names to entries, got {_kind(models)}"
        )
    return models


def _refuse_unknown_keys(mapping, known, error):
    """Raise error(key, hint) for the first key of `mapping` not in `known`."""
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            if close:
                raise error(key, f"did you mean {close[0]!r}? (known: {', '.join(known)})")
            raise error(key, f"expected one of: {', '.join(known)}")


def _kind(value):
    """`value`'s type in the manifest's terms, for 'expected X, got Y' messages."""
    if value is None:
        return "nothing (null)"
    for types, words in (
        (bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
        (list, "a list"), (dict, "a mapping"),
    ):
        if isinstance(value, types):
            return words
    return f"a {type(value).__name__}"


# ---------------------------------------------------------------- paths


def _root(source, root):
    def fail(message):
        return ManifestError(source, message, field="root")

    if not isinstance(root, str):
        raise fail(f"expected an absolute path such as {DEFAULT_ROOT!r}, got {_kind(root)}")
    _check_absolute(root, fail, f"such as {DEFAULT_ROOT!r}")
    # Normalised so that "<root>/<name>/" is one string comparison away.
    return "/" + root.strip("/")


def _check_absolute(path, fail, example):
    """Raise fail(message) unless `path` is absolute and already normalised (paths.py decides)."""
    problem = absolute_path_problem(path, example)
    if problem:
        raise fail(problem)


def _model_path(fail, root, name, path):
    """(parts, is_dir) for the model's `path`, which must lie inside <root>/<name>/."""
    own_dir = _join(root, name) + "/"
    _check_absolute(path, fail, f"inside {own_dir!r}")
    under_root = root.rstrip("/") + "/"
    if not path.startswith(under_root):
        raise fail(f"{path!r} is outside the mount root {root!r} (set 'root:' to change it)")
    if path == own_dir[:-1]:
        raise fail(
            f"{path!r} is a file directly in the mount root; a directory model ends with '/' "
            f"({own_dir!r}), a single file goes inside it ({own_dir + 'model.gguf'!r})"
        )
    if not path.startswith(own_dir):
        raise fail(f"{path!r} is not inside {own_dir!r}, the model's own directory")
    parts = tuple(path[len(under_root):].rstrip("/").split("/"))
    return parts, path.endswith("/")


def _join(root, *parts):
    return root.rstrip("/") + "/" + "/".join(parts)


# ---------------------------------------------------------------- one model


def _model(source, root, name, entry):
    """Validate one `name: entry` pair into a ModelSpec."""
    _check_name(source, name)

    def fail(message, field=None):
        return ManifestError(source, message, model=name, field=field)

    if not isinstance(entry, dict):
        raise fail(f"expected a mapping of fields (path, backend, ...), got {_kind(entry)}")
    _refuse_unknown_keys(_without_old_keys(entry), MODEL_KEYS, lambda key, hint: fail(f"unknown field; {hint}", key))
    path = _required_str(fail, entry, "path", f"e.g. {_join(root, name, '')!r}")
    parts, is_dir = _model_path(lambda message: fail(message, "path"), root, name, path)
    backend, hf = _backend(fail, entry), _hf(fail, entry)
    local = _local(fail, entry, hf)
    spec = ModelSpec(
        name=name, backend=backend, path=path, parts=parts, is_dir=is_dir, hf=hf, local=local,
        file=_file(fail, entry, hf, local, is_dir),
        revision=_revision(fail, entry, hf, local),
        include=_patterns(fail, entry, "include", hf or local, is_dir),
        exclude=_patterns(fail, entry, "exclude", hf or local, is_dir),
        keep=_keep(fail, entry),
    )
    _check_gguf(fail, spec)
    return spec


def _check_name(source, name):
    if not isinstance(name, str):
        raise ManifestError(
            source, f"a model name must be a string, got {_kind(name)}; quote it", model=name
        )
    if name in (".", ".."):
        raise ManifestError(source, "'.' and '..' are not valid model names", model=name)
    if not _NAME.fullmatch(name):
        raise ManifestError(
            source, "invalid name; use only letters, digits, '.', '_' and '-'", model=name
        )
    if len(name) > COMPONENT_MAX_BYTES:     # a model name is a directory name
        raise ManifestError(
            source, f"the name is {len(name)} bytes long; at most {COMPONENT_MAX_BYTES}", model=name
        )


def _required_str(fail, entry, field, example):
    if field not in entry:
        raise fail(f"missing; expected {example}", field)
    return _str(fail, entry, field)


def _str(fail, entry, field):
    """entry[field] if it is a string, None if absent; wrong types raise."""
    value = entry.get(field)
    if field in entry and not isinstance(value, str):
        raise fail(f"expected a string, got {_kind(value)}", field)
    return value


def _backend(fail, entry):
    known = ", ".join(BACKENDS)
    backend = _required_str(fail, entry, "backend", f"one of: {known}")
    if backend not in BACKENDS:
        raise fail(f"unknown backend {backend!r}; expected one of: {known}", "backend")
    return backend


def _hf(fail, entry):
    hf = _str(fail, entry, "hf")
    if hf is None:
        return None
    if len(hf) > REPO_ID_MAX:
        raise fail(
            f"{hf!r} is {len(hf)} characters; a Hub repo id has at most {REPO_ID_MAX}", "hf"
        )
    for bad in ("--", ".."):
        if bad in hf:
            raise fail(f"{hf!r} is not a Hub repo id: it contains {bad!r}", "hf")
    parts = hf.split("/")
    if len(parts) > 2 or not all(_REPO_PART.fullmatch(p) for p in parts) or hf.endswith(".git"):
        raise fail(
            f"{hf!r} is not a Hub repo id; expected 'name' or 'org/name' "
            "(letters, digits, '.', '_', '-')",
            "hf",
        )
    return hf


def _local(fail, entry, hf):
    local = _str(fail, entry, "local")
    if local is None:
        return None
    if hf is not None:
        raise fail("give hf or local, not both: a model's bytes come from one source", "local")
    _check_absolute(local, lambda message: fail(message, "local"), "such as '/srv/finetunes/x/'")
    if local == "/":
        raise fail("'/' is the whole filesystem; name the model's own directory or file", "local")
    return local


def _file(fail, entry, hf, local, is_dir):
    file = _str(fail, entry, "file")
    if file is None:
        if hf is not None and not is_dir:
            raise fail(
                "missing; a single-file model with hf needs the repo file to show at its path",
                "file",
            )
        return None
    if is_dir:
        raise fail("file is for single-file models; use include on a directory model", "file")
    if local is not None:
        raise fail("file is for hf models; a local single-file model shows the file local names",
                   "file")
    if hf is None:
        raise fail("file needs hf: without hf there is no repo to take it from", "file")
    problem = repo_path_problem(file)
    if problem:
        raise fail(problem, "file")
    return file


def _revision(fail, entry, hf, local):
    revision = _str(fail, entry, "revision")
    if revision is None:
        return DEFAULT_REVISION
    if local is not None:
        raise fail("revision is for hf models; local files have no revisions", "revision")
    if hf is None:
        raise fail("revision needs hf: without hf there is no repo to resolve", "revision")
    if is_commit(revision.lower()):
        return revision.lower()  # one spelling per commit, so cache keys agree
    problem = _ref_problem(revision)
    if problem:
        raise fail(f"{revision!r} is not a valid branch, tag or commit: {problem}", "revision")
    return revision


def _ref_problem(ref):
    """What git's check-ref-format would refuse in branch or tag name `ref`, or None."""
    if not ref:
        return "it is empty"
    forbidden = _REF_FORBIDDEN.search(ref)
    if forbidden:
        return f"it contains {_describe_char(forbidden.group())}"
    for bad in ("..", "@{", "//"):
        if bad in ref:
            return f"it contains {bad!r}"
    if ref.startswith(("-", "/")):
        return f"it starts with {ref[0]!r}"
    if ref == "@" or ref.endswith(("/", ".")):
        return f"it ends with {ref[-1]!r}"
    for component in ref.split("/"):
        if component.startswith(".") or component.endswith(".lock"):
            return f"the component {component!r} starts with '.' or ends with '.lock'"
    return None


def _describe_char(char):
    if char == " ":
        return "a space"
    if CONTROL_CHARACTER.match(char):
        return "a control character"
    return repr(char)


def _patterns(fail, entry, field, source, is_dir):
    if field not in entry:
        return ()
    if source is None:
        raise fail(f"{field} needs hf or local: without a source there is nothing to filter", field)
    if not is_dir:
        raise fail(f"{field} is for directory models (a path ending in '/'); use file", field)
    return _pattern_tuple(lambda message: fail(message, field), entry[field])


def _pattern_tuple(fail, value):
    """A string or a list of strings as a tuple of glob patterns."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise fail(f"expected a glob pattern or a list of them, got {_kind(value)}")
    if not value:
        raise fail("the list is empty; leave the field out to take every file")
    for number, pattern in enumerate(value, 1):
        if not isinstance(pattern, str):
            raise fail(f"item {number}: expected a glob pattern string, got {_kind(pattern)}")
        if not pattern:
            raise fail(f"item {number} is an empty pattern")
    return tuple(value)


def _without_old_keys(entry):
    return {key: value for key, value in entry.items() if key not in OLD_KEYS}


def _keep(fail, entry):
    key = "pin" if "pin" in entry else "keep"
    if "pin" in entry and "keep" in entry:
        raise fail("give keep or its old name pin, not both", "pin")
    keep = entry.get(key, False)
    if not isinstance(keep, bool):
        raise fail(f"expected true or false, got {_kind(keep)}", key)
    return keep


def _check_gguf(fail, spec):
    # llama.cpp only reads GGUF; catching a wrong file here beats a load error at run time.
    if spec.backend != "llama.cpp" or spec.is_dir:
        return
    local_name = spec.local.rstrip("/").rsplit("/", 1)[-1] if spec.local else None
    for field, value in (("file", spec.file), ("local", local_name), ("path", spec.parts[-1])):
        if value is not None and not value.lower().endswith(".gguf"):
            raise fail(f"a single-file llama.cpp model must be a .gguf file, not {value!r}", field)


# ---------------------------------------------------------------- adding a model


def add_model(path, name, *, hf=None, local=None, backend, file=None, revision=None, include=(),
              dir_model=None):
    """Append a model to the manifest at `path` (created if missing) and return its spec.

    The entry is inserted as text at the end of the `models:` mapping, so the user's
    comments, order and layout stay as they were. The whole result is validated before
    the file is replaced atomically. `dir_model` defaults to "no `file` given" for `hf`,
    and to "`local` is a directory" for `local`.
    """
    source = os.fspath(path)
    with _editing(source):
        return _add_model(source, name, hf=hf, local=local, backend=backend, file=file,
                          revision=revision, include=include, dir_model=dir_model)


@contextlib.contextmanager
def _editing(source):
    """Serialise read-modify-write edits of the manifest across processes: ten `add`s at
    once must each see the others' entries. The lock is a flock on the manifest's
    directory (the file itself is replaced by each edit, so it cannot carry the lock)."""
    directory = os.path.dirname(os.path.realpath(source))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _add_model(source, name, *, hf, local, backend, file, revision, include, dir_model):
    text = _read_for_update(source)
    if _is_blank(text):
        text += ("\n" if text and not text.endswith("\n") else "") + "models:\n"
    manifest = parse_manifest(text, source)
    if any(spec.name == name for spec in manifest.models):
        raise ManifestError(source, "already in the manifest", model=name)
    if dir_model is None:
        dir_model = os.path.isdir(local) if local is not None else file is None
    shown = file if local is None else local.rstrip("/")
    fields = _new_fields(source, manifest.root, name, shown=shown, dir_model=dir_model,
                         backend=backend, hf=hf, local=local, file=file, revision=revision,
                         include=include)
    new_text = _insert_entry(source, text, name, fields)
    spec = parse_manifest(new_text, source).get(name)
    check_local_path(source, spec)
    _write_atomically(source, new_text)
    return spec


def _new_fields(source, root, name, *, shown, dir_model, backend, **given):
    """The new entry's fields in the order a person would write them.

    `shown` is the repo file or local file whose name a single-file model takes.
    """
    if dir_model:
        model_path = _join(root, name, "")
    elif shown is None:
        raise ManifestError(
            source, "missing; a single-file model needs the repo file", model=name, field="file"
        )
    else:
        # llama.cpp users point at /models/<name>/model.gguf whatever the file is called.
        leaf = "model.gguf" if shown.lower().endswith(".gguf") else shown.rsplit("/", 1)[-1]
        model_path = _join(root, name, leaf)
    include = given.pop("include")
    fields = {"path": model_path, "backend": backend, **given}
    if isinstance(include, str):
        include = (include,)
    fields["include"] = list(include) or None
    return {key: value for key, value in fields.items() if value is not None}


def _read_for_update(source):
    # newline="" keeps CRLF files CRLF: the text is spliced, never re-dumped.
    try:
        with open(source, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        return ""
    except UnicodeDecodeError as exc:
        raise _not_utf8(source, exc) from None
    except OSError as exc:
        raise _unreadable(source, exc) from None


def _is_blank(text):
    """True when `text` holds nothing but blank lines and comments."""
    return all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())


def _entry_text(name, fields, key_indent, field_indent, newline):
    """The YAML lines of one new entry, each value quoted only where YAML needs it."""
    lines = [" " * key_indent + _scalar(name) + ":"]
    for key, value in fields.items():
        rendered = json.dumps(value) if isinstance(value, list) else _scalar(value)
        lines.append(" " * (key_indent + field_indent) + f"{key}: {rendered}")
    return newline.join(lines) + newline


def _scalar(value):
    """`value` as a YAML scalar: plain when that reads back as the same string, else quoted."""
    try:
        plain = "\n" not in value and yaml.safe_load(value) == value
    except yaml.YAMLError:
        plain = False
    # A JSON string is a valid YAML double-quoted scalar, escapes included.
    return value if plain else json.dumps(value)


def _insert_entry(source, text, name, fields):
    """`text` with the entry spliced in at the end of its `models:` mapping."""
    value_events = _models_value_events(source, text)
    start, end, key_indent, field_indent = _models_slot(source, value_events)
    # The entry goes on the line after `end`; `start:end` is an empty `{}` or `null` to drop.
    if end > 0 and text[end - 1] == "\n":  # a block scalar's end is already on the next line
        line_end = end
    else:
        line_end = text.find("\n", end) + 1 or len(text)
    newline = "\r\n" if "\r\n" in text else "\n"
    gap = "" if line_end > 0 and text[line_end - 1] == "\n" else newline
    entry = _entry_text(name, fields, key_indent, field_indent, newline)
    return text[:start] + text[end:line_end] + gap + entry + text[line_end:]


def _models_value_events(source, text):
    """The parse events of the top-level `models:` value (already known to be valid)."""
    events = list(yaml.parse(text, Loader=_StrictLoader))
    top = events[2]  # after StreamStart and DocumentStart
    if getattr(top, "flow_style", False):
        raise ManifestError(source, "cannot add to a manifest written in flow style ({...})")
    index = 3
    while True:
        value_end = _node_end(events, index + 1)
        key = events[index]
        if isinstance(key, yaml.ScalarEvent) and key.value == "models":
            return events[index + 1:value_end]
        index = value_end


def _node_end(events, index):
    """The index just past the node whose first event is events[index]."""
    depth = 0
    while True:
        event = events[index]
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        index += 1
        if depth == 0:
            return index


def _models_slot(source, events):
    """(start, end, key_indent, field_indent): the span to drop and the entry's indentation."""
    first = events[0]
    if isinstance(first, yaml.ScalarEvent) or len(events) == 2:  # `models:` null or `{}`
        return first.start_mark.index, events[-1].end_mark.index, 2, 2
    if not isinstance(first, yaml.MappingStartEvent):
        raise ManifestError(source, "cannot add to a 'models:' mapping given as an alias")
    if first.flow_style:
        raise ManifestError(
            source, "cannot add to a 'models:' mapping written in flow style ({...})"
        )
    end = _last_content_end(events[1:-1])
    key_indent = events[1].start_mark.column
    field_indent = 2
    if isinstance(events[2], yaml.MappingStartEvent) and not events[2].flow_style:
        field_indent = events[3].start_mark.column - key_indent
    return end, end, key_indent, field_indent


def _last_content_end(events):
    """Where the text of the last scalar, alias or flow collection among `events` ends."""
    # Block collections end where the next token starts, possibly after comments that
    # belong to what follows; so the entry goes after the last real content instead.
    # Block starts and ends are zero-width; scalars, aliases and brackets are not.
    for event in reversed(events):
        start, end = event.start_mark, event.end_mark
        if start is None or end is None:
            continue        # never from the parser: every event it makes has both marks
        if isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)) or start.index != end.index:
            return end.index
    raise AssertionError("a block mapping always has content")


def _write_atomically(source, text):
    """Replace the manifest at `source` with `text`: all of it or nothing, even across a crash."""
    target = os.path.realpath(source)  # replace a symlink's target, not the link
    mode = _mode_or_none(target)
    try:
        write_atomically(target, text.encode("utf-8"))
        if mode is not None:
            # The temp file is created 0600; other users and containers must still read
            # a manifest they could read before.
            os.chmod(target, mode)
    except OSError as exc:
        raise ManifestError(
            source, f"cannot write the manifest: {exc.strerror or exc}"
        ) from None


def _mode_or_none(path):
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None
