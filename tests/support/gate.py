"""A gate to test against: its config, the gate in the test's event loop, and
the real process started the way operators do (``python -m palpo_gate --config FILE``).

``gate_toml`` is the one config builder; ``running_gate`` runs the same Gate
class ``palpo-gate`` runs inside the test's event loop; ``run_gate`` starts the
real process, for tests that must see the CLI, signals or the production
handler settings. Readiness is what the gate says to systemd or serves, not
what it logs: ``READY=1`` on a notify socket (a supervisor sends it once every
worker is ready), or a listener's ``/health``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

from palpo_gate import config as configmod
from palpo_gate.generation import Gate
from support.notify import notify_socket


def gate_toml(upstream: str, *, bind: str = "127.0.0.1:0", name: str = "main",
              role: str | None = "client", access: str = "off", log: str = "",
              server: str = "", upstream_keys: str = "", before: str = "",
              listener: str = "", extra: str = "") -> str:
    """A config with one listener *name* on *bind*, forwarding to *upstream*.

    *server*, *upstream_keys* and *log* are keys added to those tables;
    *before* is tables placed before the listener, *listener* keys of the
    listener (and its sub-tables), *extra* tables after it."""
    role_line = f'role = "{role}"' if role is not None else ""
    server_table = f"[server]\n{server}" if server else ""
    return f"""
{server_table}
[upstream]
url = "{upstream}"
{upstream_keys}
[log]
access = "{access}"
{log}
{before}
[[listeners]]
name = "{name}"
bind = "{bind}"
{role_line}
{listener}
{extra}
"""


@contextlib.asynccontextmanager
async def running_gate(toml: str) -> AsyncIterator[Gate]:
    """Start a gate on *toml* (listeners may bind port 0) and stop it after."""
    gate = Gate(configmod.loads(toml))
    await gate.start()
    try:
        yield gate
    finally:
        await gate.close(0)


def port_of(gate: Gate, name: str = "main") -> int:
    return int(gate.addresses()[name][1])


class GateProcess:
    def __init__(self, proc: subprocess.Popen[str], cfg: configmod.Config) -> None:
        self.proc = proc
        self.cfg = cfg
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.ready = threading.Event()
        #: cleared: the test stops reading that pipe (it fills up), set: reads again
        self.stdout_reading = threading.Event()
        self.stderr_reading = threading.Event()

    def port(self, listener_name: str) -> int:
        for lst in self.cfg.listeners:
            if lst.name == listener_name:
                return lst.bind.port
        raise KeyError(listener_name)

    def _pump(self, stream: object, sink: list[str], reading: threading.Event) -> None:
        """Read *stream* line by line into *sink*, pausing while *reading* is clear."""
        reading.wait()
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line)
            while not reading.wait(0.5):
                if self.proc.poll() is not None:
                    break  # the gate is gone: read what it left

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def spawn(config_path: pathlib.Path | None, *args: str,
          env: dict[str, str] | None = None,
          preexec_fn: Callable[[], object] | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "palpo_gate", *args]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)


def answers_health(listener: configmod.Listener, timeout: float = 1.0) -> bool:
    """*listener* answers ``GET /health`` (any HTTP response: a listener limited
    to some hosts may refuse the probe's Host, and still it serves). False when
    it cannot be reached (yet); None-like for a listener no client can name."""
    bind = listener.bind
    host = sorted(listener.hosts)[0] if listener.hosts else "localhost"
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    try:
        with contextlib.ExitStack() as stack:
            if bind.kind == "unix":
                sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                sock.settimeout(timeout)
                sock.connect(bind.path)
            else:
                sock = stack.enter_context(
                    socket.create_connection((bind.host, bind.port), timeout=timeout))
            if listener.proxy_protocol:
                sock.sendall(b"PROXY UNKNOWN\r\n")
            if listener.tls is not None:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                sock = stack.enter_context(ctx.wrap_socket(sock, server_hostname=host))
            sock.sendall(request)
            return sock.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def _probe(cfg: configmod.Config) -> Callable[[], bool] | None:
    """The readiness check of a single process: its first listener a client can
    reach answers /health (None: every listener is a systemd socket)."""
    for listener in cfg.listeners:
        if listener.bind.kind in ("tcp", "unix"):
            return lambda: answers_health(listener)
    return None


@contextlib.contextmanager
def watch(proc: subprocess.Popen[str], cfg: configmod.Config, ready: Callable[[], bool], *,
          startup_timeout: float = 20.0, read_stdout: bool = True) -> Iterator[GateProcess]:
    """Pump *proc*'s output, wait until *ready*() is true, stop the gate after.

    *read_stdout* False: nothing reads the gate's stdout (a stalled log
    reader) until the test sets ``stdout_reading``."""
    gp = GateProcess(proc, cfg)
    if read_stdout:
        gp.stdout_reading.set()
    gp.stderr_reading.set()
    threads = [
        threading.Thread(target=gp._pump, args=(proc.stdout, gp.stdout_lines, gp.stdout_reading),
                         daemon=True),
        threading.Thread(target=gp._pump, args=(proc.stderr, gp.stderr_lines, gp.stderr_reading),
                         daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)  # let the pumps read what the gate said
                raise RuntimeError("gate did not start:\n" + "".join(gp.stderr_lines[-30:]))
            time.sleep(0.05)
        gp.ready.set()
        yield gp
    finally:
        # Read whatever is left, so that the gate can flush it and stop.
        gp.stdout_reading.set()
        gp.stderr_reading.set()
        gp.stop()
        for t in threads:
            t.join(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def run_gate(config_toml: str, workdir: pathlib.Path, *, startup_timeout: float = 20.0,
             env: dict[str, str] | None = None, read_stdout: bool = True,
             preexec_fn: Callable[[], object] | None = None) -> Iterator[GateProcess]:
    """Write *config_toml*, start the gate on it, wait until it is ready.

    Ready: ``READY=1`` on a notify socket of our own (a single process sends it
    once it serves; a supervisor once every worker does), which leaves no trace
    in the access log or the metrics. A test that brings its own
    ``NOTIFY_SOCKET`` gets a listener's /health instead. *read_stdout* as for
    :func:`watch`; *preexec_fn* runs in the child before the gate starts
    (resource limits, say)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "gate.toml"
    path.write_text(config_toml)
    cfg = configmod.loads(config_toml, str(path))
    env = dict(env or {})
    with contextlib.ExitStack() as stack:
        probe = _probe(cfg)
        if "NOTIFY_SOCKET" not in env:
            ns = stack.enter_context(notify_socket(workdir))
            env["NOTIFY_SOCKET"] = ns.path
            probe = lambda: any(d.has("READY=1") for d in ns.datagrams())  # noqa: E731
        elif probe is None:
            raise ValueError("no listener to probe and the test holds NOTIFY_SOCKET")
        proc = spawn(path, env=env, preexec_fn=preexec_fn)
        yield stack.enter_context(watch(proc, cfg, probe, startup_timeout=startup_timeout,
                                        read_stdout=read_stdout))
