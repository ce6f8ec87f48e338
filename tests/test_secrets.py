"""The Hub token stays secret: not in logs, messages, attributes, CLI output or the cache; never sent to the CDN.

The token is made unique per run, so finding its text anywhere is a leak, not a coincidence.
"""

import json
import logging
import os
import secrets
from pathlib import Path

import pytest

from conftest import eventually, needs_fuse
from faultkit import BLOCK, SHORT_BOUNDS, MiB, report, run_cli, timed_pread
from vfs import logs
from vfs.testing.hubsim import Fault, HubSimulator

pytestmark = [needs_fuse, pytest.mark.fuse]

TOKEN = f"hf_lamina_secret_{secrets.token_hex(12)}"
MANIFEST = "models:\n  private:\n    path: /models/private/\n    backend: vllm\n    hf: org/private\n"


@pytest.fixture
def private_hub(random_file):
    with HubSimulator(tokens={TOKEN: {"granted": ["org/private"]}}) as sim:
        sources = {"model.safetensors": random_file("model.safetensors", 3 * MiB + 5).read_bytes(),
                   "config.json": b'{"model_type": "llama"}\n'}
        sim.add_repo("org/private", files=dict(sources), private=True)
        sim.sources = sources
        yield sim


@pytest.fixture
def secret_mount(private_hub, mount_factory):
    return mount_factory(MANIFEST, private_hub.endpoint, env={"HF_TOKEN": TOKEN}, args=BLOCK + SHORT_BOUNDS + ("-v",))


def every_file(root):
    return [Path(directory, name) for directory, _, names in os.walk(root) for name in names]


def leaks(*texts):
    return [text for text in texts if TOKEN in (text.decode(errors="replace") if isinstance(text, bytes) else text)]


def test_reads_work_with_the_token_and_it_goes_only_to_the_api_origin(private_hub, secret_mount):
    for name, expected in private_hub.sources.items():
        assert (secret_mount.mountpoint / "private" / name).read_bytes() == expected
    cdn = [r for r in private_hub.log if r.origin == "cdn"]
    api = [r for r in private_hub.log if r.origin == "api"]
    print(f"{len(api)} API requests, {sum(r.authorization_sent for r in api)} with the token; "
          f"{len(cdn)} CDN requests, {sum(r.authorization_sent for r in cdn)} with it")
    assert cdn and not any(r.authorization_sent for r in cdn)
    assert all(r.authorization == f"Bearer {TOKEN}" for r in api)


def test_no_extended_attribute_holds_the_token(private_hub, secret_mount):
    values = []
    for path in [secret_mount.mountpoint, *secret_mount.mountpoint.rglob("*")]:
        values += [os.getxattr(path, name) for name in os.listxattr(path)]
    print(f"{len(values)} attribute values read")
    assert values and not leaks(*values)


def test_list_and_info_never_show_the_token(private_hub, secret_mount, tmp_path):
    (tmp_path / "models.yaml").write_text(MANIFEST)
    outputs = []
    for command in (["list"], ["list", "--json"], ["info", "private"], ["info", "private", "--json"]):
        status, out, err, _ = run_cli(*command, "-m", tmp_path / "models.yaml", "--cache-dir", tmp_path / "cache",
                                      "--endpoint", private_hub.endpoint, home=tmp_path, env={"HF_TOKEN": TOKEN})
        assert status == 0, err
        outputs += [out, err]
    assert "org/private" in outputs[2] and not leaks(*outputs)


