"""`lamina-llm-cache demo`: a simulated Hub with small generated models, mounted, no network."""

import shutil
import sys
import tempfile
from pathlib import Path

from . import mount
from .assembly import HubPolicy, build_filesystem
from .manifest import parse_manifest
from .settings import from_environment

TRY_THIS = """
lamina-llm-cache demo: a simulated Hub at {endpoint} serves two generated models.
Mounted at {mountpoint}. Try, in another terminal:

  ls -lR {mountpoint}
  getfattr -d {mountpoint}/tiny-llama/model.gguf            # how much is cached
  cat {mountpoint}/tiny-safetensors/config.json
  # with the gguf package (pip install gguf):
  {python} -c "import gguf; r = gguf.GGUFReader('{mountpoint}/tiny-llama/model.gguf'); print(len(r.tensors), 'tensors')"

Ctrl-C unmounts and cleans up.
"""


def run_demo(mountpoint=None):
    from .testing.models import DEMO_MANIFEST, demo_simulator
    workdir = Path(tempfile.mkdtemp(prefix="lamina-demo-"))
    target = Path(mountpoint) if mountpoint else workdir / "models"
    simulator = demo_simulator()
    try:
        settings = from_environment(endpoint=simulator.endpoint, cache_dir=workdir / "cache", token="")
        manifest = parse_manifest(DEMO_MANIFEST, source="demo models.yaml")
        fs = build_filesystem(settings, manifest, HubPolicy.FRESH)
        ready = lambda: print(TRY_THIS.format(endpoint=simulator.endpoint, mountpoint=target,
                                              python=sys.executable), flush=True)
        mount.run(fs, target, on_ready=ready)
    finally:
        simulator.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
