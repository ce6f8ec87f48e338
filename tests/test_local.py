"""Models served from local files (`local:` in the manifest), through real mounts."""

import errno
import hashlib
import json
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import call_api, eventually, free_port, needs_fuse, run_elsewhere, unexpected_log_lines
from vfs.testing.models import write_gguf, write_safetensors_dir
from vfs.testing.mounts import MountProcess, isolated_environment

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1024 * 1024
DEAD_HUB = "http://127.0.0.1:9"     # nothing listens: any attempt to reach the Hub fails


def manifest_for(finetune, gguf):
    return f"""
models:
  my-finetune:
    path: /models/my-finetune/
    backend: transformers
    local: {finetune}/
    exclude: ["*.md"]
  tiny-q4:
    path: /models/tiny-q4/model.gguf
    backend: llama.cpp
    local: {gguf}
"""


def write_bytes(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


@pytest.fixture
def local_models(tmp_path):
    finetune = write_safetensors_dir(tmp_path / "finetunes" / "my-finetune")
    write_bytes(finetune / "big.bin", 6 * MiB + 4321, seed=5)
    (finetune / "NOTES.md").write_text("not shown: excluded\n")
    (finetune / "empty.txt").write_bytes(b"")
    gguf = tmp_path / "quantized" / "tiny-q4.gguf"
    gguf.parent.mkdir(parents=True)
    write_gguf(gguf, size_mib=6)
    return finetune, gguf


@pytest.fixture
def served(hub, local_models, mount_factory):
    """A mount of the two local models with the API on; `hub` is there to prove it is never asked."""
    port = free_port()
    mount = mount_factory(manifest_for(*local_models), hub.endpoint, args=("--api", f"127.0.0.1:{port}"))
    return mount, port


@pytest.fixture
def checked(hub, local_models, mount_factory):
    """The same, with every read served by the daemon and checked against the scan (a passed-through
    open reads the local file as it is: test_passthrough_local.py)."""
    port = free_port()
    mount = mount_factory(manifest_for(*local_models), hub.endpoint,
                          args=("--api", f"127.0.0.1:{port}", "--no-local-passthrough"))
    return mount, port


def tree_of(root):
    root = os.fspath(root)
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = path
    return found


def fingerprint(root):
    """Every file under `root` with its mtime, size and sha256: what 'untouched' means."""
    return {name: (os.stat(path).st_mtime_ns, os.stat(path).st_size,
                   hashlib.sha256(open(path, "rb").read()).hexdigest())
            for name, path in tree_of(root).items()}


def lamina(workspace, manifest_text, *args, check=True):
    """Run the CLI against a manifest in `workspace`, with no way to reach a Hub."""
    manifest = workspace / "cli-models.yaml"
    if manifest_text is not None:
        manifest.write_text(manifest_text)
    command = [sys.executable, "-m", "vfs", *args, "-m", str(manifest),
               "--cache-dir", str(workspace / "cache"), "--endpoint", DEAD_HUB]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env=isolated_environment(workspace))
    if check:
        assert result.returncode == 0, result.stderr
    return result


# ---------------------------------------------------------------- served as the files are


def test_a_local_directory_shows_the_same_names_sizes_and_bytes(served, local_models):
    mount, _ = served
    finetune, gguf = local_models
    shown = mount.mountpoint / "my-finetune"
    expected = {name for name in tree_of(finetune) if not name.endswith(".md")}
    assert set(tree_of(shown)) == expected
    assert "original/consolidated.safetensors" in expected
    for name in expected:
        info = os.stat(shown / name)
        assert info.st_size == os.stat(finetune / name).st_size, name
        assert stat.S_IMODE(info.st_mode) == 0o444
        assert (shown / name).read_bytes() == (finetune / name).read_bytes(), name
    assert os.listdir(mount.mountpoint / "tiny-q4") == ["model.gguf"]
    assert (mount.mountpoint / "tiny-q4" / "model.gguf").read_bytes() == gguf.read_bytes()


