"""Ctrl-C while llama.cpp runs Python callbacks (the eval hook, the log callback, the load's progress): a
KeyboardInterrupt raised inside a ctypes callback is printed and swallowed, and llama.cpp goes on, so the signal is
deferred to where Python can raise it."""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigint_deferred(on_sigint):
    """While the body runs on the main thread, a SIGINT calls on_sigint() instead of raising at whatever Python
    runs next (a ctypes callback, where it would be swallowed); the program's own handler runs once the body
    ends, so the default one raises KeyboardInterrupt there. Elsewhere, or with SIGINT ignored or left to the
    OS, nothing changes."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    frames = []

    def record(_signum, frame):
        frames.append(frame)
        on_sigint()

    signal.signal(signal.SIGINT, record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if frames:
            previous(signal.SIGINT, frames[0])
