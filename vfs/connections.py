"""HTTP/1.1 connections for the fetch path: one pool shared by every worker thread, and proxies.

The only importer of http.client. `Pool.request` lends a connection to one thread for
one exchange and takes it back after:

- Idle connections are kept per origin (scheme, host, port), at most `max_idle` each; the
  one returned last is lent first (its server has had the least time to close it).
- A connection goes back idle only when its response was read to the end and the server
  did not ask to close it. One that errored, or whose body was left unread, is closed:
  the next request on it would take the leftover bytes for its answer.
- A reused connection that fails before the first byte of its answer is tried once more
  on a new one: the server may have closed it while it sat idle (GET and HEAD are safe
  to repeat). A timeout is not retried here: a silent server is the caller's business.
- `connect_timeout` covers the TCP connect, a proxy's CONNECT and the TLS handshake;
  `read_timeout` is then the socket's timeout for every send and receive.
- TLS trusts what tls.py says (`ca_bundle`, else the system's CAs) and always checks the
  certificate and the name; through a proxy, the name checked is the origin's, not the proxy's.

Proxies are the ones Settings found in the environment (HTTP_PROXY, HTTPS_PROXY,
ALL_PROXY, NO_PROXY: what requests and curl read). An https origin is reached through a
CONNECT tunnel, an http one with absolute-URI requests. Proxy credentials travel only in
Proxy-Authorization, and no message here names a proxy URL.

Concurrency: `_lock` guards the idle lists and nothing else; nothing waits on the network
or the disk while holding it. A lent connection belongs to the thread that holds it.
"""

import base64
import contextlib
import http.client
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import errors, tls
from .metrics import STATS

MAX_IDLE = 16           # per origin: the fetch workers plus the direct first-touch reads
USER_AGENT = "lamina-llm-cache"

# What a request or a body read raises when the network or the peer fails it.
TRANSPORT_ERRORS = (OSError, http.client.HTTPException)
# What a request on a connection the server already closed raises before any answer.
_STALE = (ConnectionError, http.client.RemoteDisconnected, ssl.SSLEOFError)
# urllib's NO_PROXY matching, as requests uses it: undocumented, so absent from the type stubs.
_bypasses_proxy: Callable[[str, Mapping[str, str]], bool] = getattr(urllib.request, "proxy_bypass_environment")

Origin = tuple[str, str | None, int | None]     # (scheme, host, port)


def origin(url: str) -> Origin:
    """(scheme, host, port) of `url`: what a connection is kept for, and what a token may go to."""
    parts = urllib.parse.urlsplit(url)
    return (parts.scheme, parts.hostname, parts.port)


@dataclass
class _Connection:
    """An http.client connection, the origin it talks to, and how requests on it are written."""

    http: http.client.HTTPConnection
    origin: Origin
    absolute_form: bool = False       # through an http proxy: the request line names the URL
    headers: dict[str, str] = field(default_factory=dict)     # sent with every request (proxy credentials)

    def close(self) -> None:
        self.http.close()


@dataclass(frozen=True)
class _Proxy:
    host: str
    port: int
    headers: dict[str, str]


