"""Tests of the Hub simulator through real clients: huggingface_hub, requests, curl, raw sockets."""

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # harmless if huggingface_hub was imported before
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import requests  # noqa: E402
from huggingface_hub import HfApi, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from vfs.testing.hubsim import Fault, HubSimulator, SimulatorClient  # noqa: E402
from vfs.testing.models import (  # noqa: E402
    DEMO_MANIFEST,
    GGUF_NAME,
    GGUF_REPO,
    SAFETENSORS_REPO,
    demo_simulator,
    write_gguf,
    write_safetensors_dir,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = b'{"architectures": ["LlamaForCausalLM"]}\n'
TOKENS = {"hf_good": {"granted": {"org/private", "org/gated"}}, "hf_nobody": {}}


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A 3 MiB file on disk: LFS by its suffix, served by sendfile."""
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    return path


@pytest.fixture
def sim(weights):
    files = {"config.json": CONFIG, "model.safetensors": weights, "sub/dir/notes.txt": "hello\n"}
    with HubSimulator(tokens=TOKENS) as sim:
        sim.add_repo("org/model", files=files, tags=("v1.0",))
        sim.add_repo("org/private", files=files, private=True)
        sim.add_repo("org/gated", files=files, gated=True)
        yield sim


@pytest.fixture
def http():
    with requests.Session() as session:
        session.trust_env = False  # no proxy from the environment between us and 127.0.0.1
        yield session


def api(sim, token=False):
    return HfApi(endpoint=sim.endpoint, token=token)


def download(sim, tmp_path, repo="org/model", filename="config.json", token=False, **kwargs):
    return Path(hf_hub_download(repo, filename, endpoint=sim.endpoint, cache_dir=tmp_path / "hf",
                                token=token, etag_timeout=5, **kwargs))


def resolve_url(sim, path="model.safetensors", repo="org/model", revision="main"):
    return f"{sim.endpoint}/{repo}/resolve/{revision}/{path}"


def cdn_url(sim, http, path="model.safetensors"):
    response = http.head(resolve_url(sim, path), allow_redirects=False)
    assert response.status_code == 302
    return response.headers["Location"]


def raw_get(url, headers=""):
    """GET over a bare socket: returns (head, body bytes, how the connection ended)."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
        data, ending = b"", "eof"
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            ending = "reset"
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode(), body, ending


# ---------------------------------------------------------------------------
# Metadata through huggingface_hub


def test_model_info_names_the_commit_and_the_files(sim):
    info = api(sim).model_info("org/model")
    assert len(info.sha) == 40 and info.sha == api(sim).model_info("org/model", revision="main").sha
    assert sorted(s.rfilename for s in info.siblings) == ["config.json", "model.safetensors", "sub/dir/notes.txt"]


def test_model_info_blobs_carry_git_ids_and_lfs_hashes(sim, weights):
    siblings = {s.rfilename: s for s in api(sim).model_info("org/model", files_metadata=True).siblings}
    assert siblings["config.json"].blob_id == git_blob_sha1(CONFIG) and siblings["config.json"].lfs is None
    lfs = siblings["model.safetensors"].lfs
    assert lfs.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert lfs.size == weights.stat().st_size and 125 < lfs.pointer_size < 140


def test_tree_lists_folders_and_files_with_lfs_info(sim, weights):
    entries = {e.path: e for e in api(sim).list_repo_tree("org/model", recursive=True)}
    assert set(entries) == {"config.json", "model.safetensors", "sub", "sub/dir", "sub/dir/notes.txt"}
    lfs_file = entries["model.safetensors"]
    assert lfs_file.size == weights.stat().st_size
    assert lfs_file.lfs.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{lfs_file.lfs.sha256}\nsize {lfs_file.size}\n"
    assert lfs_file.blob_id == git_blob_sha1(pointer.encode())
    assert [e.path for e in api(sim).list_repo_tree("org/model")] == ["sub", "config.json", "model.safetensors"]
    assert [e.path for e in api(sim).list_repo_tree("org/model", path_in_repo="sub/dir")] == ["sub/dir/notes.txt"]


def test_tree_of_a_missing_folder_is_entry_not_found(sim):
    with pytest.raises(EntryNotFoundError):
        list(api(sim).list_repo_tree("org/model", path_in_repo="nope"))


def test_paths_info_answers_the_paths_that_exist(sim):
    found = api(sim).get_paths_info("org/model", ["config.json", "sub", "missing.bin"], expand=True)
    assert [e.path for e in found] == ["config.json", "sub"]
    assert found[0].last_commit.oid == api(sim).model_info("org/model").sha


def test_tree_pages_are_linked_by_link_header(weights, http):
    files = {f"f{i:02}.txt": str(i) for i in range(7)}
    with HubSimulator(page_size=3) as sim:
        sim.add_repo("org/many", files=files)
        assert [e.path for e in api(sim).list_repo_tree("org/many")] == sorted(files)
        assert sum("/tree/" in r.path for r in sim.log) == 3
        link = http.get(f"{sim.endpoint}/api/models/org/many/tree/main").headers["Link"]
        assert link.startswith(f"<{sim.endpoint}/api/models/org/many/tree/main?") and link.endswith('>; rel="next"')


# ---------------------------------------------------------------------------
# Downloads through huggingface_hub


def test_small_file_downloads_from_the_api_origin(sim, tmp_path):
    assert download(sim, tmp_path).read_bytes() == CONFIG
    assert {r.origin for r in sim.log} == {"api"}


def test_lfs_file_redirects_to_the_cdn(sim, tmp_path, weights):
    assert download(sim, tmp_path, filename="model.safetensors").read_bytes() == weights.read_bytes()
    assert [(r.origin, r.method, r.status) for r in sim.log] == [("api", "HEAD", 302), ("cdn", "GET", 200)]
    assert sim.bytes_sent(origin="cdn") == weights.stat().st_size


def test_snapshot_download_fetches_every_file(sim, tmp_path):
    folder = Path(snapshot_download("org/model", endpoint=sim.endpoint, cache_dir=tmp_path, token=False))
    assert (folder / "sub/dir/notes.txt").read_text() == "hello\n"
    assert (folder / "config.json").read_bytes() == CONFIG


def test_token_goes_to_the_api_but_never_to_the_cdn(sim, tmp_path, weights):
    path = download(sim, tmp_path, repo="org/private", filename="model.safetensors", token="hf_good")
    assert path.read_bytes() == weights.read_bytes()
    assert all(r.authorization == "Bearer hf_good" for r in sim.log if r.origin == "api")
    cdn = [r for r in sim.log if r.origin == "cdn"]
    assert cdn and not any(r.authorization_sent for r in cdn)
    assert all(r.headers.get("Authorization") in (None, "<redacted>") for r in sim.log)


# ---------------------------------------------------------------------------
# Access control and errors


def test_private_repo_is_not_found_without_a_token(sim, http):
    with pytest.raises(RepositoryNotFoundError):
        api(sim).model_info("org/private")
    answer = http.get(resolve_url(sim, "config.json", repo="org/private"))
    assert answer.status_code == 401 and answer.headers["X-Error-Code"] == "RepoNotFound"
    assert answer.json() == {"error": "Repository not found"}


def test_private_repo_is_readable_with_a_granted_token(sim, tmp_path):
    assert api(sim, "hf_good").model_info("org/private").private is True
    assert download(sim, tmp_path, repo="org/private", token="hf_good").read_bytes() == CONFIG


def test_private_repo_is_404_for_a_token_without_access(sim):
    with pytest.raises(RepositoryNotFoundError) as caught:
        api(sim, "hf_nobody").model_info("org/private")
    assert caught.value.response.status_code == 404


def test_gated_repo_lists_but_refuses_files_without_access(sim, tmp_path):
    assert api(sim).model_info("org/gated").gated == "manual"
    assert len(list(api(sim).list_repo_tree("org/gated"))) == 3
    for token in (False, "hf_nobody"):
        with pytest.raises(GatedRepoError) as caught:
            download(sim, tmp_path, repo="org/gated", token=token)
        assert caught.value.response.status_code == 403
    assert download(sim, tmp_path, repo="org/gated", token="hf_good").read_bytes() == CONFIG


def test_unknown_token_is_refused_as_invalid_credentials(sim, http):
    with pytest.raises(HfHubHTTPError) as caught:
        api(sim, "hf_forged").model_info("org/model")
    assert not isinstance(caught.value, RepositoryNotFoundError)
    assert caught.value.response.status_code == 401 and "Invalid credentials" in str(caught.value)
    answer = http.get(resolve_url(sim, "config.json"), headers={"Authorization": "Bearer hf_forged"})
    assert answer.status_code == 401 and "X-Error-Code" not in answer.headers


def test_unknown_revision_is_revision_not_found(sim, tmp_path):
    with pytest.raises(RevisionNotFoundError):
        api(sim).model_info("org/model", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        download(sim, tmp_path, revision="nope")


def test_missing_file_is_entry_not_found_with_the_commit(sim, tmp_path, http):
    with pytest.raises(EntryNotFoundError):
        download(sim, tmp_path, filename="nope.json")
    answer = http.head(resolve_url(sim, "nope.json"))
    assert answer.status_code == 404 and answer.headers["X-Error-Code"] == "EntryNotFound"
    assert answer.headers["X-Repo-Commit"] == api(sim).model_info("org/model").sha


def test_no_answer_ever_mentions_xet(sim, http, tmp_path):
    download(sim, tmp_path, filename="model.safetensors")
    for url in (resolve_url(sim), resolve_url(sim, "config.json"), f"{sim.endpoint}/api/models/org/model/tree/main"):
        headers = http.get(url).headers
        assert not any("xet" in k.lower() or "xet" in v.lower() for k, v in headers.items())


# ---------------------------------------------------------------------------
# Revisions


def test_a_new_commit_moves_the_branch_and_the_old_sha_still_resolves(sim, tmp_path):
    old = api(sim).model_info("org/model").sha
    new = sim.add_commit("org/model", files={"config.json": b"{}"})
    assert new != old and api(sim).model_info("org/model").sha == new
    assert download(sim, tmp_path).read_bytes() == b"{}"
    assert download(sim, tmp_path, revision=old).read_bytes() == CONFIG
    old_tree = [e.path for e in api(sim).list_repo_tree("org/model", revision=old, recursive=True)]
    assert old_tree[-1] == "sub/dir/notes.txt"


def test_tags_and_pr_refs_resolve(sim, tmp_path, http):
    first = api(sim).model_info("org/model").sha
    pr = sim.add_commit("org/model", files={"config.json": b"[]"}, branch="refs/pr/1")
    assert api(sim).model_info("org/model", revision="v1.0").sha == first
    assert api(sim).model_info("org/model", revision="refs/pr/1").sha == pr
    assert any("refs%2Fpr%2F1" in r.path for r in sim.log)
    assert download(sim, tmp_path, revision="refs/pr/1").read_bytes() == b"[]"
    assert http.get(resolve_url(sim, "config.json", revision="refs/pr/1")).content == b"[]"


# ---------------------------------------------------------------------------
# HTTP details: ranges, HEAD, keep-alive


@pytest.mark.parametrize("origin", ["api", "cdn"])
def test_ranges_answer_206_with_content_range(sim, http, weights, origin):
    data = weights.read_bytes() if origin == "cdn" else CONFIG
    url = cdn_url(sim, http) if origin == "cdn" else resolve_url(sim, "config.json")
    size = len(data)
    for header, start, end in (("bytes=2-9", 2, 10), ("bytes=5-", 5, size), ("bytes=-4", size - 4, size),
                               (f"bytes=3-{size + 50}", 3, size)):
        answer = http.get(url, headers={"Range": header})
        assert answer.status_code == 206 and answer.content == data[start:end]
        assert answer.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
        assert answer.headers["Accept-Ranges"] == "bytes"


def test_range_past_the_end_is_416(sim, http, weights):
    answer = http.get(cdn_url(sim, http), headers={"Range": f"bytes={weights.stat().st_size}-"})
    assert answer.status_code == 416
    assert answer.headers["Content-Range"] == f"bytes */{weights.stat().st_size}"


def test_head_tells_the_length_without_a_body(sim, http, weights):
    small = http.head(resolve_url(sim, "config.json"))
    assert small.status_code == 200 and small.headers["Content-Length"] == str(len(CONFIG))
    assert small.headers["ETag"] == f'"{git_blob_sha1(CONFIG)}"' and len(small.headers["X-Repo-Commit"]) == 40
    lfs = http.head(resolve_url(sim), allow_redirects=False)
    assert lfs.headers["X-Linked-Size"] == str(weights.stat().st_size)
    assert lfs.headers["X-Linked-Etag"] == f'"{hashlib.sha256(weights.read_bytes()).hexdigest()}"'
    cdn = http.head(lfs.headers["Location"])
    assert cdn.headers["Content-Length"] == str(weights.stat().st_size) and cdn.content == b""


def test_one_session_keeps_one_connection_per_origin(sim, http):
    for _ in range(5):
        http.head(resolve_url(sim, "config.json"))
        http.get(resolve_url(sim, "config.json"), headers={"Range": "bytes=0-3"})
        http.get(resolve_url(sim, "missing.json"))
        http.get(f"{sim.endpoint}/api/models/org/model/tree/main")
        http.get(resolve_url(sim)).raise_for_status()  # 302 then the CDN
    assert sim.connections("api") == 1 and sim.connections("cdn") == 1


# ---------------------------------------------------------------------------
# Faults


def test_status_fault_hits_the_next_n_requests(sim, http):
    fault = sim.add_fault(Fault("status", path="config.json", times=2, code=503, headers={"X-Why": "test"}))
    codes = [http.get(resolve_url(sim, "config.json")).status_code for _ in range(3)]
    assert codes == [503, 503, 200] and fault.hits == 2 and fault.times == 0
    assert [r.fault for r in sim.log] == ["status", "status", None]


@pytest.mark.parametrize("style, header, value", [("retry-after", "Retry-After", "7"),
                                                  ("ratelimit", "RateLimit", '"api";r=0;t=7')])
def test_rate_limit_fault_answers_429(sim, http, style, header, value):
    sim.add_fault("rate_limit", seconds=7, style=style, times=1)
    answer = http.get(f"{sim.endpoint}/api/models/org/model")
    assert answer.status_code == 429 and answer.headers[header] == value


def test_delay_fault_holds_the_headers(sim, http):
    sim.add_fault("delay", seconds=0.3, times=1)
    started = time.monotonic()
    assert http.get(resolve_url(sim, "config.json")).content == CONFIG
    assert time.monotonic() - started >= 0.3


def test_stall_fault_pauses_mid_body_then_finishes(sim, http, weights):
    sim.add_fault("stall", origin="cdn", after_bytes=1000, seconds=0.3)
    started = time.monotonic()
    assert http.get(resolve_url(sim)).content == weights.read_bytes()
    assert time.monotonic() - started >= 0.3


def test_stall_fault_can_end_in_a_close(sim, http):
    sim.add_fault("stall", origin="cdn", after_bytes=1000, seconds=0.1, then="close")
    head, body, ending = raw_get(cdn_url(sim, http))
    assert " 200 " in head and len(body) == 1000 and ending == "eof"


def test_reset_fault_sends_rst_mid_body(sim, http):
    sim.add_fault("reset", origin="cdn", after_bytes=5000)
    head, body, ending = raw_get(cdn_url(sim, http))
    assert ending == "reset" and len(body) <= 5000
    assert sim.log[-1].bytes_sent == 5000


def test_short_fault_closes_cleanly_before_content_length(sim, http, weights):
    sim.add_fault("short", origin="cdn", after_bytes=5000)
    url = cdn_url(sim, http)
    head, body, ending = raw_get(url)
    assert ending == "eof" and body == weights.read_bytes()[:5000]
    assert f"Content-Length: {weights.stat().st_size}" in head
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        http.get(url)


def test_ignore_range_fault_answers_200_with_everything(sim, http, weights):
    sim.add_fault("ignore_range")
    answer = http.get(cdn_url(sim, http), headers={"Range": "bytes=10-19"})
    assert answer.status_code == 200 and answer.content == weights.read_bytes()
    assert "Content-Range" not in answer.headers


def test_wrong_content_range_fault_serves_another_range(sim, http, weights):
    sim.add_fault("wrong_content_range")
    answer = http.get(cdn_url(sim, http), headers={"Range": "bytes=10-19"})
    size = weights.stat().st_size
    assert answer.status_code == 206 and answer.headers["Content-Range"] == f"bytes 20-29/{size}"
    assert answer.content == weights.read_bytes()[20:30]


def test_long_body_fault_sends_more_than_asked(sim, http, weights):
    sim.add_fault("long_body", extra=100)
    answer = http.get(cdn_url(sim, http), headers={"Range": "bytes=10-19"})
    assert answer.headers["Content-Range"] == f"bytes 10-19/{weights.stat().st_size}"
    assert answer.content == weights.read_bytes()[10:120]


def test_wrong_bytes_fault_corrupts_with_correct_headers(sim, http):
    sim.add_fault("wrong_bytes", path="config.json")
    answer = http.get(resolve_url(sim, "config.json"))
    assert answer.status_code == 200 and len(answer.content) == len(CONFIG)
    assert bytes(b ^ 0xFF for b in answer.content) == CONFIG


def test_redirect_loop_fault_never_reaches_the_file(sim, http, tmp_path):
    sim.add_fault("redirect_loop")
    with pytest.raises(requests.exceptions.TooManyRedirects):
        http.get(resolve_url(sim, "config.json"))
    with pytest.raises(Exception, match="redirect"):
        download(sim, tmp_path)


def test_drop_header_fault_removes_the_commit_header(sim, tmp_path, http):
    sim.add_fault("drop_header", name="X-Repo-Commit", path="config.json")
    assert "X-Repo-Commit" not in http.head(resolve_url(sim, "config.json")).headers
    with pytest.raises(Exception, match="X-Repo-Commit"):
        download(sim, tmp_path)


def test_claim_size_fault_changes_listings_not_bytes(sim, tmp_path, weights, http):
    sim.add_fault("claim_size", size=42, file="model.safetensors")
    listed = {e.path: getattr(e, "size", None) for e in api(sim).list_repo_tree("org/model")}
    assert listed["model.safetensors"] == 42 and listed["config.json"] == len(CONFIG)
    assert http.head(resolve_url(sim), allow_redirects=False).headers["X-Linked-Size"] == "42"
    assert len(http.get(resolve_url(sim)).content) == weights.stat().st_size
    with pytest.raises(OSError, match="Consistency check failed"):
        download(sim, tmp_path, filename="model.safetensors")


def test_raw_tree_fault_lists_literal_entries(sim, http):
    hostile = [{"type": "file", "oid": "0" * 40, "size": 1, "path": p}
               for p in ("..", "/etc/passwd", "a\0b", "x" * 300)]
    sim.add_fault("raw_tree", entries=hostile, times=1)
    assert http.get(f"{sim.endpoint}/api/models/org/model/tree/main").json() == hostile
    assert len(http.get(f"{sim.endpoint}/api/models/org/model/tree/main").json()) == 3


def test_faults_match_by_origin_method_and_path_and_the_first_wins(sim, http):
    sim.add_fault("status", code=500, origin="cdn")
    sim.add_fault("status", code=502, method="HEAD", path=r"config\.json$")
    sim.add_fault("status", code=504, path="config")
    assert http.head(resolve_url(sim, "config.json")).status_code == 502
    assert http.get(resolve_url(sim, "config.json")).status_code == 504
    assert http.head(resolve_url(sim), allow_redirects=False).status_code == 302
    assert http.get(resolve_url(sim)).status_code == 500
    sim.clear_faults()
    assert http.get(resolve_url(sim, "config.json")).status_code == 200


def test_a_fault_with_unknown_kind_or_params_is_refused():
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("explode")
    with pytest.raises(ValueError, match="missing"):
        Fault("status")
    with pytest.raises(ValueError, match="unknown params"):
        Fault("reset", after=3)


# ---------------------------------------------------------------------------
# Out-of-process control: HTTP endpoints, client, command line


def test_http_control_api_drives_faults_and_log(sim, http):
    client = SimulatorClient(sim.endpoint)
    client.add_fault(Fault("status", code=503, times=1, path="config.json"))
    assert http.get(resolve_url(sim, "config.json")).status_code == 503
    assert http.get(resolve_url(sim, "config.json")).content == CONFIG
    assert [(r.status, r.fault) for r in client.log] == [(503, "status"), (200, None)]
    assert client.faults[0]["hits"] == 1
    assert client.bytes_sent(origin="api", path_contains="config.json") == sim.bytes_sent() > len(CONFIG)
    client.clear_log()
    client.add_fault("status", code=500)
    client.clear_faults()
    assert sim.log == [] and sim.faults == []


def test_command_line_serves_a_directory(tmp_path):
    (tmp_path / "repo/sub").mkdir(parents=True)
    (tmp_path / "repo/sub/w.gguf").write_bytes(b"GGUF" + bytes(1000))
    (tmp_path / "repo/README.md").write_text("hi\n")
    process = subprocess.Popen([sys.executable, "-m", "vfs.testing.hubsim", "--repo", f"org/dir={tmp_path / 'repo'}"],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        word, endpoint = process.stdout.readline().split()
        assert word == "ready"
        info = HfApi(endpoint=endpoint, token=False).model_info("org/dir", files_metadata=True)
        assert sorted(s.rfilename for s in info.siblings) == ["README.md", "sub/w.gguf"]
        assert requests.get(f"{endpoint}/org/dir/resolve/main/sub/w.gguf").content == b"GGUF" + bytes(1000)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_one_stream_of_a_large_file_exceeds_1_gb_per_second(tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: no time spent writing it
    with HubSimulator() as sim:
        sim.add_repo("org/big", files={"big.bin": big})
        speeds = [float(subprocess.run(
            ["curl", "-sSL", "--noproxy", "*", "-o", "/dev/null", "-w", "%{speed_download}",
             f"{sim.endpoint}/org/big/resolve/main/big.bin"], capture_output=True, text=True, check=True).stdout)
            for _ in range(2)]
        assert sim.bytes_sent(origin="cdn") == 2 << 30
    print(f"\nhubsim single-stream throughput: {max(speeds) / 1e9:.2f} GB/s (runs: {speeds})")
    assert max(speeds) > 1e9


# ---------------------------------------------------------------------------
# Generated models and the demo Hub


def test_write_gguf_makes_a_file_gguf_can_read(tmp_path):
    import gguf

    path = write_gguf(tmp_path / "m.gguf", size_mib=4, seed=1)
    reader = gguf.GGUFReader(path)
    names = [t.name for t in reader.tensors]
    assert "token_embd.weight" in names and "blk.1.ffn_down.weight" in names
    assert bytes(reader.fields["general.architecture"].parts[-1]) == b"llama"
    assert 3.5 < path.stat().st_size / 2**20 < 4.5
    assert write_gguf(tmp_path / "again.gguf", size_mib=4, seed=1).read_bytes() == path.read_bytes()


def test_write_gguf_makes_a_model_bigger_than_one_random_draw(tmp_path):
    path = write_gguf(tmp_path / "big.gguf", size_mib=600, seed=2)     # an embedding of more than 256 MiB
    assert 590 < path.stat().st_size / 2**20 < 610
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_write_safetensors_dir_makes_a_loadable_model(tmp_path):
    from safetensors.numpy import load_file

    folder = write_safetensors_dir(tmp_path / "m")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["config.json", "generation_config.json", "model.safetensors",
                     "original/consolidated.safetensors", "original/params.json", "tokenizer.json"]
    assert load_file(str(folder / "model.safetensors"))["lm_head.weight"].shape == (1024, 256)


def test_demo_simulator_serves_the_manifest_models(tmp_path):
    sim = demo_simulator()
    try:
        assert f"hf: {GGUF_REPO}" in DEMO_MANIFEST and f"file: {GGUF_NAME}" in DEMO_MANIFEST
        path = download(sim, tmp_path, repo=GGUF_REPO, filename=GGUF_NAME)
        assert path.read_bytes()[:4] == b"GGUF" and path.stat().st_size > 20 * 2**20
        tree = [e.path for e in api(sim).list_repo_tree(SAFETENSORS_REPO, recursive=True)]
        assert "original/consolidated.safetensors" in tree and "original" in tree
    finally:
        sim.stop()
