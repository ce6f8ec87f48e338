"""systemd Type=notify as systemd meets it: a real NOTIFY_SOCKET datagram listener beside a real mount."""

import os
import signal
import socket
import threading
import time

import pytest

from conftest import eventually, needs_fuse
from faultkit import MiB
from vfs.health import is_lamina_mount

pytestmark = [needs_fuse, pytest.mark.fuse]

MANIFEST = """
models:
  big:
    path: /models/big/model.gguf
    backend: llama.cpp
    hf: org/big
    file: big.gguf
"""


class Listener:
    """What systemd does with NOTIFY_SOCKET: receive datagrams; on READY=1, look at the mount at once."""

    def __init__(self, address, mountpoint):
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(address)
        self.socket.settimeout(0.2)
        self.mountpoint = mountpoint
        self.messages = []              # (seconds since start, text)
        self.mount_at_ready = None      # (mounted?, stat answered?) the moment READY=1 arrived
        self.started = time.monotonic()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                data = self.socket.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in data.splitlines() and self.mount_at_ready is None:
                self.mount_at_ready = (is_lamina_mount(str(self.mountpoint)), _stat_answers(self.mountpoint))
            self.messages.append((time.monotonic() - self.started, data))

    def lines(self, name):
        return [line for _, text in self.messages for line in text.splitlines() if line.startswith(name)]

    def close(self):
        self._stop = True
        self._thread.join()
        self.socket.close()


def _stat_answers(path):
    try:
        return os.stat(path).st_ino == 1          # the FUSE root, not the empty directory beneath
    except OSError:
        return False


@pytest.fixture
def big(hub, random_file):
    hub.add_repo("org/big", files={"big.gguf": random_file("big.gguf", 3 * MiB + 5)})


def start_listened(tmp_path, hub, mount_factory, address, env=None):
    mountpoint = tmp_path / "mnt"
    listener = Listener(address, mountpoint)
    mount = mount_factory(MANIFEST, hub.endpoint, mountpoint=mountpoint,
                          env={"NOTIFY_SOCKET": address if isinstance(address, str) and not address.startswith("\0")
                               else "@" + address[1:], **(env or {})},
                          args=("--block-size", "1M"), start=False)
    return listener, mount


def test_ready_comes_only_once_the_mount_answers_and_stopping_on_sigterm(big, hub, mount_factory, tmp_path):
    listener, mount = start_listened(tmp_path, hub, mount_factory, str(tmp_path / "notify.sock"))
    try:
        mount.start()
        assert eventually(lambda: listener.lines("READY=1"), timeout=10)
        print(f"at READY=1: mounted, stat answered = {listener.mount_at_ready}; {listener.messages}")
        assert listener.mount_at_ready == (True, True)
        assert listener.lines("STATUS=") and "1 of 1 models resolved" in listener.lines("STATUS=")[0]
        assert not listener.lines("STOPPING=1")
        mount.process.send_signal(signal.SIGTERM)
        assert mount.process.wait(15) == 0
        assert eventually(lambda: listener.lines("STOPPING=1"), timeout=5)
        assert listener.lines("STOPPING=1") == ["STOPPING=1"]       # once, however the loop ended
        assert not is_lamina_mount(str(mount.mountpoint))
    finally:
        listener.close()


def test_an_abstract_socket_gets_ready_too(big, hub, mount_factory, tmp_path):
    name = f"\0lamina-test-{os.getpid()}-{time.monotonic_ns()}"
    listener, mount = start_listened(tmp_path, hub, mount_factory, name)
    try:
        mount.start()
        assert eventually(lambda: listener.lines("READY=1"), timeout=10)
        assert listener.mount_at_ready == (True, True)
    finally:
        listener.close()


def test_the_watchdog_is_petted_every_half_interval_only_while_the_mount_answers(big, hub, mount_factory, tmp_path):
    listener, mount = start_listened(tmp_path, hub, mount_factory, str(tmp_path / "notify.sock"),
                                     env={"WATCHDOG_USEC": "600000"})
    try:
        mount.start()
        time.sleep(2.0)
        petted = [when for when, text in listener.messages if "WATCHDOG=1" in text]
        print(f"WATCHDOG=1 at {[f'{t:.2f}' for t in petted]}")
        assert len(petted) >= 4                                   # every 0.3 s over 2 s, on a loaded machine
        gaps = [b - a for a, b in zip(petted, petted[1:])]
        assert max(gaps) < 0.6                                   # never a whole interval without one
    finally:
        listener.close()


def test_a_watchdog_for_another_process_is_left_alone(big, hub, mount_factory, tmp_path):
    listener, mount = start_listened(tmp_path, hub, mount_factory, str(tmp_path / "notify.sock"),
                                     env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    try:
        mount.start()
        assert eventually(lambda: listener.lines("READY=1"), timeout=10)
        time.sleep(1.0)
        assert not listener.lines("WATCHDOG=1")
    finally:
        listener.close()
