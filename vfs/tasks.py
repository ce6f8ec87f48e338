"""Background work's one guard: a failure in a task is logged once, by the task's name, and ends nothing else.

A task started with `nursery.start_soon` that raised would cancel its nursery: the
mount's, or the block cache's, which means every reader on the host. So every
background task starts through `spawn_guarded` (or runs under `guard`, for work in a
worker thread or awaited in a loop), which decides what its failure costs:

- an *expected* failure (by default a `LaminaError`: the Hub said no, a file changed) is
  one line at the level the caller chose, "<name> failed: <why>";
- anything else is a bug: one ERROR line with its traceback, "<name> failed".

Either way `on_failure(exc)` runs after the line (to record the failure where a user
looks, e.g. a pull's status). Cancellation (trio.Cancelled, KeyboardInterrupt) is not a
failure and passes through.
"""

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVarTuple, Unpack

from . import errors

if TYPE_CHECKING:
    import trio

log = logging.getLogger(__name__)

Args = TypeVarTuple("Args")
Expected = tuple[type[Exception], ...]   # never BaseException: a Cancelled must go through


@contextlib.contextmanager
def guard(name: str, expected: Expected = (errors.LaminaError,), level: int = logging.WARNING,
          on_failure: Callable[[Exception], None] | None = None,
          extra: dict[str, object] | None = None) -> Iterator[None]:
    """Run the `with` block so that no Exception leaves it: each is logged once under `name`
    (`extra`: the log record's fields, e.g. logs.where's model and file)."""
    try:
        yield
    except expected as exc:
        log.log(level, "%s failed: %s", name, exc, extra=extra)
        if on_failure is not None:
            on_failure(exc)
    except Exception as exc:  # noqa: BLE001 - background work must never end the mount
        log.exception("%s failed", name, extra=extra)
        if on_failure is not None:
            on_failure(exc)


def spawn_guarded(nursery: "trio.Nursery", name: str, function: Callable[[Unpack[Args]], Awaitable[object]],
                  *args: Unpack[Args], **guard_options: Any) -> None:
    """Start `function(*args)` in `nursery`, under `guard(name, **guard_options)`."""
    nursery.start_soon(_guarded, name, function, args, guard_options, name=name)


async def _guarded(name: str, function: Callable[[Unpack[Args]], Awaitable[object]], args: tuple[Unpack[Args]],
                   guard_options: dict[str, Any]) -> None:
    with guard(name, **guard_options):
        await function(*args)
