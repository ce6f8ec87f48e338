#!/usr/bin/env python3
"""The systemd unit's file descriptor store under a real systemd (contrib/SYSTEMD.md, "The trial").

systemd 252 boots as PID 1 in a Docker container made from a Debian bookworm tree
(debootstrap, `docker import`), with /dev/fuse, this checkout and its venv bound in at
the same paths. contrib/lamina-llm-cache.service is installed there with only its
ExecStart changed (this venv, the Hub simulator running on the host, `--no-passthrough`
so that every read reaches the daemon). With the three readers of vfs.testing.readers
reading the mount inside that container, keeper and child are SIGKILLed (`systemctl kill
-s KILL`) and the unit is started again (`systemctl restart`). The readers must see 0
errors and 0 wrong bytes, and the unit's new keeper must adopt the stored connection.

    sudo .venv/bin/python contrib/systemd-trial.py        # prints what happened; exit 0 if all held

Needs what tests/test_container.py needs (root, dockerd, debootstrap); the engine's data
and the systemd tree's tarball are kept in build/docker/.
"""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

import dockerkit  # noqa: E402
from vfs.testing.hubsim import HubSimulator  # noqa: E402
from vfs.testing.models import write_gguf  # noqa: E402

IMAGE = "lamina-test-systemd:bookworm"
TARBALL = dockerkit.BUILD / "bookworm-systemd.tar"
PACKAGES = "systemd,systemd-sysv,dbus,fuse3,procps,python3"
UNIT = "lamina-llm-cache"
WORK = Path("/var/tmp/lamina-systemd-trial")        # bound into the container at the same path


def make_image(engine) -> None:
    if engine.has_image(IMAGE):
        return
    if not TARBALL.exists():
        rootfs = dockerkit.BUILD / "systemd-rootfs.partial"
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(rootfs),
                        dockerkit.DEBIAN_MIRROR], check=True, capture_output=True, timeout=1200)
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(TARBALL), "."], check=True)
        subprocess.run(["rm", "-rf", str(rootfs)], check=True)
    with open(TARBALL, "rb") as source:
        subprocess.run([dockerkit.docker_client(), "import", "-", IMAGE], stdin=source, env=engine.env,
                       check=True, capture_output=True)


def unit_text(endpoint: str) -> str:
    """The shipped unit, ExecStart pointed at this venv and the simulator."""
    lines, out, skipping = (REPO / "contrib" / f"{UNIT}.service").read_text().splitlines(), [], False
    for line in lines:
        if line.startswith("ExecStart="):
            out.append(f"ExecStart={REPO}/.venv/bin/lamina-llm-cache mount /models -m {WORK}/models.yaml "
                       f"--cache-dir {WORK}/cache --endpoint {endpoint} --no-passthrough --log-format json")
            out.append("Environment=HF_HUB_DISABLE_XET=1")
            skipping = line.endswith("\\")
            continue
        if skipping:
            skipping = line.endswith("\\")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    gguf = write_gguf(WORK / "tiny.gguf", size_mib=6)
    engine = dockerkit.Engine(dockerkit.BUILD / "engine").start()
    try:
        make_image(engine)
        with HubSimulator() as hub:
            hub.add_repo("org/tiny-GGUF", files={"tiny.Q4_K_M.gguf": gguf})
            (WORK / "models.yaml").write_text("models:\n  tiny-llama:\n    path: /models/tiny-llama/model.gguf\n"
                                              "    backend: llama.cpp\n    hf: org/tiny-GGUF\n"
                                              "    file: tiny.Q4_K_M.gguf\n")
            return trial(engine, hub, gguf)
    finally:
        engine.stop()


def trial(engine, hub, gguf) -> int:
    base = Path(sys.base_prefix).resolve()
    engine.docker("run", "-d", "--name", "sysd", "--network", "host", "--cgroupns", "host",
                  "--cap-add", "SYS_ADMIN", "--device", "/dev/fuse", "--security-opt", "apparmor=unconfined",
                  "--security-opt", "seccomp=unconfined", "--tmpfs", "/run", "--tmpfs", "/run/lock",
                  "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "-v", f"{REPO}:{REPO}:ro", "-v", f"{base}:{base}:ro",
                  "-v", f"{WORK}:{WORK}", "-e", "container=docker", IMAGE, "/lib/systemd/systemd")
    try:
        return run_in(engine, hub, gguf)
    finally:
        print(engine.docker("exec", "sysd", "journalctl", "-u", UNIT, "--no-pager", "-o", "cat",
                            check=False).stdout[-6000:])
        engine.docker("rm", "-f", "sysd", check=False)


def sh(engine, command, check=True, timeout=120):
    return engine.docker("exec", "sysd", "sh", "-c", command, check=check, timeout=timeout)


def run_in(engine, hub, gguf) -> int:
    deadline = time.monotonic() + 60
    while sh(engine, "systemctl is-system-running", check=False).stdout.strip() not in ("running", "degraded"):
        if time.monotonic() > deadline:
            raise SystemExit("systemd did not come up: " + sh(engine, "systemctl is-system-running", check=False).stdout)
        time.sleep(1)
    engine.docker("exec", "-i", "sysd", "sh", "-c", f"cat > /etc/systemd/system/{UNIT}.service",
                  input=unit_text(hub.endpoint))
    sh(engine, f"mkdir -p /models && systemctl daemon-reload && systemctl start {UNIT}", timeout=300)
    print(sh(engine, f"systemctl show {UNIT} -p MainPID -p NFileDescriptorStore -p ActiveState").stdout)
    readers = f"{REPO}/.venv/bin/python -m vfs.testing.readers /models/tiny-llama/model.gguf {gguf} " \
              f"--seconds 25 --drop-every 0.5 --json > {WORK}/readers.json 2> {WORK}/readers.err"
    engine.docker("exec", "-d", "sysd", "sh", "-c", readers)
    time.sleep(5)
    sh(engine, f"systemctl kill -s KILL {UNIT}")
    time.sleep(0.5)
    sh(engine, f"systemctl restart {UNIT}", timeout=300)
    print(sh(engine, f"systemctl show {UNIT} -p MainPID -p NFileDescriptorStore -p ActiveState").stdout)
    time.sleep(25)
    summary = json.loads((WORK / "readers.json").read_text())
    print(json.dumps(summary, indent=2))
    digest = sh(engine, "sha256sum /models/tiny-llama/model.gguf").stdout.split()[0]
    exact = digest == hashlib.sha256(gguf.read_bytes()).hexdigest()
    journal = sh(engine, f"journalctl -u {UNIT} --no-pager -o cat").stdout
    adopted = "adopting the connection systemd kept" in journal
    print(f"exact bytes after: {exact}; adopted the stored connection: {adopted}")
    return 0 if exact and adopted and summary.get("errors") == 0 and summary.get("wrong_bytes") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