def test_random_reads_of_a_local_file_are_exact(served, local_models):
    mount, _ = served
    expected = (local_models[0] / "big.bin").read_bytes()
    generator = random.Random(3)
    with open(mount.mountpoint / "my-finetune" / "big.bin", "rb") as handle:
        for _ in range(200):
            offset = generator.randrange(len(expected) + 10)
            length = generator.choice([1, 4095, 65536, 3 * MiB])
            assert os.pread(handle.fileno(), length, offset) == expected[offset:offset + length]


def test_local_files_say_where_they_come_from_in_xattrs(served, local_models):
    mount, _ = served
    path = mount.mountpoint / "my-finetune" / "original" / "consolidated.safetensors"
    assert os.getxattr(path, "user.lamina.source") == b"local"
    assert os.getxattr(path, "user.lamina.local") == os.fsencode(local_models[0] / "original" / "consolidated.safetensors")
    assert os.getxattr(path, "user.lamina.size") == str(path.stat().st_size).encode()


SAFETENSORS_DIGEST = """
import hashlib, sys
from safetensors import safe_open
with safe_open(sys.argv[1], framework="numpy") as f:
    print(sorted(f.metadata().items()) if f.metadata() else "-")
    for name in sorted(f.keys()):
        tensor = f.get_tensor(name)
        print(name, tensor.dtype, tensor.shape, hashlib.sha256(tensor.tobytes()).hexdigest())
"""


def test_safetensors_load_through_the_mount_exactly_as_from_the_directory(served, local_models):
    mount, _ = served
    for name in ("model.safetensors", "original/consolidated.safetensors"):
        through_mount = run_elsewhere(SAFETENSORS_DIGEST, mount.mountpoint / "my-finetune" / name)
        assert len(through_mount.splitlines()) > 3
        assert through_mount == run_elsewhere(SAFETENSORS_DIGEST, local_models[0] / name)


TRANSFORMERS_LOGITS = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)
with torch.no_grad():
    logits = model(torch.tensor([[1, 5, 9, 42, 7]])).logits
print(sum(p.numel() for p in model.parameters()))
print(logits.double().sum().item(), logits[0, -1, :8].tolist())
"""


@pytest.mark.slow
def test_transformers_loads_the_local_model_through_the_mount_with_identical_results(served, local_models):
    pytest.importorskip("transformers")
    mount, _ = served
    through_mount = run_elsewhere(TRANSFORMERS_LOGITS, mount.mountpoint / "my-finetune")
    assert through_mount == run_elsewhere(TRANSFORMERS_LOGITS, local_models[0])


GGUF_SUMMARY = """
import hashlib, sys, gguf
reader = gguf.GGUFReader(sys.argv[1])
print(reader.fields["general.architecture"].contents())
for tensor in reader.tensors:
    print(tensor.name, hashlib.sha256(tensor.data.tobytes()).hexdigest())
