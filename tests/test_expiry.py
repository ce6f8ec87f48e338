"""Signed CDN URLs that run out or were signed for another range: reads never see it.

The Hub's resolve redirects to a CDN URL signed for a limited time (an hour on the real
Hub); a mount lives for weeks. The simulator signs its CDN URLs like presigned S3 URLs
(`hub.signer.seconds`), and its CDN refuses them (403) once expired, when re-signed with
a new key, or for a range other than the one they were signed for (`scope_ranges`).
"""

import math
import os
import threading
import time
import urllib.request

import pytest

from conftest import eventually, needs_fuse, unexpected_log_lines
from vfs import errors, signedurl
from vfs.fetch import RangeFetcher
from vfs.settings import Settings
from vfs.testing.hubsim import Fault

MiB = 1024 * 1024
BIG = "big.bin"


@pytest.fixture
def files(hub):
    contents = {BIG: os.urandom(12 * MiB + 321)}
    hub.add_repo("org/m", files=dict(contents))
    return contents


@pytest.fixture
def fetcher(hub, tmp_path):
    settings = Settings(endpoint=hub.endpoint, cache_dir=tmp_path / "cache", read_timeout=2.0, read_deadline=10.0)
    fetcher = RangeFetcher(settings, settings.block_size)
    yield fetcher
    fetcher.pool.close()


URL = "{endpoint}/org/m/resolve/main/big.bin"


def read(fetcher, hub, start, length):
    return bytes(fetcher.read_range(URL.format(endpoint=hub.endpoint), start, length, "m/big.bin"))


def heads(hub):
    return [r for r in hub.log if r.origin == "api" and r.method == "HEAD"]


def refusals(hub):
    return [r for r in hub.log if r.origin == "cdn" and r.status == 403]


# ------------------------------------------------------------------ reading the expiry


def test_a_presigned_url_is_resolved_again_a_fifth_of_its_life_before_it_runs_out():
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    url = f"https://cdn.example/x?X-Amz-Date={stamp}&X-Amz-Expires=3600&X-Amz-Signature=s"
    assert 3599 - 60 <= signedurl.refresh_after(url, now) <= 3600 - 60
    short = f"https://cdn.example/x?X-Amz-Date={stamp}&X-Amz-Expires=5&X-Amz-Signature=s"
    assert 3 <= signedurl.refresh_after(short, now) <= 4


def test_cloudfront_and_gcs_expiries_are_read_too():
    now = 1_800_000_000.0
    assert signedurl.seconds_left(f"https://d.example/x?Expires={int(now) + 600}&Signature=s", now) == 600
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now - 100))
    assert signedurl.seconds_left(f"https://g.example/x?X-Goog-Date={stamp}&X-Goog-Expires=900", now) == 800


def test_a_url_without_an_expiry_is_kept_until_refused():
    assert signedurl.refresh_after("https://cdn.example/lfs/abc", time.time()) == math.inf


def test_a_skewed_clock_never_makes_a_url_look_expired_on_arrival():
    now = time.time()
    ahead = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now - 7200))     # our clock 2 h fast
    url = f"https://cdn.example/x?X-Amz-Date={ahead}&X-Amz-Expires=3600"
    assert signedurl.refresh_after(url, now) > 2000                     # lifetime counted from now
    assert signedurl.refresh_after(f"https://d.example/x?Expires={int(now) - 10}", now) == math.inf


# ------------------------------------------------------------------ the fetcher


def test_a_read_after_the_url_expired_resolves_again_before_asking_the_cdn(hub, files, fetcher):
    hub.signer.seconds = 1
    assert read(fetcher, hub, 0, MiB) == files[BIG][:MiB]
    time.sleep(2.1)
    assert read(fetcher, hub, 5 * MiB, MiB) == files[BIG][5 * MiB:6 * MiB]
    print(f"{len(heads(hub))} resolves, {len(refusals(hub))} refusals")
    assert len(heads(hub)) == 2 and not refusals(hub)


def test_a_url_the_cdn_refuses_is_resolved_again_within_the_same_read(hub, files, fetcher):
    hub.signer.seconds = 3600
    assert read(fetcher, hub, 0, MiB) == files[BIG][:MiB]
    hub.signer.rotate_key()                   # every URL signed so far is refused now
    assert read(fetcher, hub, 3 * MiB, 2 * MiB) == files[BIG][3 * MiB:5 * MiB]
    assert len(refusals(hub)) == 1 and len(heads(hub)) == 2