class Pool:
    def __init__(self, connect_timeout: float, read_timeout: float, proxies: Mapping[str, str] | None = None,
                 max_idle: int = MAX_IDLE, ca_bundle: Path | None = None):
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.ca_bundle = ca_bundle
        self.proxies = dict(proxies or {})
        self.max_idle = max_idle
        self._idle: dict[Origin, list[_Connection]] = {}    # the last one returned at the end
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        self._ssl_lock = threading.Lock()

    @contextlib.contextmanager
    def request(self, method: str, url: str, headers: Mapping[str, str]) -> Iterator[http.client.HTTPResponse]:
        """The response to one request; its connection is lent for the `with` block only.

        Each request is counted by method and status, with the time to its answer's head."""
        asked = time.perf_counter()
        try:
            connection, response = self._exchange(method, url, headers)
        except BaseException:
            STATS.fetch_answered(method, "error")
            raise
        first_byte = time.perf_counter() - asked if method == "GET" else None
        STATS.fetch_answered(method, str(response.status), first_byte)
        try:
            yield response
        except BaseException:
            connection.close()
            raise
        self._give_back(connection, response)

    def connect_ahead(self, url: str) -> None:
        """Open a connection to `url`'s origin and leave it idle, unless one is idle already."""
        key = origin(url)
        with self._lock:
            if self._idle.get(key):
                return
        self._park(self._connect(key))

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def _exchange(self, method: str, url: str,
                  headers: Mapping[str, str]) -> tuple[_Connection, http.client.HTTPResponse]:
        key = origin(url)
        reused = self._take(key)
        if reused is not None:
            try:
                return reused, _send_or_close(reused, method, url, headers)
            except _STALE:
                pass            # the server closed it while it sat idle: once more, on a new one
        connection = self._connect(key)
        return connection, _send_or_close(connection, method, url, headers)

    def _take(self, key: Origin) -> _Connection | None:
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def _give_back(self, connection: _Connection, response: http.client.HTTPResponse) -> None:
        if response.length == 0 and not response.isclosed():
            response.read()             # HEAD, or an empty body: marks the exchange complete
        if response.isclosed() and not response.will_close:
            self._park(connection)
        else:
            connection.close()

    def _park(self, connection: _Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(connection.origin, [])
            if len(idle) < self.max_idle:
                idle.append(connection)
                return
        connection.close()

    def _connect(self, key: Origin) -> _Connection:
        """A new connection to `key`'s origin, connected, its sends and receives under read_timeout."""
        scheme, host, port = key
        if host is None:
            raise errors.FetchError(f"a {scheme} URL without a host")
        proxy = self._proxy_for(scheme, host, port)
        raw = self._new_http(scheme, host, port, proxy)
        try:
            raw.connect()           # TCP, a proxy's CONNECT, TLS: all under connect_timeout
            raw.sock.settimeout(self.read_timeout)
        except BaseException:
            raw.close()
            raise
        through_proxy = proxy is not None and scheme == "http"
        headers = proxy.headers if proxy is not None and through_proxy else {}
        return _Connection(raw, key, absolute_form=through_proxy, headers=headers)

    def _new_http(self, scheme: str, host: str, port: int | None, proxy: _Proxy | None) -> http.client.HTTPConnection:
        address = (proxy.host, proxy.port) if proxy else (host, port)
        if scheme == "http":
            return http.client.HTTPConnection(*address, timeout=self.connect_timeout)
        if scheme != "https":
            raise errors.FetchError(f"unsupported URL scheme {scheme!r}")
        raw = http.client.HTTPSConnection(*address, timeout=self.connect_timeout, context=self._ssl_context())
        if proxy:
            raw.set_tunnel(host, port, headers=proxy.headers)   # the credentials go in the CONNECT only
        return raw

    def _proxy_for(self, scheme: str, host: str, port: int | None) -> _Proxy | None:
        url = self.proxies.get(scheme) or self.proxies.get("all")
        if not url or _bypasses_proxy(_host_port(host, port), self.proxies):
            return None
        return _parse_proxy(url, scheme)

    def _ssl_context(self) -> ssl.SSLContext:
        # Built on first use: loading the CA store costs milliseconds an http-only mount never pays.
        with self._ssl_lock:
            if self._ssl is None:
                self._ssl = tls.client_context(self.ca_bundle)
            return self._ssl


def _send_or_close(connection: _Connection, method: str, url: str,
                   headers: Mapping[str, str]) -> http.client.HTTPResponse:
    """The response's head; a connection that failed is closed (its state is unknown)."""
    target = url if connection.absolute_form else _path_and_query(url)
    all_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **connection.headers, **headers}
    try:
        connection.http.request(method, target, headers=all_headers)
        return connection.http.getresponse()
    except BaseException:
        connection.close()
        raise


def _path_and_query(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _host_port(host: str, port: int | None) -> str:
    return host if port is None else f"{host}:{port}"


def _parse_proxy(url: str, scheme: str) -> _Proxy:
    """The proxy for `scheme` requests; errors name the scheme, never the URL (it may hold credentials)."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http":
        raise errors.FetchError(f"the proxy for {scheme} is a {parts.scheme}:// proxy: only http:// proxies are supported")
    try:
        port = parts.port or 80
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise errors.FetchError(f"the proxy for {scheme} is not a valid host:port URL")
    headers: dict[str, str] = {}
    if parts.username is not None:
        credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
    return _Proxy(parts.hostname, port, headers)
