"""A worker that cannot start stops the whole service with the worker's status."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys

import pytest


@pytest.mark.timeout(60)
def test_workers_exit_2_when_a_listener_cannot_bind(tmp_path: pathlib.Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "gate.toml"
        config.write_text(f"""
[server]
workers = 2
[[listeners]]
name = "busy"
bind = "127.0.0.1:{port}"
""")
        proc = subprocess.run([sys.executable, "-m", "palpo_gate", "--config", str(config)],
                              capture_output=True, text=True, timeout=45)
    assert proc.returncode == 2, proc.stderr
    assert "listeners[0].bind" in proc.stderr
    assert "Traceback" not in proc.stderr
