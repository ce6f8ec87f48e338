"""HTTPS end to end: the simulator's Hub and CDN speak TLS with a CA made here, and a real mount
trusts it the way huggingface_hub users say so (SSL_CERT_FILE, REQUESTS_CA_BUNDLE).

Exact bytes over TLS from both origins; a TLS session cut mid-body is retried; a
certificate that does not check out is refused with a message that says so, never
accepted; and a whole TLS session runs through an HTTP proxy's CONNECT tunnel, the proxy
seeing only ciphertext.
"""

import errno

import pytest

from conftest import eventually, needs_fuse
from connectproxy import ConnectProxy
from faultkit import BIG, BLOCK, MANIFEST, SHORT_BOUNDS, SMALL, MiB, error_lines, file_path, report, timed_pread
from vfs.testing.hubsim import Fault, HubSimulator
from vfs.testing.mounts import MountFailed
from vfs.testing.tlsca import TestCA

pytestmark = [needs_fuse, pytest.mark.fuse]


@pytest.fixture
def ca():
    return TestCA()


@pytest.fixture
def ca_file(ca, tmp_path):
    return ca.write_ca_file(tmp_path / "ca" / "test-ca.pem")


@pytest.fixture
def sources(random_file):
    return {BIG: random_file(BIG, 5 * MiB + 12345).read_bytes(),
            SMALL: random_file(SMALL, 300_000, seed=2).read_bytes()}


def https_hub(sources, **tls):
    hub = HubSimulator(**tls)
    hub.add_repo("org/weights", files=dict(sources))
    return hub


@pytest.fixture
def tls_hub(ca, sources):
    with https_hub(sources, tls=ca.server_context()) as hub:
        yield hub


# The CA settings a machine may already carry: each test names the one it means.
CA_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def mount_over_tls(mount_factory, hub, env, args=()):
    assert hub.endpoint.startswith("https://") and hub.cdn_endpoint.startswith("https://")
    env = {**dict.fromkeys(CA_VARIABLES, ""), **env}
    return mount_factory(MANIFEST, hub.endpoint, env=env, args=BLOCK + SHORT_BOUNDS + tuple(args))


def read_whole(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"])
def test_bytes_over_https_from_the_hub_and_its_cdn_are_exact(tls_hub, ca_file, sources, mount_factory, variable):
    # The mount starting at all means the Hub client (a revision's commit, the tree listing)
    # trusted the CA too: REQUESTS_CA_BUNDLE is what huggingface_hub users set from the requests era.
    mount = mount_over_tls(mount_factory, tls_hub, {variable: str(ca_file)})
    for name, data in sources.items():
        assert read_whole(file_path(mount, name)) == data
    origins = {record.origin for record in tls_hub.log if record.status in (200, 206)}
    print(f"{variable}: {len(tls_hub.log)} requests over TLS, answered by {sorted(origins)}")
    assert origins == {"api", "cdn"}


@pytest.mark.parametrize("kind", ["reset", "short"])
def test_a_tls_session_cut_mid_body_is_retried_for_exact_bytes(tls_hub, ca_file, sources, mount_factory, kind):
    fault = tls_hub.add_fault(Fault(kind, origin="cdn", method="GET", times=2, after_bytes=200_000))
    mount = mount_over_tls(mount_factory, tls_hub, {"SSL_CERT_FILE": str(ca_file)})
    assert read_whole(file_path(mount, BIG)) == sources[BIG]
    print(f"{kind} after 200 kB of a TLS body, twice: exact bytes; log says "
          f"{[l.split(': ', 2)[-1] for l in mount.log_text().splitlines() if 'mid-body' in l][:2]}")
    assert fault.hits == 2
    assert "connection broke mid-body" in mount.log_text() or "short body" in mount.log_text()


def test_a_hub_whose_certificate_no_trusted_ca_signed_is_refused_at_mount(tls_hub, mount_factory):
    with pytest.raises(MountFailed) as failure:
        mount_over_tls(mount_factory, tls_hub, {})         # the system's CAs: the test CA is not among them
    message = str(failure.value)
    print(f"mount refused: {message}")
    host = tls_hub.endpoint.removeprefix("https://")
    assert f"TLS certificate of {host} refused (unable to get local issuer certificate)" in message
    assert "SSL_CERT_FILE or REQUESTS_CA_BUNDLE" in message
    assert not [r for r in tls_hub.log if r.status is not None]       # no request ever got through


@pytest.mark.parametrize("cdn_certificate, reason", [
    ("another CA", "unable to get local issuer certificate"),
    ("another name", "IP address mismatch, certificate is not valid for '127.0.0.1'."),
])
def test_a_cdn_certificate_that_does_not_check_out_fails_the_read_at_once_and_says_why(
        ca, ca_file, sources, mount_factory, cdn_certificate, reason):
    cdn_tls = TestCA().server_context() if cdn_certificate == "another CA" else ca.server_context("example.invalid")
    with https_hub(sources, tls=ca.server_context(), cdn_tls=cdn_tls) as hub:
        mount = mount_over_tls(mount_factory, hub, {"SSL_CERT_FILE": str(ca_file)})
        mount.expect_log_errors("TLS certificate of")
        reading = report(f"CDN certificate from {cdn_certificate}", timed_pread(file_path(mount, BIG), 0, 4096))
        assert reading.error == errno.EIO
        assert reading.seconds < 1.0           # refused, not retried: another try meets the same certificate
        lines = error_lines(mount.log_text())
        host = hub.cdn_endpoint.removeprefix("https://")
        print("\n".join(lines))
        assert lines and all(f"TLS certificate of {host} refused ({reason})" in line for line in lines)
        assert not [r for r in hub.log if r.origin == "cdn"]        # no request reached it
        # The small file comes from the Hub itself, whose certificate is good.
        assert read_whole(file_path(mount, SMALL)) == sources[SMALL]


def test_a_full_tls_session_runs_through_an_http_proxys_connect_tunnel(tls_hub, ca_file, sources, mount_factory):
    with ConnectProxy() as proxy:
        env = {"SSL_CERT_FILE": str(ca_file), "HTTPS_PROXY": proxy.url, "https_proxy": proxy.url,
               "NO_PROXY": "", "no_proxy": ""}
        mount = mount_over_tls(mount_factory, tls_hub, env)
        for name, data in sources.items():
            assert read_whole(file_path(mount, name)) == data
        mount.stop()
        targets = {tunnel.target for tunnel in proxy.tunnels}
        hosts = {tls_hub.endpoint.removeprefix("https://"), tls_hub.cdn_endpoint.removeprefix("https://")}
        relayed = sum(tunnel.bytes_down for tunnel in proxy.tunnels)
        print(f"{len(proxy.tunnels)} CONNECT tunnels to {sorted(targets)}: {relayed} bytes relayed down")
        assert targets == hosts and not proxy.refused
        assert relayed > len(sources[BIG])
        for tunnel in proxy.tunnels:
            assert tunnel.sent_up[:1] == b"\x16"          # a TLS handshake record opens every tunnel
            assert b"HTTP/1.1" not in tunnel.sent_up and b"HTTP/1.1" not in tunnel.sent_down
            assert sources[BIG][:4096] not in tunnel.sent_down and sources[SMALL][:4096] not in tunnel.sent_down
        # Every request the simulator saw, metadata (the Hub client) and bytes (the range
        # reader) alike, arrived on one of the proxy's own connections.
        upstreams = {tunnel.upstream for tunnel in proxy.tunnels}
        assert tls_hub.log and all(record.peer in upstreams for record in tls_hub.log)
        assert any("/api/models/" in record.path for record in tls_hub.log)
