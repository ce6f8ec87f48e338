"""The command line as a user meets it: list, info, pull, verify, gc, keep, mount failures, background."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import eventually, needs_fuse
from vfs.testing.hubsim import Fault
from vfs.testing.mounts import isolated_environment

MiB = 1024 * 1024

MANIFEST = """
models:
  big:
    path: /models/big/model.gguf
    backend: llama.cpp
    hf: org/big
    file: big.gguf
  small:
    path: /models/small/
    backend: vllm
    hf: org/small
  by-hand:
    path: /models/by-hand/
    backend: llama.cpp
"""


@pytest.fixture
def workspace(hub, tmp_path, random_file):
    big = random_file("big.gguf", 5 * MiB + 3)
    hub.add_repo("org/big", files={"big.gguf": big})
    hub.add_repo("org/small", files={"model.safetensors": random_file("s.safetensors", MiB, seed=3),
                                     "config.json": b"{}\n"})
    (tmp_path / "models.yaml").write_text(MANIFEST)
    return tmp_path


def run_cli(workspace, hub, *args, env=None, check=True, endpoint=None, python=("-m", "vfs")):
    command = [sys.executable, *python, *args]
    if args[0] not in ("unmount",):
        command += ["-m", str(workspace / "models.yaml"), "--cache-dir", str(workspace / "cache"),
                    "--endpoint", endpoint or hub.endpoint]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env=isolated_environment(workspace, env))
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_list_shows_every_model_with_size_before_anything_is_cached(workspace, hub):
    out = run_cli(workspace, hub, "list").stdout
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "BACKEND", "SIZE", "CACHED"]
    big = next(line for line in lines if line.startswith("big "))
    assert "5.0 MiB" in big and "0%" in big and "/models/big/model.gguf" in big
    assert any(line.startswith("by-hand ") for line in lines)


def test_list_json_and_info_report_per_file_cache_state(workspace, hub):
    run_cli(workspace, hub, "pull", "big")
    models = {m["name"]: m for m in json.loads(run_cli(workspace, hub, "list", "--json").stdout)}
    assert models["big"]["cached_bytes"] == models["big"]["size"] == 5 * MiB + 3
    assert models["big"]["files"][0]["verified"] is True
    assert models["small"]["cached_bytes"] == 0
    info = run_cli(workspace, hub, "info", "big").stdout
    assert "commit" in info and "verified" in info and "big.gguf" in info
    detail = json.loads(run_cli(workspace, hub, "info", "small", "--json").stdout)
    assert {f["path"] for f in detail["files"]} == {"model.safetensors", "config.json"}


def test_info_of_an_unknown_model_is_a_usage_error(workspace, hub):
    result = run_cli(workspace, hub, "info", "nope", check=False)
    assert result.returncode == 2
    assert "no model named 'nope'" in result.stderr


def test_pull_fetches_everything_verifies_and_is_resumable(workspace, hub):
    out = run_cli(workspace, hub, "pull", "--all").stdout
    assert "3 of 3 files complete and verified" in out
    sent = hub.bytes_sent(origin="cdn")
    assert sent >= 6 * MiB
    again = run_cli(workspace, hub, "pull", "--all").stdout
    assert "3 of 3" in again
    assert hub.bytes_sent(origin="cdn") == sent         # nothing fetched twice


def test_pull_reports_a_model_whose_bytes_never_match(workspace, hub):
    hub.add_fault(Fault("wrong_bytes", origin="cdn", path="big.gguf"))
    result = run_cli(workspace, hub, "pull", "big", check=False)
    assert result.returncode == 1
    assert "does not match" in result.stderr
    assert json.loads(run_cli(workspace, hub, "info", "big", "--json").stdout)["files"][0]["verified"] is False


def test_verify_finds_a_rotten_blob_and_discards_it(workspace, hub):
    run_cli(workspace, hub, "pull", "big")
    content_id = json.loads(run_cli(workspace, hub, "info", "big", "--json").stdout)["files"][0]["content_id"]
    algo, digest = content_id.split(":")
    data = workspace / "cache" / "blobs" / algo / digest[:2] / f"{digest}.data"
    with open(data, "r+b") as blob:
        blob.seek(100)
        blob.write(b"rot")
    result = run_cli(workspace, hub, "verify", "big", check=False)
    assert result.returncode == 1
    assert "MISMATCH" in result.stdout
    assert json.loads(run_cli(workspace, hub, "info", "big", "--json").stdout)["cached_bytes"] == 0
    assert "1 of 1" in run_cli(workspace, hub, "pull", "big").stdout


def test_gc_evicts_to_a_size_but_keeps_kept_models(workspace, hub):
    run_cli(workspace, hub, "pull", "--all")
    run_cli(workspace, hub, "keep", "big")
    run_cli(workspace, hub, "gc", "--max-size", "1M")
    state = {m["name"]: m["cached_bytes"] for m in json.loads(run_cli(workspace, hub, "list", "--json").stdout)}
    assert state["big"] == 5 * MiB + 3 and state["small"] == 0
    run_cli(workspace, hub, "unkeep", "big")
    run_cli(workspace, hub, "gc", "--max-size", "0")
    assert json.loads(run_cli(workspace, hub, "list", "--json").stdout)[0]["cached_bytes"] == 0


def test_pin_and_unpin_are_the_old_names_of_keep_and_unkeep(workspace, hub):
    run_cli(workspace, hub, "pull", "--all")
    assert "kept big" in run_cli(workspace, hub, "pin", "big").stdout
    run_cli(workspace, hub, "gc", "--max-size", "0")
    state = {m["name"]: m for m in json.loads(run_cli(workspace, hub, "list", "--json").stdout)}
    assert state["big"]["cached_bytes"] == 5 * MiB + 3
    assert "no longer keeping big" in run_cli(workspace, hub, "unpin", "big").stdout
    run_cli(workspace, hub, "gc", "--max-size", "0")
    assert json.loads(run_cli(workspace, hub, "list", "--json").stdout)[0]["cached_bytes"] == 0


def test_gc_without_a_size_drops_blobs_no_model_names(workspace, hub):
    run_cli(workspace, hub, "pull", "--all")
    (workspace / "models.yaml").write_text(MANIFEST.replace("  small:\n    path: /models/small/\n"
                                                            "    backend: vllm\n    hf: org/small\n", ""))
    out = run_cli(workspace, hub, "gc").stdout
    assert "evicted 2 blobs" in out
    assert json.loads(run_cli(workspace, hub, "list", "--json").stdout)[0]["cached_bytes"] == 5 * MiB + 3


# The CLI in-process, then the modules it loaded: a cache-only command must never load the
# kernel side (pyfuse3), nor build a reader or a fetcher it does not use.
WHAT_IT_LOADED = """
import json, sys
from vfs.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "pyfuse3": "pyfuse3" in sys.modules, "mount": "vfs.mount" in sys.modules,
                  "ops": "vfs.ops" in sys.modules}))
