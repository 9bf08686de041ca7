"""Command-line helpers shared by gpufleet's programs."""

from __future__ import annotations

import argparse


def duration(text: str) -> float:
    """Parse a Prometheus-style duration (``500ms``, ``5s``, ``1m``) or plain seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip()
    try:
        for suffix in ("ms", "s", "m", "h"):
            if t.endswith(suffix):
                value = float(t[: -len(suffix)]) * units[suffix]
                break
        else:
            value = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (examples: 500ms, 5s, 1m)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n
