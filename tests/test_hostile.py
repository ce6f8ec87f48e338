"""Bad and hostile input: invalid manifests, Hub refusals, and a Hub that lies, through the CLI and a mount.

Every invalid manifest of `tests/manifests/invalid/` goes through `python -m vfs mount` and
`python -m vfs list`: exit code 2, the exact message its first line declares, and nothing
mounted. Hub refusals exit 1 with a message naming the model. A malicious Hub's listing
(`raw_tree`, `claim_size`) is refused or contained: never a path outside the mount or the
cache, never bytes from the wrong place marked verified.
"""

import concurrent.futures
import json
import os
import sys
import subprocess
from pathlib import Path

import pytest

from conftest import eventually, needs_fuse
from faultkit import BLOCK, SHORT_BOUNDS, MiB, cli_error, is_mounted, report, run_cli, timed_pread
from vfs import errors
from vfs.testing.hubsim import Fault, HubSimulator
from vfs.testing.mounts import isolated_environment

INVALID = sorted((Path(__file__).parent / "manifests" / "invalid").glob("*.yaml"))
EXPECT = "# expect: "
NOWHERE = "http://127.0.0.1:9"      # nothing listens: a bad manifest must fail before any request


def declared_message(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(EXPECT), f"{path.name} declares no message"
    return f"{path}: {first[len(EXPECT):]}"


def cli_command(verb, manifest, scratch):
    where = [scratch / "mnt"] if verb == "mount" else []
    return [sys.executable, "-m", "vfs", verb, *map(str, where), "-m", str(manifest),
            "--cache-dir", str(scratch / "cache"), "--endpoint", NOWHERE]


@pytest.fixture(scope="session")
def corpus_results(tmp_path_factory):
    """(verb, file name) -> (exit code, stderr, scratch dir), run a few at a time (CPU-bound)."""
    jobs = {}
    for manifest in INVALID:
        for verb in ("mount", "list"):
            scratch = tmp_path_factory.mktemp(f"{verb}-{manifest.stem}")
            jobs[(verb, manifest.name)] = (cli_command(verb, manifest, scratch), scratch)

    def run(item):
        key, (command, scratch) = item
        result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                env=isolated_environment(scratch))
        return key, (result.returncode, result.stderr, scratch)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, jobs.items()))


def test_the_corpus_is_big_enough():
    assert len(INVALID) >= 40


@pytest.mark.parametrize("verb", ["mount", "list"])
@pytest.mark.parametrize("manifest", INVALID, ids=[p.stem for p in INVALID])
def test_an_invalid_manifest_exits_2_with_its_exact_message(corpus_results, manifest, verb):
    status, stderr, scratch = corpus_results[(verb, manifest.name)]
    assert status == 2, stderr
    assert cli_error(stderr) == declared_message(manifest)
    assert not (scratch / "mnt").exists() and not (scratch / "cache").exists()


# ------------------------------------------------------------------ Hub refusals

TOKEN = "hf_lamina_test_granted_token"


@pytest.fixture
def refusing_hub():
    with HubSimulator(tokens={TOKEN: {"granted": ["org/private", "org/gated"]}}) as sim:
        sim.public_commit = sim.add_repo("org/public", files={"model.gguf": b"GGUF" + bytes(100)})
        sim.add_repo("org/private", files={"model.gguf": b"GGUF" + bytes(50)}, private=True)
        sim.add_repo("org/gated", files={"model.gguf": b"GGUF" + bytes(60)}, gated=True)
        yield sim


def single(repo, file="model.gguf", revision=None):
    text = f"models:\n  m:\n    path: /models/m/model.gguf\n    backend: llama.cpp\n    hf: {repo}\n    file: {file}\n"
    return text + (f"    revision: {revision}\n" if revision else "")


