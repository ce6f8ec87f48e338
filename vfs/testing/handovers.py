"""Hand-overs under load: kill (or upgrade) the serving daemon again and again while the
three readers (readers.py) check every byte; the figures docs/RELIABILITY.md gives.

    python -m vfs.testing.handovers --kills 20 [--size 256M] [--no-passthrough] [--json F]
    python -m vfs.testing.handovers --upgrades 20 --max-stall 0.25
    python -m vfs.testing.handovers --baseline 60 --max-stall 0.25   # the same readers, no hand-over

One simulated Hub, one model file of deterministic bytes, one mount run by the keeper
(`mount` without `--no-keeper`), read through once so the cache holds it. The readers
run with the page cache dropped every 2 s. Each round waits until every reader has made
progress, then SIGKILLs the serving child (the keeper starts a successor on the same
connection) or asks for an upgrade (SIGUSR1 to the keeper), and waits until a new child
serves. It exits 0 when the readers saw 0 errors and 0 wrong bytes, the longest stall
is within --max-stall, and no child of an earlier generation is left running.

After the summary it lists every reader stall of 100 ms or more against the moments of the
nearest upgrade, read from the log (milliseconds from the old daemon's stop: the
successor started, the descriptors sent and received, the connection adopted, the
successor reading requests and saying it serves, the old daemon's requests answered and
its exit), which says where a long stall's time went.
"""

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .hubsim import HubSimulator
from .mounts import MountProcess
from .readers import ONE_MODEL_MANIFEST, Readers, Results, read_through, write_reference

MiB = 1024 * 1024
SERVE_SECONDS = 60.0


@dataclass
class Round:
    kind: str
    old_pid: int
    new_pid: int
    seconds_to_serve: float


@dataclass
class Report:
    rounds: list[Round] = field(default_factory=list)
    results: Results | None = None
    leftover: list[int] = field(default_factory=list)   # earlier children still running
    failure: str | None = None
    log: str = ""                                       # the daemon log (keeper and children)

    def gaps(self) -> list[float]:
        """Seconds from each old daemon's stop (upgrades) to its successor's "serving" line:
        an upper bound of the time the connection had no server (the successor reads before
        it logs)."""
        out, stopped = [], None
        for line in self.log.splitlines():
            if "hand-over: pid" in line and "takes over" in line:
                stopped = _stamp(line)
            elif "vfs.mount: serving" in line and stopped is not None:
                out.append(_stamp(line) - stopped)
                stopped = None
        return out

    def phases(self) -> list[dict[str, float]]:
        """Each upgrade's moments (time of day, seconds) from the log lines of the keeper,
        the old daemon and its successor, in the order they come."""
        out: list[dict[str, float]] = []
        for line in self.log.splitlines():
            for marker, name in PHASE_LINES:
                if marker in line:
                    if name == "started" or not out:
                        out.append({})
                    out[-1].setdefault(name, _stamp(line))
        return [round_ for round_ in out if "stopped" in round_]

    def stall_account(self, at_least: float = 0.1) -> list[str]:
        """Every reader stall of `at_least` seconds, placed against the nearest upgrade's
        moments (milliseconds from the old daemon's stop): where the time went."""
        if self.results is None:
            return []
        rounds = self.phases()
        lines = []
        for reader in self.results.readers:
            for wall, seconds in reader.stalls:
                if seconds < at_least:
                    continue
                start = _time_of_day(wall)
                near = min(rounds, key=lambda r: abs(r["stopped"] - start), default=None)
                if near is None or abs(near["stopped"] - start) > 5:
                    lines.append(f"{reader.kind} {seconds * 1000:.0f} ms at {_clock(start)}, no upgrade near")
                    continue
                moments = " ".join(f"{name} {(t - near['stopped']) * 1000:+.0f}" for name, t in near.items())
                lines.append(f"{reader.kind} {seconds * 1000:.0f} ms at {_clock(start)}: from {(start - near['stopped']) * 1000:+.0f} "
                             f"to {(start + seconds - near['stopped']) * 1000:+.0f} ms; {moments}")
        return lines

    def ok(self, max_stall: float) -> bool:
        return (self.failure is None and self.results is not None and self.results.ok
                and self.results.longest_stall <= max_stall and not self.leftover)

    def summary(self) -> str:
        if self.failure or self.results is None:
            return f"failed after {len(self.rounds)} rounds: {self.failure}"
        serve = max((r.seconds_to_serve for r in self.rounds), default=0.0)
        gaps = sorted(self.gaps())
        gap = f"; stop to successor serving: median {gaps[len(gaps) // 2] * 1000:.0f} ms, longest " \
              f"{gaps[-1] * 1000:.0f} ms" if gaps else ""
        return (f"{len(self.rounds)} rounds ({', '.join(sorted({r.kind for r in self.rounds})) or 'none'}): "
                f"{self.results.summary()}; slowest successor served after {serve * 1000:.0f} ms; "
                f"{len(self.leftover)} old daemons left running{gap}")

    def as_dict(self) -> dict:
        return {"rounds": [vars(r) for r in self.rounds], "results": self.results.as_dict() if self.results else None,
                "leftover": self.leftover, "failure": self.failure}


def serving_pid(mount: MountProcess) -> int:
    pid = mount.daemon_pid()
    if pid is None:
        raise RuntimeError("no daemon serves")
    return pid


def kill_child(mount: MountProcess) -> int:
    pid = serving_pid(mount)
    os.kill(pid, signal.SIGKILL)
    return pid


def ask_upgrade(mount: MountProcess) -> int:
    pid = serving_pid(mount)
    os.kill(keeper_pid(mount), signal.SIGUSR1)
    return pid


