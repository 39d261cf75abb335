"""TLS for listeners: SSL contexts built at load, certificates chosen by SNI.

This module owns the TLS policy of docs/DESIGN.md section 1: TLS 1.2 minimum, ALPN
``http/1.1`` only (aiohttp serves HTTP/1.1; advertising h2 would break h2
clients), a default certificate plus more chosen by SNI name, and optional
strict SNI (an unknown or missing name fails the handshake, like HAProxy's
``strict-sni``). Errors are :class:`ConfigError` with the key path of the
certificate that failed. A listener with ``tls.acme`` also serves the
certificate :mod:`palpo_gate.acme` obtains, read at each handshake so that a
renewal reaches new handshakes without a reload.

It is the one place certificate files are loaded: :mod:`config` asks
:func:`pair_problem` while it reads the file (so certificate errors come with
all the others), the running gate builds its contexts with :func:`build`.
It imports nothing of the gate at run time (config imports it).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .config import Tls


def server_context(cert: str, key: str | None = None,
                   alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    """A context with the gate's TLS policy serving *cert* (a PEM chain; the
    key is in it when *key* is None). Raises ssl.SSLError or OSError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # The certificate and ALPN come from the context the SNI callback picks,
    # so every context carries the ALPN list (docs/DESIGN.md section 11).
    ctx.set_alpn_protocols(list(alpn))
    ctx.load_cert_chain(cert, key)
    return ctx


def _load(cert: str, key: str) -> tuple[ssl.SSLContext | None, str | None]:
    try:
        return server_context(cert, key), None
    except (ssl.SSLError, OSError) as exc:
        return None, (f"cannot load certificate {cert} with key {key}: "
                      f"{getattr(exc, 'reason', None) or exc}")


def pair_problem(cert: str, key: str) -> str | None:
    """Why *cert* and *key* do not load as a pair, or None."""
    return _load(cert, key)[1]


def _context(cert: str, key: str, where: str, errors: list[str]) -> ssl.SSLContext | None:
    ctx, problem = _load(cert, key)
    if problem is not None:
        errors.append(f"{where}: {problem}")
    return ctx


def cert_names(cert: str) -> set[str]:
    """DNS names, IP addresses and CN of the first certificate in a PEM chain,
    lower-case; empty when the file cannot be read as one."""
    # Imported here: only strict SNI needs it, and a process without it is
    # ~9 MiB smaller (its Rust extension, and a heap every full garbage
    # collection walks).
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        with open(cert, "rb") as fh:
            first = x509.load_pem_x509_certificate(fh.read())
    except (OSError, ValueError):
        return set()
    names: set[str] = set()
    try:
        san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        names.update(san.get_values_for_type(x509.DNSName))
        names.update(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    for attr in first.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if isinstance(attr.value, str):
            names.add(attr.value)
    return {name.lower() for name in names}


def _matches(name: str, table: dict[str, ssl.SSLContext]) -> ssl.SSLContext | None:
    ctx = table.get(name)
    if ctx is None and "." in name:
        ctx = table.get("*." + name.split(".", 1)[1])  # one-label wildcard
    return ctx


class AcmeCertificate(Protocol):
    """A certificate the gate obtains itself (``tls.acme``), swapped while it
    serves: read at each handshake, never copied."""

    names: frozenset[str]

    @property
    def context(self) -> ssl.SSLContext: ...

    @property
    def files(self) -> tuple[str, str | None]: ...


class CertSet:
    """The certificates of one listener for one config generation."""

    __slots__ = ("_acme", "_by_name", "_default", "_default_files", "_default_names",
                 "_strict")

    def __init__(self, default: ssl.SSLContext | None, default_files: tuple[str, str],
                 by_name: dict[str, ssl.SSLContext], default_names: set[str],
                 strict: bool, acme: AcmeCertificate | None = None) -> None:
        self._default = default  # None: the ACME certificate is the default
        self._default_files = default_files
        self._by_name = by_name
        self._default_names = {n: default for n in default_names}
        self._strict = strict
        self._acme = acme

    @property
    def default(self) -> ssl.SSLContext:
        if self._default is None:
            assert self._acme is not None
            return self._acme.context
        return self._default

    @property
    def default_files(self) -> tuple[str, str | None]:
        if self._default is None:
            assert self._acme is not None
            return self._acme.files
        return self._default_files

    def pick(self, sslobj: ssl.SSLObject, server_name: str | None) -> int | None:
        """The SNI decision: switch *sslobj* to the certificate for the name,
        or fail the handshake (strict SNI and an unknown or missing name)."""
        if server_name:
            name = server_name.lower().rstrip(".")
            acme = self._acme
            if acme is not None and name in acme.names:
                sslobj.context = acme.context
                return None
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


def build(tls: Tls, where: str, acme: AcmeCertificate | None,
          errors: list[str]) -> CertSet | None:
    """The certificates of one listener's ``tls`` table, loaded; None with
    what failed added to *errors* (each naming its key path under *where*).
    With ``tls.acme``, *acme* serves acme.domains (and is the default when no
    file pair is given); without it (``check``) such a listener has nothing to
    load and gives None."""
    before = len(errors)
    default = _context(tls.cert, tls.key, f"{where}.cert", errors) if tls.cert else None
    by_name: dict[str, ssl.SSLContext] = {}
    for i, sni in enumerate(tls.sni):
        ctx = _context(sni.cert, sni.key, f"{where}.sni[{i}].cert", errors)
        if ctx is not None:
            for name in sni.names:
                by_name.setdefault(name, ctx)
    if len(errors) > before:
        return None
    acme = acme if tls.acme else None
    if default is None and acme is None:
        if not tls.acme:
            errors.append(f"{where}.cert: required")
        return None
    # The default certificate's own names matter only to strict SNI; reading
    # them takes the cryptography package (~9 MiB of RSS once loaded).
    names = cert_names(tls.cert) if tls.cert and tls.strict_sni else set()
    return CertSet(default, (tls.cert, tls.key), by_name, names, tls.strict_sni, acme)


def listening_context(current: Callable[[], CertSet]) -> ssl.SSLContext:
    """The context a TLS listening socket is created with, for its whole life.

    Its SNI callback asks *current* for the certificates of the generation
    that is serving now, so a reload (renewed certificates, new SNI names)
    reaches new handshakes without touching the socket. The version floor
    comes from this context; certificate and ALPN from the one picked.
    """
    # A handshake whose callback could not run still needs a certificate.
    ctx = server_context(*current().default_files)

    def pick(sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> int | None:
        return current().pick(sslobj, server_name)

    ctx.sni_callback = pick
    return ctx
