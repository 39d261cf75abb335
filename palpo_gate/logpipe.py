"""Log output that never blocks the event loop: stdout (access lines) and
stderr (operational messages).

This module owns the two descriptors the gate logs to. A reader that stops
reading (journald under pressure, a container log driver that stalls) must
never stop the gate: a blocking ``write(2)`` on a full pipe would hold the
event loop, and with it every request and ``/health``.

Each :class:`LogPipe` writes a line with one non-blocking ``write(2)``. While
the descriptor takes them, that is all it does (as before: a line of up to
PIPE_BUF bytes stays whole when several workers share the pipe). When a write
would block, lines wait in a bounded buffer (:data:`BUFFER_LIMIT` bytes per
descriptor) that the event loop writes out when the descriptor becomes
writable, in writes of whole lines of at most PIPE_BUF bytes. A reader that is
merely slow loses nothing while the buffer has room. When it is full, new
lines are dropped and counted (``palpo_gate_log_lines_dropped_total``), and a
warning says how many, at most once a minute. When the reader comes back,
lines flow again. What is left at exit gets :data:`FLUSH_TIMEOUT` seconds.

Non-blocking without touching what others share: ``O_NONBLOCK`` belongs to
the open file description, which the gate shares with its supervisor, its
workers and whatever started it (a shell's terminal, which would be left
non-blocking). So a pipe or terminal is opened again through
``/proc/self/fd`` (a description of its own, on the same pipe), a socket
(journald's stdout stream) is written with ``MSG_DONTWAIT``, and a regular
file is written as it is (a file never waits for a reader). Only when none
of these can be had is ``O_NONBLOCK`` set on the descriptor itself, and
cleared again at exit.

Not thread-safe: call it from the thread that runs the event loop (the
logging handler holds its own lock; other threads' lines wait in the buffer).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import functools
import itertools
import logging
import os
import select
import socket
import stat
import time
from collections.abc import Callable

log = logging.getLogger("palpo_gate")

#: Bytes of lines one descriptor may hold back while its reader is not
#: reading (about 4,000 access lines).
BUFFER_LIMIT = 1024 * 1024
#: Writes up to this size reach a pipe whole, never interleaved with another
#: writer's (POSIX; 4096 on Linux).
PIPE_BUF = select.PIPE_BUF
#: The warning about dropped lines comes at most this often (seconds).
WARN_INTERVAL = 60.0
#: What the lines still buffered at exit get to be written (seconds).
FLUSH_TIMEOUT = 2.0


class LogPipe:
    """Whole lines to one descriptor, never blocking; see the module docstring."""

    __slots__ = ("_loop", "_queue", "_queued", "_raw", "_restore", "_sock", "_unreported",
                 "_warn_handle", "_warn_loop", "_warned_at", "_wfd", "broken", "dropped", "fd",
                 "limit", "name", "warn_every")

    def __init__(self, fd: int, name: str, limit: int = BUFFER_LIMIT,
                 warn_every: float = WARN_INTERVAL) -> None:
        self.fd = fd
        #: "stdout" or "stderr": the ``stream`` label of the dropped-lines counter
        self.name = name
        self.limit = limit
        self.warn_every = warn_every
        #: lines dropped since the start (a full buffer, or lines left at exit)
        self.dropped = 0
        #: the error that ended writing (the reader is gone for good), else None
        self.broken: OSError | None = None
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        #: the loop whose writer callback is registered, while lines wait
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unreported = 0
        self._warned_at = -warn_every
        self._warn_handle: asyncio.TimerHandle | None = None
        self._warn_loop: asyncio.AbstractEventLoop | None = None
        self._wfd = -1
        self._sock: socket.socket | None = None
        self._restore: int | None = None  # flags to put back on fd at close
        self._raw: Callable[[bytes], int] = _unwritable
        try:
            self._open()
        except OSError as exc:  # started with the descriptor closed
            self.broken = exc

    def _open(self) -> None:
        mode = os.fstat(self.fd).st_mode
        if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
            self._wfd = self.fd
            self._raw = functools.partial(os.write, self.fd)
            return
        if stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(self.fd))
            self._wfd = self._sock.fileno()
            self._raw = self._send
            return
        try:
            # A description of our own: O_NONBLOCK here leaves the shared one alone.
            self._wfd = os.open(f"/proc/self/fd/{self.fd}",
                                os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
                self._restore = flags
            self._wfd = self.fd
        self._raw = functools.partial(os.write, self._wfd)

    def _send(self, data: bytes) -> int:
        assert self._sock is not None
        return self._sock.send(data, socket.MSG_DONTWAIT)

    # -- the hot path -----------------------------------------------------------------

    def write(self, data: bytes) -> bool:
        """Write or buffer *data* (whole lines); False once the reader is gone for good."""
        if self._queue or self.broken is not None:
            return self._enqueue(data)
        try:
            n = self._raw(data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._break(exc)
            return False
        if n < len(data):
            # The rest of a line written in part goes first whatever the
            # limit: dropping it would glue two lines together.
            rest = data[n:] if n else data
            if n:
                self._queue.append(rest)
                self._queued += len(rest)
                self._watch()
            else:
                self._enqueue(rest)
        return True

    def _enqueue(self, data: bytes) -> bool:
        if self.broken is not None:
            return False
        if self._queued + len(data) > self.limit:
            self._drop(1)
            return True
        self._queue.append(data)
        self._queued += len(data)
        if self._loop is None or self._loop.is_closed():
            self._watch()
        return True

    # -- the writer ---------------------------------------------------------------------

    def _watch(self) -> None:
        """Have the running loop write the buffer out when the descriptor is writable."""
        loop = asyncio.events._get_running_loop()
        if loop is None or loop is self._loop:
            return  # no loop yet: written at the next write in one, or at exit
        try:
            loop.add_writer(self._wfd, self._on_writable)
        except (OSError, ValueError, RuntimeError, NotImplementedError):
            return
        self._loop = loop

    def _unwatch(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(OSError, ValueError, RuntimeError, NotImplementedError):
                loop.remove_writer(self._wfd)

    def _on_writable(self) -> None:
        if self._write_some():
            self._unwatch()

    def _write_some(self) -> bool:
        """Write buffered lines until the descriptor would block; True once empty."""
        queue = self._queue
        while queue:
            data = queue[0]
            if len(queue) > 1 and len(data) < PIPE_BUF:
                # Several whole lines in one write, never more than PIPE_BUF
                # bytes: each write still lands whole between other writers'.
                parts = [data]
                size = len(data)
                for item in itertools.islice(queue, 1, None):
                    if size + len(item) > PIPE_BUF:
                        break
                    parts.append(item)
                    size += len(item)
                if len(parts) > 1:
                    data = b"".join(parts)
            try:
                n = self._raw(data)
            except BlockingIOError:
                return False
            except OSError as exc:
                self._break(exc)
                return True
            self._queued -= n
            while n and n >= len(queue[0]):
                n -= len(queue.popleft())
            if n:
                queue[0] = queue[0][n:]
        return True

    def _break(self, exc: OSError) -> None:
        """The reader is gone (EPIPE, EBADF …): writing ends for good."""
        self.broken = exc
        self.dropped += len(self._queue)
        self._queue.clear()
        self._queued = 0
        self._unwatch()

    # -- dropped lines -------------------------------------------------------------------

    def _drop(self, lines: int) -> None:
        self.dropped += lines
        self._unreported += lines
        if self._warn_handle is not None and not self._warn_loop.is_closed():  # type: ignore[union-attr]
            return  # a warning is due
        loop = asyncio.events._get_running_loop()
        if loop is None:
            self._warn_handle = None
            return  # said at exit
        delay = max(0.0, self._warned_at + self.warn_every - time.monotonic())
        self._warn_handle = loop.call_later(delay, self._warn)
        self._warn_loop = loop

    def _warn(self) -> None:
        self._warn_handle = None
        lines, self._unreported = self._unreported, 0
        if not lines:
            return
        self._warned_at = time.monotonic()
        # The warning goes to stderr: when that is the stalled one, it is
        # itself dropped and counted, and the next one comes a minute later.
        log.warning("%d log line(s) to %s dropped: nothing read %s fast enough and its "
                    "buffer of %d KiB was full (%d dropped since the start)",
                    lines, self.name, self.name, self.limit // 1024, self.dropped)

    # -- exit ------------------------------------------------------------------------------

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Write what is buffered, waiting at most *timeout* seconds (no loop needed)."""
        self._unwatch()
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._wfd, select.POLLOUT)
        while self._queue and not self._write_some():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                poller.poll(left * 1000.0)
            except InterruptedError:  # pragma: no cover - PEP 475 retries poll()
                continue
        if self._queue:
            self._drop(len(self._queue))
            self._queue.clear()
            self._queued = 0

    def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Flush, say what was dropped and not yet said, let go of the descriptor."""
        if self._warn_handle is not None:
            self._warn_handle.cancel()
            self._warn_handle = None
        if self.broken is None:
            self.flush(timeout)
        if self._unreported:
            self._warn()
        if self._sock is not None:
            self._sock.close()
        elif self._wfd not in (-1, self.fd):
            os.close(self._wfd)
        if self._restore is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.fd, fcntl.F_SETFL, self._restore)
        self._wfd = -1
        self._sock = None
        self._raw = _unwritable
        if self.broken is None:
            self.broken = OSError(errno.EBADF, "closed")


def _unwritable(data: bytes) -> int:
    raise OSError(errno.EBADF, "the log descriptor is closed")


# -- the process's two pipes -----------------------------------------------------------

_pipes: dict[str, LogPipe] = {}
_FDS = {"stdout": 1, "stderr": 2}


def get(name: str) -> LogPipe:
    """The pipe of ``"stdout"`` or ``"stderr"``, opened at first use."""
    pipe = _pipes.get(name)
    if pipe is None:
        pipe = _pipes[name] = LogPipe(_FDS[name], name)
    return pipe


def stdout() -> LogPipe:
    return _pipes.get("stdout") or get("stdout")


def stderr() -> LogPipe:
    return _pipes.get("stderr") or get("stderr")


def dropped() -> dict[str, int]:
    """Lines dropped so far, per stream (both always present)."""
    return {name: (p.dropped if (p := _pipes.get(name)) is not None else 0) for name in _FDS}


def close_all(timeout: float = FLUSH_TIMEOUT) -> None:
    """At exit: flush stdout, then stderr (which may say what stdout dropped)."""
    for name in ("stdout", "stderr"):
        pipe = _pipes.pop(name, None)
        if pipe is not None:
            pipe.close(timeout)


class Handler(logging.Handler):
    """A logging handler that writes each record as one line to a :class:`LogPipe`
    (stderr by default)."""

    def __init__(self, pipe: LogPipe | None = None, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self._pipe = pipe

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            pipe = self._pipe if self._pipe is not None else stderr()
            pipe.write(line.encode("utf-8", "backslashreplace"))
        except Exception:  # pragma: no cover - logging's own error path
            self.handleError(record)