def test_failures_with_a_token_never_print_it(private_hub, secret_mount, tmp_path):
    path = secret_mount.mountpoint / "private" / "model.safetensors"
    secret_mount.expect_log_errors("HTTP 503 (gave up after", "the Hub refused access (HTTP 401)")
    private_hub.add_fault(Fault("status", code=503, origin="cdn", method="GET"))
    assert report("a failing read with the token set", timed_pread(path, MiB, 4096)).error == 5
    private_hub.clear_faults()
    private_hub.add_fault(Fault("status", code=401, origin="api", path="/resolve/"))
    assert timed_pread(secret_mount.mountpoint / "private" / "config.json", 0, 10).error == 13
    (tmp_path / "models.yaml").write_text(MANIFEST)
    status, out, err, _ = run_cli("list", "-m", tmp_path / "models.yaml", "--cache-dir", tmp_path / "other-cache",
                                  "--endpoint", private_hub.endpoint, home=tmp_path, env={"HF_TOKEN": TOKEN + "x"})
    print(f"a rejected token: exit {status}: {err.strip()}")
    assert status == 1 and "access denied (HTTP 401)" in err
    assert eventually(lambda: secret_mount.log_text().count(" ERROR ") >= 2)
    assert not leaks(out, err, secret_mount.log_text())


def test_neither_the_cache_nor_the_logs_nor_the_command_line_hold_the_token(private_hub, secret_mount, tmp_path):
    for name in private_hub.sources:
        (secret_mount.mountpoint / "private" / name).read_bytes()
    assert eventually(lambda: all(os.getxattr(p, "user.lamina.verified") == b"yes"
                                  for p in (secret_mount.mountpoint / "private").iterdir()))
    cmdline = Path(f"/proc/{secret_mount.process.pid}/cmdline").read_bytes()
    secret_mount.stop()
    written = every_file(tmp_path)
    print(f"{len(written)} files written under the test's directory (cache, logs, manifests) searched")
    assert any("blobs" in p.parts for p in written) and any(p.suffix == ".log" for p in written)
    assert not [p for p in written if TOKEN.encode() in p.read_bytes()]
    assert not leaks(cmdline)


@pytest.fixture
def json_mount(private_hub, mount_factory):
    return mount_factory(MANIFEST, private_hub.endpoint, env={"HF_TOKEN": TOKEN},
                         args=BLOCK + SHORT_BOUNDS + ("-v", "--log-format", "json"))


def test_json_logs_say_where_a_read_failed_and_never_carry_the_token(private_hub, json_mount):
    path = json_mount.mountpoint / "private" / "model.safetensors"
    json_mount.expect_log_errors("HTTP 503 (gave up after")
    assert (json_mount.mountpoint / "private" / "config.json").read_bytes() == private_hub.sources["config.json"]
    private_hub.add_fault(Fault("status", code=503, origin="cdn", method="GET"))
    assert report("a failing read, JSON logs", timed_pread(path, MiB, 4096)).error == 5
    assert eventually(lambda: '"level": "ERROR"' in json_mount.log_text())
    lines = [json.loads(line) for line in json_mount.log_text().splitlines()]
    print(f"{len(lines)} JSON log lines, e.g. {lines[-1]}")
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    failure = next(line for line in lines if line["level"] == "ERROR" and line["logger"] == "vfs.ops")
    assert (failure["model"], failure["file"], failure["offset"]) == ("private", "model.safetensors", MiB)
    retries = [line for line in lines if "retry in" in line["message"]]
    assert retries and all(line["model"] == "private" and "offset" in line for line in retries)
    assert not leaks(json_mount.log_text())


def test_a_token_that_reaches_a_log_call_is_redacted_in_both_formats(tmp_path):
    for log_format in ("text", "json"):
        log_file = tmp_path / f"{log_format}.log"
        logs.setup(log_file=str(log_file), log_format=log_format, secrets=[TOKEN])
        try:
            logging.getLogger("vfs.test").error("sent Authorization: Bearer %s", TOKEN)
            try:
                raise RuntimeError(f"request failed with {TOKEN}")
            except RuntimeError:
                logging.getLogger("vfs.test").exception("a traceback")
        finally:
            logging.getLogger().handlers[:] = []
        text = log_file.read_text()
        print(f"{log_format}: {text[:300]!r}")
        assert text.count(logs.REDACTED) == 2 and not leaks(text)
