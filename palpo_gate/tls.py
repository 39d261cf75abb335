"""TLS for listeners: SSL contexts built at load, certificates chosen by SNI.

This module owns the TLS policy of SPEC section 1: TLS 1.2 minimum, ALPN
``http/1.1`` only (aiohttp serves HTTP/1.1; advertising h2 would break h2
clients), a default certificate plus more chosen by SNI name, and optional
strict SNI (an unknown or missing name fails the handshake, like HAProxy's
``strict-sni``). Errors are :class:`ConfigError` with the key path of the
certificate that failed.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from .config import ConfigError, Tls


def _context(cert: str, key: str, where: str, errors: list[str]) -> ssl.SSLContext | None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # The certificate and ALPN come from the context the SNI callback picks,
    # so every context carries the ALPN list (AIOHTTP-FACTS section 6).
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        errors.append(f"{where}: cannot load certificate {cert} with key {key}: "
                      f"{getattr(exc, 'reason', None) or exc}")
        return None
    return ctx


def cert_names(cert: str) -> set[str]:
    """DNS names (and CN) of the first certificate in a PEM chain, lower-case."""
    try:
        info = ssl._ssl._test_decode_cert(cert)  # type: ignore[attr-defined]
    except Exception:
        return set()
    names = {v.lower() for k, v in info.get("subjectAltName", ()) if k in ("DNS", "IP Address")}
    for rdn in info.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                names.add(v.lower())
    return names


def _matches(name: str, table: dict[str, ssl.SSLContext]) -> ssl.SSLContext | None:
    ctx = table.get(name)
    if ctx is None and "." in name:
        ctx = table.get("*." + name.split(".", 1)[1])  # one-label wildcard
    return ctx


class CertSet:
    """The certificates of one listener for one config generation."""

    __slots__ = ("_by_name", "_default_names", "_strict", "default", "default_files")

    def __init__(self, default: ssl.SSLContext, default_files: tuple[str, str],
                 by_name: dict[str, ssl.SSLContext], default_names: set[str],
                 strict: bool) -> None:
        self.default = default
        self.default_files = default_files
        self._by_name = by_name
        self._default_names = {n: default for n in default_names}
        self._strict = strict

    def pick(self, sslobj: ssl.SSLObject, server_name: str | None) -> int | None:
        """The SNI decision: switch *sslobj* to the certificate for the name,
        or fail the handshake (strict SNI and an unknown or missing name)."""
        if server_name:
            name = server_name.lower().rstrip(".")
            ctx = _matches(name, self._by_name)
            if ctx is not None:
                sslobj.context = ctx
                return None
            if not self._strict or _matches(name, self._default_names) is not None:
                sslobj.context = self.default
                return None
        elif not self._strict:
            sslobj.context = self.default
            return None
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME


def build(tls: Tls, where: str) -> CertSet:
    """The certificates of one listener's ``tls`` table, loaded."""
    errors: list[str] = []
    default = _context(tls.cert, tls.key, f"{where}.cert", errors)
    by_name: dict[str, ssl.SSLContext] = {}
    for i, sni in enumerate(tls.sni):
        ctx = _context(sni.cert, sni.key, f"{where}.sni[{i}].cert", errors)
        if ctx is not None:
            for name in sni.names:
                by_name.setdefault(name, ctx)
    if errors or default is None:
        raise ConfigError(errors)
    return CertSet(default, (tls.cert, tls.key), by_name, cert_names(tls.cert), tls.strict_sni)


def listening_context(current: Callable[[], CertSet]) -> ssl.SSLContext:
    """The context a TLS listening socket is created with, for its whole life.

    Its SNI callback asks *current* for the certificates of the generation
    that is serving now, so a reload (renewed certificates, new SNI names)
    reaches new handshakes without touching the socket. The version floor
    comes from this context; certificate and ALPN from the one picked.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    # A handshake whose callback could not run still needs a certificate.
    ctx.load_cert_chain(*current().default_files)

    def pick(sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> int | None:
        return current().pick(sslobj, server_name)

    ctx.sni_callback = pick
    return ctx
