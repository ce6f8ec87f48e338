"""The passthrough status file: a mount says whether it serves files by passthrough, `info` reads it.

Kept apart from passthrough.py so that `info`, a cache-only command, never loads pyfuse3.
"""

import json
import os
from pathlib import Path

from .atomic import write_atomically

STATUS_FILE = "passthrough.json"        # in the cache dir while a mount runs


def write_status(cache_root: Path, off_reason: str | None, local: bool = True) -> None:
    status = {"pid": os.getpid(), "on": off_reason is None, "reason": off_reason, "local": local}
    write_atomically(cache_root / STATUS_FILE, (json.dumps(status) + "\n").encode())


def mount_status(cache_root: Path) -> dict | None:
    """The passthrough status of the live mount on this cache, or None without one."""
    try:
        status = json.loads((Path(cache_root) / STATUS_FILE).read_text())
        os.kill(status["pid"], 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return status


def file_passthrough(status: dict | None, verified: bool) -> str:
    """`info`'s word on one file: would the mount on this cache serve it by passthrough?"""
    if status is None:
        return "no mount"
    if not status["on"]:
        return f"no: {status['reason']}"
    return "yes" if verified else "no: not complete and verified yet"


def local_passthrough(status: dict | None) -> str:
    """`info`'s word on a local model's files: would the mount on this cache pass them through?"""
    if status is None:
        return "no mount"
    if not status["on"]:
        return f"no: {status['reason']}"
    if not status.get("local", True):
        return "no: local files are served by the daemon (--no-local-passthrough)"
    return "yes, unless open for writing elsewhere"
