"""The conversation with the CA: account, order, challenges, certificate.

Built on certbot's ``acme`` library, which signs the requests (JWS), keeps
the nonces and retries ``badNonce``, polls authorizations and the order, and
reads ``Retry-After`` (RFC 8555 sections 6.5, 7.1, 7.4). Every call here
blocks: :mod:`.manager` runs them in a thread of their own, never on the
event loop.

What is added around the library:
- the trust for the directory's HTTPS: the system's CAs plus ``acme.ca_bundle``;
- ``Retry-After`` of a refused request, kept for the back-off (the library
  raises the problem document without it);
- ``badNonce`` retried a few times rather than once (RFC 8555 section 6.5:
  the client should retry; a server may reject any nonce);
- TLS-ALPN-01 (RFC 8737), which the library does not know: the key
  authorization is computed from the token as for HTTP-01 (RFC 8555 section
  8.1) and the response posted is the same empty object.
"""

from __future__ import annotations

import datetime
import logging
import ssl
from typing import Any

import josepy as jose
import requests
from acme import challenges, errors, messages
from acme import client as acme_client
from cryptography.hazmat.primitives import hashes
from requests.adapters import HTTPAdapter

from . import certs
from .store import Store

log = logging.getLogger("palpo_gate.acme")

USER_AGENT = "palpo-gate"
#: Seconds before one HTTP request to the CA is given up.
NETWORK_TIMEOUT = 30
#: Seconds an order may take from the first challenge to the certificate.
ORDER_TIMEOUT = 90
#: Tries per request when the CA rejects the nonce (each try is the
#: library's own request plus its one retry).
BAD_NONCE_TRIES = 3


