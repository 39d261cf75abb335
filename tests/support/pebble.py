"""Let's Encrypt's test CA on loopback: Debian's ``pebble`` and
``pebble-challtestsrv`` as its DNS, for the ACME tests.

- pebble's own HTTPS certificate comes from trustme (``ca_bundle`` is what
  the gate's ``acme.ca_bundle`` must name);
- ``pebble-challtestsrv`` answers every DNS name with 127.0.0.1 (and no
  AAAA), so every domain a test orders is validated against the gate;
- ``httpPort`` / ``tlsPort`` are where pebble's VA connects for HTTP-01 and
  TLS-ALPN-01: the gate's listeners in the test;
- ``PEBBLE_VA_NOSLEEP=1``; pebble's default 5 % of rejected nonces stays
  unless a test asks otherwise;
- the root of the chains it issues is :meth:`Pebble.root` (``/roots/0`` of
  its management API; new at every start).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import trustme

from support.net import free_port

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
CHALLTESTSRV = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"


def _free_udp_and_tcp_port() -> int:
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port for the DNS server")


class Pebble:
    def __init__(self, workdir: pathlib.Path, http_port: int, tls_port: int, *,
                 validity: int | None = None, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.http_port = http_port
        self.tls_port = tls_port
        self.validity = validity
        self.env = env or {}
        self.port = free_port()
        self.management_port = free_port()
        self.dns_port = _free_udp_and_tcp_port()
        workdir.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_pem.write_to_path(str(workdir / "pebble.key"))
        cert.cert_chain_pems[0].write_to_path(str(workdir / "pebble.crt"))
        ca.cert_pem.write_to_path(str(workdir / "pebble-ca.pem"))
        #: the CA that signed pebble's HTTPS certificate
        self.ca_bundle = str(workdir / "pebble-ca.pem")
        self.directory = f"https://127.0.0.1:{self.port}/dir"
        self.log_path = workdir / "pebble.log"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._dns: subprocess.Popen[bytes] | None = None

    def _config(self) -> pathlib.Path:
        conf: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.workdir / "pebble.crt"),
            "privateKey": str(self.workdir / "pebble.key"),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity is not None:
            conf["certificateValidityPeriod"] = self.validity
        path = self.workdir / "pebble-config.json"
        path.write_text(json.dumps({"pebble": conf}))
        return path

    def start(self) -> Pebble:
        if self._dns is None:
            self._dns = subprocess.Popen(
                [CHALLTESTSRV, "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "",
                 "-https01", "", "-tlsalpn01", "", "-defaultIPv6", "",
                 "-management", f"127.0.0.1:{free_port()}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = open(self.log_path, "ab")
        proc = subprocess.Popen(
            [PEBBLE, "-config", str(self._config()), "-dnsserver",
             f"127.0.0.1:{self.dns_port}"],
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PEBBLE_VA_NOSLEEP": "1", **self.env})
        log.close()
        self._procs.append(proc)
        deadline = time.monotonic() + 20
        while True:
            try:
                self._get(f"{self.directory}")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("pebble did not start:\n" + self.log()) from None
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop the CA (the DNS stays): the gate finds it unreachable."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    def close(self) -> None:
        self.stop()
        if self._dns is not None:
            self._dns.terminate()
            self._dns.wait(5)

    def _get(self, url: str) -> bytes:
        ctx = ssl.create_default_context(cafile=self.ca_bundle)
        with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
            return resp.read()

    def root(self) -> bytes:
        """The root CA of the certificates this pebble run issues (PEM)."""
        return self._get(f"https://127.0.0.1:{self.management_port}/roots/0")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def orders(self) -> int:
        """New orders placed (RFC 8555 section 7.4): those pebble added, not
        the POSTs to newOrder, which a rejected nonce makes the client repeat."""
        return self.log().count("Added order ")

    def issued(self) -> int:
        return self.log().count("Issued certificate serial")


@contextlib.contextmanager
def run_pebble(workdir: pathlib.Path, http_port: int, tls_port: int, *,
               validity: int | None = None, env: dict[str, str] | None = None
               ) -> Iterator[Pebble]:
    pebble = Pebble(workdir, http_port, tls_port, validity=validity, env=env)
    try:
        yield pebble.start()
    finally:
        pebble.close()
