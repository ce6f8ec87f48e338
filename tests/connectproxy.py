"""A small real HTTP CONNECT proxy for tests: it opens tunnels and relays bytes it cannot read.

It answers only CONNECT (anything else gets 405), records every tunnel's target and the
bytes it relayed each way, and keeps the first bytes of each direction so a test can show
that what crossed it was TLS (a handshake record), never a plaintext request or body.
"""

import socket
import threading
from dataclasses import dataclass, field

KEEP = 64 * 1024             # bytes of each direction kept for inspection


@dataclass
class Tunnel:
    target: str                         # host:port named in the CONNECT line
    upstream: str                       # the proxy's own host:port towards the origin
    sent_up: bytearray = field(default_factory=bytearray)       # client -> origin, first KEEP bytes
    sent_down: bytearray = field(default_factory=bytearray)     # origin -> client, first KEEP bytes
    bytes_up: int = 0
    bytes_down: int = 0


class ConnectProxy:
    def __init__(self):
        self.tunnels: list[Tunnel] = []
        self.refused: list[str] = []    # request lines that were not CONNECT
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._stopping = False
        self._threads = []

    @property
    def url(self):
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        thread = threading.Thread(target=self._accept_loop, daemon=True, name="connect-proxy")
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc):
        self._stopping = True
        self._listener.close()

    def _accept_loop(self):
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        with client:
            head = _read_head(client)
            if not head:
                return              # connected and closed without a request (a pool's spare)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, _, rest = line.partition(" ")
            if method != "CONNECT":
                with self._lock:
                    self.refused.append(line)
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            target = rest.split(" ", 1)[0]
            host, _, port = target.rpartition(":")
            try:
                upstream = socket.create_connection((host, int(port)), timeout=10)
            except OSError:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            tunnel = Tunnel(target, "%s:%d" % upstream.getsockname()[:2])
            with self._lock:
                self.tunnels.append(tunnel)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            with upstream:
                upstream.settimeout(None)
                down = threading.Thread(target=_relay, args=(upstream, client, tunnel, "down"), daemon=True)
                down.start()
                _relay(client, upstream, tunnel, "up")
                down.join(timeout=30)


def _read_head(connection):
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = connection.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _relay(source, sink, tunnel, direction):
    kept = tunnel.sent_up if direction == "up" else tunnel.sent_down
    try:
        while chunk := source.recv(256 * 1024):
            if len(kept) < KEEP:
                kept.extend(chunk[:KEEP - len(kept)])
            if direction == "up":
                tunnel.bytes_up += len(chunk)
            else:
                tunnel.bytes_down += len(chunk)
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
