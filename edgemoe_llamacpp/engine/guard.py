"""One call at a time on a Llama: the lock every call holds, the closed state, and the one open stream.

llama_cpp.Llama is not safe to share: two threads in it at once corrupt its state, and a call after close()
dereferences freed memory. A `CallGuard` serialises the calls of one Llama (a stream takes the lock for each
step, so its steps may come from different threads), refuses them once closed, and keeps track of the
stream a generation left open: a new generation from the thread that last stepped it ends it, one from
another thread is refused.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any

from edgemoe_llamacpp.errors import LlamaBusyError, LlamaClosedError


class Stream:
    """A streamed completion, or generate(), of one Llama.

    Each step runs under the guard's lock, so the steps may come from different threads (the server takes
    them from its threadpool). Until it ends it is the guard's open stream (see CallGuard.call)."""

    _NOTHING = object()

    def __init__(self, guard: CallGuard, gen):
        self._guard, self._gen = guard, gen
        self._first = Stream._NOTHING
        self.done = self.superseded = False
        self.thread = threading.get_ident()

    def __iter__(self):
        return self

    def __next__(self):
        return self.send(None)

    def send(self, value):
        with self._guard.call():
            if self.superseded:
                raise LlamaBusyError("this stream was ended by a later generation on the same Llama, which runs "
                                     "one generation at a time")
            if self.done:
                raise StopIteration
            self.thread = threading.get_ident()
            if self._first is not Stream._NOTHING:
                first, self._first = self._first, Stream._NOTHING
                return first
            try:
                return self._gen.send(value)
            except BaseException:
                self.done = True
                raise

    def prime(self) -> None:
        """Run to the first item now (the caller holds the lock), so that what fails before generation starts
        (the context window, the arguments) fails in the call that opened the stream."""
        try:
            self._first = next(self._gen)
        except StopIteration:
            self.done = True
        except BaseException:
            self.done = True
            raise

    def close(self, superseded: bool = False) -> None:
        with self._guard.lock:
            if not self.done:
                self.done, self.superseded = True, superseded
                self._gen.close()


class CallGuard:
    """The lock, closed state and open stream of one Llama."""

    def __init__(self):
        self.lock = threading.RLock()        # held by every call, and by each step of a stream
        self.closed = False
        self.depth = 0                       # calls in progress (nested ones come from llama-cpp-python)
        self._stream: weakref.ref | None = None

    def _check_open(self) -> None:
        if self.closed:
            raise LlamaClosedError("this Llama is closed")

    @contextlib.contextmanager
    def call(self, generation: bool = False):
        """Hold the lock for a call; yields True for the outermost call (the caller's, not one
        llama-cpp-python makes from inside another). A generation first ends or refuses an open stream."""
        with self.lock:
            self._check_open()
            outer = self.depth == 0
            if generation and outer:
                self._end_open_stream()
            self.depth += 1
            try:
                yield outer
            finally:
                self.depth -= 1

    def _end_open_stream(self) -> None:
        stream = self._stream() if self._stream is not None else None
        if stream is None or stream.done:
            self._stream = None
            return
        if stream.thread != threading.get_ident():
            raise LlamaBusyError("this Llama is streaming a completion for another thread, and runs one generation "
                                 "at a time: finish or close() that stream first, or give each thread its own Llama")
        stream.close(superseded=True)
        self._stream = None

    def open_stream(self, gen, *, prime: bool = True) -> Stream:
        """`gen` as the open stream; primed, it has run to its first item before this returns."""
        stream = Stream(self, gen)
        if prime:
            stream.prime()
        self._stream = weakref.ref(stream)
        return stream

    def read(self, now: Callable[[], Any], last: Callable[[], Any]) -> Any:
        """now() if no other thread is inside a call, else a copy of last(): never waits."""
        if self.lock.acquire(blocking=False):
            try:
                self._check_open()
                return now()
            finally:
                self.lock.release()
        self._check_open()
        return copy.deepcopy(last())

    @contextlib.contextmanager
    def closing(self):
        """Wait for a call in progress and mark the guard closed; yields False if it already was."""
        with self.lock:
            first = not self.closed
            self.closed = True
            yield first


def serialised(base: Callable, generation: bool = False):
    """The method `base`, called under the instance's guard (its `_edgemoe_call`), refused once closed."""

    @functools.wraps(base)
    def method(self, *args, **kwargs):
        with self._edgemoe_call(generation=generation):
            return base(self, *args, **kwargs)
    return method
