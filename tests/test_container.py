"""The container image as an operator runs it: built, linted, mounting for the host and for
consumer containers, and healing them when the daemon container is replaced.

The daemon container runs on the host network against the Hub simulator; consumers run with
no network at all and read the model through their volume. Bytes are compared by sha256 of
the whole file against the file the simulator serves. See tests/dockerkit.py for how the
engine, the base image and the build are made on a machine without a registry.
"""

import hashlib
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

import dockerkit
from dockerkit import BASE_IMAGE, IMAGE, REPO
from vfs.testing.hubsim import HubSimulator
from vfs.testing.models import write_gguf

MODEL = "tiny-llama"
GGUF_IN_MOUNT = f"{MODEL}/model.gguf"
MANIFEST = f"""
models:
  {MODEL}:
    path: /models/{MODEL}/model.gguf
    backend: llama.cpp
    hf: org/tiny-GGUF
    file: tiny.Q4_K_M.gguf
"""
ENOTCONN_TEXT = "Transport endpoint is not connected"


# ---------------------------------------------------------------------------
# Without an engine: the Dockerfile's lint and its dependency pins


def test_hadolint_passes_the_dockerfile():
    hadolint = Path(os.environ.get("VIRTUAL_ENV", Path(os.sys.executable).parent.parent)) / "bin" / "hadolint"
    result = subprocess.run([str(hadolint) if hadolint.exists() else "hadolint", str(REPO / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_pins_every_package_the_daemon_imports():
    """The image installs exactly contrib/docker/requirements.txt (the build's `pip check` fails
    otherwise): every runtime dependency, transitively, must be pinned there with ==."""
    from importlib.metadata import requires
    from packaging.requirements import Requirement
    pinned = {}
    for line in (REPO / "contrib" / "docker" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            assert str(requirement.specifier).startswith("=="), f"not pinned: {line}"
            pinned[_canonical(requirement.name)] = requirement
    needed, todo = set(), ["lamina-llm-cache"]
    while todo:
        for text in requires(todo.pop()) or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            name = _canonical(requirement.name)
            if name not in needed:
                needed.add(name)
                todo.append(requirement.name)
                if name in pinned:
                    assert next(iter(pinned[name].specifier)).version in requirement.specifier, \
                        f"requirements.txt pins {pinned[name]}, which does not satisfy {text}"
    assert sorted(needed - set(pinned)) == [], "add these to contrib/docker/requirements.txt, pinned"


def _canonical(name):
    return name.lower().replace("_", "-").replace(".", "-")


# ---------------------------------------------------------------------------
# A private engine, the base image and the image, once per module


@pytest.fixture(scope="module")
def engine():
    dockerkit.check_prerequisites()
    engine = dockerkit.Engine(dockerkit.BUILD / "engine").start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def image(engine):
    dockerkit.make_base_image(engine)
    dockerkit.build_image(engine)
    return IMAGE


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    gguf = tmp_path_factory.mktemp("sources") / "tiny.gguf"
    write_gguf(gguf, size_mib=6)
    with HubSimulator() as simulator:
        simulator.add_repo("org/tiny-GGUF", files={"tiny.Q4_K_M.gguf": gguf})
        simulator.expected_sha256 = hashlib.sha256(gguf.read_bytes()).hexdigest()
        yield simulator


@pytest.fixture
def node(tmp_path, engine, hub):
    """One host's layout: a shared parent directory (with `models` in it), a cache, a manifest."""
    manifest = tmp_path / "models.yaml"
    manifest.write_text(MANIFEST)
    with dockerkit.shared_directory(tmp_path / "lamina") as parent:
        (parent / "models").mkdir()
        yield Node(engine, hub, parent, tmp_path / "cache", manifest)
        engine.remove_all_containers()


class Node:
    """Starts the daemon and consumer containers of one test, in the documented layout."""

    def __init__(self, engine, hub, parent, cache, manifest):
        self.engine, self.hub, self.parent, self.cache, self.manifest = engine, hub, parent, cache, manifest
        self.api_port = dockerkit.free_port()

    def start_daemon(self, name="lamina", parent_volume=None):
        self.engine.docker(
            "run", "-d", "--name", name, "--network", "host",
            "--device", "/dev/fuse", "--cap-add", "SYS_ADMIN", "--security-opt", "apparmor=unconfined",
            "-v", parent_volume or f"{self.parent}:/host:rshared",
            "-v", f"{self.cache}:/var/cache/lamina-llm-cache",
            "-v", f"{self.manifest}:/etc/lamina-llm-cache/models.yaml:ro",
            "-e", f"HF_ENDPOINT={self.hub.endpoint}", "-e", "HF_HUB_DISABLE_XET=1",
            "-e", f"LAMINA_API=127.0.0.1:{self.api_port}", IMAGE)

    def wait_ready(self, name="lamina", timeout=60):
        """Until /readyz answers 200; the daemon's log in the failure if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        logs = self.engine.docker("logs", name, check=False)
        raise AssertionError(f"daemon not ready in {timeout}s:\n{logs.stdout}\n{logs.stderr}")

    def start_consumer(self, name, volume):
        self.engine.docker("run", "-d", "--name", name, "--network", "none", "-v", volume,
                           BASE_IMAGE, "sleep", "3600")

    def sha256_in(self, container, path):
        """sha256 of the whole file as the container reads it, or the error it gets."""
        result = self.engine.docker("exec", container, "sha256sum", path, check=False)
        return result.stdout.split()[0] if result.returncode == 0 else result.stderr.strip()

    def listing_in(self, container, path):
        result = self.engine.docker("exec", container, "ls", "-A", path, check=False)
        return result.stdout.split() if result.returncode == 0 else result.stderr.strip()


# ---------------------------------------------------------------------------
# With the engine


@pytest.mark.slow
def test_the_image_runs_any_subcommand_and_keeps_no_build_settings(engine, image):
    version = engine.docker("run", "--rm", "--entrypoint", "lamina-llm-cache", image, "--version")
    assert version.stdout.startswith("lamina-llm-cache ")
    config = json.loads(engine.docker("image", "inspect", image).stdout)[0]["Config"]
    assert not [v for v in config["Env"] if v.startswith("PIP_")]
    listing = engine.docker("run", "--rm", "--entrypoint", "sh", image, "-c",
                            "command -v pip gcc || true; ls /opt").stdout.split()
    assert listing == ["lamina-llm-cache"], "no pip, no compiler, no build venv in the final image"


@pytest.mark.slow
def test_the_entrypoint_refuses_a_parent_without_shared_propagation(node, image):
    private = node.parent.parent / "private"
    private.mkdir()
    result = node.engine.docker(
        "run", "--rm", "--device", "/dev/fuse", "--cap-add", "SYS_ADMIN", "--network", "none",
        "-v", f"{private}:/host", "-v", f"{node.manifest}:/etc/lamina-llm-cache/models.yaml:ro", image,
        check=False)
    assert result.returncode == 2
    assert "/host is not on a shared mount" in result.stderr
    assert "-v /var/lib/lamina-llm-cache:/host:rshared" in result.stderr


@pytest.mark.slow
def test_mount_refuses_a_volume_target_naming_the_layout_that_heals(node, image):
    """Volume target = mount point: a restart could never heal it, so `mount` says what to do."""
    node.engine.docker("run", "-d", "--name", "lamina", "--network", "host", "--device", "/dev/fuse",
                       "--cap-add", "SYS_ADMIN", "-v", f"{node.parent / 'models'}:/models:rshared",
                       "-v", f"{node.manifest}:/etc/lamina-llm-cache/models.yaml:ro",
                       "-e", "LAMINA_MOUNTPOINT=/models", "-e", f"HF_ENDPOINT={node.hub.endpoint}",
                       "-e", "HF_HUB_DISABLE_XET=1", "-e", "LAMINA_API=", image)
    exit_code = node.engine.docker("wait", "lamina", timeout=60).stdout.strip()
    logs = node.engine.docker("logs", "lamina").stderr
    assert exit_code == "1"
    assert "/models is itself a mount point" in logs and "mount /host/models" in logs


@pytest.mark.slow
def test_consumers_read_exact_bytes_and_heal_when_the_daemon_container_is_replaced(node, image):
    expected = node.hub.expected_sha256
    child = f"{node.parent / 'models'}:/models:ro,rslave"
    # Started before the daemon: one binding the models child with rslave, one with the default.
    node.start_consumer("before-rslave", child)
    node.start_consumer("before-private", f"{node.parent / 'models'}:/models:ro")
    node.start_daemon()
    node.wait_ready()

    assert hashlib.sha256((node.parent / "models" / GGUF_IN_MOUNT).read_bytes()).hexdigest() == expected
    assert node.sha256_in("before-rslave", f"/models/{GGUF_IN_MOUNT}") == expected
    assert node.listing_in("before-private", "/models") == [], "default propagation never sees the mount"
    # Started after the mount: one binding the parent (the documented layout), one the child.
    node.start_consumer("after-parent", f"{node.parent}:/lamina:ro,rslave")
    node.start_consumer("after-child", child)
    assert node.sha256_in("after-parent", f"/lamina/models/{GGUF_IN_MOUNT}") == expected
    assert node.sha256_in("after-child", f"/models/{GGUF_IN_MOUNT}") == expected

    for replace in ("kill", "stop"):            # the daemon killed (dead mount), then stopped cleanly
        node.engine.docker(*(["rm", "-f"] if replace == "kill" else ["stop", "-t", "30"]), "lamina")
        if replace == "stop":
            node.engine.docker("rm", "lamina")
        node.start_daemon()
        node.wait_ready()
        if replace == "kill":
            assert "left a dead mount; clearing it" in node.engine.docker("logs", "lamina").stderr
        # Healed, with no consumer restarted: the host, the consumer started before the first
        # mount, and the one started after it that binds the parent directory.
        assert hashlib.sha256((node.parent / "models" / GGUF_IN_MOUNT).read_bytes()).hexdigest() == expected
        assert node.sha256_in("before-rslave", f"/models/{GGUF_IN_MOUNT}") == expected, replace
        assert node.sha256_in("after-parent", f"/lamina/models/{GGUF_IN_MOUNT}") == expected, replace
        # The documented limit: a consumer that bound the FUSE mount itself keeps it, dead.
        assert ENOTCONN_TEXT in node.sha256_in("after-child", f"/models/{GGUF_IN_MOUNT}"), replace
    logs = node.engine.docker("logs", "lamina").stderr        # after a clean stop: nothing to clear
    assert " WARNING " not in logs and " ERROR " not in logs, logs
