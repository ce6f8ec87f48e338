"""`python -m vfs.testing`: serve the demo Hub (two tiny models) until SIGINT/SIGTERM.

Prints `ready <endpoint>` on stdout once listening; the manifest that mounts the demo
models goes to stderr, for a person to copy.
"""

import argparse
import sys

from .hubsim import run_until_signalled
from .models import DEMO_MANIFEST, demo_simulator


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vfs.testing", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="API port (0: any free port)")
    parser.add_argument("--cdn-port", type=int, default=0, help="CDN port (0: any free port)")
    args = parser.parse_args(argv)
    sim = demo_simulator(port=args.port, cdn_port=args.cdn_port)
    print(f"ready {sim.endpoint}", flush=True)
    print(f"# HF_ENDPOINT={sim.endpoint} HF_HUB_DISABLE_XET=1, with this models.yaml:\n{DEMO_MANIFEST}",
          file=sys.stderr, flush=True)
    run_until_signalled(sim)


if __name__ == "__main__":
    main()
