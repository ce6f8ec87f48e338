"""pull's progress: a tqdm bar per model on a terminal, a plain line per 10% otherwise.

As huggingface_hub does, HF_HUB_DISABLE_PROGRESS_BARS turns the progress off (bars and
lines alike; Settings.progress_bars carries it). Without a terminal (a log file, CI,
systemd's journal) a bar's carriage returns would be noise, so each model gets a plain
line when it crosses each tenth of its bytes.
"""

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm


class PullProgress:
    """Bytes fetched per model against the bytes each was missing when the pull began."""

    def __init__(self, missing: dict[str, int], enabled: bool = True, stream: TextIO = sys.stderr):
        self.missing = {name: total for name, total in missing.items() if total > 0}
        self.stream = stream
        self.mode = "off" if not enabled else "bars" if stream.isatty() else "lines"
        self.done = dict.fromkeys(self.missing, 0)
        self._started = time.monotonic()
        self._tenths = dict.fromkeys(self.missing, 0)
        self._bars = {}
        if self.mode == "bars":
            self._bars = {name: tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                                     file=stream, position=position, leave=True)
                          for position, (name, total) in enumerate(self.missing.items())}

    def for_model(self, name: str) -> Callable[[int], None]:
        """The callback a fill calls with each block's length, for model `name`."""
        return lambda amount: self.advance(name, amount)

    def advance(self, name: str, amount: int) -> None:
        if name not in self.missing:
            return
        self.done[name] += amount
        if self.mode == "bars":
            self._bars[name].update(amount)
        elif self.mode == "lines":
            self._line_per_tenth(name)

    def _line_per_tenth(self, name):
        total, done = self.missing[name], self.done[name]
        tenth = min(10, done * 10 // total)
        if tenth <= self._tenths[name]:
            return
        self._tenths[name] = tenth
        rate = done / max(time.monotonic() - self._started, 1e-6) / 1e6
        self.stream.write(f"pull: {name}: {tenth * 10:3d}% ({done / 2**20:.1f} of {total / 2**20:.1f} MiB, "
                          f"{rate:.1f} MB/s)\n")
        self.stream.flush()

    def finish(self) -> None:
        for bar in self._bars.values():
            bar.close()
