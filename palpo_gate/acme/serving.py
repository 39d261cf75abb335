"""What every gate process serves for ACME: the certificate, and the answers
to the CA's validation requests. Reads :mod:`.store`; never talks to the CA.

- :class:`Served`: the certificate for ``acme.domains``. ``tls.py`` reads its
  ``context`` at each handshake, so replacing it reaches new handshakes at
  once while connections already open keep the certificate they began with.
  It is the stored certificate, or until there is one a temporary
  self-signed certificate, and it follows the stored file (:meth:`Served.refresh`):
  the process that renews writes the file, every process picks it up.
- :class:`Challenges`: HTTP-01 key authorizations and TLS-ALPN-01 contexts
  for the open challenges, read from the store when the CA asks.
"""

from __future__ import annotations

import logging
import os
import ssl
import time

from aiohttp import web

from .. import tls as tlsmod
from . import certs
from .clienthello import ACME_TLS_1
from .store import Store

log = logging.getLogger("palpo_gate.acme")

#: The path HTTP-01 asks for (RFC 8555 section 8.3).
HTTP01_PREFIX = "/.well-known/acme-challenge/"


def utc(ts: float) -> str:
    """A time for the log."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


class Served:
    """The certificate this process serves for *names* (``tls.AcmeCertificate``)."""

    def __init__(self, store: Store, names: tuple[str, ...]) -> None:
        self.store = store
        self.names = frozenset(names)
        self._names_order = names
        self.context: ssl.SSLContext
        self.files: tuple[str, str | None] = ("", None)
        #: the certificate served; None until one is loaded
        self.info: certs.CertInfo | None = None
        #: True when it comes from the CA, False for the temporary one
        self.issued = False
        self._stamp: tuple[int, int, int] | None = None

    def start(self) -> None:
        """Serve the stored certificate, or a temporary one. Raises OSError
        when the state directory cannot be used."""
        if self.refresh(quiet=True) and self.info is not None:
            log.info("acme: serving the stored certificate for %s (serial %x, valid until %s)",
                     ", ".join(sorted(self.info.names)), self.info.serial,
                     utc(self.info.not_after))
        else:
            self._self_signed()

    def set_names(self, names: tuple[str, ...]) -> None:
        """acme.domains changed (a reload): a temporary certificate covers the new set."""
        self.names = frozenset(names)
        self._names_order = names
        if not self.issued:
            self._self_signed()

    def stored(self) -> tuple[bytes, certs.CertInfo] | None:
        """The stored certificate (PEM) and what it says, if there is a usable one."""
        pem = self.store.read(self.store.certificate)
        if pem is None:
            return None
        try:
            return pem, certs.info(pem)
        except ValueError:
            return None

    def refresh(self, *, quiet: bool = False) -> bool:
        """Serve the stored certificate if the file changed since it was
        last loaded; True when it was (re)loaded. An expired or broken file
        is left alone (logged), the current certificate keeps serving."""
        path = self.store.certificate
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            pem = self.store.read(path) or b""
            info = certs.info(pem)
            if info.not_after <= time.time():
                raise ValueError(f"expired at {utc(info.not_after)}")
            context = tlsmod.server_context(path)
        except (ValueError, OSError, ssl.SSLError) as exc:
            log.error("acme: cannot serve the stored certificate %s: %s", path,
                      getattr(exc, "reason", None) or exc)
            return False
        self.context, self.files, self.info, self.issued = context, (path, None), info, True
        if not quiet:
            log.info("acme: now serving certificate serial %x for %s, valid until %s",
                     info.serial, ", ".join(sorted(info.names)), utc(info.not_after))
        return True

    def _self_signed(self) -> None:
        """Serve a temporary self-signed certificate for the names (Caddy does
        the same): a TLS listener starts before the CA has answered."""
        path = self.store.self_signed
        pem = self.store.read(path)
        info = None
        if pem is not None:
            try:
                info = certs.info(pem)
            except ValueError:
                info = None
        if info is None or info.names != self.names or info.not_after < time.time() + 86400:
            pem = certs.self_signed(self._names_order)
            self.store.write(path, pem)
            info = certs.info(pem)
        self.context, self.files, self.info, self.issued = (
            tlsmod.server_context(path), (path, None), info, False)
        log.warning("acme: no certificate from the CA yet for %s: serving a temporary "
                    "self-signed one until it is obtained", ", ".join(self._names_order))

    def expiry(self) -> dict[tuple[str, ...], float]:
        """Metrics: per name, when the certificate served for it expires (0: none
        covers it)."""
        info = self.info
        return {(name,): (info.not_after if info is not None and name in info.names else 0.0)
                for name in self._names_order}


class Challenges:
    """The open challenges of the store, as the CA's requests need them."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def http01(self, token: str) -> bytes | None:
        path = self.store.http01_path(token)
        return None if path is None else self.store.read(path)

    def alpn_context(self, name: str) -> ssl.SSLContext | None:
        """The context answering TLS-ALPN-01 for *name*, while its challenge is open."""
        path = self.store.alpn_path(name)
        if path is None or not os.path.exists(path):
            return None
        try:
            return tlsmod.server_context(path, alpn=(ACME_TLS_1,))
        except (OSError, ssl.SSLError):
            return None  # removed meanwhile: the order ended

    def http01_response(self, method: str, target: str) -> web.Response:
        """The answer to ``GET /.well-known/acme-challenge/TOKEN`` (RFC 8555
        section 8.3): the key authorization while the challenge is open, 404
        otherwise. Never forwarded."""
        if method not in ("GET", "HEAD"):
            return web.Response(status=405, text="method not allowed\n",
                                headers={"Allow": "GET, HEAD"})
        token = target[len(HTTP01_PREFIX):].split("?", 1)[0]
        body = self.http01(token)
        if body is None:
            return web.Response(status=404, text="no such challenge\n")
        log.debug("acme: answering an http-01 validation")
        return web.Response(status=200, body=body, content_type="application/octet-stream")
