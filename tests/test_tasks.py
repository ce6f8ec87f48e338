"""The one guard of background work (vfs/tasks.py): a task's failure costs that task, logged once.

No FUSE, no network, no root.
"""

import logging

import pytest
import trio

from vfs import errors
from vfs.tasks import guard, spawn_guarded


def lines(caplog):
    return [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records if r.name == "vfs.tasks"]


async def test_a_failed_background_task_leaves_its_siblings_running(caplog):
    caplog.set_level(logging.INFO)
    finished = []

    async def fails():
        raise errors.FetchError("the Hub said no")

    async def works():
        await trio.sleep(0.01)
        finished.append("sibling")

    async with trio.open_nursery() as nursery:
        spawn_guarded(nursery, "m/f.gguf: warm-up", fails, level=logging.INFO)
        spawn_guarded(nursery, "pull of org/repo", works)
    assert finished == ["sibling"]
    assert lines(caplog) == [("INFO", "m/f.gguf: warm-up failed: the Hub said no", False)]


async def test_a_bug_in_a_background_task_is_one_error_with_its_traceback(caplog):
    failures = []

    async def crashes(argument):
        raise RuntimeError(f"a bug with {argument}")

    async with trio.open_nursery() as nursery:
        spawn_guarded(nursery, "pull of org/repo", crashes, 7, level=logging.ERROR, on_failure=failures.append)
    assert lines(caplog) == [("ERROR", "pull of org/repo failed", True)]
    assert [str(exc) for exc in failures] == ["a bug with 7"]


def test_what_the_caller_expects_is_one_line_at_its_level(caplog):
    caplog.set_level(logging.DEBUG)
    with guard("block 3 loaded ahead", expected=(Exception,), level=logging.DEBUG):
        raise OSError(5, "Input/output error")
    assert lines(caplog) == [("DEBUG", "block 3 loaded ahead failed: [Errno 5] Input/output error", False)]


async def test_cancellation_is_not_a_failure(caplog):
    with trio.move_on_after(0.01):
        with guard("waits forever"):
            await trio.sleep_forever()
    assert lines(caplog) == []


def test_keyboard_interrupt_passes_through(caplog):
    with pytest.raises(KeyboardInterrupt):
        with guard("interrupted"):
            raise KeyboardInterrupt
    assert lines(caplog) == []
