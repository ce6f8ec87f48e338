"""The mount's long-lived threads: results and errors come back, threads stay for the next call."""

import threading

import pytest
import trio

from vfs.workers import Workers


async def test_a_call_returns_its_result_from_another_thread():
    workers = Workers(2, "test-workers")
    total, name = await workers.run(lambda a, b: (a + b, threading.current_thread().name), 2, 3)
    assert total == 5 and name in ("test-workers-0", "test-workers-1")


async def test_an_exception_is_raised_in_the_caller():
    workers = Workers(1)

    def broken():
        raise ValueError("from the worker")

    with pytest.raises(ValueError, match="from the worker"):
        await workers.run(broken)
    assert await workers.run(lambda: "still serving") == "still serving"


async def test_more_calls_than_threads_all_complete_and_the_threads_stay():
    workers = Workers(2, "test-stay")
    results = []

    async def call(number):
        results.append(await workers.run(lambda: number))

    async with trio.open_nursery() as nursery:
        for number in range(20):
            nursery.start_soon(call, number)
    assert sorted(results) == list(range(20))
    assert sum(t.name.startswith("test-stay-") for t in threading.enumerate()) == 2


async def test_submit_runs_without_waiting():
    workers = Workers(1)
    ran = threading.Event()
    workers.submit(ran.set)
    assert await trio.to_thread.run_sync(ran.wait, 5)