"""


@pytest.mark.parametrize("command", [("list",), ("info", "big"), ("gc", "--max-size", "1M"), ("gc",),
                                     ("verify", "big"), ("keep", "big"), ("unkeep", "big"), ("pull", "small"),
                                     ("wait", "big", "--cached")])
def test_cache_only_commands_never_load_pyfuse3(workspace, hub, command):
    run_cli(workspace, hub, "pull", "big")
    out = run_cli(workspace, hub, *command, python=("-c", WHAT_IT_LOADED)).stdout
    loaded = json.loads(out.splitlines()[-1])
    assert loaded == {"code": 0, "pyfuse3": False, "mount": False, "ops": False}


def unreachable_endpoint():
    """An address nothing listens on: every connect is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_list_info_gc_and_verify_work_with_the_hub_unreachable(workspace, hub):
    run_cli(workspace, hub, "pull", "big")
    dead = unreachable_endpoint()
    assert "1 of 1 files complete" in run_cli(workspace, hub, "pull", "big", endpoint=dead).stdout
    with open(workspace / "models.yaml", "a") as manifest:      # a model this cache never resolved
        manifest.write("  late:\n    path: /models/late/\n    backend: vllm\n    hf: org/late\n")
    assert "1 of 1 files complete" in run_cli(workspace, hub, "pull", "big", endpoint=dead).stdout  # late is not pulled
    models = {m["name"]: m for m in json.loads(run_cli(workspace, hub, "list", "--json", endpoint=dead).stdout)}
    assert models["big"]["cached_bytes"] == 5 * MiB + 3 and models["big"]["verified"] is True
    assert models["late"]["ready"] is False and models["late"]["commit"] is None   # never resolved: said so
    assert "big.gguf" in run_cli(workspace, hub, "info", "big", endpoint=dead).stdout
    assert "1 ok" in run_cli(workspace, hub, "verify", "big", endpoint=dead).stdout
    assert "late: never resolved in this cache" in run_cli(workspace, hub, "verify", "late", endpoint=dead).stdout
    assert "evicted 0 blobs" in run_cli(workspace, hub, "gc", endpoint=dead).stdout
    assert json.loads(run_cli(workspace, hub, "list", "--json", endpoint=dead).stdout)[0]["cached_bytes"] == 5 * MiB + 3


def test_pull_of_an_uncached_model_needs_the_hub_and_says_so(workspace, hub):
    result = run_cli(workspace, hub, "pull", "small", endpoint=unreachable_endpoint(), check=False)
    assert result.returncode == 1
    assert "org/small@main: Hub unreachable" in result.stderr    # the model pulled, not another
    assert "org/big" not in result.stderr


