"""pull's progress as a user sees it: tqdm bars on a terminal, 10% lines in a log, nothing when disabled."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from faultkit import MiB, run_cli
from vfs.cachedir import CacheDir
from vfs.testing.mounts import isolated_environment

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


@pytest.fixture
def workspace(hub, random_file, tmp_path):
    hub.add_repo("org/big", files={"big.gguf": random_file("big.gguf", 5 * MiB + 3)})
    hub.add_repo("org/small", files={"model.safetensors": random_file("s.safetensors", 2 * MiB, seed=3)})
    (tmp_path / "models.yaml").write_text(MANIFEST)
    CacheDir(tmp_path / "cache", MiB)            # 1 MiB blocks: a few progress steps per file
    return tmp_path


def pull_args(workspace, hub):
    return ["pull", "--all", "-m", str(workspace / "models.yaml"), "--cache-dir", str(workspace / "cache"),
            "--endpoint", hub.endpoint]


def pull_on_a_terminal(workspace, hub, env=None):
    """Run pull with stdout and stderr on a pseudo-terminal; everything it wrote there."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))     # 24 rows, 100 columns
    process = subprocess.Popen([sys.executable, "-m", "vfs", *pull_args(workspace, hub)], stdin=subprocess.DEVNULL,
                               stdout=terminal, stderr=terminal, env=isolated_environment(workspace, env))
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:             # EIO: the terminal's other side closed
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert process.wait(timeout=120) == 0, output
    return output.decode(errors="replace")


def test_without_a_terminal_each_model_gets_a_line_per_tenth(workspace, hub):
    status, out, err, _ = run_cli(*pull_args(workspace, hub), home=workspace)
    assert status == 0, err
    print(err)
    for model in ("big", "small"):
        shares = [int(share) for share in re.findall(rf"^pull: {model}: +(\d+)% \(", err, re.MULTILINE)]
        assert shares == sorted(set(shares)) and shares[-1] == 100 and len(shares) >= 2
    assert "\r" not in err
    assert "2 of 2 files complete and verified" in out


def test_on_a_terminal_each_model_gets_a_tqdm_bar(workspace, hub):
    output = pull_on_a_terminal(workspace, hub)
    print(output[-600:])
    assert "\r" in output
    for model in ("big", "small"):
        assert re.search(rf"{model}: 100%\|[^\r\n]*\|", output), model
    assert "pull: big:" not in output                # bars instead of lines
    assert "2 of 2 files complete and verified" in output


def test_hf_hub_disable_progress_bars_silences_the_progress(workspace, hub):
    output = pull_on_a_terminal(workspace, hub, env={"HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    print(output)
    assert "%|" not in output and "pull: big:" not in output
    assert "2 of 2 files complete and verified" in output
