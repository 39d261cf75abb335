"""Fixtures shared by the socket tests: a gate running in the test's event loop
(the same Gate class ``palpo-gate`` runs), a recording upstream, TLS material."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
import trustme

from palpo_gate import config as configmod
from palpo_gate.server import Gate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def running_gate(toml: str) -> AsyncIterator[Gate]:
    """Start a gate on *toml* (listeners may bind port 0) and stop it after."""
    cfg = configmod.loads(toml)
    gate = Gate(cfg)
    await gate.start()
    try:
        yield gate
    finally:
        await gate.close(0)


def port_of(gate: Gate, name: str = "main") -> int:
    return int(gate.addresses()[name][1])


def gate_toml(upstream: str, *, extra: str = "", listener: str = "", role: str = "client") -> str:
    """A one-listener config on 127.0.0.1:0 named "main"."""
    return f"""
[upstream]
url = "{upstream}"
[log]
access = "off"
[[listeners]]
name = "main"
bind = "127.0.0.1:0"
role = "{role}"
{listener}
{extra}
"""


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two certificates: "default" for localhost/127.0.0.1, "other" for other.test."""
    d = tmp_path_factory.mktemp("tls")
    out: dict[str, str] = {}
    for name, hosts in (("default", ["localhost", "127.0.0.1", "matrix.test"]),
                        ("other", ["other.test"])):
        cert = ca.issue_cert(*hosts)
        cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
        cert.cert_chain_pems[0].write_to_path(str(d / f"{name}.crt"))
        with open(d / f"{name}.crt", "ab") as f:
            for pem in cert.cert_chain_pems[1:]:
                f.write(pem.bytes())
        out[f"{name}_cert"] = str(d / f"{name}.crt")
        out[f"{name}_key"] = str(d / f"{name}.key")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    out["ca"] = str(d / "ca.pem")
    return out