# What a plain `pip install .` lacks: the test extras. Blocked, an import of them fails.
WITHOUT_TEST_EXTRAS = """
import sys
for name in ("numpy", "gguf", "safetensors", "torch", "huggingface_hub"):
    sys.modules[name] = None
from vfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_demo_generates_its_models_without_the_test_extras(tmp_path):
    # The generation alone, no mount: any user can run this.
    blocked = WITHOUT_TEST_EXTRAS.replace("from vfs.cli import main\nsys.exit(main(sys.argv[1:]))",
                                          "from vfs.testing.models import demo_simulator\ndemo_simulator().stop()")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@needs_fuse
def test_demo_mounts_and_unmounts_on_ctrl_c_without_the_test_extras(tmp_path):
    mountpoint = tmp_path / "demo"
    demo = subprocess.Popen([sys.executable, "-c", WITHOUT_TEST_EXTRAS, "demo", str(mountpoint)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=isolated_environment(tmp_path))
    try:
        assert "Mounted at" in "".join(_lines_until(demo.stdout, "Ctrl-C"))
        assert (mountpoint / "tiny-llama" / "model.gguf").open("rb").read(4) == b"GGUF"
        assert json.loads((mountpoint / "tiny-safetensors" / "config.json").read_text())["model_type"] == "llama"
    finally:
        demo.send_signal(signal.SIGINT)
        _, stderr = demo.communicate(timeout=30)
    assert demo.returncode == 0, stderr
    assert not os.path.ismount(mountpoint)


def _lines_until(stream, marker):
    lines = []
    for line in stream:
        lines.append(line)
        if marker in line:
            break
    return lines


def test_add_puts_a_model_in_the_manifest(workspace, hub):
    run_cli(workspace, hub, "add", "extra", "--hf", "org/big", "--file", "big.gguf")
    text = (workspace / "models.yaml").read_text()
    assert "extra:" in text and "/models/extra/model.gguf" in text
    assert any(line.startswith("extra ") for line in run_cli(workspace, hub, "list").stdout.splitlines())


def test_a_cache_of_an_unknown_format_is_refused(workspace, hub):
    run_cli(workspace, hub, "list")
    (workspace / "cache" / "format").write_text("lamina-llm-cache cache\nformat 99\nblock_size 8388608\n")
    result = run_cli(workspace, hub, "list", check=False)
    assert result.returncode == 1
    assert "cache format 99 is not supported" in result.stderr


@pytest.mark.parametrize("repo, message", [
    ("org/missing", "model 'big': org/missing@main: repository not found"),
])
def test_a_mount_that_cannot_start_says_why_and_exits_non_zero(workspace, hub, repo, message):
    (workspace / "models.yaml").write_text(MANIFEST.replace("hf: org/big", f"hf: {repo}"))
    result = run_cli(workspace, hub, "mount", str(workspace / "mnt"), check=False)
    assert result.returncode == 1
    assert message in result.stderr


def test_a_bad_manifest_exits_2_before_mounting(workspace, hub):
    (workspace / "models.yaml").write_text("models:\n  bad name:\n    path: /models/x/\n    backend: vllm\n")
    result = run_cli(workspace, hub, "mount", str(workspace / "mnt"), check=False)
    assert result.returncode == 2
    assert "models.yaml" in result.stderr and "bad name" in result.stderr


@needs_fuse
def test_background_mount_returns_when_ready_and_unmount_ends_it(workspace, hub):
    mountpoint = workspace / "mnt"
    out = run_cli(workspace, hub, "mount", str(mountpoint), "--background").stdout
    try:
        assert "mounted" in out
        assert sorted(os.listdir(mountpoint)) == ["big", "by-hand", "small"]
        assert (mountpoint / "small" / "config.json").read_bytes() == b"{}\n"
    finally:
        run_cli(workspace, hub, "unmount", str(mountpoint))
    assert eventually(lambda: not os.path.ismount(mountpoint))


@needs_fuse
def test_background_mount_failure_is_reported_by_the_parent(workspace, hub):
    (workspace / "models.yaml").write_text(MANIFEST.replace("hf: org/small", "hf: org/nothing-here"))
    result = run_cli(workspace, hub, "mount", str(workspace / "mnt"), "--background", check=False)
    assert result.returncode == 1
    assert "model 'small'" in result.stderr and "not found" in result.stderr


@needs_fuse
def test_pull_while_mounted_shares_the_cache(workspace, hub, mount_factory):
    mount = mount_factory(MANIFEST, hub.endpoint, cache_dir=workspace / "cache")
    run_cli(workspace, hub, "pull", "big")
    sent = hub.bytes_sent(origin="cdn")
    assert (mount.mountpoint / "big" / "model.gguf").read_bytes() == (workspace / "sources" / "big.gguf").read_bytes()
    assert hub.bytes_sent(origin="cdn") == sent
