"""The long-run soak: one mount, many minutes, everything weeks of service bring, every byte checked.

    python -m vfs.testing.soak --minutes 20 [--readers 4] [--seed N] [--url-seconds 4] [--json F]

One simulated Hub (private, gated and public repos) and one mount of eight models at the
default block size and memory, with the REST API on. For `--minutes`:

- readers churn in their own processes: open a random file, random preads, a sequential
  stream, a slice of an mmap (page faults in a child process, as llama.cpp's are), close;
  each checks every byte against the source whose content id the file carries
  (`user.lamina.content_id`), so a file that changed revision is checked against the
  right bytes;
- every CDN URL the Hub signs expires after `--url-seconds`;
- the token rotates every ROTATE_EVERY seconds: a new token is written to the token file
  (in place and by rename, in turn), and the old one is revoked at the Hub GRACE seconds
  later, as an operator does it;
- a branch moves every MOVE_EVERY seconds (new bytes for the same paths) and
  `POST /refresh` applies it; the new content must show at the path at once;
- `lamina-llm-cache gc --max-size` runs beside the mount every GC_EVERY seconds, so
  blobs are evicted under the readers and fetched again.

It reports reads, bytes checked, mismatches, reader errors, the daemon log's tracebacks
and ERROR lines, requests that carried a token after it had been rotated away, and the
daemon's RSS and open descriptors at the start, after warm-up and at the end. It exits 0
only when all of it holds (growth within the bounds below). A reader process is also the
command `python -m vfs.testing.soak reader ...`, which the soak starts by itself.
"""

import argparse
import json
import mmap
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

MiB = 1024 * 1024
ROTATE_EVERY, GRACE, MOVE_EVERY, GC_EVERY, SAMPLE_EVERY = 60.0, 5.0, 45.0, 40.0, 15.0
WARM_UP = 120.0                  # seconds (or a third of a shorter run) before the "after warm-up" sample
RSS_GROWTH_BOUND = 48 * MiB      # after warm-up, to the end
FD_GROWTH_BOUND = 8
GC_MAX_SIZE = "96M"
CONTENT_XATTR = "user.lamina.content_id"

# repo -> (visibility, {path: size}); ".json" files are small (served by the Hub), the rest LFS.
REPOS = {
    "soak/llama-a": ("private", {"model-q4.gguf": 24 * MiB + 4321, "model-q8.gguf": 40 * MiB + 17}),
    "soak/llama-b": ("public", {"model.gguf": 33 * MiB + 999}),
    "soak/shards": ("private", {"model-00001-of-00002.safetensors": 20 * MiB, "config.json": 3000,
                                "model-00002-of-00002.safetensors": 12 * MiB + 5, "tokenizer.json": 180_000}),
    "soak/gated": ("gated", {"weights.safetensors": 17 * MiB + 3, "config.json": 700}),
    "soak/moving": ("private", {"weights.bin": 9 * MiB + 77, "config.json": 1200}),
    "soak/tiny": ("public", {f"piece-{i}.bin": 300_000 + i for i in range(8)}),
}
MANIFEST = """models:
  llama-a-q4: {path: /models/llama-a-q4/model.gguf, backend: llama.cpp, hf: soak/llama-a, file: model-q4.gguf}
  llama-a-q8: {path: /models/llama-a-q8/model.gguf, backend: llama.cpp, hf: soak/llama-a, file: model-q8.gguf}
  llama-b: {path: /models/llama-b/model.gguf, backend: llama.cpp, hf: soak/llama-b, file: model.gguf}
  shards: {path: /models/shards/, backend: vllm, hf: soak/shards}
  shards-config: {path: /models/shards-config/, backend: vllm, hf: soak/shards, include: ["*.json"]}
  gated: {path: /models/gated/, backend: vllm, hf: soak/gated}
  moving: {path: /models/moving/, backend: vllm, hf: soak/moving}
  tiny: {path: /models/tiny/, backend: vllm, hf: soak/tiny}
"""


# ---------------------------------------------------------------------------
# Sources: every version of every file, findable by content id


