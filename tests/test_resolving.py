"""Start-up that does not grow with the Hub: grouped, parallel, rate-limited, stored-first resolving."""

import threading
import time

import pytest

from conftest import eventually, needs_fuse
from vfs.hub import Hub
from vfs.manifest import parse_manifest
from vfs.resolving import HubPolicy, resolve_all
from vfs.ratelimit import RateGate, budget_spent_for
from vfs.settings import Settings
from vfs.snapshots import SnapshotStore
from vfs.testing.hubsim import Fault


def manifest_of(repos, per_repo):
    """`per_repo` single-file models of each repo, plus one directory model per repo."""
    lines = ["models:"]
    for repo in repos:
        slug = repo.replace("/", "-")
        for number in range(per_repo):
            lines += [f"  {slug}-{number}:", f"    path: /models/{slug}-{number}/model.gguf",
                      "    backend: llama.cpp", f"    hf: {repo}", f"    file: m{number % 3}.gguf"]
        lines += [f"  {slug}-all:", f"    path: /models/{slug}-all/", "    backend: vllm", f"    hf: {repo}"]
    return parse_manifest("\n".join(lines) + "\n")


def add_repos(hub, count):
    repos = [f"org/r{number}" for number in range(count)]
    for repo in repos:
        hub.add_repo(repo, files={f"m{i}.gguf": f"GGUF {repo} {i}".encode() for i in range(3)})
    return repos


def settings_for(hub, tmp_path, **overrides):
    return Settings(endpoint=hub.endpoint, cache_dir=tmp_path / "cache", max_retries=3, read_deadline=20,
                    **overrides)


def hub_requests(hub, kind):
    """API requests of one kind: 'revision' (a resolve of a branch) or 'tree' (a listing)."""
    return [r for r in hub.log if r.origin == "api" and f"/{kind}/" in r.path]


def test_models_of_one_repo_and_revision_cost_one_resolve_and_one_listing(hub, tmp_path):
    repos = add_repos(hub, 3)
    manifest = manifest_of(repos, per_repo=10)
    resolved = resolve_all(settings_for(hub, tmp_path), manifest, SnapshotStore(tmp_path / "cache"))
    assert len(hub_requests(hub, "revision")) == 3 and len(hub_requests(hub, "tree")) == 3
    assert len(resolved.snapshots) == 33
    assert [f.path for f in resolved.snapshots["org-r1-4"].files] == ["m1.gguf"]
    assert len(resolved.snapshots["org-r2-all"].files) == 3


def test_groups_are_resolved_in_parallel(hub, tmp_path):
    repos = add_repos(hub, 6)
    hub.set_link(delay=0.3)
    started = time.monotonic()
    resolve_all(settings_for(hub, tmp_path), manifest_of(repos, per_repo=2), SnapshotStore(tmp_path / "cache"))
    took = time.monotonic() - started
    one_at_a_time = 6 * 2 * 0.3
    print(f"6 repos, 300 ms a reply: resolved in {took:.2f}s (one at a time: {one_at_a_time:.1f}s)")
    assert took < one_at_a_time / 2


def test_stored_first_resolves_branches_without_the_hub_and_reports_them_for_a_recheck(hub, tmp_path):
    repos = add_repos(hub, 2)
    manifest = manifest_of(repos, per_repo=2)
    store = SnapshotStore(tmp_path / "cache")
    first = resolve_all(settings_for(hub, tmp_path), manifest, store)
    hub.clear_log()
    again = resolve_all(settings_for(hub, tmp_path), manifest, store, policy=HubPolicy.STORED_FIRST)
    assert hub.log == []
    assert again.snapshots == first.snapshots
    assert sorted(again.to_recheck) == [(repo, "main") for repo in repos]


