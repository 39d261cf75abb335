"""Start the gate the way operators do: ``python -m palpo_gate --config FILE``.

Used by tests that must see the real process (CLI, signals, the production
handler settings) rather than a gate run inside the test's event loop.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

from palpo_gate import config as configmod


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

    def _pump(self, stream: object, sink: list[str], watch: bool,
              reading: threading.Event | None = None) -> None:
        """Read *stream* line by line into *sink*, pausing while *reading* is clear."""
        if reading is None:
            reading = threading.Event()
            reading.set()
        reading.wait()
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line)
            if watch and "palpo-gate ready" in line:
                self.ready.set()
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


@contextlib.contextmanager
def run_gate(config_toml: str, workdir: pathlib.Path, *, startup_timeout: float = 20.0,
             env: dict[str, str] | None = None, read_stdout: bool = True,
             preexec_fn: Callable[[], object] | None = None) -> Iterator[GateProcess]:
    """Write *config_toml*, start the gate on it, wait until it reports ready.

    *read_stdout* False: nothing reads the gate's stdout (a stalled log
    reader) until the test sets ``stdout_reading``; *preexec_fn* runs in the
    child before the gate starts (resource limits, say)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "gate.toml"
    path.write_text(config_toml)
    cfg = configmod.loads(config_toml, str(path))
    gp = GateProcess(spawn(path, env=env, preexec_fn=preexec_fn), cfg)
    if read_stdout:
        gp.stdout_reading.set()
    gp.stderr_reading.set()
    threads = [
        threading.Thread(target=gp._pump,
                         args=(gp.proc.stdout, gp.stdout_lines, False, gp.stdout_reading),
                         daemon=True),
        threading.Thread(target=gp._pump,
                         args=(gp.proc.stderr, gp.stderr_lines, True, gp.stderr_reading),
                         daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not gp.ready.wait(0.05):
            if gp.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("gate did not start:\n" + "".join(gp.stderr_lines[-30:]))
        yield gp
    finally:
        # Read whatever is left, so that the gate can flush it and stop.
        gp.stdout_reading.set()
        gp.stderr_reading.set()
        gp.stop()
        for t in threads:
            t.join(5)
        for stream in (gp.proc.stdout, gp.proc.stderr):
            if stream is not None:
                stream.close()
