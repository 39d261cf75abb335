"""Run a real Synapse homeserver (from PyPI) for end-to-end tests.

Synapse stands in for the Palpo homeserver: the gate must carry real Matrix
client and federation traffic to it unchanged.

Usage::

    with run_synapse(tmp_path) as hs:
        hs.url          # "http://127.0.0.1:<port>"
        hs.server_name  # "hs.test"

The server runs as a subprocess (``python -m synapse.app.homeserver``) with a
SQLite database, a generated signing key and every rate limit turned off. It is
stopped by PID (SIGTERM, then SIGKILL) when the context exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import yaml
from signedjson.key import generate_signing_key, write_signing_keys

from support.net import free_port

SERVER_NAME = "hs.test"
REGISTRATION_SHARED_SECRET = "palpo-gate-test-shared-secret"
STARTUP_TIMEOUT = 90.0
STOP_TIMEOUT = 5.0

# A rate limit nobody in a test will reach.
_UNLIMITED = {"per_second": 100000, "burst_count": 100000}


@dataclasses.dataclass
class SynapseServer:
    port: int
    server_name: str
    workdir: pathlib.Path
    pid: int
    log_path: pathlib.Path
    stdout_path: pathlib.Path
    registration_shared_secret: str = REGISTRATION_SHARED_SECRET
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        return _log_tail(self.log_path, self.stdout_path, lines)


def _tail(path: pathlib.Path, lines: int) -> str:
    try:
        data = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "<missing>"
    return "\n".join(data[-lines:])


def _log_tail(log_path: pathlib.Path, stdout_path: pathlib.Path, lines: int) -> str:
    return (
        f"--- {stdout_path} (last {lines} lines) ---\n{_tail(stdout_path, lines)}\n"
        f"--- {log_path} (last {lines} lines) ---\n{_tail(log_path, lines)}"
    )


def synapse_config(workdir: pathlib.Path, port: int, server_name: str = SERVER_NAME) -> dict:
    """The homeserver.yaml contents, as a dict."""
    ratelimits = {
        "rc_message": _UNLIMITED,
        "rc_registration": _UNLIMITED,
        "rc_registration_token_validity": _UNLIMITED,
        "rc_login": {
            "address": _UNLIMITED,
            "account": _UNLIMITED,
            "failed_attempts": _UNLIMITED,
        },
        "rc_admin_redaction": _UNLIMITED,
        "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
        "rc_joins_per_room": _UNLIMITED,
        "rc_key_requests": _UNLIMITED,
        "rc_3pid_validation": _UNLIMITED,
        "rc_invites": {
            "per_room": _UNLIMITED,
            "per_user": _UNLIMITED,
            "per_issuer": _UNLIMITED,
        },
        "rc_third_party_invite": _UNLIMITED,
        "rc_media_create": _UNLIMITED,
        "rc_presence": {"per_user": _UNLIMITED},
        "rc_delayed_event_mgmt": _UNLIMITED,
        "rc_room_creation": _UNLIMITED,
        "rc_reports": _UNLIMITED,
        "rc_user_directory": _UNLIMITED,
        "rc_profile": _UNLIMITED,
        "rc_federation": {
            "window_size": 1000,
            "sleep_limit": 100000,
            "sleep_delay": 1,
            "reject_limit": 100000,
            "concurrent": 100000,
        },
        "remote_media_download_per_second": "1G",
        "remote_media_download_burst_count": "10G",
    }
    return {
        "server_name": server_name,
        "pid_file": str(workdir / "homeserver.pid"),
        "report_stats": False,
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                # The gate sets X-Forwarded-For / -Proto; let Synapse use them.
                "x_forwarded": True,
                "resources": [{"names": ["client", "federation"], "compress": False}],
            }
        ],
        "database": {
            "name": "sqlite3",
            "args": {"database": str(workdir / "homeserver.db")},
        },
        "log_config": str(workdir / "log.yaml"),
        "media_store_path": str(workdir / "media_store"),
        "max_upload_size": "50M",
        "url_preview_enabled": False,
        "enable_media_repo": True,
        "signing_key_path": str(workdir / "signing.key"),
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "macaroon_secret_key": "palpo-gate-test-macaroon-secret",
        "form_secret": "palpo-gate-test-form-secret",
        "registration_shared_secret": REGISTRATION_SHARED_SECRET,
        "enable_registration": True,
        "enable_registration_without_verification": True,
        # Password hashing is the slowest part of register/login otherwise.
        "bcrypt_rounds": 4,
        # Federation with a fake remote homeserver that lives on loopback and
        # has a self-signed certificate.
        "federation_verify_certificates": False,
        # Synapse blocks loopback for outbound requests by default. The
        # allowlist alone is not enough: Synapse checks server names that are IP
        # literals (ours: "127.0.0.1:<port>") against the blocklist only, so
        # the blocklist itself must not contain loopback.
        "ip_range_blacklist": [],
        "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
        "allow_public_rooms_over_federation": True,
        # Less background noise (and no spurious /sync wake-ups).
        "presence": {"enabled": False},
        "enable_metrics": False,
        "user_directory": {"enabled": False},
        "serve_server_wellknown": False,
        **ratelimits,
    }


def _log_config(log_path: pathlib.Path) -> dict:
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s"
                " - %(request)s - %(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": str(log_path),
                "encoding": "utf8",
            }
        },
        "loggers": {
            "synapse.storage.SQL": {"level": "WARNING"},
            "synapse.access.http": {"level": "INFO"},
        },
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


def _versions_ok(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/_matrix/client/versions")
        resp = conn.getresponse()
        body = resp.read()
        return resp.status == 200 and b"versions" in body
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def run_synapse(
    workdir: pathlib.Path,
    server_name: str = SERVER_NAME,
    startup_timeout: float = STARTUP_TIMEOUT,
) -> Iterator[SynapseServer]:
    """Start Synapse in ``workdir``; yield a :class:`SynapseServer`; stop it."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "media_store").mkdir(exist_ok=True)
    log_path = workdir / "homeserver.log"
    stdout_path = workdir / "synapse.stdout"

    key_path = workdir / "signing.key"
    if not key_path.exists():
        with key_path.open("w") as fh:
            write_signing_keys(fh, [generate_signing_key("a_test")])

    port = free_port()
    config = synapse_config(workdir, port, server_name)
    config_path = workdir / "homeserver.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    (workdir / "log.yaml").write_text(yaml.safe_dump(_log_config(log_path), sort_keys=False))

    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)  # our -W filters are not Synapse's business

    with stdout_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", str(config_path)],
            cwd=str(workdir),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            rc = proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"Synapse exited with status {rc} during startup "
                    f"(config {config_path})\n{_log_tail(log_path, stdout_path, 60)}"
                )
            if _versions_ok(port):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Synapse did not answer /_matrix/client/versions on port {port} "
                    f"within {startup_timeout:.0f}s\n{_log_tail(log_path, stdout_path, 60)}"
                )
            time.sleep(0.1)

        yield SynapseServer(
            port=port,
            server_name=server_name,
            workdir=workdir,
            pid=proc.pid,
            log_path=log_path,
            stdout_path=stdout_path,
        )
    finally:
        _stop(proc)


def _main() -> None:  # pragma: no cover - manual debugging aid
    import tempfile

    with tempfile.TemporaryDirectory() as d, run_synapse(pathlib.Path(d)) as hs:
        print(json.dumps({"url": hs.url, "server_name": hs.server_name, "pid": hs.pid}))
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    _main()
