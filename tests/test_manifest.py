"""Tests for vfs.manifest: the format, every refusal message, wants() and add_model."""

import os
import pathlib
import stat

import pytest

from vfs.errors import ManifestError, UsageError
from vfs.manifest import ModelSpec, add_model, load_manifest, parse_manifest

CORPUS = pathlib.Path(__file__).parent / "manifests"
INVALID = sorted((CORPUS / "invalid").glob("*.yaml"))
EXPECT = "# expect: "


def expected_message(path):
    """The message a corpus file declares on its first line, prefixed by its source."""
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith(EXPECT), f"{path.name} has no '{EXPECT}' first line"
    return f"{path}: {first_line[len(EXPECT):]}"


def model(name, body, root=None):
    """A one-model manifest text; `body` holds the entry's field lines."""
    head = f"root: {root}\n" if root else ""
    fields = "".join(f"    {line}\n" for line in body.strip().splitlines())
    return f"{head}models:\n  {name}:\n{fields}"


# ---------------------------------------------------------------- valid manifests


def test_the_seed_example_loads_with_its_paths_and_kinds():
    manifest = load_manifest(CORPUS / "valid" / "seed.yaml")
    assert manifest.root == "/models"
    got = [(m.name, m.backend, m.parts, m.is_dir, m.hf) for m in manifest.models]
    assert got == [
        ("llama3-70b-q4_k_m", "llama.cpp", ("llama3-70b-q4_k_m", "model.gguf"), False, None),
        ("yi-34b-awq", "mlc", ("yi-34b-awq",), True, None),
        ("llama3-70b-q5_k_m", "llama.cpp", ("llama3-70b-q5_k_m",), True, None),
        ("mistral-7b-instruct", "llama.cpp", ("mistral-7b-instruct",), True, None),
    ]


def test_the_design_example_loads_with_every_field():
    manifest = load_manifest(CORPUS / "valid" / "design.yaml")
    llama, mistral, finetune = manifest.models
    assert llama == ModelSpec(
        name="llama3-70b-q4_k_m", backend="llama.cpp",
        path="/models/llama3-70b-q4_k_m/model.gguf", parts=("llama3-70b-q4_k_m", "model.gguf"),
        is_dir=False, hf="QuantFactory/Meta-Llama-3-70B-Instruct-GGUF",
        file="Meta-Llama-3-70B-Instruct.Q4_K_M.gguf", revision="main",
    )
    assert mistral.include == ("*.safetensors", "*.json", "tokenizer*")
    assert (mistral.is_dir, mistral.file, mistral.exclude) == (True, None, ())
    assert (finetune.hf, finetune.is_dir, finetune.keep) == (None, True, False)


def test_source_is_the_path_as_given():
    path = CORPUS / "valid" / "seed.yaml"
    assert load_manifest(path).source == str(path)
    assert parse_manifest("models: {}\n").source == "models.yaml"


def test_an_empty_models_mapping_is_a_mount_with_nothing_in_it():
    assert parse_manifest("models: {}\n").models == ()
    assert parse_manifest("models:\n").models == ()


def test_models_keep_file_order():
    text = "models:\n" + "".join(f"  {n}:\n    path: /models/{n}/\n    backend: vllm\n" for n in "zam")
    assert [m.name for m in parse_manifest(text).models] == ["z", "a", "m"]


def test_intermediate_folders_are_part_of_the_path():
    single = parse_manifest(model("x", "path: /models/x/weights/model.gguf\nbackend: llama.cpp")).models[0]
    folder = parse_manifest(model("x", "path: /models/x/weights/\nbackend: vllm")).models[0]
    assert (single.parts, single.is_dir) == (("x", "weights", "model.gguf"), False)
    assert (folder.parts, folder.is_dir) == (("x", "weights"), True)


def test_paths_are_relative_to_a_custom_root():
    manifest = parse_manifest(model("x", "path: /srv/llm/x/\nbackend: vllm", root="/srv/llm/"))
    assert manifest.root == "/srv/llm"
    assert manifest.models[0].parts == ("x",)