NOT_FOUND_HINT = "repository not found (or it is private: set HF_TOKEN)"
HUB_REFUSALS = [
    ("repo-missing", single("org/missing"), None, f"model 'm': org/missing@main: {NOT_FOUND_HINT}"),
    ("revision-missing", single("org/public", revision="v9"), None,
     "model 'm': org/public@v9: revision 'v9' not found"),
    ("commit-missing", single("org/public", revision="deadbeef" * 5), None,
     f"model 'm': org/public@{'deadbeef' * 5}: revision '{'deadbeef' * 5}' not found"),
    ("file-missing", single("org/public", file="other.gguf"), None,
     "model 'm': file 'other.gguf' is not in org/public at main ({commit})"),
    ("private-without-token", single("org/private"), None, f"model 'm': org/private@main: {NOT_FOUND_HINT}"),
    ("private-with-an-ungranted-token", single("org/private"), "hf_valid_but_not_granted",
     "model 'm': org/private@main: repository not found"),
    ("token-rejected", single("org/public"), "hf_the_hub_rejects_this",
     "model 'm': org/public@main: access denied (HTTP 401); check HF_TOKEN"),
    ("token-rejected-private", single("org/private"), "hf_the_hub_rejects_this",
     "model 'm': org/private@main: access denied (HTTP 401); check HF_TOKEN"),
]


@pytest.mark.parametrize("verb", ["list", "mount"])
@pytest.mark.parametrize("manifest, token, message", [case[1:] for case in HUB_REFUSALS],
                         ids=[case[0] for case in HUB_REFUSALS])
def test_a_hub_refusal_exits_1_with_a_message_naming_the_model(refusing_hub, tmp_path, verb, manifest, token,
                                                                message):
    refusing_hub.add_token("hf_valid_but_not_granted")
    (tmp_path / "models.yaml").write_text(manifest)
    where = [tmp_path / "mnt"] if verb == "mount" else []
    status, _, stderr, _ = run_cli(verb, *where, "-m", tmp_path / "models.yaml", "--cache-dir", tmp_path / "cache",
                                   "--endpoint", refusing_hub.endpoint,
                                   home=tmp_path, env={"HF_TOKEN": token} if token else None)
    print(f"{verb}: exit {status}: {cli_error(stderr)}")
    assert status == 1
    assert cli_error(stderr) == message.format(commit=refusing_hub.public_commit[:12])
    assert not is_mounted(tmp_path / "mnt")


def test_a_hub_that_cannot_be_reached_fails_what_must_fetch_and_list_says_what_it_knows(tmp_path):
    (tmp_path / "models.yaml").write_text(single("org/public"))
    where = ("-m", tmp_path / "models.yaml", "--cache-dir", tmp_path / "cache", "--endpoint", NOWHERE)
    status, _, stderr, seconds = run_cli("pull", "m", *where, home=tmp_path)
    print(f"pull: exit {status} after {seconds:.1f}s: {cli_error(stderr)}")
    assert status == 1
    assert cli_error(stderr) == "model 'm': org/public@main: Hub unreachable: ConnectionRefusedError"
    # list needs no Hub: a model never resolved is listed without a size, and the log says why
    status, stdout, stderr, _ = run_cli("list", *where, home=tmp_path)
    assert status == 0, stderr
    assert [line.split()[:3] for line in stdout.splitlines()[1:]] == [["m", "llama.cpp", "-"]]
    assert "model 'm': org/public@main: Hub unreachable: ConnectionRefusedError; reported as not resolved" in stderr


@needs_fuse
def test_a_gated_repo_without_a_token_mounts_but_reads_fail_with_eacces(refusing_hub, mount_factory):
    mount = mount_factory(single("org/gated"), refusing_hub.endpoint, args=BLOCK + SHORT_BOUNDS)
    mount.expect_log_errors("the repository is gated")
    path = mount.mountpoint / "m" / "model.gguf"
    assert os.stat(path).st_size == 64                   # the listing is public; the bytes are not
    reading = report("read of a gated file without a token", timed_pread(path, 0, 64))
    assert reading.error == 13                           # EACCES
    (line,) = [l for l in mount.log_text().splitlines() if " ERROR " in l]
    print(line)
    assert "m/model.gguf" in line and "the repository is gated" in line and "HF_TOKEN" in line


# ------------------------------------------------------------------ a Hub that lies