"""


def test_a_local_gguf_reads_with_ggufs_reader(served, local_models):
    mount, _ = served
    through_mount = run_elsewhere(GGUF_SUMMARY, mount.mountpoint / "tiny-q4" / "model.gguf")
    assert through_mount.splitlines()[0] == "llama" and len(through_mount.splitlines()) > 2
    assert through_mount == run_elsewhere(GGUF_SUMMARY, local_models[1])


@pytest.mark.parametrize("attempt", [
    lambda p: open(p / "my-finetune" / "big.bin", "r+b"),
    lambda p: os.unlink(p / "my-finetune" / "big.bin"),
    lambda p: os.truncate(p / "tiny-q4" / "model.gguf", 0),
    lambda p: open(p / "my-finetune" / "original" / "new.bin", "wb"),
], ids=["open-rw", "unlink", "truncate", "create"])
def test_writes_to_a_local_model_fail_with_erofs(served, local_models, attempt):
    mount, _ = served
    before = fingerprint(local_models[0].parent)
    with pytest.raises(OSError) as failure:
        attempt(mount.mountpoint)
    assert failure.value.errno == errno.EROFS
    assert fingerprint(local_models[0].parent) == before


# ---------------------------------------------------------------- changes under the mount


def test_a_file_truncated_under_the_mount_gives_eio_until_refresh(checked, local_models):
    mount, port = checked
    mount.expect_log_errors("changed since it was scanned")
    source = local_models[0] / "big.bin"
    original = source.read_bytes()
    path = mount.mountpoint / "my-finetune" / "big.bin"
    handle = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(handle, 4096, 0) == original[:4096]
        os.truncate(source, 2 * MiB + 5)
        for offset in (4 * MiB, 2 * MiB, 6 * MiB):     # never short bytes, never zeros: EIO
            with pytest.raises(OSError) as failure:
                os.pread(handle, 65536, offset)
            assert failure.value.errno == errno.EIO
        with pytest.raises(OSError) as failure:
            open(path, "rb").read()
        assert failure.value.errno == errno.EIO
    finally:
        os.close(handle)
    changed = [line for line in mount.log_text().splitlines() if "changed since it was scanned" in line]
    assert len(changed) == 1 and "my-finetune/big.bin" in changed[0] and "size" in changed[0], changed

    assert call_api(port, "POST", "/refresh")[0] == 200
    assert path.stat().st_size == 2 * MiB + 5
    assert path.read_bytes() == original[:2 * MiB + 5]


def test_a_file_replaced_under_the_mount_gives_eio_then_the_new_bytes_after_refresh(served, local_models):
    mount, port = served
    mount.expect_log_errors("changed since it was scanned")
    source = local_models[0] / "config.json"
    path = mount.mountpoint / "my-finetune" / "config.json"
    inode = path.stat().st_ino
    unchanged = (mount.mountpoint / "tiny-q4" / "model.gguf").stat().st_ino
    replacement = source.with_name("config.json.new")
    replacement.write_text('{"replaced": true}\n')
    os.replace(replacement, source)
    with pytest.raises(OSError) as failure:
        path.read_bytes()
    assert failure.value.errno == errno.EIO
    assert call_api(port, "POST", "/refresh")[0] == 200
    assert path.read_bytes() == b'{"replaced": true}\n'
    assert path.stat().st_ino != inode
    # Unchanged files keep their inode (and the kernel's cached pages) across the refresh.
    assert (mount.mountpoint / "tiny-q4" / "model.gguf").stat().st_ino == unchanged


def drop_cached_pages(fd):
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


@pytest.mark.slow
def test_a_file_rewritten_while_it_is_read_never_gives_mixed_bytes(checked, local_models):
    """Rounds of: refresh, then a reader (dropping the kernel's cached pages before every
    read, so each read reaches the daemon) against a writer rewriting the file in place.
    Every read gives the bytes of the last refresh, or EIO. A read the kernel splits in
    several requests may end early, with the bytes it got before the change: read(2)
    returns what it transferred before an error, and the next read gets the EIO."""
    mount, port = checked
    mount.expect_log_errors("changed since it was scanned")
    source = local_models[0] / "big.bin"
    size = source.stat().st_size
    path = mount.mountpoint / "my-finetune" / "big.bin"
    served_reads = failed_reads = 0
    for round_number in range(6):
        assert call_api(port, "POST", "/refresh")[0] == 200
        current = source.read_bytes()
        fresh = random.Random(round_number).randbytes(size)
        stop = threading.Event()

        def rewrite():
            with open(source, "r+b", buffering=0) as out:
                time.sleep(0.05)
                for offset in range(0, size, 256 * 1024):
                    out.seek(offset)
                    out.write(fresh[offset:offset + 256 * 1024])
            stop.set()

        writer = threading.Thread(target=rewrite)
        fd = os.open(path, os.O_RDONLY)
        try:
            writer.start()
            generator = random.Random(100 + round_number)
            deadline = time.monotonic() + 1.0
            while not stop.is_set() or time.monotonic() < deadline:
                drop_cached_pages(fd)
                offset = generator.randrange(size)
                try:
                    data = os.pread(fd, 1 * MiB, offset)
                except OSError as failure:
                    assert failure.errno == errno.EIO
                    failed_reads += 1
                    continue
                expected = current[offset:offset + MiB]
                assert data and data == expected[:len(data)], f"round {round_number}: mixed or new bytes at {offset}"
                if len(data) < len(expected):
                    with pytest.raises(OSError) as failure:
                        os.pread(fd, MiB, offset + len(data))
                    assert failure.value.errno == errno.EIO
                served_reads += 1
                if stop.is_set() and time.monotonic() > deadline:
                    break
        finally:
            writer.join()
            os.close(fd)
    assert served_reads > 0 and failed_reads > 0
    changed = [line for line in mount.log_text().splitlines() if "changed since it was scanned" in line]
    assert len(changed) == 6, changed        # one line per change, not one per failed read


# ---------------------------------------------------------------- what a scan skips


def test_a_symlink_that_escapes_is_refused_with_one_warning(hub, tmp_path, mount_factory):
    model = tmp_path / "model"
    write_bytes(model / "weights.bin", 3000, seed=1)
    write_bytes(tmp_path / "outside" / "secret.bin", 100, seed=2)
    os.symlink(tmp_path / "outside" / "secret.bin", model / "absolute-escape.bin")
    os.symlink("../outside/secret.bin", model / "relative-escape.bin")
    os.symlink("/etc", model / "etc")
    os.symlink("weights.bin", model / "alias.bin")      # inside: served as its target
    manifest = f"models:\n  m:\n    path: /models/m/\n    backend: vllm\n    local: {model}\n"
    mount = mount_factory(manifest, hub.endpoint)
    root = mount.mountpoint / "m"
    assert sorted(os.listdir(root)) == ["alias.bin", "weights.bin"]
    for name in ("absolute-escape.bin", "relative-escape.bin", "etc"):
        with pytest.raises(FileNotFoundError):
            os.stat(root / name)
    assert (root / "alias.bin").read_bytes() == (model / "weights.bin").read_bytes()
    warnings = unexpected_log_lines(mount.log_text())
    assert len(warnings) == 1, warnings
    assert "model 'm'" in warnings[0] and "3 symlinks that point outside" in warnings[0]
    assert "absolute-escape.bin" in warnings[0]


def test_special_files_are_skipped(hub, tmp_path, mount_factory):
    model = tmp_path / "model"
    write_bytes(model / "weights.bin", 3000, seed=1)
    os.mkfifo(model / "pipe")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(model / "sock"))
    try:
        manifest = f"models:\n  m:\n    path: /models/m/\n    backend: vllm\n    local: {model}/\n"
        mount = mount_factory(manifest, hub.endpoint)
        assert os.listdir(mount.mountpoint / "m") == ["weights.bin"]
        assert unexpected_log_lines(mount.log_text()) == []
        assert "2 special files" in mount.log_text()
    finally:
        listener.close()


class MountWithoutDacOverride(MountProcess):
    """The daemon as root without the capabilities that let root read any file."""

    def command(self, ready_fd):
        drop = "-dac_override,-dac_read_search"
        return ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", *super().command(ready_fd)]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_files_the_daemon_cannot_read_are_listed_and_give_eacces(hub, tmp_path):
    model = tmp_path / "model"
    write_bytes(model / "weights.bin", 3000, seed=1)
    write_bytes(model / "secret.bin", 5000, seed=2).chmod(0)
    manifest = tmp_path / "models.yaml"
    manifest.write_text(f"models:\n  m:\n    path: /models/m/\n    backend: vllm\n    local: {model}\n")
    mount = MountWithoutDacOverride(manifest, tmp_path / "mnt", tmp_path / "cache", hub.endpoint,
                                    tmp_path / "mount.log", env=isolated_environment(tmp_path))
    mount.expect_log_errors("secret.bin: Permission denied")
    with mount:
        root = mount.mountpoint / "m"
        assert sorted(os.listdir(root)) == ["secret.bin", "weights.bin"]
        assert (root / "secret.bin").stat().st_size == 5000
        for _ in range(2):
            with pytest.raises(PermissionError):
                open(root / "secret.bin", "rb")
        assert (root / "weights.bin").read_bytes() == (model / "weights.bin").read_bytes()
    warnings = unexpected_log_lines(mount.log_text())
    assert len(warnings) == 2, warnings     # the scan's warning, then the first refused open
    assert "cannot open are listed and give EACCES" in warnings[0] and "secret.bin" in warnings[0]


# ---------------------------------------------------------------- offline, and never touched


def test_a_mount_of_only_local_models_never_asks_the_hub(hub, served, local_models):
    mount, port = served
    (mount.mountpoint / "tiny-q4" / "model.gguf").read_bytes()
    assert call_api(port, "POST", "/refresh")[0] == 200
    assert call_api(port, "GET", "/models")[0] == 200
    mount.stop()
    assert hub.log == []
    assert hub.connections() == 0     # not even a connection opened ahead
    assert unexpected_log_lines(mount.log_text()) == []


def test_a_mount_of_only_local_models_starts_with_the_hub_unreachable(local_models, mount_factory):
    mount = mount_factory(manifest_for(*local_models), DEAD_HUB, args=("--read-timeout", "1"))
    path = mount.mountpoint / "my-finetune" / "model.safetensors"
    assert path.read_bytes() == (local_models[0] / "model.safetensors").read_bytes()
    mount.stop()
    assert unexpected_log_lines(mount.log_text()) == []


def test_no_command_writes_moves_or_deletes_local_files(served, local_models, tmp_path):
    mount, _ = served
    folders = (local_models[0].parent, local_models[1].parent)
    for name in tree_of(mount.mountpoint):
        (mount.mountpoint / name).read_bytes()
    mount.stop()
    before = [fingerprint(folder) for folder in folders]
    manifest = mount.manifest.read_text()
    time.sleep(0.01)                            # a rewrite now would show a later mtime
    for command in (["gc", "--max-size", "0"], ["gc"], ["verify"], ["pull", "--all"],
                    ["keep", "my-finetune"], ["unkeep", "my-finetune"]):
        lamina(tmp_path, manifest, *command)
    assert [fingerprint(folder) for folder in folders] == before
    assert len(before[0]) == 9 and len(before[1]) == 1


# ---------------------------------------------------------------- the commands


def test_list_and_info_show_local_models_with_size_and_source(local_models, tmp_path):
    finetune, gguf = local_models
    manifest = manifest_for(finetune, gguf)
    models = {m["name"]: m for m in json.loads(lamina(tmp_path, manifest, "list", "--json").stdout)}
    expected = sum(os.stat(p).st_size for n, p in tree_of(finetune).items() if not n.endswith(".md"))
    assert models["my-finetune"]["source"] == "local"
    assert models["my-finetune"]["size"] == expected
    assert models["tiny-q4"]["size"] == gguf.stat().st_size
    assert models["tiny-q4"]["local"] == str(gguf)
    table = lamina(tmp_path, None, "list").stdout
    assert "my-finetune" in table and "local" in table
    info = lamina(tmp_path, None, "info", "my-finetune").stdout
    assert "source    local" in info and "original/consolidated.safetensors" in info
    files = json.loads(lamina(tmp_path, None, "info", "tiny-q4", "--json").stdout)["files"]
    assert files == [{"path": "model.gguf", "size": gguf.stat().st_size, "local": str(gguf), "readable": True,
                      "passthrough": "no mount"}]


def test_verify_reports_the_sha256_of_local_files(local_models, tmp_path):
    finetune, gguf = local_models
    out = lamina(tmp_path, manifest_for(finetune, gguf), "verify", "tiny-q4").stdout
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert f"tiny-q4/model.gguf: local sha256:{digest}" in out


def test_pull_says_there_is_nothing_to_fetch(local_models, tmp_path):
    result = lamina(tmp_path, manifest_for(*local_models), "pull", "my-finetune")
    assert "my-finetune: nothing to fetch; served from local files" in result.stdout


def test_download_says_there_is_nothing_to_fetch(served):
    mount, port = served
    status, answer = call_api(port, "POST", "/download/my-finetune")
    assert status == 200 and answer["source"] == "local" and "nothing to fetch" in answer["message"]


def test_add_local_adds_a_directory_or_a_file_model(local_models, tmp_path):
    finetune, gguf = local_models
    manifest = tmp_path / "cli-models.yaml"
    manifest.write_text("models:\n")
    lamina(tmp_path, None, "add", "ft", "--local", str(finetune), "--backend", "vllm")
    lamina(tmp_path, None, "add", "q4", "--local", str(gguf))
    text = manifest.read_text()
    assert f"    path: /models/ft/\n    backend: vllm\n    local: {finetune}/\n" in text
    assert f"    path: /models/q4/model.gguf\n    backend: llama.cpp\n    local: {gguf}\n" in text
    models = {m["name"]: m for m in json.loads(lamina(tmp_path, None, "list", "--json").stdout)}
    assert models["q4"]["size"] == gguf.stat().st_size
    missing = lamina(tmp_path, None, "add", "gone", "--local", str(tmp_path / "nope"), check=False)
    assert missing.returncode == 2 and "model 'gone': field 'local'" in missing.stderr
    assert manifest.read_text() == text


@pytest.mark.parametrize("entry, message", [
    ("local: srv/x/", "field 'local': 'srv/x/' is relative"),
    ("local: {missing}", "field 'local': '{missing}' does not exist"),
    ("local: {file}", "field 'local': '{file}' is a file; a directory model"),
    ("hf: org/x\n    local: {dir}", "field 'local': give hf or local, not both"),
], ids=["relative", "missing", "wrong-kind", "beside-hf"])
def test_a_bad_local_entry_stops_the_mount_with_exit_2(tmp_path, entry, message):
    paths = {"missing": tmp_path / "nope", "file": write_bytes(tmp_path / "f.bin", 10, 1), "dir": tmp_path}
    manifest = f"models:\n  x:\n    path: /models/x/\n    backend: vllm\n    {entry.format(**paths)}\n"
    result = lamina(tmp_path, manifest, "mount", str(tmp_path / "mnt"), check=False)
    assert result.returncode == 2
    assert f"model 'x': {message.format(**paths)}" in result.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_a_local_directory_that_holds_the_mountpoint_is_refused(tmp_path):
    write_bytes(tmp_path / "model" / "w.bin", 10, 1)
    manifest = f"models:\n  x:\n    path: /models/x/\n    backend: vllm\n    local: {tmp_path / 'model'}/\n"
    result = lamina(tmp_path, manifest, "mount", str(tmp_path / "model" / "mnt"), check=False)
    assert result.returncode == 2
    assert "model 'x': field 'local'" in result.stderr and "overlap" in result.stderr
    assert not os.path.ismount(tmp_path / "model" / "mnt")


def test_a_refresh_to_a_local_path_under_the_mountpoint_is_refused(served, local_models):
    mount, port = served
    inside = f"  x:\n    path: /models/x/\n    backend: vllm\n    local: {mount.mountpoint}/my-finetune/\n"
    mount.manifest.write_text(manifest_for(*local_models) + inside)
    status, answer = call_api(port, "POST", "/refresh")
    assert status == 400 and "model 'x': field 'local'" in answer["error"] and "overlap" in answer["error"]
    assert sorted(os.listdir(mount.mountpoint)) == ["my-finetune", "tiny-q4"]


def test_the_lock_records_local_files_and_verify_compares_with_it(local_models, tmp_path):
    finetune, gguf = local_models
    out = lamina(tmp_path, manifest_for(finetune, gguf), "lock").stdout
    assert "2 models changed" in out
    lock = json.loads((tmp_path / "cli-models.lock").read_text())["models"]
    digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert lock["tiny-q4"] == {"local": str(gguf), "files": [{"path": "model.gguf", "size": gguf.stat().st_size,
                                                               "sha256": digest}]}
    assert len(lock["my-finetune"]["files"]) == 8
    assert "(matches cli-models.lock)" in lamina(tmp_path, None, "verify", "tiny-q4").stdout
    assert "0 models changed" in lamina(tmp_path, None, "lock").stdout
    with open(finetune / "config.json", "a") as config:
        config.write(" ")
    result = lamina(tmp_path, None, "verify", "my-finetune", check=False)
    assert result.returncode == 1
    assert "my-finetune/config.json: local sha256:" in result.stdout and "DIFFERS from cli-models.lock" in result.stdout
    assert "1 model changed (my-finetune)" in lamina(tmp_path, None, "lock").stdout


def test_metrics_count_the_bytes_read_from_local_files(checked, local_models):
    """Bytes the daemon served (a passed-through open's reads never reach it)."""
    mount, port = checked
    size = len((mount.mountpoint / "tiny-q4" / "model.gguf").read_bytes())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    counted = re.search(r'^lamina_read_bytes_total\{source="local_files"\} (\S+)$', text, re.M)
    assert counted and float(counted.group(1)) >= size