class Sources:
    """Source files on disk and an index content id -> path the readers load (and reload)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.index_path = directory / "index.json"
        self.index: dict[str, str] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def make(self, name, size, rng):
        from .hubsim import _blob_from_path

        path = self.directory / f"{len(self.index):04d}-{name.replace('/', '_')}"
        with open(path, "wb") as out:
            left = size
            while left:
                out.write(rng.randbytes(min(left, 4 * MiB)))
                left -= min(left, 4 * MiB)
        blob = _blob_from_path(path, want_git_sha1=True)
        self.index[f"sha256:{blob.sha256}"] = str(path)
        self.index[f"sha1:{blob.git_sha1}"] = str(path)
        self._write_index()
        return path

    def _write_index(self):
        fresh = self.index_path.with_suffix(".tmp")
        fresh.write_text(json.dumps(self.index))
        os.replace(fresh, self.index_path)


# ---------------------------------------------------------------------------
# Readers (child processes)


class Reader:
    """Open, read in three ways, check, close; again until the time is up."""

    def __init__(self, root, index_path, seed):
        self.root, self.index_path = Path(root), Path(index_path)
        self.random = random.Random(seed)
        self.index: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []
        self.bytes_checked = 0

    def files(self):
        return sorted(p for p in self.root.rglob("*") if p.is_file())

    def source_for(self, content_id):
        if content_id not in self.index:
            self.index = json.loads(self.index_path.read_text())
        return self.index[content_id]

    def run(self, seconds):
        deadline = time.monotonic() + seconds
        files = self.files()
        while time.monotonic() < deadline:
            path = self.random.choice(files)
            try:
                self.visit(path)
            except OSError as exc:
                self.counts["errors"] += 1
                self.note(f"{path.relative_to(self.root)}: {exc!r}")
            time.sleep(self.random.uniform(0.0, 0.02))
        return {"counts": dict(self.counts), "bytes_checked": self.bytes_checked, "problems": self.problems}

    def visit(self, path):
        with open(path, "rb", buffering=0) as handle:
            fd = handle.fileno()
            content_id = os.getxattr(fd, CONTENT_XATTR).decode()
            with open(self.source_for(content_id), "rb", buffering=0) as source:
                expected = _Source(source.fileno())
                size = os.fstat(fd).st_size
                if size != expected.size:
                    return self.mismatch(path, content_id, "size", 0, size)
                self.counts["opens"] += 1
                if passed_through(fd):
                    self.counts["passthrough opens"] += 1
                if self.random.random() < 0.3:
                    # Drop the kernel's copy: these reads reach the daemon (buffers, disk, network).
                    # On a passthrough open it is a no-op (the advice stays with the FUSE file;
                    # the cache file's pages are the kernel's to keep).
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    self.counts["forget"] += 1
                for _ in range(self.random.randint(1, 6)):
                    self.pread(path, fd, content_id, expected)
                self.stream(path, fd, content_id, expected)
                if size and self.random.random() < 0.5:
                    self.mmapped(path, fd, content_id, expected)

    def pread(self, path, fd, content_id, expected):
        offset, length = self.span(expected.size, 2 * MiB)
        self.check(path, content_id, "pread", offset, length, os.pread(fd, length, offset), expected)

    def stream(self, path, fd, content_id, expected):
        offset, length = self.span(expected.size, 8 * MiB)
        chunk, got, data = self.random.choice((4096, 65536, MiB)), 0, bytearray()
        while got < length:
            piece = os.pread(fd, min(chunk, length - got), offset + got)
            if not piece:
                break
            data += piece
            got += len(piece)
        self.check(path, content_id, "stream", offset, length, bytes(data), expected)

    def mmapped(self, path, fd, content_id, expected):
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as view:
            offset, length = self.span(expected.size, 4 * MiB)
            self.check(path, content_id, "mmap", offset, length, view[offset:offset + length], expected)

    def span(self, size, longest):
        if not size:
            return 0, 0
        offset = self.random.randrange(size)
        return offset, self.random.randint(1, min(longest, size - offset))

    def check(self, path, content_id, kind, offset, length, data, expected):
        self.counts[kind] += 1
        self.bytes_checked += len(data)
        if len(data) != length or data != expected.read(offset, length):
            self.mismatch(path, content_id, kind, offset, len(data))

    def mismatch(self, path, content_id, kind, offset, length):
        self.counts["mismatches"] += 1
        self.note(f"{path.relative_to(self.root)} ({content_id}): {kind} at {offset}+{length} differs")

    def note(self, text):
        if len(self.problems) < 20:
            self.problems.append(text)


def passed_through(fd):
    """Whether open `fd` is served by FUSE passthrough (the mount says so by xattr)."""
    try:
        return os.getxattr(fd, "user.lamina.passthrough") == b"yes"
    except OSError:
        return False


class _Source:
    """A source file read by pread (never whole: some are tens of MiB)."""

    def __init__(self, fd):
        self.fd, self.size = fd, os.fstat(fd).st_size

    def read(self, offset, length):
        return os.pread(self.fd, length, offset)


def reader_command(root, index_path, seed, seconds):
    return [sys.executable, "-m", "vfs.testing.soak", "reader", "--root", str(root), "--index", str(index_path),
            "--seed", str(seed), "--seconds", str(seconds)]


# ---------------------------------------------------------------------------
# The daemon's footprint


def footprint(pid):
    """(RSS in bytes, open descriptors) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------------------
