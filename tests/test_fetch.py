"""The fetch transport against the Hub simulator: shared connections, connecting ahead, proxies, reads into buffers.

Everything here goes through real sockets: the simulator is a real HTTP server, and the
proxy below is a real (tiny) forwarding proxy.
"""

import base64
import contextlib
import logging
import mmap
import os
import socket
import threading
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest

from conftest import eventually, needs_fuse
from vfs import errors, fetch
from vfs.connections import Pool
from vfs.fetch import RangeFetcher
from vfs.hub import Hub
from vfs.manifest import parse_manifest
from vfs.settings import Settings, from_environment
from vfs.snapshots import SnapshotStore
from vfs.sources import HfCacheSource, RemoteSource
from vfs.testing.hubsim import Fault, HubSimulator

MiB = 1024 * 1024
BIG = "big.bin"                 # LFS: the resolve redirects to the CDN origin
SMALL = "config.json"           # small: served by the API origin itself


@pytest.fixture
def files(hub):
    contents = {BIG: os.urandom(6 * MiB + 123), SMALL: os.urandom(200_000)}
    hub.add_repo("org/m", files=dict(contents))
    return contents


def url_of(hub, name):
    return f"{hub.endpoint}/org/m/resolve/main/{name}"


def settings_for(hub, tmp_path, **overrides):
    # Parts as big as any read here: these tests count the requests of one read and where
    # its retries resume (parts side by side are test_parts.py's business).
    values = dict(endpoint=hub.endpoint, cache_dir=tmp_path / "cache", read_timeout=2.0, read_deadline=10.0,
                  part_size=64 * MiB)
    return Settings(**{**values, **overrides})


@pytest.fixture
def fetcher(hub, tmp_path):
    fetcher = RangeFetcher(settings := settings_for(hub, tmp_path), settings.block_size)
    yield fetcher
    fetcher.pool.close()


def in_thread(function, *args):
    """`function(*args)` run in a thread of its own (as a worker thread would), its result returned."""
    result = []
    thread = threading.Thread(target=lambda: result.append(function(*args)))
    thread.start()
    thread.join()
    return result[0]


# ------------------------------------------------------------------ one pool for every thread


