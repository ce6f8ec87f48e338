"""The Hub simulator in its own process, serving the benchmark's repos.

Its own process because a page fault on an mmap of the mount, taken in a process that
also serves the bytes, would wait on the GIL the server needs: a deadlock, or at best a
benchmark of the GIL.
"""

import subprocess
import sys
from pathlib import Path
import time
import urllib.request

from vfs.testing.hubsim import SimulatorClient

ROOT = Path(__file__).resolve().parent.parent     # where `python -m bench.hubserver` resolves


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class HubProcess:
    def __init__(self, repos):
        """`repos` maps repo ids to directories whose files they serve."""
        self.repos = dict(repos)
        self.process = None
        self.endpoint = None

    def start(self, timeout=120):
        args = [sys.executable, "-m", "bench.hubserver"]
        for repo, directory in self.repos.items():
            args += ["--repo", f"{repo}={directory}"]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        deadline = time.monotonic() + timeout
        line = self.process.stdout.readline()
        if not line.startswith("ready ") or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"the Hub simulator did not start: {line!r}")
        self.endpoint = line.split()[1]
        self.client = SimulatorClient(self.endpoint)
        return self

    def resolve_url(self, repo, path):
        return f"{self.endpoint}/{repo}/resolve/main/{path}"

    def cdn_url(self, repo, path):
        """Where the resolve URL redirects: the URL curl and rclone read the bytes from."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)
        request = urllib.request.Request(self.resolve_url(repo, path), method="HEAD")
        try:
            opener.open(request, timeout=30)
        except urllib.error.HTTPError as answer:
            if answer.code in (301, 302, 307, 308):
                return answer.headers["Location"]
            raise
        return self.resolve_url(repo, path)

    def bytes_sent(self):
        return self.client.bytes_sent(origin="cdn")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
