"""The Hub token over a mount's life: found where huggingface_hub finds it, rotated without a
remount, and a token the Hub refuses backed off instead of asked again by every reader.

The FUSE tests mount a private repository whose CDN URLs expire every 2 s, so reads keep
going back to the Hub with whatever token is current; the simulator's request log shows
which token each request carried.
"""

import errno
import json
import os
import threading
import time
import urllib.request

import pytest

from conftest import eventually, needs_fuse
from faultkit import MiB, report, timed_pread
from vfs import settings as settings_module
from vfs.testing.hubsim import HubSimulator
from vfs.tokens import RefusalBackoff, TokenSource

OLD, NEW = "hf_old_token_rotated_away", "hf_new_token_rotated_in"
FILES = 6                               # LFS files of 4 MiB + a small config, 1 MiB blocks
MANIFEST = "models:\n  private:\n    path: /models/private/\n    backend: vllm\n    hf: org/private\n"


# ------------------------------------------------------------------ where the token comes from


def token_from(env):
    return settings_module.token_source(settings_module.from_environment(env)).current()


def test_the_token_comes_from_hf_token_then_hf_token_path_then_hf_home(tmp_path):
    home, elsewhere = tmp_path / "hf-home", tmp_path / "secrets" / "token"
    home.mkdir()
    elsewhere.parent.mkdir()
    (home / "token").write_text("hf_from_home\n")
    elsewhere.write_text("hf_from_token_path\n")
    assert token_from({"HF_HOME": str(home)}) == "hf_from_home"
    assert token_from({"HF_HOME": str(home), "HF_TOKEN_PATH": str(elsewhere)}) == "hf_from_token_path"
    assert token_from({"HF_HOME": str(home), "HF_TOKEN_PATH": str(elsewhere), "HF_TOKEN": "hf_env"}) == "hf_env"
    assert token_from({"HF_HOME": str(tmp_path / "nothing-here")}) is None


def test_a_token_file_is_read_again_when_it_changes_and_not_before(tmp_path):
    path = tmp_path / "token"
    path.write_text("hf_first_token_aaaa\n")
    source = TokenSource(path=path)
    assert source.current() == "hf_first_token_aaaa"
    path.write_text("hf_other_token_bbbb\n")           # same length, rewritten in place
    assert source.current() == "hf_other_token_bbbb"
    replacement = tmp_path / "token.new"
    replacement.write_text("hf_renamed_over_it\n")
    os.replace(replacement, path)                       # a secret manager's atomic rename
    assert source.current() == "hf_renamed_over_it"
    path.write_text("")                                 # a writer between truncate and write
    assert source.current() == "hf_renamed_over_it"
    path.unlink()                                       # logged out
    assert source.current() is None


def test_a_fixed_token_is_never_replaced_by_the_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("hf_file")
    assert TokenSource("hf_fixed", path).current() == "hf_fixed"


def test_refusals_back_off_doubling_per_token_and_a_new_token_is_tried_at_once():
    backoff = RefusalBackoff(first=0.2, limit=0.4)
    refusal = PermissionError("refused")
    assert backoff.refusal(OLD, "/org/private") is None
    backoff.refused(OLD, "/org/private", refusal)
    assert backoff.refusal(OLD, "/org/private") is refusal
    assert backoff.refusal(NEW, "/org/private") is None and backoff.refusal(OLD, "/org/public") is None
    time.sleep(0.25)
    assert backoff.refusal(OLD, "/org/private") is None          # 0.2 s passed: ask again
    backoff.refused(OLD, "/org/private", refusal)                 # refused again: 0.4 s now
    time.sleep(0.25)
    assert backoff.refusal(OLD, "/org/private") is refusal
    backoff.accepted(OLD, "/org/private")
    assert backoff.refusal(OLD, "/org/private") is None


# ------------------------------------------------------------------ through a real mount


@pytest.fixture
def private_hub(random_file):
    with HubSimulator(tokens={OLD: {"granted": ["org/private"]}, NEW: {"granted": ["org/private"]}},
                      sign_seconds=2) as hub:
        files = {f"part-{i}.bin": random_file(f"part-{i}.bin", 4 * MiB + i, seed=i) for i in range(FILES)}
        files["config.json"] = b'{"private": true}\n'
        hub.add_repo("org/private", files=files, private=True)
        yield hub, {name: (path.read_bytes() if hasattr(path, "read_bytes") else path) for name, path in files.items()}


