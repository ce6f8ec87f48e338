"""Liveness and readiness as a probe meets them: /healthz, /readyz, and `health` from outside.

A probe must never hang: a wedged mount answers 503 (or exit 1) within the probe's
timeout, a dead one names ENOTCONN, and blocked statvfs calls never pile up.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import trio

from conftest import eventually, needs_fuse
from faultkit import MiB, run_cli
from vfs.api import Api
from vfs.health import Health, MountProbe
from vfs.manifest import load_manifest
from vfs.testing.mounts import isolated_environment

MANIFEST = """
models:
  big:
    path: /models/big/model.gguf
    backend: llama.cpp
    hf: org/big
    file: big.gguf
  by-hand:
    path: /models/by-hand/
    backend: llama.cpp
"""


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(port, path, timeout=30):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as failure:
        return failure.code, json.loads(failure.read())


@pytest.fixture
def big(hub, random_file):
    source = random_file("big.gguf", 3 * MiB + 5)
    hub.add_repo("org/big", files={"big.gguf": source})
    return source.read_bytes()


@pytest.fixture
def served(hub, big, mount_factory):
    port = free_port()
    mount = mount_factory(MANIFEST, hub.endpoint, args=("--block-size", "1M", "--api", f"127.0.0.1:{port}"))
    return mount, port


@needs_fuse
@pytest.mark.fuse
def test_a_serving_mount_is_healthy_and_ready(served):
    mount, port = served
    status, health = call(port, "/healthz")
    assert (status, health["healthy"], health["status"]) == (200, True, "ok")
    assert health["mountpoint"] == str(mount.mountpoint)
    assert call(port, "/readyz") == (200, {"ready": True, "models": []})


@needs_fuse
@pytest.mark.fuse
def test_a_model_shows_ready_cached_fraction_and_verified(served, big):
    mount, port = served
    status, model = call(port, "/models/big")
    assert status == 200 and model["ready"] is True
    assert (model["cached_fraction"], model["verified"]) == (0.0, False)
    assert (mount.mountpoint / "big" / "model.gguf").read_bytes() == big
    assert eventually(lambda: call(port, "/models/big")[1]["verified"], timeout=30)
    assert call(port, "/models/big")[1]["cached_fraction"] == 1.0
    by_hand = call(port, "/models/by-hand")[1]
    assert (by_hand["ready"], by_hand["cached_fraction"], by_hand["verified"]) == (True, 1.0, True)


def stopped(process):
    """A daemon frozen by SIGSTOP: its mount is wedged (nothing answers FUSE requests)."""
    os.kill(process.pid, signal.SIGSTOP)
    return process


def api_for(mountpoint, timeout, max_stuck=2):
    api = Api(SimpleNamespace(), mountpoint)
    api.probe = MountProbe(mountpoint, timeout=timeout, max_stuck=max_stuck)
    return api


@needs_fuse
@pytest.mark.fuse
async def test_healthz_of_a_wedged_mount_answers_503_in_time_and_blocked_probes_never_pile_up(served):
    # /healthz's own code, pointed at a mount whose daemon is frozen: a daemon cannot freeze
    # its own FUSE side and keep its loop, so the frozen one is another process.
    mount, _ = served
    api = api_for(mount.mountpoint, timeout=0.5)
    try:
        stopped(mount.process)
        started = trio.current_time()
        answers = [await api.route("GET", "/healthz") for _ in range(4)]
        waited = trio.current_time() - started
    finally:
        os.kill(mount.process.pid, signal.SIGCONT)
    print(f"4 probes of a frozen daemon's mount in {waited:.2f}s: {answers}")
    assert [(status, body["status"]) for status, body in answers] == [(503, "wedged")] * 4
    assert "did not return within 0.5s" in answers[0][1]["reason"]
    assert all("still blocked" in body["reason"] for _, body in answers[2:])
    assert waited < 2 * 0.5 + 0.5            # only the first two waited; the rest answered at once
    with trio.fail_after(10):
        while (await api.route("GET", "/healthz"))[0] != 200:
            await trio.sleep(0.1)


@needs_fuse
@pytest.mark.fuse
async def test_healthz_of_a_dead_mount_answers_503_naming_enotconn(served):
    mount, _ = served
    mount.process.kill()
    mount.process.wait()
    status, body = await api_for(mount.mountpoint, timeout=2).route("GET", "/healthz")
    print(f"/healthz of a dead mount: {status} {body}")
    assert (status, body["healthy"], body["status"]) == (503, False, "dead") and "ENOTCONN" in body["reason"]


@needs_fuse
@pytest.mark.fuse
def test_a_killed_daemon_leaves_a_dead_mount_that_the_health_command_names(served, tmp_path):
    mount, port = served
    status, out, _, _ = run_cli("health", mount.mountpoint, home=tmp_path)
    assert status == 0 and json.loads(out)["status"] == "ok"
    mount.process.kill()
    mount.process.wait()
    status, out, err, seconds = run_cli("health", mount.mountpoint, home=tmp_path)
    answer = json.loads(out)
    print(f"health of a dead mount: exit {status} after {seconds:.2f}s: {answer}")
    assert status == 1 and (answer["healthy"], answer["status"]) == (False, "dead")
    assert "ENOTCONN" in answer["reason"]
    # The daemon's own /healthz went with it: an HTTP probe sees the connection refused.
    with pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert isinstance(refused.value.reason, ConnectionRefusedError)


@needs_fuse
@pytest.mark.fuse
def test_the_health_command_on_a_wedged_mount_exits_1_within_its_timeout(served, tmp_path):
    mount, _ = served
    try:
        stopped(mount.process)
        status, out, _, seconds = run_cli("health", mount.mountpoint, "--timeout", "0.5", home=tmp_path)
    finally:
        os.kill(mount.process.pid, signal.SIGCONT)
    print(f"health of a frozen daemon's mount: exit {status} after {seconds:.2f}s: {out.strip()}")
    assert status == 1 and json.loads(out)["status"] == "wedged"
    assert seconds < 8        # the interpreter's start on a loaded machine, plus the 0.5 s


class HealthyProbe:
    async def check(self):
        return Health("ok", "/models")


async def test_readyz_waits_for_the_mount_and_lists_each_unresolved_model_with_why(tmp_path):
    (tmp_path / "models.yaml").write_text(MANIFEST)
    manifest = load_manifest(tmp_path / "models.yaml")
    api = Api(SimpleNamespace(manifest=manifest, snapshots={"big": None, "by-hand": None}), tmp_path)
    api.probe = HealthyProbe()
    status, answer = await api.route("GET", "/readyz")
    assert status == 503 and answer["reason"] == "the mount is not serving yet"
    api.serving = True
    status, answer = await api.route("GET", "/readyz")
    assert status == 503 and [m["name"] for m in answer["models"]] == ["big"]
    assert "not resolved" in answer["models"][0]["why"]
    api.fs.snapshots["big"] = object()
    assert await api.route("GET", "/readyz") == (200, {"ready": True, "models": []})


async def test_a_probe_of_a_directory_that_is_no_mount_says_so(tmp_path):
    health = await MountProbe(tmp_path).check()
    assert (health.ok, health.status) == (False, "not mounted")


@needs_fuse
@pytest.mark.fuse
def test_a_sandbox_without_dev_fuse_gets_one_clear_error_not_a_traceback(hub, big, tmp_path):
    # systemd's PrivateDevices= does this to a daemon: /dev/fuse is not the FUSE device.
    (tmp_path / "models.yaml").write_text(MANIFEST)
    command = [sys.executable, "-m", "vfs", "mount", str(tmp_path / "mnt"), "-m", str(tmp_path / "models.yaml"),
               "--cache-dir", str(tmp_path / "cache"), "--endpoint", hub.endpoint]
    result = subprocess.run(["unshare", "--mount", "sh", "-c", 'mount --bind /dev/null /dev/fuse && exec "$@"',
                             "sh", *command], capture_output=True, text=True, timeout=60,
                            env=isolated_environment(tmp_path))
    print(result.stderr)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "lamina-llm-cache: error: could not mount" in result.stderr and "/dev/fuse" in result.stderr