def keeper_pid(mount: MountProcess) -> int:
    if mount.process is None:
        raise RuntimeError("the mount was not started")
    return mount.process.pid


ACTIONS = {"kill": kill_child, "upgrade": ask_upgrade}


def wait_for_successor(mount: MountProcess, old_pid: int, timeout: float = SERVE_SECONDS) -> int:
    """The pid of the child that serves after `old_pid`, once the keeper says it serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = mount.daemon_pid()
        if pid not in (None, old_pid) and f"keeper: daemon pid {pid} serves" in mount.log_text():
            return pid
        if mount.process is None or mount.process.poll() is not None:
            raise RuntimeError("the keeper exited")
        time.sleep(0.02)
    raise RuntimeError(f"no successor served within {timeout:.0f} s of pid {old_pid}")


def run_rounds(mount: MountProcess, readers: Readers, kinds: list[str], report: Report,
               pause: float = 0.5) -> None:
    """One hand-over per entry of `kinds`, each once every reader has moved on since the last."""
    for kind in kinds:
        if not readers.wait_for_progress(3, timeout=SERVE_SECONDS):
            report.failure = f"readers stopped making progress before round {len(report.rounds) + 1}: {readers.progress()}"
            return
        time.sleep(pause)
        started = time.monotonic()
        old = ACTIONS[kind](mount)
        new = wait_for_successor(mount, old)
        report.rounds.append(Round(kind, old, new, time.monotonic() - started))
    readers.wait_for_progress(3, timeout=SERVE_SECONDS)


def soak(kinds: list[str], size: int, mount_args=(), drop_every: float = 2.0, work: Path | None = None,
         idle: float = 0.0) -> Report:
    """Run the rounds in `work` (a new temporary directory, removed afterwards unless given),
    then let the readers run `idle` seconds more (with no rounds: the baseline)."""
    if work is None:
        with tempfile.TemporaryDirectory(prefix="lamina-handovers-") as scratch:
            return soak(kinds, size, mount_args, drop_every, Path(scratch), idle)
    report = Report()
    with HubSimulator() as hub:
        reference = write_reference(work / "model.gguf", size)
        hub.add_repo("readers/model", files={"model.gguf": reference})
        manifest = work / "models.yaml"
        manifest.write_text(ONE_MODEL_MANIFEST)
        mount = MountProcess(manifest, work / "mnt", work / "cache", hub.endpoint, work / "mount.log",
                             extra_args=mount_args, keeper=True)
        try:
            mount.start()
            path = mount.mountpoint / "model" / "model.gguf"
            read_through(path)
            first = serving_pid(mount)
            with Readers(path, reference, drop_every=drop_every) as readers:
                try:
                    run_rounds(mount, readers, kinds, report)
                    time.sleep(idle)
                except RuntimeError as exc:
                    report.failure = str(exc)
            report.results = readers.results
            report.leftover = [pid for pid in {r.old_pid for r in report.rounds} | {first}
                               if pid != mount.daemon_pid() and _running(pid)]
        finally:
            mount.stop()
            report.log = mount.log_text()
    return report


# Log lines that mark an upgrade's moments (keeper, old daemon, successor), in their order.
PHASE_LINES = (
    ("keeper: upgrade: starting a successor", "started"),
    ("hand-over: pid", "stopped"),                          # the old daemon reads no more requests
    ("hand-over: descriptors sent", "sent"),
    ("hand-over: connection received", "received"),
    ("hand-over: connection adopted", "adopted"),
    ("hand-over: reading requests", "reading"),
    ("hand-over: every request read is answered", "answered"),   # by the old daemon
    ("vfs.mount: serving", "serving"),
    ("keeper: upgrade: pid", "old exited"),
)


def _time_of_day(wall: float) -> float:
    local = time.localtime(wall)
    return local.tm_hour * 3600 + local.tm_min * 60 + local.tm_sec + wall % 1


def _clock(seconds: float) -> str:
    return f"{int(seconds // 3600):02d}:{int(seconds % 3600 // 60):02d}:{seconds % 60:06.3f}"


def _stamp(line: str) -> float:
    """Seconds of a log line's time of day (logs.py: `YYYY-MM-DD HH:MM:SS,mmm ...`)."""
    clock = line.split()[1]
    hours, minutes, seconds = clock.replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vfs.testing.handovers", description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=0, help="SIGKILLs of the serving child")
    parser.add_argument("--upgrades", type=int, default=0, help="upgrades asked of the keeper")
    parser.add_argument("--baseline", type=float, default=0.0, metavar="SECONDS",
                        help="then let the readers run this long (alone: the same readers with no hand-over)")
    parser.add_argument("--size", type=_size, default=256 * MiB)
    parser.add_argument("--max-stall", type=float, default=2.0, help="seconds (the target: 2 for kills)")
    parser.add_argument("--no-passthrough", action="store_true", help="every read through the daemon")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--work", type=Path, help="work here (kept) instead of a temporary directory")
    parser.add_argument("--log", type=Path, help="write the daemon log (keeper and children) here")
    args = parser.parse_args(argv)
    kinds = ["kill"] * args.kills + ["upgrade"] * args.upgrades
    if not kinds and not args.baseline:
        parser.error("ask for --kills N, --upgrades N or --baseline SECONDS")
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min)")
    report = soak(kinds, args.size, ["--no-passthrough"] if args.no_passthrough else [], work=args.work,
                  idle=args.baseline)
    print(report.summary())
    for line in report.stall_account():
        print("  stall:", line)
    if args.log:
        args.log.write_text(report.log)
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
    return 0 if report.ok(args.max_stall) else 1


if __name__ == "__main__":
    sys.exit(main())
