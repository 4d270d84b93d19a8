"""SIGTERM as an interrupt: a fine-tune stopped by `kill` (a scheduler, a container stop) ends as
Ctrl-C does, through the same cleanup and message, instead of dying without a word."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from gaborprune.errors import Terminated

__all__ = ["Terminated", "sigterm_as_interrupt"]


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread; the previous handler is restored after.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