def test_a_url_refused_as_soon_as_the_hub_signed_it_is_eacces_naming_the_cdn(hub, files, fetcher):
    hub.add_fault(Fault("status", origin="cdn", code=403))
    started = time.monotonic()
    with pytest.raises(errors.AccessDenied) as failure:
        read(fetcher, hub, 0, MiB)
    print(f"{failure.value} after {time.monotonic() - started:.2f}s")
    assert "the CDN refused" in str(failure.value)
    assert len([r for r in hub.log if r.origin == "cdn"]) == 2      # one more fresh URL, then no loop
    assert time.monotonic() - started < 1.0


def test_the_hubs_own_refusal_says_it_is_the_hub(hub, files, fetcher):
    hub.add_fault(Fault("status", origin="api", code=403))
    with pytest.raises(errors.AccessDenied) as failure:
        read(fetcher, hub, 0, MiB)
    assert "the Hub refused access (HTTP 403)" in str(failure.value)


def test_a_resolve_with_range_is_scoped_so_the_mount_resolves_without_range(hub, files, fetcher):
    """The measured reason the fetcher resolves without a Range header: with one, the CDN
    URL may be good for that range alone (as the Hub's Xet bridge has been seen to sign)."""
    hub.signer.seconds, hub.signer.scope_ranges = 3600, True
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    ranged = opener.open(urllib.request.Request(URL.format(endpoint=hub.endpoint), method="HEAD",
                                                headers={"Range": "bytes=0-99"}))
    location = ranged.headers["Location"]
    assert _cdn_status(location, "bytes=0-99") == 206
    assert _cdn_status(location, "bytes=100-199") == 403              # scoped: another range is refused

    threads = [threading.Thread(target=lambda i=i: results.append(
        read(fetcher, hub, i * MiB + 7, MiB) == files[BIG][i * MiB + 7:(i + 1) * MiB + 7])) for i in range(10)]
    results = []
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    mount_heads = [r for r in heads(hub) if r.range is None]
    print(f"10 ranges from 10 threads: {len(mount_heads)} resolve(s), {len(refusals(hub))} refusal(s) in all")
    assert results == [True] * 10 and len(mount_heads) == 1
    assert len(refusals(hub)) == 1                                    # only the probe above


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None

    def http_error_302(self, req, fp, code, msg, headers):
        return fp


def _cdn_status(location, byte_range):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(location, headers={"Range": byte_range})) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


# ------------------------------------------------------------------ through a mount


@needs_fuse
@pytest.mark.fuse
def test_readers_across_many_expiries_see_exact_bytes_and_no_error(hub, tmp_path, mount_factory, random_file):
    """URLs signed for 2 s, three readers reading uncached blocks for ~6 s: every read exact."""
    hub.signer.seconds, hub.signer.scope_ranges = 2, True
    sources = {f"part-{i}.bin": random_file(f"part-{i}.bin", 24 * MiB, seed=i) for i in range(3)}
    hub.add_repo("org/m", files=dict(sources))
    manifest = "models:\n  m:\n    path: /models/m/\n    backend: vllm\n    hf: org/m\n"
    mount = mount_factory(manifest, hub.endpoint, args=("--block-size", "1M"))
    problems = []

    def reader(name, path):
        expected = path.read_bytes()
        with open(mount.mountpoint / "m" / name, "rb", buffering=0) as mounted:
            for index in range(0, 24, 4):                     # one uncached block every ~1 s
                offset = index * MiB + 12345
                if os.pread(mounted.fileno(), 4096, offset) != expected[offset:offset + 4096]:
                    problems.append(f"{name} @{offset}: wrong bytes")
                time.sleep(1.0)

    threads = [threading.Thread(target=reader, args=item) for item in sources.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log = mount.log_text()
    print(f"{len(heads(hub))} resolves, {len(refusals(hub))} CDN refusals")
    assert problems == []
    assert unexpected_log_lines(log) == []
    assert len(heads(hub)) >= 3                           # it did resolve again as URLs ran out
