"""A threaded HTTP/1.1 upstream for tests that run the gate as a subprocess.

The test's event loop (if any) is free for the clients; this server answers
from its own threads, one per connection, with keep-alive:

- ``/_matrix/client/v3/sync`` is held ``sync_hold`` seconds, then answered
  ``{"next_batch": "<name>-s1"}``;
- ``/_matrix/hold/N`` is held N seconds, then answered as below;
- anything else at once: ``{"upstream": "<name>", "target": "<target>"}``.

A held request ends early (no answer) when the gate closes the connection;
the time is kept in ``UpReq.peer_closed_at``. Request bodies are read when
they carry Content-Length.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

_HOLD = re.compile(rb"/_matrix/hold/(\d+(?:\.\d+)?)")


@dataclass
class UpReq:
    method: bytes
    target: bytes
    headers: dict[bytes, bytes]
    body: bytes
    arrived: float
    peer_closed_at: float | None = None


class ThreadedUpstream:
    def __init__(self, name: str = "up", *, sync_hold: float = 0.0) -> None:
        self.name = name
        self.sync_hold = sync_hold
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[UpReq] = []
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # -- control

    def start(self) -> ThreadedUpstream:
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(3)
        self.listener.close()

    def wait_for(self, pred: Callable[[], object], timeout: float) -> bool:
        with self.changed:
            return bool(self.changed.wait_for(pred, timeout))

    def targets(self) -> list[bytes]:
        with self.changed:
            return [r.target for r in self.requests]

    # -- serving

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._serve, conn)

    def _recv(self, conn: socket.socket) -> bytes | None:
        """Some bytes; b"" at EOF; None when stopping."""
        while not self._stop.is_set():
            try:
                return conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return b""
        return None

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = self._recv(conn)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.split(b"\r\n")
                method, target = lines[0].split(b" ")[:2]
                headers: dict[bytes, bytes] = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get(b"content-length", b"0") or 0)
                while len(buf) < length:
                    data = self._recv(conn)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                req = UpReq(method, target, headers, body, time.monotonic())
                with self.changed:
                    self.requests.append(req)
                    self.changed.notify_all()
                if not self._answer(conn, req):
                    return

    def _hold(self, conn: socket.socket, req: UpReq, seconds: float) -> bool:
        """Wait *seconds*; False (and the time recorded) if the gate closes first."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self._stop.is_set():
            try:
                if conn.recv(1, socket.MSG_PEEK) == b"":
                    break
                time.sleep(0.05)  # a pipelined byte (not expected): keep holding
            except TimeoutError:
                continue
            except OSError:
                break
        else:
            return not self._stop.is_set()
        with self.changed:
            req.peer_closed_at = time.monotonic()
            self.changed.notify_all()
        return False

    def body(self, req: UpReq) -> bytes:
        """The JSON answered to a request that is not a /sync long-poll."""
        return json.dumps({"upstream": self.name, "target": req.target.decode("latin-1")}).encode()

    def _answer(self, conn: socket.socket, req: UpReq) -> bool:
        m = _HOLD.match(req.target)
        if m and not self._hold(conn, req, float(m.group(1))):
            return False
        if req.target.startswith(b"/_matrix/client/v3/sync"):
            if not self._hold(conn, req, self.sync_hold):
                return False
            body = json.dumps({"next_batch": f"{self.name}-s1"}).encode()
        else:
            body = self.body(req)
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def threaded_upstream(name: str = "up", *, sync_hold: float = 0.0
                      ) -> Iterator[ThreadedUpstream]:
    up = ThreadedUpstream(name, sync_hold=sync_hold).start()
    try:
        yield up
    finally:
        up.stop()
