"""Threads that live as long as the mount, for the blocking calls a reader is waiting on.

trio starts its worker threads on demand and lets them go after 10 s idle; starting one
costs 0.5-1 ms on this kind of VM, and a file's first open and first read (resolve the
redirect, fetch the bytes touched) would pay it every time the mount had been quiet for
10 s. These threads wait, parked, for exactly those calls.
"""

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar, TypeVarTuple, Unpack

import outcome
import trio

Result = TypeVar("Result")
Args = TypeVarTuple("Args")
Job = tuple[Callable[..., Any], tuple[Any, ...], Callable[[outcome.Outcome[Any]], None]]


class Workers:
    def __init__(self, count: int, name: str = "lamina-first-read"):
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        for number in range(count):
            threading.Thread(target=self._work, name=f"{name}-{number}", daemon=True).start()

    async def run(self, function: Callable[[Unpack[Args]], Result], *args: Unpack[Args]) -> Result:
        """`function(*args)` in one of the threads; its result, or its exception raised here.

        Not cancellable once handed over (like trio.to_thread.run_sync's default): the
        caller waits for the call to end, which the callee bounds with its own deadline.
        """
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def finished(result: outcome.Outcome[Result]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._jobs.put((function, args, finished))
        result: Result = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result

    def submit(self, function: Callable[[Unpack[Args]], object], *args: Unpack[Args]) -> None:
        """Start `function(*args)` in one of the threads now, without waiting for it (it must
        not raise: nobody is there to hear)."""
        self._jobs.put((function, args, lambda result: None))

    def _work(self) -> None:
        while True:
            function, args, finished = self._jobs.get()
            finished(outcome.capture(function, *args))
