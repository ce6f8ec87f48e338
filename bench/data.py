"""The files the benchmark serves: a big file of random bytes and a real GGUF, made once."""

import os
from pathlib import Path

MIB = 1024 * 1024
BIG_NAME = "big.bin"
GGUF_NAME = "model.gguf"


def big_file(directory, size):
    """A file of `size` random bytes in `directory` (kept between runs when the size fits)."""
    path = Path(directory) / BIG_NAME
    if path.exists() and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        for offset in range(0, size, 64 * MIB):
            out.write(os.urandom(min(64 * MIB, size - offset)))
    return path


def four_files(directory, size):
    """Four files of `size` random bytes each (for four readers of different files)."""
    paths = []
    for number in range(4):
        path = Path(directory) / f"part-{number}.bin"
        if not (path.exists() and path.stat().st_size == size):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as out:
                for offset in range(0, size, 64 * MIB):
                    out.write(os.urandom(min(64 * MIB, size - offset)))
        paths.append(path)
    return paths


def gguf_file(directory, size_mib):
    """A llama-architecture GGUF of about `size_mib` MiB (kept between runs)."""
    path = Path(directory) / GGUF_NAME
    marker = path.with_suffix(f".{size_mib}mib")
    if path.exists() and marker.exists():
        return path
    from vfs.testing.models import write_gguf
    write_gguf(path, size_mib=size_mib)
    marker.touch()
    return path