# The soak itself


class Soak:
    def __init__(self, workdir, minutes, readers, seed, url_seconds):
        self.workdir, self.seconds, self.readers, self.seed = Path(workdir), minutes * 60, readers, seed
        self.url_seconds = url_seconds
        self.random = random.Random(seed)
        self.sources = Sources(self.workdir / "sources")
        self.events: Counter[str] = Counter()
        self.failures = []                  # what breaks the run: gc exits, refreshes not applied, ...
        self.rotations = []                 # (old token, new token)
        self.samples = []                   # (seconds since start, rss, fds)
        self.token_file = self.workdir / "secrets" / "hf-token"

    # -- setup

    def build_hub(self):
        from .hubsim import HubSimulator

        self.token = self.new_token()
        self.sim = HubSimulator(tokens={self.token: {"granted": self.granted()}}, sign_seconds=self.url_seconds)
        for repo, (visibility, files) in REPOS.items():
            made = {name: self.sources.make(f"{repo}/{name}", size, self.random) for name, size in files.items()}
            self.sim.add_repo(repo, files=made, private=visibility == "private", gated=visibility == "gated")
        return self.sim.start()

    def granted(self):
        return [repo for repo, (visibility, _) in REPOS.items() if visibility != "public"]

    def new_token(self):
        return f"hf_soak_{self.random.getrandbits(64):016x}"

    def start_mount(self):
        from .mounts import MountProcess, isolated_environment

        (self.workdir / "models.yaml").write_text(MANIFEST)
        self.token_file.parent.mkdir(parents=True, exist_ok=True)
        self.token_file.write_text(self.token + "\n")
        self.api_port = _free_port()
        self.env = isolated_environment(self.workdir, {"HF_TOKEN_PATH": str(self.token_file)})
        self.mount = MountProcess(self.workdir / "models.yaml", self.workdir / "mnt", self.workdir / "cache",
                                  self.sim.endpoint, self.workdir / "mount.log", env=self.env,
                                  extra_args=["--api", f"127.0.0.1:{self.api_port}"])
        return self.mount.start()

    # -- the things that happen meanwhile

    def rotate_token(self):
        old, new = self.token, self.new_token()
        self.sim.add_token(new, self.granted())
        if len(self.rotations) % 2:
            self.token_file.write_text(new + "\n")              # rewritten in place
        else:
            fresh = self.token_file.with_suffix(".new")
            fresh.write_text(new + "\n")
            os.replace(fresh, self.token_file)                  # renamed over it
        self.token = new
        self.rotations.append((old, new))
        self.later(GRACE, lambda: self.sim.remove_token(old))
        self.events["token rotations"] += 1

    def move_branch(self):
        from .hubsim import _blob_from_path

        _, files = REPOS["soak/moving"]
        made = {name: self.sources.make(f"moving/{name}", size, self.random) for name, size in files.items()}
        self.sim.add_commit("soak/moving", files=made)
        answer = self.post("/refresh")
        expected = {name: f"sha256:{_blob_from_path(path, False).sha256}" for name, path in made.items()}
        shown = os.getxattr(self.mount.mountpoint / "moving" / "weights.bin", CONTENT_XATTR).decode()
        if shown != expected["weights.bin"]:
            self.failures.append(f"refresh {self.events['branch moves'] + 1}: {answer}; path shows {shown}")
        self.events["branch moves"] += 1

    def run_gc(self):
        result = subprocess.run([sys.executable, "-m", "vfs", "gc", "--max-size", GC_MAX_SIZE,
                                 "-m", str(self.workdir / "models.yaml"), "--cache-dir", str(self.workdir / "cache")],
                                env=self.env, capture_output=True, text=True, timeout=300)
        self.events["gc runs"] += 1
        evicted = re.search(r"evicted (\d+) blob", result.stdout + result.stderr)
        self.events["blobs evicted by gc"] += int(evicted[1]) if evicted else 0
        if result.returncode != 0:
            self.failures.append(f"gc exited {result.returncode}: {result.stderr.strip()[-500:]}")

    def sample(self):
        process = self.mount.process
        assert process is not None, "sampled while mounted"
        self.samples.append((time.monotonic() - self.started, *footprint(process.pid)))

    def post(self, path):
        request = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", method="POST")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=120) as answer:
            return json.loads(answer.read())

    def later(self, delay, action):
        self._timers.append((time.monotonic() + delay, action))

    # -- the run

    def run(self):
        self._timers = []
        with self.build_hub():
            self.start_mount()
            try:
                return self.drive()
            finally:
                self.mount.stop()

    def drive(self):
        self.started = time.monotonic()
        self.sample()
        index = self.sources.index_path
        workers = [subprocess.Popen(reader_command(self.mount.mountpoint, index, self.seed + n, self.seconds),
                                    stdout=subprocess.PIPE, text=True) for n in range(self.readers)]
        schedule = {"rotate": ROTATE_EVERY, "move": MOVE_EVERY, "gc": GC_EVERY, "sample": SAMPLE_EVERY}
        due = {name: self.started + every for name, every in schedule.items()}
        actions = {"rotate": self.rotate_token, "move": self.move_branch, "gc": self.run_gc, "sample": self.sample}
        warm = None
        while any(worker.poll() is None for worker in workers):
            now = time.monotonic()
            for name in [n for n, when in due.items() if when <= now]:
                self.guarded(name, actions[name])
                due[name] = now + schedule[name]
            for when, action in [t for t in self._timers if t[0] <= now]:
                self._timers.remove((when, action))
                self.guarded("timer", action)
            if warm is None and now - self.started >= min(WARM_UP, self.seconds / 3):
                self.sample()
                warm = self.samples[-1]
            time.sleep(0.2)
        self.sample()
        reports = [json.loads(worker.communicate()[0] or "{}") for worker in workers]
        return self.summary(reports, warm or self.samples[0])

    def guarded(self, name, action):
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - a failed side action is a finding, not a crash
            self.failures.append(f"{name}: {type(exc).__name__}: {exc}")

    # -- the verdict

    def stale_tokens_sent(self, log):
        """Requests that carried a token after a request had already carried its successor."""
        stale = 0
        for old, new in self.rotations:
            first_new = min((r.started for r in log if r.authorization == f"Bearer {new}"), default=None)
            if first_new is not None:
                stale += sum(1 for r in log if r.authorization == f"Bearer {old}" and r.started > first_new)
        return stale

    def summary(self, reports, warm):
        counts: Counter[str] = Counter()
        problems, checked = [], 0
        for report in reports:
            counts.update(report.get("counts", {}))
            problems += report.get("problems", [])
            checked += report.get("bytes_checked", 0)
        log = self.sim.log
        start, end = self.samples[0], self.samples[-1]
        result = {
            "seconds": round(end[0]), "readers": self.readers, "seed": self.seed, "url_seconds": self.url_seconds,
            "reads": sum(counts[k] for k in ("pread", "stream", "mmap")), "opens": counts["opens"],
            "passthrough_opens": counts["passthrough opens"],
            "by_kind": {k: counts[k] for k in ("pread", "stream", "mmap")}, "bytes_checked": checked,
            "mismatches": counts["mismatches"], "reader_errors": counts["errors"], "problems": problems,
            "events": dict(self.events), "failures": self.failures,
            "hub_requests": len(log), "resolves": sum(1 for r in log if "/resolve/" in r.path),
            "cdn_refusals": sum(1 for r in log if r.origin == "cdn" and r.status == 403),
            "hub_refusals": sum(1 for r in log if r.origin == "api" and r.status in (401, 403)),
            "stale_token_requests": self.stale_tokens_sent(log),
            "log_problems": self.mount.log_problems(), "log_warnings": _warnings(self.mount.log_text()),
            "rss": {"start": start[1], "warm": warm[1], "end": end[1], "max": max(s[1] for s in self.samples)},
            "fds": {"start": start[2], "warm": warm[2], "end": end[2], "max": max(s[2] for s in self.samples)},
        }
        result["ok"] = _verdict(result)
        return result


