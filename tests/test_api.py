"""The REST API beside a real mount: models, one model, download, refresh."""

import json
import os

import pytest

from conftest import call_api as call
from conftest import eventually, free_port, needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse]

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
"""

EXTRA = """  extra:
    path: /models/extra/
    backend: vllm
    hf: org/small
    include: ["*.json"]
"""


@pytest.fixture
def served(hub, random_file, mount_factory):
    hub.add_token("hf_api_secret_token")
    hub.add_repo("org/big", files={"big.gguf": random_file("big.gguf", 3 * MiB + 5)})
    hub.add_repo("org/small", files={"model.safetensors": random_file("s", MiB, seed=4), "config.json": b"{}"})
    port = free_port()
    mount = mount_factory(MANIFEST, hub.endpoint, args=("--block-size", "1M", "--api", f"127.0.0.1:{port}"),
                          env={"HF_TOKEN": "hf_api_secret_token"})
    return mount, port


def test_models_lists_every_model_with_sizes_and_cache_state(served):
    mount, port = served
    status, models = call(port, "GET", "/models")
    assert status == 200
    assert [m["name"] for m in models] == ["big", "small"]
    assert models[0]["size"] == 3 * MiB + 5 and models[0]["cached_bytes"] == 0
    assert len(models[0]["commit"]) == 40


def test_one_model_shows_its_files_and_unknown_names_are_404(served):
    mount, port = served
    status, model = call(port, "GET", "/models/small")
    assert status == 200
    assert {f["path"] for f in model["files"]} == {"model.safetensors", "config.json"}
    assert call(port, "GET", "/models/nope")[0] == 404
    assert call(port, "GET", "/nothing")[0] == 404
    assert call(port, "DELETE", "/models")[0] == 405


def test_download_pulls_a_repo_in_the_background(served):
    mount, port = served
    status, job = call(port, "POST", "/download/org/big")
    assert status == 202 and job["models"] == ["big"]
    assert eventually(lambda: call(port, "GET", "/download/org/big")[1]["state"] == "done", timeout=30)
    assert eventually(lambda: call(port, "GET", "/models/big")[1]["files"][0]["verified"])
    path = mount.mountpoint / "big" / "model.gguf"
    assert os.getxattr(path, "user.lamina.cached_bytes") == str(3 * MiB + 5).encode()
    status, answer = call(port, "POST", "/download/org/unknown")
    assert status == 404 and "add" in answer["error"]


def test_refresh_shows_manifest_changes_and_keeps_unchanged_inodes(served, hub):
    mount, port = served
    root = mount.mountpoint
    before = os.stat(root / "big" / "model.gguf").st_ino
    assert sorted(os.listdir(root)) == ["big", "small"]
    mount.manifest.write_text(MANIFEST.replace("  small:\n    path: /models/small/\n    backend: vllm\n"
                                               "    hf: org/small\n", "") + EXTRA)
    status, answer = call(port, "POST", "/refresh")
    assert status == 200 and answer["models"] == ["big", "extra"]
    assert sorted(os.listdir(root)) == ["big", "extra"]
    assert os.listdir(root / "extra") == ["config.json"]
    assert not (root / "small").exists()
    assert os.stat(root / "big" / "model.gguf").st_ino == before


def test_refresh_follows_a_moved_branch(served, hub):
    mount, port = served
    path = mount.mountpoint / "big" / "model.gguf"
    assert path.stat().st_size == 3 * MiB + 5
    hub.add_commit("org/big", files={"big.gguf": b"GGUF new weights"})
    assert call(port, "POST", "/refresh")[0] == 200
    assert path.read_bytes() == b"GGUF new weights"


def test_a_bad_manifest_on_refresh_is_refused_and_the_mount_keeps_serving(served):
    mount, port = served
    mount.manifest.write_text("models:\n  bad name:\n    path: /x\n")
    status, answer = call(port, "POST", "/refresh")
    assert status == 400 and "bad name" in answer["error"]
    assert sorted(os.listdir(mount.mountpoint)) == ["big", "small"]


def test_the_api_never_shows_the_token(served):
    mount, port = served
    call(port, "POST", "/download/org/small")
    answers = [call(port, "GET", path)[1] for path in ("/models", "/models/big", "/download/org/small")]
    assert "hf_api_secret_token" not in json.dumps(answers)