def test_the_filesystem_root_can_be_the_mount_root():
    manifest = parse_manifest(model("x", "path: /x/model.gguf\nbackend: llama.cpp", root="/"))
    assert (manifest.root, manifest.models[0].parts) == ("/", ("x", "model.gguf"))


def test_a_commit_revision_is_lowercased():
    commit = "0123456789ABCDEF0123456789abcdef01234567"
    spec = parse_manifest(model("x", f"path: /models/x/\nbackend: vllm\nhf: o/x\nrevision: {commit}")).models[0]
    assert spec.revision == commit.lower()


@pytest.mark.parametrize("revision", [
    "v1.0", "refs/pr/12", "feature/x", "0123456789abcdef0123456789abcdef0123456",  # 39 hex: a branch
])
def test_branch_and_tag_revisions_are_kept_as_written(revision):
    spec = parse_manifest(model("x", f"path: /models/x/\nbackend: vllm\nhf: o/x\nrevision: {revision}")).models[0]
    assert spec.revision == revision


def test_optional_fields_take_their_defaults():
    spec = parse_manifest(model("x", "path: /models/x/\nbackend: vllm\nhf: x")).models[0]
    assert (spec.revision, spec.include, spec.exclude, spec.keep, spec.file) == ("main", (), (), False, None)


def test_a_single_pattern_string_is_a_one_pattern_filter():
    spec = parse_manifest(model("x", "path: /models/x/\nbackend: vllm\nhf: o/x\ninclude: '*.json'\nkeep: yes")).models[0]
    assert (spec.include, spec.keep) == (("*.json",), True)


def test_pin_is_the_old_name_of_keep():
    spec = parse_manifest(model("x", "path: /models/x/\nbackend: vllm\nhf: o/x\npin: true")).models[0]
    assert spec.keep is True


def test_yaml_anchors_and_merge_keys_work():
    text = (
        "models:\n"
        "  a: &common\n    path: /models/a/\n    backend: vllm\n    hf: org/a\n"
        "  b:\n    <<: *common\n    path: /models/b/\n"
    )
    a, b = parse_manifest(text).models
    assert (b.path, b.backend, b.hf) == ("/models/b/", "vllm", "org/a")


def test_get_finds_a_model_or_raises_a_usage_error():
    manifest = load_manifest(CORPUS / "valid" / "seed.yaml")
    assert manifest.get("yi-34b-awq").backend == "mlc"
    with pytest.raises(UsageError, match="no model named 'nope' in .*seed.yaml"):
        manifest.get("nope")


def test_specs_are_frozen():
    spec = parse_manifest(model("x", "path: /models/x/\nbackend: vllm")).models[0]
    with pytest.raises(AttributeError):
        spec.path = "/models/y/"


# ---------------------------------------------------------------- invalid manifests


def test_the_invalid_corpus_is_big_enough():
    assert len(INVALID) >= 40


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_each_invalid_manifest_gets_its_one_exact_message(path):
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert str(caught.value) == expected_message(path)


def test_a_missing_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "models.yaml"
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert str(caught.value) == f"{path}: cannot read the manifest: No such file or directory"


def test_a_directory_is_not_a_manifest(tmp_path):
    with pytest.raises(ManifestError, match="cannot read the manifest: Is a directory"):
        load_manifest(tmp_path)