def _verdict(result):
    return (not result["mismatches"] and not result["reader_errors"] and not result["failures"]
            and not result["log_problems"] and not result["stale_token_requests"] and result["reads"] > 0
            and result["rss"]["end"] - result["rss"]["warm"] <= RSS_GROWTH_BOUND
            and result["fds"]["end"] - result["fds"]["warm"] <= FD_GROWTH_BOUND)


def _warnings(text):
    kinds = Counter(line.split(": ", 1)[-1][:80] for line in text.splitlines() if " WARNING " in line)
    return dict(kinds.most_common(10))


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(result):
    mib = lambda n: f"{n / MiB:.0f} MiB"  # noqa: E731
    rss, fds = result["rss"], result["fds"]
    return "\n".join([
        f"{result['seconds']} s, {result['readers']} readers, seed {result['seed']}, URLs signed for "
        f"{result['url_seconds']} s: {result['opens']} opens ({result['passthrough_opens']} by FUSE passthrough), "
        f"{result['reads']} reads {result['by_kind']}, "
        f"{result['bytes_checked'] / 2**30:.1f} GiB checked",
        f"mismatches {result['mismatches']}, reader errors {result['reader_errors']}, daemon log problems "
        f"{len(result['log_problems'])}, failures {len(result['failures'])}, stale-token requests "
        f"{result['stale_token_requests']}",
        f"meanwhile: {result['events']}; {result['hub_requests']} requests, {result['resolves']} resolves, "
        f"{result['cdn_refusals']} expired-URL refusals by the CDN, {result['hub_refusals']} by the Hub",
        f"daemon RSS {mib(rss['start'])} at start, {mib(rss['warm'])} after warm-up, {mib(rss['end'])} at the end "
        f"(max {mib(rss['max'])}); fds {fds['start']} / {fds['warm']} / {fds['end']} (max {fds['max']})",
        f"warnings logged: {result['log_warnings'] or 'none'}",
        *[f"problem: {p}" for p in result["problems"] + result["failures"] + result["log_problems"]][:30],
        "OK" if result["ok"] else "FAILED",
    ])


# ---------------------------------------------------------------------------
# Command line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["reader"]:
        return reader_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m vfs.testing.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--url-seconds", type=int, default=4, help="how long each signed CDN URL is good for")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--workdir", type=Path, help="keep the run's files (sources, cache, daemon log) here")
    args = parser.parse_args(argv)
    seed = random.randrange(1 << 32) if args.seed is None else args.seed
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = Soak(args.workdir, args.minutes, args.readers, seed, args.url_seconds).run()
    else:
        with tempfile.TemporaryDirectory(prefix="lamina-soak-") as workdir:
            result = Soak(workdir, args.minutes, args.readers, seed, args.url_seconds).run()
    print(describe(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


def reader_main(argv):
    parser = argparse.ArgumentParser(prog="python -m vfs.testing.soak reader")
    parser.add_argument("--root", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(Reader(args.root, args.index, args.seed).run(args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
