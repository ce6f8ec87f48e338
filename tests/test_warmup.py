"""Warm-up's header parsing: the byte ranges a loader touches, in the order it touches them."""

import json
import os
import struct

import pytest
import trio

from vfs import warmup
from vfs.testing.models import write_gguf, write_safetensors_dir

MiB = 1024 * 1024


def ranges_of(path, monkeypatch=None, first_look=None):
    data = path.read_bytes()
    if first_look is not None:
        monkeypatch.setattr(warmup, "FIRST_LOOK", first_look)

    async def read(start, end):
        return data[start:end]

    return trio.run(warmup.loader_ranges, read, len(data))


def test_a_gguf_is_warmed_in_file_order_which_is_header_then_tensors_by_offset(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = write_gguf(tmp_path / "m.gguf", size_mib=4)
    reader = gguf.GGUFReader(str(path))
    offsets = [int(t.data_offset) for t in reader.tensors]
    assert offsets == sorted(offsets) and min(offsets) >= reader.data_offset
    assert ranges_of(path) == [(0, path.stat().st_size)]


def test_safetensors_ranges_follow_sorted_tensor_names(tmp_path):
    path = write_safetensors_dir(tmp_path / "st") / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + length])
    names = sorted(name for name in header if name != "__metadata__")
    expected = [(8 + length + header[n]["data_offsets"][0], 8 + length + header[n]["data_offsets"][1])
                for n in names]
    assert ranges_of(path) == [(0, 8 + length)] + expected


def test_a_header_longer_than_the_first_look_is_read_again_bigger(tmp_path, monkeypatch):
    path = write_safetensors_dir(tmp_path / "st") / "model.safetensors"
    assert ranges_of(path, monkeypatch, first_look=64) == ranges_of(path)


def test_other_files_are_left_to_read_ahead(tmp_path):
    random_bytes = tmp_path / "weights.bin"
    random_bytes.write_bytes(os.urandom(MiB))
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 100)
    assert ranges_of(random_bytes) is None
    assert ranges_of(fake) is None


def test_block_order_lists_each_block_once_in_first_touch_order():
    ranges = [(0, 100), (3 * MiB, 5 * MiB), (MiB + 5, MiB + 10), (0, 10)]
    assert warmup.block_order(ranges, MiB, blocks=6) == [0, 3, 4, 1]
