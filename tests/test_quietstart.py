"""A successor builds at a lower CPU priority while the old daemon serves, and serves at its own."""

import json
import os
import subprocess
import sys

from vfs.control import STARTUP_NICENESS, _may_raise_priority_to

# In a process of its own (niceness is per thread on Linux): a thread started while the
# priority is low inherits it, and must get its own back too.
PROBE = """
import json, os, threading
from vfs.control import QuietStart
before = os.getpriority(os.PRIO_PROCESS, 0)
start = QuietStart()
during = os.getpriority(os.PRIO_PROCESS, 0)
started, finish, tid = threading.Event(), threading.Event(), []
def worker():
    tid.append(threading.get_native_id()); started.set(); finish.wait()
thread = threading.Thread(target=worker); thread.start(); started.wait()
worker_during = os.getpriority(os.PRIO_PROCESS, tid[0])
start.end()
after = os.getpriority(os.PRIO_PROCESS, 0)
worker_after = os.getpriority(os.PRIO_PROCESS, tid[0])
finish.set(); thread.join()
print(json.dumps([before, start.lowered, during, worker_during, after, worker_after]))
"""


def probe(niceness=0):
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: os.nice(niceness))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_successor_starts_lower_and_every_thread_gets_its_priority_back():
    before, lowered, during, worker_during, after, worker_after = probe()
    if _may_raise_priority_to(before):
        assert during == worker_during == min(19, before + STARTUP_NICENESS)
    else:                               # it could not raise it again: never lowered
        assert during == worker_during == before
    assert after == worker_after == before
    assert lowered is False             # ended


def test_a_successor_already_at_the_lowest_priority_stays_there():
    before, _, during, _, after, _ = probe(niceness=19)
    assert before == during == after == 19