def tree_entry(path, oid="a" * 40, size=5, **extra):
    return {"type": "file", "oid": oid, "size": size, "path": path, **extra}


HOSTILE_ENTRIES = [
    tree_entry("../escape.bin"), tree_entry("../../../../tmp/escape.bin"), tree_entry("/etc/passwd"),
    tree_entry("a/../../escape.bin"), tree_entry("a/./b.bin"), tree_entry("./c.bin"), tree_entry("d/."),
    tree_entry("e//f.bin"), tree_entry("g/"), tree_entry(""), tree_entry("."), tree_entry(".."),
    tree_entry("back\\slash.bin"), tree_entry("nul\x00byte.bin"), tree_entry("bell\x07.bin"),
    tree_entry("new\nline.bin"), tree_entry("tab\t.bin"), tree_entry("del\x7f.bin"),
    tree_entry("x" * 256), tree_entry("deep/" + "y" * 256 + "/z.bin"), tree_entry("lone\udc80surrogate.bin"),
    tree_entry("size-negative.bin", size=-1), tree_entry("size-string.bin", size="5"),
    tree_entry("size-huge.bin", size=1 << 62), tree_entry("size-bool.bin", size=True),
    tree_entry("oid-short.bin", oid="abc"), tree_entry("oid-not-hex.bin", oid="z" * 40),
    tree_entry("lfs-bad.bin", lfs={"oid": "q" * 64, "size": 5, "pointerSize": 130}),
    tree_entry("lfs-not-a-dict.bin", lfs="sha256"), tree_entry(17), tree_entry(None),
    {"type": "symlink", "oid": "a" * 40, "size": 5, "path": "link.bin"},
    "not an entry", 42, None, ["a", "list"], {"path": "no-type.bin"},
]


@pytest.fixture
def lying_hub(hub):
    hub.add_repo("org/model", files={"good.safetensors": b"\x08" + bytes(7) + b"{}" + bytes(100),
                                     "config.json": b"{}\n"})
    return hub


DIRECTORY_MODEL = "models:\n  m:\n    path: /models/m/\n    backend: vllm\n    hf: org/model\n"


def honest_entries(hub):
    from huggingface_hub import HfApi
    api = HfApi(endpoint=hub.endpoint, token=False)
    return [{"type": "file", "oid": e.blob_id, "size": e.size, "path": e.path,
             **({"lfs": {"oid": e.lfs.sha256, "size": e.lfs.size, "pointerSize": e.lfs.pointer_size}}
                if e.lfs else {})}
            for e in api.list_repo_tree("org/model", recursive=True)]


def files_under(root, skip):
    """Every path below `root`, not descending into `skip` (the live mountpoint)."""
    found = set()
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if Path(directory, d) != skip]
        found |= {Path(directory, name) for name in subdirs + names}
    return found


@needs_fuse
def test_hostile_names_in_a_listing_are_dropped_and_nothing_lands_outside(lying_hub, mount_factory, tmp_path):
    honest = honest_entries(lying_hub)
    lying_hub.add_fault(Fault("raw_tree", entries=honest + HOSTILE_ENTRIES))
    mount = mount_factory(DIRECTORY_MODEL, lying_hub.endpoint, args=BLOCK + SHORT_BOUNDS)
    shown = sorted(os.listdir(mount.mountpoint / "m"))
    print(f"{len(HOSTILE_ENTRIES)} hostile entries listed; the mount shows {shown}")
    assert shown == ["config.json", "good.safetensors"]
    assert (mount.mountpoint / "m" / "config.json").read_bytes() == b"{}\n"
    warning = next(l for l in mount.log_text().splitlines() if "unsafe or malformed" in l)
    print(warning)
    assert f"ignored {len(HOSTILE_ENTRIES)} unsafe or malformed entries" in warning
    written = files_under(tmp_path, skip=mount.mountpoint)
    assert not [p for p in written if "escape" in p.name or "\n" in p.name or "\x07" in p.name]
    assert not any(Path(where, "escape.bin").exists() for where in ("/tmp", tmp_path.parent, tmp_path))
    assert {p.relative_to(tmp_path / "cache").parts[0] for p in written if tmp_path / "cache" in p.parents} <= {
        "format", "CACHEDIR.TAG", "blobs", "snapshots", "pins", "mount.lock", "passthrough.json"}
    (tree,) = [p for p in written if p.suffix == ".json" and "trees" in p.parts]
    assert sorted(path for path, _, _ in json.loads(tree.read_text())) == shown


