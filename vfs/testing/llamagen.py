"""llama.cpp generating through the mount across an upgrade and a SIGKILL of the serving daemon.

    python -m vfs.testing.llamagen [--rounds 12] [--size 64] [--no-passthrough]

A GGUF model (vfs/testing/models.py: llama-shaped, seeded random weights) is served by the
simulator and mounted by the keeper. A child process runs llama.cpp (xllamacpp) on the
mounted file in rounds: load the model (mmap, so its pages fault in through the mount),
generate greedily, unload, drop the file's pages, again. Round 3 starts the moment an
upgrade is asked for, round 6 the moment the serving daemon is SIGKILLed, so those loads
fault their pages in across the hand-overs. Every
round's text must equal the text the same generation gives on a local copy of the file,
and the child must finish (a dead mount would kill it with SIGBUS). Exit 0 when it does.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .handovers import ask_upgrade, kill_child, wait_for_successor
from .hubsim import HubSimulator
from .mounts import MountProcess

PROMPT = "tok5 tok7 tok9 tok11"
TOKENS = 24
MANIFEST = """\
models:
  tiny: {path: /models/tiny/model.gguf, backend: llama.cpp, hf: llamagen/tiny, file: tiny.gguf}
"""
EVENTS = {3: "upgrade", 6: "kill"}      # asked for just before the round with this number starts


def generate(model: Path) -> str:
    """One greedy completion of PROMPT by llama.cpp with `model` mmapped."""
    import xllamacpp  # type: ignore[import-untyped]  # a test dependency without type hints

    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.n_ctx = 256
    params.cpuparams.n_threads = 1
    params.cpuparams_batch.n_threads = 1
    server = xllamacpp.Server(params)
    try:
        answer = server.handle_completions({"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0,
                                            "top_k": 1, "seed": 1})
    finally:
        del server
    return answer["choices"][0]["text"]


def child(model: Path, rounds: int, paced: bool) -> None:
    """Generate `rounds` times, each from a fresh load (when `paced`, once stdin says go); one
    JSON line per round."""
    for number in range(1, rounds + 1):
        if paced and not sys.stdin.readline():
            return
        started = time.monotonic()
        text = generate(model)
        with open(model, "rb") as f:        # the next load faults every page in through the mount
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        print(json.dumps({"round": number, "text": text, "seconds": time.monotonic() - started}), flush=True)


def run(rounds: int, size_mib: int, mount_args=()) -> dict:
    from .models import write_gguf

    with tempfile.TemporaryDirectory(prefix="lamina-llamagen-") as scratch, HubSimulator() as hub:
        work = Path(scratch)
        local = write_gguf(work / "tiny.gguf", size_mib)
        expected = _in_child(local, 1)[0]["text"]
        hub.add_repo("llamagen/tiny", files={"tiny.gguf": local})
        (work / "models.yaml").write_text(MANIFEST)
        mount = MountProcess(work / "models.yaml", work / "mnt", work / "cache", hub.endpoint, work / "mount.log",
                             extra_args=mount_args, keeper=True)
        with mount:
            outcome = _generate_across_handovers(mount, mount.mountpoint / "tiny" / "model.gguf", rounds)
        outcome["expected"] = expected
        outcome["same"] = bool(outcome["rounds"]) and all(r["text"] == expected for r in outcome["rounds"])
        return outcome


def _generate_across_handovers(mount: MountProcess, path: Path, rounds: int) -> dict:
    process = subprocess.Popen([sys.executable, "-m", "vfs.testing.llamagen", "--child", str(path),
                                "--rounds", str(rounds), "--paced"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdin is not None and process.stdout is not None
    done, events = [], []
    for number in range(1, rounds + 1):
        kind = EVENTS.get(number)
        old = (ask_upgrade if kind == "upgrade" else kill_child)(mount) if kind else None
        process.stdin.write("go\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            break                           # the child died (SIGBUS on a dead mount)
        done.append(json.loads(line))
        if old is not None:
            wait_for_successor(mount, old)
            events.append({"before_round": number, "kind": kind, "old": old, "new": mount.daemon_pid()})
    process.stdin.close()
    code = process.wait()
    return {"rounds": done, "events": events, "child_exit": code}


def _in_child(model: Path, rounds: int) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "vfs.testing.llamagen", "--child", str(model), "--rounds",
                          str(rounds)], capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vfs.testing.llamagen", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--size", type=int, default=64, help="MiB of the model")
    parser.add_argument("--no-passthrough", action="store_true", help="every page fault through the daemon")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--paced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.rounds, args.paced)
        return 0
    outcome = run(args.rounds, args.size, ["--no-passthrough"] if args.no_passthrough else [])
    texts = {r["text"] for r in outcome["rounds"]}
    print(f"{len(outcome['rounds'])} of {args.rounds} rounds, child exit {outcome['child_exit']}, "
          f"events {[(e['kind'], e['before_round']) for e in outcome['events']]}; "
          f"{len(texts)} distinct texts; same as the local file's: {outcome['same']}")
    print(f"text: {outcome['expected']!r}")
    ok = outcome["same"] and outcome["child_exit"] == 0 and len(outcome["rounds"]) == args.rounds
    return 0 if ok and len(outcome["events"]) == len(EVENTS) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
