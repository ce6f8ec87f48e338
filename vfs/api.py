"""The REST API beside a mount: list models, one model's state, start a pull, reload the manifest.

    GET  /models               every manifest model with size and cache state
    GET  /models/<name>        one model, per file
    POST /download/<org/name>  fetch every model of that Hub repo fully, in the background (202)
    GET  /download/<org/name>  progress of those pulls
    POST /refresh              reload models.yaml and re-pin revisions; the mount shows the result

A small HTTP/1.1 server on trio (one request per connection), bound to loopback unless
told otherwise. It is model-aware only: /download never adds a model; the manifest is the
one source of truth. Answers never carry the Hub token.
"""

import json
import logging
import urllib.parse

import trio

from . import errors

log = logging.getLogger(__name__)

MAX_REQUEST = 16 * 1024
STATUS_TEXT = {200: "OK", 202: "Accepted", 400: "Bad Request", 404: "Not Found",
               405: "Method Not Allowed", 413: "Payload Too Large", 502: "Bad Gateway"}


class Api:
    def __init__(self, fs):
        self.fs = fs
        self.pulls = {}        # hf repo -> {"total": bytes, "done": bytes, "state": str}

    async def serve(self, host, port, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(port, host=host)
        log.info("REST API on http://%s:%d", host, listeners[0].socket.getsockname()[1])
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream):
        try:
            with trio.move_on_after(30):
                method, target = await read_request(stream)
                status, payload = await self.route(method, urllib.parse.unquote(target.split("?")[0]))
                await stream.send_all(encode_response(status, payload))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except ValueError as exc:
            await _send_quietly(stream, encode_response(400, {"error": str(exc)}))
        finally:
            await stream.aclose()

    async def route(self, method, path):
        parts = [p for p in path.split("/") if p]
        if parts == ["models"] and method == "GET":
            return 200, self.fs.reports()
        if len(parts) == 2 and parts[0] == "models" and method == "GET":
            return self._one_model(parts[1])
        if parts[:1] == ["download"] and len(parts) in (2, 3):
            return await self._download(method, "/".join(parts[1:]))
        if parts == ["refresh"] and method == "POST":
            return await self._refresh()
        if parts in (["models"], ["refresh"]) or parts[:1] == ["models"]:
            return 405, {"error": f"{method} is not allowed on {path}"}
        return 404, {"error": f"no such endpoint: {path}"}

    def _one_model(self, name):
        for report in self.fs.reports():
            if report["name"] == name:
                return 200, report
        return 404, {"error": f"no model named {name!r} in the manifest"}

    async def _download(self, method, repo):
        models = [spec.name for spec in self.fs.manifest.models if spec.hf == repo]
        if not models:
            return 404, {"error": f"no model in the manifest uses {repo!r}; add one with `lamina-llm-cache add`"}
        if method == "GET":
            return 200, {"repo": repo, "models": models, **self.pulls.get(repo, {"state": "idle"})}
        if method != "POST":
            return 405, {"error": f"{method} is not allowed on /download"}
        if self.pulls.get(repo, {}).get("state") != "running":
            refs = [node.file for node in self.fs.tree.files() if node.model in models]
            self.pulls[repo] = {"total": sum(r.size for r in refs), "done": 0, "state": "running"}
            self.fs.nursery.start_soon(self._pull, repo, refs)
        return 202, {"repo": repo, "models": models, **self.pulls[repo]}

    async def _pull(self, repo, refs):
        progress = self.pulls[repo]
        try:
            for ref in {r.content_id: r for r in refs}.values():
                await self.fs.fill(ref, lambda length: progress.__setitem__("done", progress["done"] + length))
            progress["state"] = "done"
        except errors.LaminaError as exc:
            progress.update(state="failed", error=str(exc))
            log.error("pull of %s failed: %s", repo, exc)
        except Exception:  # noqa: BLE001 - a background task must never end the mount
            progress.update(state="failed", error="internal error (see the log)")
            log.exception("pull of %s failed", repo)

    async def _refresh(self):
        try:
            changed = await self.fs.refresh()
        except errors.ManifestError as exc:
            return 400, {"error": str(exc)}
        except errors.LaminaError as exc:
            return 502, {"error": str(exc)}
        return 200, {"models": [spec.name for spec in self.fs.manifest.models], "changed_entries": changed}


async def read_request(stream):
    """(method, target) of one HTTP request; the body, if any, is ignored."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise ValueError("connection closed before the request ended")
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too large")
    request_line = data.split(b"\r\n", 1)[0].decode("latin-1")
    fields = request_line.split(" ")
    if len(fields) != 3 or not fields[1].startswith("/"):
        raise ValueError(f"malformed request line: {request_line[:80]!r}")
    return fields[0], fields[1]


def encode_response(status, payload):
    body = (json.dumps(payload, indent=2) + "\n").encode()
    head = (f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def _send_quietly(stream, data):
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def parse_address(text):
    """'HOST:PORT' or 'PORT' -> (host, port); loopback unless a host is given."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise errors.UsageError(f"--api wants HOST:PORT, got {text!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)