@needs_fuse
def test_a_listing_that_claims_a_bigger_size_gives_eio_past_the_real_end(hub, random_file, mount_factory):
    real = random_file("real.bin", 3 * MiB + 100).read_bytes()
    hub.add_repo("org/lies", files={"real.bin": real})
    hub.add_fault(Fault("claim_size", size=5 * MiB, file="real.bin"))
    mount = mount_factory("models:\n  l:\n    path: /models/l/\n    backend: vllm\n    hf: org/lies\n",
                          hub.endpoint, args=BLOCK + SHORT_BOUNDS)
    mount.expect_log_errors("range not satisfiable")
    path = mount.mountpoint / "l" / "real.bin"
    assert os.stat(path).st_size == 5 * MiB
    head = report("read inside the real bytes", timed_pread(path, 100, 4096))
    assert head.data == real[100:4196]
    tail = report("read past the real end", timed_pread(path, 4 * MiB, 4096))
    assert tail.error == 5
    assert any("shorter than its listing" in l or "Content-Range" in l for l in mount.log_text().splitlines())
    assert os.getxattr(path, "user.lamina.verified") == b"no"


@needs_fuse
def test_a_listing_that_claims_a_smaller_size_is_never_verified(hub, random_file, mount_factory):
    real = random_file("real.bin", 3 * MiB + 100).read_bytes()
    hub.add_repo("org/lies", files={"real.bin": real})
    hub.add_fault(Fault("claim_size", size=2 * MiB + 5, file="real.bin"))
    mount = mount_factory("models:\n  l:\n    path: /models/l/\n    backend: vllm\n    hf: org/lies\n",
                          hub.endpoint, args=BLOCK + SHORT_BOUNDS)
    mount.expect_log_errors("does not match its content id")
    path = mount.mountpoint / "l" / "real.bin"
    data = path.read_bytes()
    print(f"claimed {2 * MiB + 5} bytes of {len(real)}: reader got {len(data)} bytes, a prefix: {real.startswith(data)}")
    assert data == real[:2 * MiB + 5]                     # never bytes from anywhere else
    assert eventually(lambda: "does not match its content id" in mount.log_text())
    assert os.getxattr(path, "user.lamina.verified") == b"no"


def test_folders_never_count_against_the_bound_and_too_many_files_are_refused(hub, tmp_path, monkeypatch):
    from vfs import hub as hub_module
    from vfs.hub import Hub
    from vfs.manifest import parse_manifest
    from vfs.settings import Settings
    from vfs.snapshots import SnapshotStore
    hub.add_repo("org/huge", files={"config.json": b"{}\n"})
    folders = [{"type": "directory", "oid": "b" * 40, "size": 0, "path": f"d{i}"} for i in range(3000)]
    files = [{"type": "file", "oid": f"{i:040x}", "size": 1, "path": f"d{i}/f"} for i in range(1000)]
    hub.add_fault(Fault("raw_tree", entries=folders + files))
    monkeypatch.setattr(hub_module, "MAX_FILES", 1000)
    spec = parse_manifest("models:\n  h:\n    path: /models/h/\n    backend: vllm\n    hf: org/huge\n").models[0]
    settings = Settings(endpoint=hub.endpoint, cache_dir=tmp_path / "cache", max_retries=1)
    assert len(Hub(settings, SnapshotStore(tmp_path / "cache")).resolve(spec).files) == 1000    # 3,000 folders free
    hub.clear_faults()
    hub.add_fault(Fault("raw_tree", entries=folders + files + [{**files[0], "path": "extra/f"}]))
    with pytest.raises(errors.HubError, match="lists more than 1000 files; refused"):
        Hub(settings, SnapshotStore(tmp_path / "other-cache")).resolve(spec)
