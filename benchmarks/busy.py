"""Busy background processes for the benchmarks: what a shared machine looks like.

``background_load(n, seconds)`` starts ``n`` processes that each spin one CPU (a pure-Python
loop, no threads, no memory traffic) until ``seconds`` have passed or the context exits,
whichever comes first; the time bound keeps a crashed benchmark from leaving them behind.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def background_load(n: int, seconds: float):
    """``n`` CPU-bound processes beside the caller for at most ``seconds`` (wall clock)."""
    if n < 0 or seconds <= 0:
        raise ValueError(f"background_load: need n >= 0 and seconds > 0, not {n}, {seconds}")
    processes = [
        subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=float(seconds))])
        for _ in range(n)
    ]
    try:
        yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
