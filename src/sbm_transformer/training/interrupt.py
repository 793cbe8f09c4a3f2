"""Ctrl-C as a request to stop at the next step boundary."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import suppress
from typing import Any


def _notify(text: str) -> None:
    # straight to file descriptor 2: print() from a signal handler can hit a stream the
    # interrupted code is writing to ("reentrant call")
    with suppress(OSError):
        os.write(2, text.encode())


class StopRequest:
    """Ctrl-C as a request to stop at the next step boundary (a context manager).

    While active (in the main thread, unless SIGINT is ignored), the first SIGINT only sets
    :attr:`requested`: the training loop finishes the step in progress, with its log row,
    evaluation and checkpoints when due, saves ``last`` and stops, so the checkpoint is one an
    uninterrupted run passes through. A second SIGINT raises KeyboardInterrupt at once; nothing
    is saved from the half-finished step. The previous handler is restored on exit.
    """

    def __init__(self, *, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce  # False on ranks other than 0 (one message, not N)
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not signal.SIG_IGN:
                self._previous = previous
                signal.signal(signal.SIGINT, self._handle)
                self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.default_int_handler
            signal.signal(signal.SIGINT, previous)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            _notify(
                "\nCtrl-C: stopping after the step in progress (with its evaluation if one is "
                "due) and saving a checkpoint; press Ctrl-C again to stop at once without "
                "saving\n"
            )