def bearer(token):
    return f"Bearer {token}"


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_file(mount, name):
    with open(mount.mountpoint / "private" / name, "rb") as f:
        return f.read()


@pytest.mark.parametrize("where, how", [("HF_HOME", "in place"), ("HF_TOKEN_PATH", "renamed over")])
@pytest.mark.slow
def test_a_rotated_token_is_used_without_a_remount_and_the_old_one_is_never_sent_again(
        private_hub, mount_factory, tmp_path, where, how):
    hub, sources = private_hub
    token_file = tmp_path / "hf-home" / "token" if where == "HF_HOME" else tmp_path / "secrets" / "hf-token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(OLD + "\n")
    env = {"HF_TOKEN_PATH": str(token_file)} if where == "HF_TOKEN_PATH" else {}
    port = free_port()
    mount = mount_factory(MANIFEST, hub.endpoint, env=env,
                          args=("--block-size", "1M", "--api", f"127.0.0.1:{port}"))
    assert read_file(mount, "part-0.bin")[:MiB] == sources["part-0.bin"][:MiB]

    if how == "in place":
        token_file.write_text(NEW + "\n")                # as `huggingface-cli login` rewrites it
    else:
        fresh = token_file.with_suffix(".new")
        fresh.write_text(NEW + "\n")
        os.replace(fresh, token_file)
    hub.remove_token(OLD)                                # revoked at the Hub: a request with it gets 401
    time.sleep(2.5)                                      # every CDN URL signed with the old token expires
    for name, data in sources.items():
        assert read_file(mount, name) == data, name
    request = urllib.request.Request(f"http://127.0.0.1:{port}/refresh", method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200, json.loads(answer.read())

    log = hub.log
    first_new = next(i for i, r in enumerate(log) if r.authorization == bearer(NEW))
    after = log[first_new:]
    print(f"{how} via {where}: {first_new} requests before the rotation, {len(after)} after, "
          f"{sum(r.authorization == bearer(NEW) for r in after)} of them with the new token")
    assert not [r for r in after if r.authorization == bearer(OLD)]
    assert not [r for r in log if r.status == 401]
    assert any(r.origin == "api" and "/revision/" in r.path for r in after)   # the refresh resolved again with it


@pytest.mark.slow
def test_a_refused_token_is_backed_off_not_retried_by_every_reader(private_hub, mount_factory, tmp_path):
    hub, sources = private_hub
    token_file = tmp_path / "hf-home" / "token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(OLD)
    mount = mount_factory(MANIFEST, hub.endpoint, args=("--block-size", "1M"))
    mount.expect_log_errors("the Hub refused access (HTTP 401)")
    hub.remove_token(OLD)
    time.sleep(2.2)                                      # the signed URLs of the mount's opens expire

    errors_seen, stop = [], threading.Event()

    def reader(number):
        offset = number * MiB
        while not stop.is_set():
            for i in range(FILES):
                reading = timed_pread(mount.mountpoint / "private" / f"part-{i}.bin", offset, 4096, direct=True)
                errors_seen.append(reading.error)
            time.sleep(0.02)

    readers = [threading.Thread(target=reader, args=(n,)) for n in range(3)]
    started = time.monotonic()
    for thread in readers:
        thread.start()
    time.sleep(6)
    stop.set()
    for thread in readers:
        thread.join()
    seconds = time.monotonic() - started
    refused = [r for r in hub.log if r.authorization == bearer(OLD) and r.status == 401]
    print(f"{len(errors_seen)} reads by 3 readers in {seconds:.1f}s with a revoked token: "
          f"{len(refused)} requests refused by the Hub; errnos {sorted(set(errors_seen) - {None})}")
    assert errno.EACCES in errors_seen and errno.EIO not in errors_seen
    # 1 s, 2 s, 4 s apart: 3 or 4 in 6 s. Without the backoff, every failed read asked again.
    assert 1 <= len(refused) <= 5
    assert len(errors_seen) > 10 * len(refused)

    token_file.write_text(NEW)                           # the operator fixes it: tried at once
    reading = report("first read after the new token", timed_pread(
        mount.mountpoint / "private" / "part-1.bin", 3 * MiB, 4096, direct=True))    # a block no reader tried
    assert reading.error is None and reading.data == sources["part-1.bin"][3 * MiB:3 * MiB + 4096]
    assert reading.seconds < 1.0
    assert eventually(lambda: read_file(mount, "config.json") == sources["config.json"])
