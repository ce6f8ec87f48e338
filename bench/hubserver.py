"""`python -m bench.hubserver --repo ORG/NAME=DIR ...`: the Hub simulator, plus directory
pages on its CDN so rclone's `http` remote can list what it serves.

rclone's http remote finds files by reading an HTML index of a directory URL. The
simulator's CDN has none (the Hub has none either), so `GET /lfs/<sha256>/files/`
answers a one-link page naming the file; the file itself, `/lfs/<sha256>/files/<name>`,
is served by the simulator's own CDN route, with the same code as for every client.
"""

import argparse
import html
import sys
from pathlib import Path

from vfs.testing import hubsim


class ListingRouter:
    def __init__(self, router, names):
        self.router, self.names = router, names      # sha256 -> file name

    def route(self, request):
        segments = request.segments
        if request.raw_path.endswith("/") and len(segments) == 3 and segments[0] == "lfs":
            name = self.names.get(segments[1])
            if name is not None:
                return _index_page(name)
        return self.router.route(request)


def _index_page(name):
    quoted = html.escape(name)
    page = f'<html><body><a href="{quoted}">{quoted}</a></body></html>\n'.encode()
    headers = [("Content-Type", "text/html; charset=utf-8")]
    return hubsim._Response(200, headers, hubsim._BytesBody(page), 0, len(page))


def listing_names(directories):
    """sha256 -> file name for the LFS files of `directories` (as the simulator hashed them)."""
    import hashlib
    names = {}
    for directory in directories:
        for path in Path(directory).iterdir():
            if path.is_file() and hubsim._is_lfs(path.name, path.stat().st_size):
                digest = hashlib.sha256()
                with open(path, "rb") as source:
                    while chunk := source.read(8 << 20):
                        digest.update(chunk)
                names[digest.hexdigest()] = path.name
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.hubserver", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR")
    hubsim.add_shaping_arguments(parser)
    args = parser.parse_args(argv)
    sim = hubsim.HubSimulator()
    directories = []
    for spec in args.repo:
        repo_id, _, directory = spec.partition("=")
        sim.add_repo(repo_id, files=hubsim.repo_files(directory))
        directories.append(directory)
    hubsim.apply_shaping_arguments(sim, args)
    sim.start()
    cdn = sim._servers["cdn"]
    cdn.router = ListingRouter(cdn.router, listing_names(directories))
    print(f"ready {sim.endpoint}", flush=True)
    hubsim.run_until_signalled(sim)


if __name__ == "__main__":
    sys.exit(main())
