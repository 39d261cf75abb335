"""The container's HEALTHCHECK: GET /health on the gate's own listener.

Usage: ``python healthcheck.py [--config PATH]`` (default
``/etc/palpo-gate/config.toml``). Exit status 0 when the gate answers
``200``, 1 otherwise (Docker's "healthy" / "unhealthy"; 2 is reserved).

The image cannot know which ports the operator configured, so this reads the
same config file as the gate and asks the first listener it can reach from
inside the container: the first TCP listener, else the first UNIX one
(``systemd:`` sockets have no address to connect to). A wildcard bind
(``0.0.0.0``, ``::``) is reached on loopback. A TLS listener is spoken to in
TLS without verifying the certificate (the peer is 127.0.0.1, and the gate's
own certificate is not what is being checked), with an SNI name taken from
that certificate so that ``strict_sni`` listeners accept the handshake.
``/health`` is answered before the ``hosts`` check and never logged, so a
check every 30 s leaves no trace in the access log.

It needs nothing but the standard library and ``palpo_gate`` itself.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import ssl
import sys
from dataclasses import dataclass

from palpo_gate import config as configmod
from palpo_gate.tls import cert_names

DEFAULT_CONFIG = "/etc/palpo-gate/config.toml"
#: Below Docker's --timeout (5 s in the Dockerfile), so a hung gate is a clean "1".
TIMEOUT = 4.0

#: A wildcard bind → the address to reach it on from inside the container.
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True)
class Target:
    """Where to send the check."""

    listener: str
    kind: str  # "tcp" or "unix"
    host: str = ""  # tcp
    port: int = 0  # tcp
    path: str = ""  # unix
    tls: bool = False
    server_name: str | None = None  # SNI

    def __str__(self) -> str:
        scheme = "https" if self.tls else "http"
        if self.kind == "unix":
            return f"{scheme}+unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def sni_name(names: set[str]) -> str | None:
    """A name the certificate answers for and SNI can carry (no IP address)."""
    dns = []
    for name in sorted(names):
        try:
            ipaddress.ip_address(name)
        except ValueError:
            dns.append(name)
    for name in dns:
        if not name.startswith("*."):
            return name
    for name in dns:  # only wildcards: any one label matches "*."
        return "healthcheck" + name[1:]
    return None


def target(cfg: configmod.Config) -> Target | None:
    """The listener to check: the first TCP one, else the first UNIX one."""
    for kind in ("tcp", "unix"):
        for lst in cfg.listeners:
            bind = lst.bind
            if bind.kind != kind:
                continue
            server_name = sni_name(cert_names(lst.tls.cert)) if lst.tls else None
            if kind == "unix":
                return Target(lst.name, "unix", path=bind.path, tls=lst.tls is not None,
                              server_name=server_name)
            return Target(lst.name, "tcp", host=_LOOPBACK.get(bind.host, bind.host),
                          port=bind.port, tls=lst.tls is not None, server_name=server_name)
    return None


def _connect(t: Target) -> socket.socket:
    if t.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        # "@name" is a Linux abstract socket, as in the gate's config.
        sock.connect("\0" + t.path[1:] if t.path.startswith("@") else t.path)
    else:
        sock = socket.create_connection((t.host, t.port), timeout=TIMEOUT)
    if t.tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
        sock = ctx.wrap_socket(sock, server_hostname=t.server_name)
    return sock


def check(t: Target) -> int:
    """The status code of ``GET /health`` on *t* (raises OSError on failure)."""
    with _connect(t) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n"
                     b"User-Agent: palpo-gate-healthcheck\r\nConnection: close\r\n\r\n")
        head = b""
        while b"\r\n" not in head and len(head) < 1024:
            data = sock.recv(1024)
            if not data:
                break
            head += data
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise OSError(f"not an HTTP response: {head[:80]!r}")
    return int(parts[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="healthcheck.py",
                                description="GET /health on palpo-gate's first listener")
    p.add_argument("--config", "-c", metavar="PATH", default=DEFAULT_CONFIG,
                   help=f"the gate's TOML config file (default {DEFAULT_CONFIG})")
    args = p.parse_args(argv)
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as exc:
        print("unhealthy: the config does not load:", *exc.errors, sep="\n  ")
        return 1
    t = target(cfg)
    if t is None:
        print("unhealthy: no TCP or UNIX listener to check")
        return 1
    try:
        status = check(t)
    except OSError as exc:  # refused, timed out, TLS handshake failed (ssl.SSLError)
        print(f"unhealthy: {t}/health: {exc}")
        return 1
    if status != 200:
        print(f"unhealthy: {t}/health answered {status}")
        return 1
    print(f"healthy: {t}/health answered 200 (listener {t.listener})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
