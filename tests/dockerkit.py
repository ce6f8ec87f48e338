"""A private Docker engine for the container tests: its own dockerd, a debootstrapped base, the image.

No image registry is reachable from the machines these tests run on, and no Docker engine
runs there. So the tests do what an operator of such a machine would:

- start Debian's dockerd as root with `--iptables=false --bridge=none` and its own data
  root, exec root and socket (`DOCKER_HOST`); containers use the host network or none;
- make a Debian bookworm base image with `debootstrap --variant=minbase` and
  `docker import` (python3 and python3-venv included, nothing else of Python);
- build the project's Dockerfile on it, with `--network host`, pip reading wheels that the
  host's pip built and that a local HTTP server hands out (`PIP_FIND_LINKS`,
  `PIP_NO_INDEX` as build arguments): the host's pip settings never enter the image.

The engine's data root and the base image's tarball live in build/docker/ and are kept
between runs, so a second run reuses the base and the build's cached layers. Anything
these tests cannot do is reported loudly: in CI a failure, elsewhere a skip with the reason.
"""

import contextlib
import functools
import http.server
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build" / "docker"
BASE_IMAGE = "lamina-test-base:bookworm"
IMAGE = "lamina-llm-cache:test"
DEBIAN_MIRROR = os.environ.get("LAMINA_DEBIAN_MIRROR", "http://deb.debian.org/debian")
APT_SOURCES = f"""\
deb {DEBIAN_MIRROR} bookworm main
deb {DEBIAN_MIRROR} bookworm-updates main
deb {DEBIAN_MIRROR}-security bookworm-security main
"""
TOOLS = {"dockerd": "docker.io", "debootstrap": "debootstrap", "docker-compose": "docker-compose"}


def cannot_run(reason: str):
    """In CI these tests must run: fail there; elsewhere skip, with the reason either way."""
    if os.environ.get("CI"):
        pytest.fail(f"container tests cannot run: {reason}", pytrace=False)
    pytest.skip(f"container tests cannot run: {reason}")


def docker_client() -> str | None:
    """Debian's docker client beside its dockerd (another client may come first on PATH)."""
    return shutil.which("docker", path="/usr/bin:/bin") or shutil.which("docker")


def check_prerequisites():
    if os.geteuid() != 0:
        cannot_run("dockerd and FUSE in containers need root")
    if not os.path.exists("/dev/fuse"):
        cannot_run("no /dev/fuse on this machine")
    missing = [f"{tool} (apt package {package})" for tool, package in TOOLS.items() if not shutil.which(tool)]
    if missing or docker_client() is None:
        cannot_run("missing " + ", ".join(missing or ["docker"]) +
                   ": `make test` installs them (contrib/install-system-deps.sh)")


class Engine:
    """One dockerd with its own data root and socket; `docker(...)` runs the client against it."""

    def __init__(self, data_root: Path):
        self.data_root = data_root
        self.run_dir = Path(tempfile.mkdtemp(prefix="lamina-dockerd-"))
        self.socket = self.run_dir / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}
        self.log_path = BUILD / "dockerd.log"
        self.process = None

    def start(self, timeout: float = 60):
        self.data_root.mkdir(parents=True, exist_ok=True)
        command = ["dockerd", "--iptables=false", "--ip-masq=false", "--bridge=none",
                   "--data-root", str(self.data_root), "--exec-root", str(self.run_dir / "exec"),
                   "--pidfile", str(self.run_dir / "dockerd.pid"), "--host", self.env["DOCKER_HOST"]]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.docker("version", check=False, timeout=10).returncode == 0:
                return self
            time.sleep(0.5)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        self.stop()
        cannot_run(f"dockerd did not start within {timeout:g}s; its log ends:\n{tail}")

    def docker(self, *args, check=True, timeout=120, input=None) -> subprocess.CompletedProcess:
        result = subprocess.run([docker_client(), *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    def remove_all_containers(self):
        ids = self.docker("ps", "-aq", check=False).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False, timeout=120)

    def stop(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.remove_all_containers()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # dockerd leaves its default network namespace mounted under the exec root.
        subprocess.run(["umount", "--lazy", str(self.run_dir / "exec" / "netns" / "default")],
                       capture_output=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.process = None


def make_base_image(engine: Engine):
    """BASE_IMAGE from a cached debootstrap tarball; debootstrap (a minute or two) only once."""
    if engine.has_image(BASE_IMAGE):
        return
    tarball = BUILD / "bookworm-minbase.tar"
    if not tarball.exists():
        debootstrap_tarball(tarball)
    with open(tarball, "rb") as source:
        subprocess.run([docker_client(), "import", "-", BASE_IMAGE], stdin=source, env=engine.env,
                       check=True, capture_output=True, timeout=300)


def debootstrap_tarball(tarball: Path):
    rootfs = BUILD / "rootfs.partial"
    shutil.rmtree(rootfs, ignore_errors=True)
    result = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv",
                             "bookworm", str(rootfs), DEBIAN_MIRROR], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        shutil.rmtree(rootfs, ignore_errors=True)
        cannot_run(f"debootstrap of bookworm from {DEBIAN_MIRROR} failed:\n{result.stdout[-2000:]}")
    (rootfs / "etc" / "apt" / "sources.list").write_text(APT_SOURCES)     # as Debian's images have it
    partial = tarball.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True, timeout=300)
    partial.rename(tarball)
    shutil.rmtree(rootfs, ignore_errors=True)


def build_image(engine: Engine, tag: str = IMAGE):
    """docker build of the project's Dockerfile on BASE_IMAGE, pip reading host-built wheels
    and pyfuse3's source, which the image patches and builds itself."""
    wheels = BUILD / "wheels"
    requirements = REPO / "contrib" / "docker"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--quiet", "-w", str(wheels),
                    "-r", str(requirements / "requirements.txt"),
                    "-r", str(requirements / "build-requirements.txt")],
                   check=True, capture_output=True, timeout=600)
    subprocess.run([*pip, "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", str(wheels),
                    pinned_pyfuse3()], check=True, capture_output=True, timeout=600)
    with serve_directory(wheels) as url:
        engine.docker("build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                      "--build-arg", "PIP_NO_INDEX=1", "--build-arg", f"PIP_FIND_LINKS={url}",
                      "-t", tag, str(REPO), timeout=1200)


def pinned_pyfuse3() -> str:
    """pyfuse3's line of contrib/docker/requirements.txt ("pyfuse3==X")."""
    lines = (REPO / "contrib" / "docker" / "requirements.txt").read_text().splitlines()
    return next(line.strip() for line in lines if line.lower().startswith("pyfuse3=="))


@contextlib.contextmanager
def serve_directory(directory: Path):
    """An HTTP server on 127.0.0.1 listing `directory` (what pip's find-links reads)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def shared_directory(path: Path):
    """`path` bind-mounted onto itself with shared propagation: the parent of the layout that heals.

    On a host whose root mount is shared (systemd's default) any directory will do; these
    machines mount everything private, so the test makes the shared mount itself.
    """
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "--make-shared", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--recursive", "--lazy", str(path)], capture_output=True)


def free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
