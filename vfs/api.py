"""The REST API beside a mount: health, readiness, models, a pull, a manifest reload.

    GET  /healthz              liveness: the trio loop answers and statvfs of the mount root returns
    GET  /readyz               readiness: every manifest model resolved and the mount serving
    GET  /metrics              Prometheus text format (docs/METRICS.md)
    GET  /models               every manifest model with size and cache state
    GET  /models/<name>        one model, per file
    POST /download/<org/name>  fetch every model of that Hub repo fully, in the background (202)
                               (a local model's name: 200, nothing to fetch)
    GET  /download/<org/name>  progress of those pulls
    POST /refresh              reload models.yaml and re-resolve revisions; the mount shows the result

HTTP is h11's (httpserver.py), bound to loopback unless told otherwise. It is model-aware
only: /download never adds a model; the manifest is the one source of truth. Answers
never carry the Hub token.
"""

import logging
import urllib.parse

import trio

from . import errors, metrics
from .health import MountProbe
from .httpserver import Response, json_response, serve_connection
from .report import not_ready
from .tasks import spawn_guarded

log = logging.getLogger(__name__)


class Api:
    def __init__(self, fs, mountpoint):
        self.fs = fs
        self.probe = MountProbe(mountpoint)
        self.serving = False   # set once the mount has answered its first request
        self.pulls = {}        # hf repo -> {"total": bytes, "done": bytes, "state": str}

    async def serve(self, host, port, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(port, host=host)
        log.info("REST API on http://%s:%d", host, listeners[0].socket.getsockname()[1])
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream):
        await serve_connection(stream, self.answer)

    async def answer(self, method: str, target: str) -> Response:
        path = urllib.parse.unquote(target.split("?")[0])
        answer = await self.route(method, path)
        return answer if isinstance(answer, Response) else json_response(*answer)

    async def route(self, method, path):
        parts = [p for p in path.split("/") if p]
        if method == "GET" and parts == ["healthz"]:
            return await self._health()
        if method == "GET" and parts == ["readyz"]:
            return await self._readiness()
        if method == "GET" and parts == ["metrics"]:
            return await self._metrics()
        if parts == ["models"] and method == "GET":
            return 200, self.fs.reports()
        if len(parts) == 2 and parts[0] == "models" and method == "GET":
            return self._one_model(parts[1])
        if parts[:1] == ["download"] and len(parts) in (2, 3):
            return await self._download(method, "/".join(parts[1:]))
        if parts == ["refresh"] and method == "POST":
            return await self._refresh()
        if parts in (["models"], ["refresh"], ["healthz"], ["readyz"], ["metrics"]) or parts[:1] == ["models"]:
            return 405, {"error": f"{method} is not allowed on {path}"}
        return 404, {"error": f"no such endpoint: {path}"}

    async def _health(self):
        health = await self.probe.check()
        return (200 if health.ok else 503), health.as_dict()

    async def _readiness(self):
        if not self.serving:
            return 503, {"ready": False, "reason": "the mount is not serving yet", "models": []}
        health = await self.probe.check()
        if not health.ok:
            return 503, {"ready": False, "reason": health.reason, "models": []}
        waiting = not_ready(self.fs.manifest, self.fs.snapshots)
        if waiting:
            return 503, {"ready": False, "reason": f"{len(waiting)} models not ready", "models": waiting}
        return 200, {"ready": True, "models": []}

    async def _metrics(self):
        # The directory scan (one stat per blob) runs in a thread; the counters and the models'
        # state are read here, on the trio thread that writes them.
        used = await trio.to_thread.run_sync(self.fs.cache.directory.usage)
        text = metrics.exposition(metrics.STATS, used, self.fs.cache.max_size, self.fs.reports())
        return Response(200, text, metrics.CONTENT_TYPE)

    def _one_model(self, name):
        for report in self.fs.reports():
            if report["name"] == name:
                return 200, report
        return 404, {"error": f"no model named {name!r} in the manifest"}

    async def _download(self, method, repo):
        models = [spec.name for spec in self.fs.manifest.models if spec.hf == repo]
        local = [spec for spec in self.fs.manifest.models if spec.local and spec.name == repo]
        if local and method in ("GET", "POST"):
            return 200, {"model": repo, "source": "local", "local": local[0].local, "state": "done",
                         "message": "nothing to fetch: the model is served from local files"}
        if not models:
            return 404, {"error": f"no model in the manifest uses {repo!r}; add one with `lamina-llm-cache add`"}
        if method == "GET":
            return 200, {"repo": repo, "models": models, **self.pulls.get(repo, {"state": "idle"})}
        if method != "POST":
            return 405, {"error": f"{method} is not allowed on /download"}
        if self.pulls.get(repo, {}).get("state") != "running":
            refs = [node.file for node in self.fs.tree.files() if node.model in models]
            progress = self.pulls[repo] = {"total": sum(r.size for r in refs), "done": 0, "state": "running"}
            spawn_guarded(self.fs.nursery, f"pull of {repo}", self._pull, progress, refs, level=logging.ERROR,
                          on_failure=lambda exc: progress.update(state="failed", error=_public(exc)))
        return 202, {"repo": repo, "models": models, **self.pulls[repo]}

    async def _pull(self, progress, refs):
        for ref in {r.content_id: r for r in refs}.values():
            await self.fs.fill(ref, lambda length: progress.__setitem__("done", progress["done"] + length))
        progress["state"] = "done"

    async def _refresh(self):
        try:
            changed = await self.fs.refresh()
        except errors.ManifestError as exc:
            return 400, {"error": str(exc)}
        except errors.LaminaError as exc:
            return 502, {"error": str(exc)}
        return 200, {"models": [spec.name for spec in self.fs.manifest.models], "changed_entries": changed}


def _public(exc):
    """What a pull's status says of its failure: ours in full, a bug only by reference to the log."""
    return str(exc) if isinstance(exc, errors.LaminaError) else "internal error (see the log)"


def parse_address(text):
    """'HOST:PORT' or 'PORT' -> (host, port); loopback unless a host is given."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise errors.UsageError(f"--api wants HOST:PORT, got {text!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)
