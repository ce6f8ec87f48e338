"""HTTP/1.1 on trio through h11: one request per connection, handed to a handler, answered.

The protocol (request parsing, framing, limits) is h11's; this module only moves bytes
between a trio stream and an h11 connection. A connection serves one request and is
closed (`Connection: close`): the API's clients are probes, scrapers and scripts, and a
server that never keeps idle connections cannot be held open by them.
"""

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 16 * 1024
CONNECTION_TIMEOUT = 30.0
JSON = "application/json"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON


def json_response(status: int, payload: object) -> Response:
    return Response(status, (json.dumps(payload, indent=2) + "\n").encode())


Handler = Callable[[str, str], Awaitable[Response]]


async def serve_connection(stream: trio.abc.Stream, handle: Handler, timeout: float = CONNECTION_TIMEOUT) -> None:
    """Read one request from `stream`, answer it with `handle(method, target)`, close."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        with trio.move_on_after(timeout):
            request = await _next_request(stream, connection)
            if request is not None:
                response = await handle(request.method.decode("ascii"), request.target.decode("latin-1"))
                await _send(stream, connection, response)
    except h11.RemoteProtocolError as exc:
        await _refuse(stream, connection, exc)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def _next_request(stream, connection):
    """The request's head, or None when the client closed before sending one."""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(4096))
            continue
        if isinstance(event, h11.Request):
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None
        raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} before a request")


async def _send(stream, connection, response):
    headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body))),
               ("Connection", "close")]
    data = connection.send(h11.Response(status_code=response.status, headers=headers))
    data += connection.send(h11.Data(data=response.body))
    data += connection.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _refuse(stream, connection, exc):
    """A malformed or oversized request gets the status h11 chose for it, when it still can."""
    if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    status = getattr(exc, "error_status_hint", 400)
    try:
        await _send(stream, connection, json_response(status, {"error": f"bad request: {exc}"}))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