def test_a_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_bytes(b"models:\n  caf\xe9:\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert str(caught.value) == f"{path}: is not UTF-8 text (bad byte at offset 13)"


def test_a_raw_control_character_is_a_yaml_error_with_its_line():
    with pytest.raises(ManifestError) as caught:
        parse_manifest("models:\n  x\x01:\n", "m.yaml")
    assert str(caught.value) == "m.yaml: invalid YAML at line 2: character U+0001 is not allowed"


# ---------------------------------------------------------------- wants


def dir_spec(**filters):
    return ModelSpec(name="x", backend="vllm", path="/models/x/", parts=("x",), is_dir=True,
                     hf="o/x", **filters)


def test_without_include_a_directory_model_wants_everything():
    assert dir_spec().wants("a/b/c.bin")


def test_include_keeps_only_matching_files():
    spec = dir_spec(include=("*.safetensors", "tokenizer*"))
    assert spec.wants("model-00001-of-00002.safetensors")
    assert spec.wants("tokenizer.json")
    assert not spec.wants("pytorch_model.bin")


def test_exclude_wins_over_include():
    spec = dir_spec(include=("*.safetensors",), exclude=("original/*",))
    assert spec.wants("model.safetensors")
    assert not spec.wants("original/consolidated.safetensors")


def test_a_pattern_ending_in_slash_means_the_whole_folder():
    assert not dir_spec(exclude=("original/",)).wants("original/params.json")


def test_star_crosses_folders_and_case_matters():
    # fnmatch semantics, as huggingface_hub's allow_patterns: '*' also matches '/'.
    spec = dir_spec(include=("*.json",))
    assert spec.wants("sub/config.json")
    assert not spec.wants("CONFIG.JSON")


def test_a_single_file_model_wants_only_its_file():
    spec = ModelSpec(name="x", backend="llama.cpp", path="/models/x/model.gguf",
                     parts=("x", "model.gguf"), is_dir=False, hf="o/x", file="q/x.Q4.gguf")
    assert spec.wants("q/x.Q4.gguf")
    assert not spec.wants("q/x.Q8.gguf")


# ---------------------------------------------------------------- add_model

COMMENTED = """\
# Models for the lab box.
models:
  # the small one, for tests
  tiny:
    path: /models/tiny/   # keep the slash
    backend: vllm
    hf: org/tiny
"""


def write(tmp_path, text):
    path = tmp_path / "models.yaml"
    path.write_bytes(text.encode())
    return path


def test_add_appends_and_keeps_comments_and_layout(tmp_path):
    path = write(tmp_path, COMMENTED)
    spec = add_model(path, "mistral", hf="mistralai/Mistral-7B-v0.3", backend="vllm",
                     include=["*.safetensors", "*.json"])
    assert path.read_text() == COMMENTED + (
        "  mistral:\n"
        "    path: /models/mistral/\n"
        "    backend: vllm\n"
        "    hf: mistralai/Mistral-7B-v0.3\n"
        '    include: ["*.safetensors", "*.json"]\n'
    )
    assert load_manifest(path).get("mistral") == spec
    assert spec.include == ("*.safetensors", "*.json")


def test_add_names_a_gguf_file_model_gguf(tmp_path):
    path = write(tmp_path, COMMENTED)
    spec = add_model(path, "llama", hf="org/llama-GGUF", backend="llama.cpp", file="q4/llama.Q4_K_M.gguf")
    assert (spec.path, spec.file, spec.is_dir) == ("/models/llama/model.gguf", "q4/llama.Q4_K_M.gguf", False)
    assert load_manifest(path).get("llama") == spec


def test_add_keeps_other_file_names(tmp_path):
    path = write(tmp_path, COMMENTED)
    spec = add_model(path, "emb", hf="org/emb", backend="transformers", file="onnx/model.onnx")
    assert spec.path == "/models/emb/model.onnx"


def test_add_writes_revision_and_quotes_what_yaml_would_misread(tmp_path):
    path = write(tmp_path, COMMENTED)
    spec = add_model(path, "123", hf="org/x", backend="vllm", revision="refs/pr/1", include="*.json")
    text = path.read_text()
    assert '  "123":\n' in text and "    revision: refs/pr/1\n" in text
    assert (spec.name, spec.revision, spec.include) == ("123", "refs/pr/1", ("*.json",))


def test_add_goes_inside_models_when_other_keys_follow(tmp_path):
    path = write(tmp_path, COMMENTED + "# the mount root\nroot: /models\n")
    add_model(path, "b", hf="org/b", backend="mlc")
    text = path.read_text()
    assert text.index("  b:\n") < text.index("# the mount root")
    assert [m.name for m in load_manifest(path).models] == ["tiny", "b"]


def test_add_uses_the_manifest_root_and_indentation(tmp_path):
    path = write(tmp_path, "root: /srv/llm\nmodels:\n    a:\n        path: /srv/llm/a/\n        backend: vllm\n")
    spec = add_model(path, "b", hf="org/b", backend="vllm")
    assert "\n    b:\n        path: /srv/llm/b/\n        backend: vllm\n        hf: org/b\n" in path.read_text()
    assert spec.parts == ("b",)


def test_add_refuses_a_name_that_exists_and_leaves_the_file_alone(tmp_path):
    path = write(tmp_path, COMMENTED)
    with pytest.raises(ManifestError) as caught:
        add_model(path, "tiny", hf="org/other", backend="vllm")
    assert str(caught.value) == f"{path}: model 'tiny': already in the manifest"
    assert path.read_text() == COMMENTED


def test_add_refuses_an_invalid_entry_and_leaves_the_file_alone(tmp_path):
    path = write(tmp_path, COMMENTED)
    with pytest.raises(ManifestError, match="field 'hf': 'a/b/c' is not a Hub repo id"):
        add_model(path, "bad", hf="a/b/c", backend="vllm")
    assert path.read_text() == COMMENTED
    assert os.listdir(tmp_path) == ["models.yaml"]


def test_add_creates_a_missing_manifest(tmp_path):
    path = tmp_path / "models.yaml"
    spec = add_model(path, "tiny", hf="org/tiny", backend="vllm")
    assert path.read_text() == "models:\n  tiny:\n    path: /models/tiny/\n    backend: vllm\n    hf: org/tiny\n"
    assert load_manifest(path).models == (spec,)


def test_add_fills_an_empty_models_mapping(tmp_path):
    path = write(tmp_path, "models: {}  # nothing yet\n")
    add_model(path, "a", hf="org/a", backend="vllm")
    assert path.read_text().startswith("models:   # nothing yet\n  a:\n    path: /models/a/\n")


def test_add_to_a_file_without_a_final_newline(tmp_path):
    path = write(tmp_path, COMMENTED.rstrip("\n"))
    add_model(path, "b", hf="org/b", backend="vllm")
    assert [m.name for m in load_manifest(path).models] == ["tiny", "b"]


def test_add_keeps_crlf_line_endings(tmp_path):
    path = write(tmp_path, COMMENTED.replace("\n", "\r\n"))
    add_model(path, "b", hf="org/b", backend="vllm")
    data = path.read_bytes()
    assert data.count(b"\n") == data.count(b"\r\n")
    assert [m.name for m in load_manifest(path).models] == ["tiny", "b"]


def test_add_keeps_the_file_mode(tmp_path):
    path = write(tmp_path, COMMENTED)
    path.chmod(0o640)
    add_model(path, "b", hf="org/b", backend="vllm")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_add_refuses_to_extend_a_broken_manifest(tmp_path):
    path = write(tmp_path, "models:\n  x: [\n")
    with pytest.raises(ManifestError, match="invalid YAML"):
        add_model(path, "b", hf="org/b", backend="vllm")


def test_add_local_writes_the_path_and_takes_the_kind_from_the_disk(tmp_path):
    path = write(tmp_path, COMMENTED)
    folder = tmp_path / "ft"
    folder.mkdir()
    gguf = tmp_path / "x-q4.gguf"
    gguf.write_bytes(b"GGUF")
    directory_model = add_model(path, "ft", local=f"{folder}/", backend="vllm")
    file_model = add_model(path, "q4", local=str(gguf), backend="llama.cpp")
    assert (directory_model.is_dir, directory_model.local, directory_model.path) == (True, f"{folder}/", "/models/ft/")
    assert (file_model.is_dir, file_model.path, file_model.source_kind) == (False, "/models/q4/model.gguf", "local")
    assert load_manifest(path).models[1:] == (directory_model, file_model)


def test_a_local_model_accepts_include_and_exclude_like_a_repo(tmp_path):
    spec = parse_manifest(model("x", f"path: /models/x/\nbackend: vllm\nlocal: {tmp_path}/\n"
                                     "include: ['*.safetensors']\nexclude: ['old/']")).models[0]
    assert spec.wants("model.safetensors") and not spec.wants("old/model.safetensors")
    assert not spec.wants("notes.md")