def test_worker_threads_share_one_connection_per_origin(hub, files, fetcher):
    for offset in (0, MiB, 5 * MiB):
        assert in_thread(fetcher.read_range, url_of(hub, BIG), offset, 4096) == files[BIG][offset:offset + 4096]
        assert in_thread(fetcher.read_range, url_of(hub, SMALL), offset // 100, 10) == \
            files[SMALL][offset // 100:offset // 100 + 10]
    print(f"6 reads from 6 threads: {hub.connections('api')} API and {hub.connections('cdn')} CDN connections")
    assert hub.connections("api") == 1 and hub.connections("cdn") == 1


def test_prepare_resolves_and_connects_to_the_cdn_before_the_first_read(hub, files, fetcher):
    in_thread(fetcher.prepare, url_of(hub, BIG))
    assert [(r.origin, r.method) for r in hub.log] == [("api", "HEAD")]
    assert eventually(lambda: hub.connections("cdn") == 1)      # connected, nothing asked yet
    assert in_thread(fetcher.read_range, url_of(hub, BIG), 3 * MiB, 1) == files[BIG][3 * MiB:3 * MiB + 1]
    assert [(r.origin, r.method) for r in hub.log] == [("api", "HEAD"), ("cdn", "GET")]
    assert hub.connections("cdn") == 1                          # the GET used the connection made ahead


def test_the_first_resolve_uses_the_connection_made_to_the_hub_at_mount_time(hub, files, fetcher):
    in_thread(fetcher.connect_to_hub)
    assert eventually(lambda: hub.connections("api") == 1) and hub.log == []
    in_thread(fetcher.prepare, url_of(hub, SMALL))
    assert [(r.origin, r.method) for r in hub.log] == [("api", "HEAD")] and hub.connections("api") == 1


def test_a_read_arriving_during_the_resolve_on_open_waits_for_it_instead_of_resolving_again(
        hub, files, fetcher):
    hub.add_fault(Fault("delay", origin="api", method="HEAD", times=1, seconds=0.3))
    preparing = threading.Thread(target=fetcher.prepare, args=(url_of(hub, BIG),))
    preparing.start()
    assert eventually(lambda: hub.faults[0].hits == 1)          # the resolve on open is under way
    assert in_thread(fetcher.read_range, url_of(hub, BIG), MiB, 10) == files[BIG][MiB:MiB + 10]
    preparing.join()
    assert [(r.origin, r.method) for r in hub.log] == [("api", "HEAD"), ("cdn", "GET")]


def test_a_response_left_unread_closes_its_connection(hub, files, fetcher, monkeypatch):
    hub.add_fault(Fault("ignore_range", origin="cdn", times=1))   # 200 + the whole body: most of it unread
    monkeypatch.setattr(fetch, "IGNORES_RANGE_MEMORY", 0.0)      # the next read asks for its range again
    for offset in (MiB, 2 * MiB):
        assert fetcher.read_range(url_of(hub, BIG), offset, 100) == files[BIG][offset:offset + 100]
    assert hub.connections("cdn") == 2


def test_idle_connections_per_origin_are_bounded(hub, files):
    pool = Pool(connect_timeout=5, read_timeout=5, max_idle=2)
    for _ in range(2):
        with contextlib.ExitStack() as lent:
            for _ in range(4):
                assert lent.enter_context(pool.request("HEAD", url_of(hub, SMALL), {})).status == 200
    print(f"4 at once, twice, 2 kept idle: {hub.connections('api')} connections")
    assert hub.connections("api") == 4 + 2


def test_a_connection_the_server_closed_while_idle_is_replaced_without_a_retry(files, tmp_path, caplog):
    with HubSimulator() as first:
        first.add_repo("org/m", files=dict(files))
        fetcher = RangeFetcher(settings := settings_for(first, tmp_path), settings.block_size)
        assert fetcher.read_range(url_of(first, BIG), 0, 10) == files[BIG][:10]
        ports = [urlsplit(first.endpoint).port, urlsplit(first.cdn_endpoint).port]
    # The same origins come back; the pooled connections are dead (the server closed them).
    with HubSimulator(port=ports[0], cdn_port=ports[1]) as again:
        again.add_repo("org/m", files=dict(files))
        caplog.set_level(logging.INFO, logger="vfs")
        started = time.monotonic()
        assert fetcher.read_range(url_of(again, BIG), MiB, 10) == files[BIG][MiB:MiB + 10]
        assert time.monotonic() - started < 0.25        # the first backoff is 0.25 s
        assert "retry in" not in caplog.text
        assert again.connections("cdn") == 1


# ------------------------------------------------------------------ reads into a caller's buffer


def test_read_range_into_fills_exactly_the_view_it_is_given(hub, files, fetcher):
    buffer = bytearray(b"\xaa" * (3 * MiB))
    fetcher.read_range_into(url_of(hub, BIG), 12345, memoryview(buffer)[4096:4096 + 2 * MiB])
    assert buffer[4096:4096 + 2 * MiB] == files[BIG][12345:12345 + 2 * MiB]
    assert buffer[:4096] == b"\xaa" * 4096 and buffer[4096 + 2 * MiB:] == b"\xaa" * (MiB - 4096)


def retried_from(hub):
    """Where the GET after the faulted one began."""
    ranges = [r.range for r in hub.log if r.method == "GET"]
    print(f"asked: {ranges}")
    (retry,) = ranges[1:]
    return int(retry.split("=")[1].split("-")[0])


@pytest.mark.parametrize("kind", ["reset", "short"])
def test_read_range_into_fills_a_page_aligned_view_across_a_broken_body(hub, files, fetcher, kind):
    hub.add_fault(Fault(kind, origin="cdn", method="GET", times=1, after_bytes=MiB + MiB // 2))
    pages = mmap.mmap(-1, 4 * MiB)                      # page-aligned, as the block cache passes
    view = memoryview(pages)
    fetcher.read_range_into(url_of(hub, BIG), 777, view)
    assert view == files[BIG][777:777 + 4 * MiB]
    view.release()
    pages.close()
    if kind == "short":                                 # a clean close: resumed at the exact byte
        assert retried_from(hub) == 777 + MiB + MiB // 2
    else:                                               # a reset: bytes of the broken read call are asked again
        assert 777 <= retried_from(hub) <= 777 + MiB + MiB // 2


def test_read_range_is_read_range_into_a_new_buffer(hub, files, fetcher):
    data = fetcher.read_range(url_of(hub, SMALL), 100, 1000)
    assert isinstance(data, bytearray) and data == files[SMALL][100:1100]


def test_remote_source_fetch_into(hub, files, fetcher):
    source = RemoteSource(fetcher, url_of(hub, BIG), "m/big.bin")
    view = memoryview(bytearray(MiB))
    source.fetch_into(2 * MiB, view)
    assert view == files[BIG][2 * MiB:3 * MiB]


def test_hf_cache_source_fetch_into_reads_the_copy_and_falls_back_to_the_hub(hub, files, fetcher, tmp_path):
    copy = tmp_path / "copy.bin"
    copy.write_bytes(files[BIG][:2 * MiB])            # a copy cut short since it was chosen
    blob = SimpleNamespace(failed_verifications=0)
    source = HfCacheSource(copy, RemoteSource(fetcher, url_of(hub, BIG), "m/big.bin"), blob)
    view = memoryview(bytearray(MiB))
    source.fetch_into(0, view)
    assert view == files[BIG][:MiB] and hub.log == []
    source.fetch_into(MiB + MiB // 2, view)           # runs past the copy's end: from the Hub
    assert view == files[BIG][MiB + MiB // 2:2 * MiB + MiB // 2] and len(hub.log) == 2
    blob.failed_verifications = 1                     # a copy that failed verification is not read
    source.fetch_into(0, view)
    assert view == files[BIG][:MiB] and len(hub.log) == 3


# ------------------------------------------------------------------ proxies


class ForwardProxy:
    """A tiny HTTP proxy: notes each connection's first request head, then relays the bytes.

    An absolute-URI request is relayed as it is (the simulator reads absolute URIs); a
    CONNECT is refused with 407, which is enough to see what a client asked for.
    """

    def __init__(self):
        self.heads = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk:
                return client.close()
            head += chunk
        lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:])
        self.heads.append((lines[0], fields.get("Proxy-Authorization")))
        method, target, _ = lines[0].split(" ")
        if method == "CONNECT":
            client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            return client.close()
        parts = urlsplit(target)
        upstream = socket.create_connection((parts.hostname, parts.port))
        upstream.sendall(head)
        threading.Thread(target=_relay, args=(upstream, client), daemon=True).start()
        _relay(client, upstream)

    def close(self):
        self._server.close()


def _relay(source, sink):
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxy():
    proxy = ForwardProxy()
    yield proxy
    proxy.close()


def proxied_fetcher(hub, tmp_path, env):
    settings = from_environment({"HF_HOME": str(tmp_path / "hf-home"), **env}, endpoint=hub.endpoint,
                                cache_dir=tmp_path / "cache", read_timeout=2.0, read_deadline=2.0, max_retries=1)
    return RangeFetcher(settings, settings.block_size)


def test_http_proxy_from_the_environment_carries_every_request(hub, files, proxy, tmp_path):
    fetcher = proxied_fetcher(hub, tmp_path, {"HTTP_PROXY": f"http://user:s3cret@127.0.0.1:{proxy.port}"})
    assert fetcher.read_range(url_of(hub, BIG), MiB, 100) == files[BIG][MiB:MiB + 100]
    assert fetcher.read_range(url_of(hub, SMALL), 0, 100) == files[SMALL][:100]
    credentials = "Basic " + base64.b64encode(b"user:s3cret").decode()
    print(f"the proxy saw: {[line for line, _ in proxy.heads]}")
    assert proxy.heads == [(f"HEAD {url_of(hub, BIG)} HTTP/1.1", credentials),
                           (f"GET {hub.cdn_endpoint}{hub.log[1].path} HTTP/1.1", credentials)]
    assert all(r.headers.get("Proxy-Authorization") == credentials for r in hub.log)


def test_the_hub_client_takes_the_same_proxy_as_the_bytes(hub, files, proxy, tmp_path):
    # The proxy is in the settings only, not in this process's environment: a client that
    # read the environment itself (huggingface_hub's did) would go around it.
    settings = proxied_fetcher(hub, tmp_path, {"HTTP_PROXY": f"http://user:s3cret@127.0.0.1:{proxy.port}"}).settings
    spec = parse_manifest("models:\n  m:\n    path: /models/m/\n    backend: vllm\n    hf: org/m\n").models[0]
    client = Hub(settings, SnapshotStore(settings.cache_dir))
    try:
        snapshot = client.resolve(spec)
    finally:
        client.close()
    assert sorted(f.path for f in snapshot.files) == sorted(files)
    credentials = "Basic " + base64.b64encode(b"user:s3cret").decode()
    print(f"the proxy saw: {[line for line, _ in proxy.heads]}; the Hub: {[r.path for r in hub.log]}")
    assert proxy.heads and all(line.startswith(f"GET {hub.endpoint}/api/models/org/m/") for line, _ in proxy.heads)
    assert [r.path.split("?")[0] for r in hub.log] == ["/api/models/org/m/revision/main",
                                                       f"/api/models/org/m/tree/{snapshot.commit}"]
    assert all(r.headers.get("Proxy-Authorization") == credentials for r in hub.log)


def test_no_proxy_bypasses_the_proxy(hub, files, proxy, tmp_path):
    fetcher = proxied_fetcher(hub, tmp_path, {"http_proxy": f"http://127.0.0.1:{proxy.port}",
                                              "no_proxy": "localhost,127.0.0.1"})
    assert fetcher.read_range(url_of(hub, BIG), 0, 100) == files[BIG][:100]
    assert proxy.heads == []


def test_https_goes_through_a_connect_tunnel_and_no_error_names_the_credentials(proxy, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    hub = SimpleNamespace(endpoint="https://hub.example:8443")
    fetcher = proxied_fetcher(hub, tmp_path, {"HTTPS_PROXY": f"http://user:s3cret@127.0.0.1:{proxy.port}"})
    with pytest.raises(errors.FetchError) as failure:
        fetcher.read_range("https://hub.example:8443/org/m/resolve/main/big.bin", 0, 100, "m/big.bin")
    print(f"refused tunnel: {failure.value}")
    assert proxy.heads[0] == ("CONNECT hub.example:8443 HTTP/1.0",
                              "Basic " + base64.b64encode(b"user:s3cret").decode())
    assert "s3cret" not in str(failure.value) and "s3cret" not in caplog.text
    assert "user:" not in str(failure.value) and "user:" not in caplog.text


# ------------------------------------------------------------------ through a mount


@needs_fuse
@pytest.mark.fuse
def test_opening_a_file_connects_to_the_cdn_before_its_first_read(hub, files, mount_factory):
    manifest = "models:\n  m:\n    path: /models/m/\n    backend: vllm\n    hf: org/m\n"
    mount = mount_factory(manifest, hub.endpoint, args=("--block-size", "1M"))
    path = mount.mountpoint / "m" / BIG
    fd = os.open(path, os.O_RDONLY)
    try:
        assert eventually(lambda: hub.connections("cdn") == 1)
        assert not [r for r in hub.log if r.origin == "cdn"]
        assert os.pread(fd, 1, 3 * MiB + 5) == files[BIG][3 * MiB + 5:3 * MiB + 6]
    finally:
        os.close(fd)
    first = next(r for r in hub.log if r.origin == "cdn")
    print(f"first CDN request: {first.method} {first.range}; CDN connections: {hub.connections('cdn')}")
    assert first.range.startswith(f"bytes={3 * MiB}")
