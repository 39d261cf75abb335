"""A stand-in for systemd's notification socket.

``notify_socket(tmp_path)`` binds an AF_UNIX SOCK_DGRAM socket, as PID 1 does,
and a background thread collects every datagram in arrival order, with the
sender's pid (SO_PASSCRED, the way systemd attributes a message to a unit's
main process)::

    with notify_socket(tmp_path) as ns:
        proc = start_gate(env={"NOTIFY_SOCKET": ns.path, ...})
        ns.wait_for("READY=1")
        proc.send_signal(signal.SIGHUP)
        reloading = ns.wait_for("RELOADING=1")   # after the READY=1 above
        int(reloading.fields["MONOTONIC_USEC"])
        ns.wait_for("READY=1")                   # the second one
        assert reloading.pid == proc.pid

``wait_for`` consumes: each call looks only at datagrams after the one the
previous call returned. From a coroutine (a gate in the test's own event
loop), ``await ns.async_wait_for(...)`` keeps the loop running meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: sizeof(sockaddr_un.sun_path) is 108 on Linux, NUL included.
_SUN_PATH_MAX = 107
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Datagram:
    text: str
    pid: int | None  # the sender, from SCM_CREDENTIALS (kept after it exits)
    fields: dict[str, str] = field(compare=False)

    @classmethod
    def parse(cls, data: bytes, pid: int | None) -> Datagram:
        text = data.decode("utf-8", "replace")
        fields = {}
        for line in text.split("\n"):
            key, _, value = line.partition("=")
            if key:
                fields[key] = value
        return cls(text, pid, fields)

    def has(self, text: str) -> bool:
        """Every assignment line of *text* is one of this datagram's lines."""
        lines = set(self.text.split("\n"))
        return all(line in lines for line in text.split("\n") if line)


class NotifySocket:
    def __init__(self, sock: socket.socket, path: str) -> None:
        self.path = path  # the value for NOTIFY_SOCKET ("@…" when abstract)
        self._sock = sock
        self._received: list[Datagram] = []
        self._cursor = 0  # datagrams before this index were consumed by wait_for
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, name="notify-socket",
                                        daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                data, anc, _flags, _addr = self._sock.recvmsg(
                    65536, socket.CMSG_SPACE(_UCRED.size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack_from(payload)[0]
            with self._cond:
                self._received.append(Datagram.parse(data, pid))
                self._cond.notify_all()

    def datagrams(self) -> list[Datagram]:
        """Everything received so far, in arrival order."""
        with self._cond:
            return list(self._received)

    def messages(self, timeout: float = 0.0) -> list[str]:
        """The text of every datagram received so far, in arrival order, after
        waiting up to *timeout* seconds for the first one if there is none."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._received), timeout)
            return [d.text for d in self._received]

    def wait_for(self, text: str, timeout: float = 5.0) -> Datagram:
        """The first datagram after the last one returned that carries every line
        of *text* (``"READY=1"``, ``"RELOADING=1"``, ``"STATUS=draining"``).
        Raises TimeoutError listing what did arrive."""
        deadline = time.monotonic() + timeout

        def find() -> int | None:
            for i in range(self._cursor, len(self._received)):
                if self._received[i].has(text):
                    return i
            return None

        with self._cond:
            while (index := find()) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [d.text for d in self._received]
                    raise TimeoutError(f"no datagram with {text!r} within {timeout}s after "
                                       f"the first {self._cursor}; received: {seen!r}")
                self._cond.wait(left)
            self._cursor = index + 1
            return self._received[index]

    async def async_wait_for(self, text: str, timeout: float = 5.0) -> Datagram:
        """:meth:`wait_for` in a thread, so the event loop keeps running."""
        return await asyncio.to_thread(self.wait_for, text, timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def _bind_path(tmp_path: Path) -> tuple[str, str | None]:
    """A socket path under *tmp_path*, or under a short temporary directory when
    *tmp_path* is too deep for sun_path (long parametrized test names)."""
    path = str(tmp_path / "notify.sock")
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return path, None
    short = tempfile.mkdtemp(prefix="pg-notify-")
    return os.path.join(short, "notify.sock"), short


@contextlib.contextmanager
def notify_socket(tmp_path: Path, *, abstract: bool = False) -> Iterator[NotifySocket]:
    """A bound notification socket; ``.path`` is the NOTIFY_SOCKET value.

    *abstract* binds ``@palpo-test-<random>`` in the abstract namespace instead
    of a file."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    short_dir = None
    try:
        if abstract:
            value = f"@palpo-test-{secrets.token_hex(8)}"
            sock.bind("\0" + value[1:])
        else:
            value, short_dir = _bind_path(tmp_path)
            sock.bind(value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.settimeout(0.05)  # how often the collector looks at its stop flag
    except BaseException:
        sock.close()
        raise
    ns = NotifySocket(sock, value)
    try:
        yield ns
    finally:
        ns.close()
        if not abstract:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(value)
            if short_dir is not None:
                os.rmdir(short_dir)
