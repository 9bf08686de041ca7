"""The demo's terminal output: a timeline of what happened, and the final table.

One line per event: seconds since the scenario started, the wall-clock time, a kind
and a sentence. Colours only when the stream is a terminal (and ``NO_COLOR`` is not
set), so logs and CI output stay plain text.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

COLOURS = {
    "step": "1;36", "fault": "1;35", "pending": "33", "firing": "1;31", "resolved": "32", "notify": "34",
    "decision": "36", "slurm": "1;33", "ok": "1;32", "miss": "1;31", "info": "2", "skip": "33",
}


def use_colour(stream: TextIO) -> bool:
    return hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("NO_COLOR")


class Timeline:
    """Thread-safe event printer; ``t0`` is the scenario's start (``time.monotonic``)."""

    def __init__(self, stream: TextIO | None = None, colour: bool | None = None):
        self.stream = stream or sys.stdout
        self.colour = use_colour(self.stream) if colour is None else colour
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self.lines: list[str] = []

    def paint(self, kind: str, text: str) -> str:
        code = COLOURS.get(kind)
        return f"\033[{code}m{text}\033[0m" if self.colour and code else text

    def since(self, at: float | None = None) -> float:
        return (at if at is not None else time.monotonic()) - self.t0

    def event(self, kind: str, text: str, at: float | None = None) -> None:
        stamp = f"+{self.since(at):6.1f}s {time.strftime('%H:%M:%S')}"
        plain = f"{stamp}  {kind:<8} {text}"
        with self._lock:
            self.lines.append(plain)
            print(f"{stamp}  {self.paint(kind, f'{kind:<8}')} {text}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        with self._lock:
            self.lines.append(text)
            print(text, file=self.stream, flush=True)


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table (no colour: it is also the --once summary in CI logs)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)
