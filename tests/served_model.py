"""The one model the keeper and hand-over tests serve (ONE_MODEL_MANIFEST), and where it shows in a mount."""

import pytest

from vfs.testing.readers import write_reference

MiB = 1024 * 1024


@pytest.fixture
def model(hub, tmp_path):
    """The reference bytes of readers/model's model.gguf, put on the simulated Hub."""
    reference = write_reference(tmp_path / "reference.gguf", 16 * MiB)
    hub.add_repo("readers/model", files={"model.gguf": reference})
    return reference


def served_file(mount):
    return mount.mountpoint / "model" / "model.gguf"