def test_a_40_hex_revision_once_listed_makes_no_hub_call_even_online(hub, tmp_path):
    commit = add_repos(hub, 1) and hub.add_commit("org/r0", files={"m0.gguf": b"GGUF new"})
    manifest = parse_manifest(
        "models:\n  m:\n    path: /models/m/model.gguf\n    backend: llama.cpp\n"
        f"    hf: org/r0\n    file: m0.gguf\n    revision: {commit}\n")
    store = SnapshotStore(tmp_path / "cache")
    resolve_all(settings_for(hub, tmp_path), manifest, store)
    assert len(hub_requests(hub, "revision")) == 0 and len(hub_requests(hub, "tree")) == 1
    hub.clear_log()
    resolved = resolve_all(settings_for(hub, tmp_path), manifest, store)
    assert hub.log == [] and resolved.to_recheck == [] and resolved.snapshots["m"].commit == commit


def test_a_429_pauses_the_other_resolving_threads_too(hub, tmp_path):
    add_repos(hub, 2)
    spec_a, spec_b = manifest_of(["org/r0", "org/r1"], per_repo=1).models[::2]
    limited = hub.add_fault(Fault("rate_limit", origin="api", path="/org/r0/revision", times=1,
                                  seconds=2, style="ratelimit"))
    hub_client = Hub(settings_for(hub, tmp_path), SnapshotStore(tmp_path / "cache"))
    first = threading.Thread(target=hub_client.resolve_commit, args=(spec_a,))
    first.start()
    assert eventually(lambda: limited.hits == 1)
    time.sleep(0.1)          # the 429 has been read and the pause noted
    hub_client.resolve_commit(spec_b)
    first.join()
    told_to_wait = next(r for r in hub.log if r.status == 429)
    others = [r for r in hub.log if "/org/r1/" in r.path]
    waited = others[0].started - told_to_wait.started
    print(f"the other thread's request came {waited:.2f}s after the 429 (RateLimit t=2)")
    assert waited >= 1.8


def test_the_ratelimit_header_budget_is_read_in_both_spellings():
    assert budget_spent_for({"ratelimit": '"api";r=0;t=7'}) == 7
    assert budget_spent_for({"ratelimit": '"api";r=3;t=7'}) is None
    assert budget_spent_for({"ratelimit-remaining": "0", "ratelimit-reset": "4"}) == 4
    assert budget_spent_for({}) is None


def test_a_spent_budget_holds_every_caller_until_it_refills():
    now, slept = [100.0], []
    gate = RateGate(clock=lambda: now[0], sleep=lambda s: (slept.append(s), now.__setitem__(0, now[0] + s)))
    gate.observe({"ratelimit": '"api";r=0;t=5'})
    gate.wait()
    gate.wait()
    assert slept == [5.0]


# ------------------------------------------------------------------ through a real mount

SINGLE = """
models:
  tiny:
    path: /models/tiny/model.gguf
    backend: llama.cpp
    hf: org/tiny
    file: m.gguf
"""


@needs_fuse
@pytest.mark.fuse
def test_a_cached_remount_serves_before_the_hub_answers_and_applies_a_moved_branch(hub, mount_factory, tmp_path):
    hub.add_repo("org/tiny", files={"m.gguf": b"GGUF old"})
    first = mount_factory(SINGLE, hub.endpoint)
    first.stop()
    hub.add_commit("org/tiny", files={"m.gguf": b"GGUF moved on"})
    hub.add_fault(Fault("delay", origin="api", seconds=4))
    started = time.monotonic()
    second = mount_factory(SINGLE, hub.endpoint, cache_dir=tmp_path / "cache")
    ready = time.monotonic() - started
    path = second.mountpoint / "tiny" / "model.gguf"
    print(f"cached remount ready in {ready:.2f}s with the Hub 4 s away")
    assert ready < 4 and path.read_bytes() == b"GGUF old"
    assert eventually(lambda: path.stat().st_size == len(b"GGUF moved on"), timeout=20)
    assert path.read_bytes() == b"GGUF moved on"
    assert "branches moved for 1 models (tiny)" in second.log_text()


def test_the_simulator_takes_its_delay_in_milliseconds():
    import argparse

    from vfs.testing import link
    parser = argparse.ArgumentParser()
    link.add_arguments(parser)
    assert link.from_arguments(parser.parse_args(["--delay-ms", "50"])).delay == 0.05
    assert link.from_arguments(parser.parse_args(["--delay", "0.2"])).delay == 0.2