class AcmeFailure(Exception):
    """An attempt that did not end with a certificate: *cause* says why in one
    line; *retry_after* is the wait the CA asked for, in seconds, if any."""

    def __init__(self, cause: str, retry_after: float | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.retry_after = retry_after


class _Trust(HTTPAdapter):
    """HTTPS to the directory with an SSL context of our own (system CAs
    plus ``ca_bundle``), the way requests documents for its adapters."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def build_connection_pool_key_attributes(self, request: Any, verify: Any,
                                             cert: Any = None) -> Any:
        host, pool = super().build_connection_pool_key_attributes(request, verify, cert)
        pool["ssl_context"] = self._context
        pool.pop("ca_certs", None)
        pool.pop("ca_cert_dir", None)
        return host, pool


class _Network(acme_client.ClientNetwork):
    """The library's network layer, keeping the last ``Retry-After`` and
    retrying ``badNonce`` more than once."""

    def __init__(self, key: jose.JWK, ca_bundle: str | None) -> None:
        super().__init__(key, alg=jose.ES256, user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT)
        self.retry_after: float | None = None
        self.session.hooks["response"].append(self._note_retry_after)
        if ca_bundle is not None:
            context = ssl.create_default_context()
            try:
                import certifi  # requests' own trust store, when installed
            except ImportError:  # pragma: no cover
                pass
            else:
                context.load_verify_locations(cafile=certifi.where())
            context.load_verify_locations(cafile=ca_bundle)
            self.session.mount("https://", _Trust(context))

    def _note_retry_after(self, response: requests.Response, *args: Any,
                          **kwargs: Any) -> None:
        if response.status_code >= 400 and "Retry-After" in response.headers:
            when = acme_client.ClientV2.retry_after(response, 0)
            self.retry_after = max((when - datetime.datetime.now()).total_seconds(), 0.0)

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for attempt in range(BAD_NONCE_TRIES):
            try:
                return super().post(*args, **kwargs)
            except messages.Error as exc:
                if exc.code != "badNonce" or attempt == BAD_NONCE_TRIES - 1:
                    raise
                log.debug("acme: the CA rejected a nonce twice; trying again")
        raise AssertionError("unreachable")


def key_authorization(token: str, account_key: jose.JWK) -> str:
    """RFC 8555 section 8.1: token "." base64url(JWK thumbprint, SHA-256)."""
    thumbprint = jose.b64encode(account_key.thumbprint(hash_function=hashes.SHA256)).decode()
    return f"{token}.{thumbprint}"


class _AlpnResponse(challenges.KeyAuthorizationChallengeResponse):
    """The answer to a tls-alpn-01 challenge: an empty object (RFC 8737
    section 3, as RFC 8555 section 7.5.1 for every challenge). Like the
    library's HTTP01Response it carries the key authorization without sending
    it: a response with no field at all would be falsy and go out as a
    POST-as-GET, which asks nothing of the CA."""

    typ = "tls-alpn-01"


class Conversation:
    """One attempt at the CA, blocking: from the directory to a certificate.

    *store* receives the account key and the open challenges, which every
    serving process reads; the certificate is returned, not stored.
    """

    def __init__(self, directory: str, email: str | None, ca_bundle: str | None,
                 store: Store) -> None:
        self.directory_url = directory
        self.email = email
        self.store = store
        self.account_key = jose.JWKEC(key=self._account_key())
        self.net = _Network(self.account_key, ca_bundle)
        self._client: acme_client.ClientV2 | None = None

    def _account_key(self) -> Any:
        pem = self.store.read(self.store.account_key)
        if pem is None:
            self.store.create_exclusive(self.store.account_key,
                                        certs.key_pem(certs.new_key()))
            pem = self.store.read(self.store.account_key)
            assert pem is not None
        return certs.load_key(pem)

    def close(self) -> None:
        self.net.session.close()

    # -- steps

    def client(self) -> acme_client.ClientV2:
        if self._client is None:
            directory = acme_client.ClientV2.get_directory(self.directory_url, self.net)
            self._client = acme_client.ClientV2(directory, self.net)
        return self._client

    def register(self) -> None:
        """Create the account, or find it again for a key the CA knows. The
        CA's terms of service are agreed to: configuring [acme] is that."""
        client = self.client()
        registration = messages.NewRegistration.from_data(
            email=self.email, terms_of_service_agreed=True)
        try:
            client.new_account(registration)
        except errors.ConflictError as exc:  # the key has an account already
            client.query_registration(
                messages.RegistrationResource(uri=exc.location, body=registration))

    def renewal_time(self, cert_pem: bytes) -> tuple[float | None, float]:
        """RFC 9773: (when to renew, when to ask again), seconds since the
        epoch; the first is None when the CA offers no renewal information."""
        when, next_check = self.client().renewal_time(cert_pem)
        return (None if when is None else when.timestamp()), next_check.timestamp()

    def order(self, domains: tuple[str, ...], challenge: str) -> bytes:
        """Order a certificate for *domains* answering *challenge*; the new key
        and the full chain, PEM. The challenges are published in the store
        before the CA is told to look, and removed after, however it ends."""
        client = self.client()
        if client.net.account is None:
            self.register()
        key = certs.new_key()
        order = client.new_order(certs.csr(key, domains))
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # validated earlier; the CA reuses it (RFC 8555 section 7.1.4)
                name = authz.body.identifier.value
                body = next((c for c in authz.body.challenges
                             if c.chall.to_partial_json().get("type") == challenge), None)
                if body is None:
                    offered = ", ".join(sorted(str(c.chall.to_partial_json().get("type"))
                                               for c in authz.body.challenges))
                    raise AcmeFailure(f"the CA offers no {challenge} challenge for {name} "
                                      f"(it offers {offered})")
                token = body.chall.to_partial_json()["token"]
                keyauth = key_authorization(token, self.account_key)
                if challenge == "http-01":
                    self.store.put_http01(token, keyauth)
                    response: challenges.ChallengeResponse = body.chall.response(
                        self.account_key)
                else:
                    self.store.put_alpn(name, certs.alpn_challenge(name, keyauth))
                    response = _AlpnResponse(key_authorization=keyauth)
                client.answer_challenge(body, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
            order = client.poll_and_finalize(order, deadline)
        finally:
            self.store.clear_challenges()
        return certs.key_pem(key) + order.fullchain_pem.encode("ascii")


def describe(exc: BaseException) -> str:
    """One line saying why an attempt failed, for the log."""
    if isinstance(exc, AcmeFailure):
        return exc.cause
    if isinstance(exc, errors.ValidationError):
        parts = []
        for authz in exc.failed_authzrs:
            for chall in authz.body.challenges:
                if chall.error is not None:
                    kind = chall.chall.to_partial_json().get("type", "challenge")
                    parts.append(f"{authz.body.identifier.value}: {kind}: "
                                 f"{_problem(chall.error)}")
        return "validation failed: " + ("; ".join(parts) or "no detail from the CA")
    if isinstance(exc, errors.IssuanceError):
        return f"the CA did not issue: {_problem(exc.error)}"
    if isinstance(exc, errors.TimeoutError):
        return "the CA did not finish the order in time"
    if isinstance(exc, messages.Error):
        return f"the CA refused: {_problem(exc)}"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"cannot verify the CA's HTTPS certificate (see acme.ca_bundle): {_root(exc)}"
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return f"cannot reach the CA: {_root(exc)}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
    return f"{type(exc).__name__}: {exc}"


def _problem(error: messages.Error) -> str:
    code = error.code or error.typ
    detail = error.detail or error.title or ""
    return f"{detail} ({code})" if detail else str(code)


def _root(exc: BaseException) -> str:
    """The innermost cause of a requests error (its own text nests three deep)."""
    seen = exc
    while True:
        nxt = seen.__cause__ or seen.__context__
        if nxt is None or nxt is seen:
            break
        seen = nxt
    if seen is exc and exc.args:
        inner = exc.args[0]
        reason = getattr(inner, "reason", None)
        if reason is not None:
            return str(reason)
    return str(seen)
