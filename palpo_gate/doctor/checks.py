"""The checks of ``palpo-gate doctor``: pure functions from what was fetched
(:class:`.facts.Facts`) to results, each naming its cause and its fix.

Nothing here opens a socket; ``fetch.py`` does that. The table of checks is
:data:`CHECKS`, in the order they are printed. A check returns one
:class:`Result` per line: ``fail`` makes the run exit 1, ``warn`` does not.

Also here, because the fetcher needs the same answers the checks judge:
where the doctor connects to a listener, which names a listener must cover,
and how the delegation documents parse.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..config import Bind, Config, Listener
from . import discovery
from .facts import Attempt, Facts, Http, TlsProbe

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"

#: A certificate that expires within this many days is a warning ...
EXPIRY_WARN_DAYS = 14
#: ... and within this many a failure: renewal has plainly stopped working.
EXPIRY_FAIL_DAYS = 7

#: The probes of the upstream, sent directly and through each listener. The
#: key id form (deprecated in Matrix 1.6, still served by Synapse and Palpo)
#: takes one path segment and ignores it: with ``%2F`` inside, that segment
#: reaches the router whole only if nothing decoded it on the way.
PROBES: dict[str, str] = {
    "versions": "/_matrix/client/versions",
    "keys": "/_matrix/key/v2/server",
    "keys_id": "/_matrix/key/v2/server/ed25519%3Adoctor",
    "keys_slash": "/_matrix/key/v2/server/ed25519%3Adoctor%2Fprobe?doctor=%2F%3F%25%20",
    "fed_version": "/_matrix/federation/v1/version?doctor=%2F%3F%25%20",
}
#: The probes the federation target check compares, in order.
TARGET_PROBES = ("keys", "keys_id", "keys_slash", "fed_version")
#: Under each blocked prefix: a path a homeserver answers without a token.
ADMIN_PROBE_SUFFIX = "/v1/server_version"


@dataclass(frozen=True, slots=True)
class Result:
    id: str  # "tls.names"
    subject: str  # the listener the check is about, or ""
    status: str  # pass | warn | fail | skip
    message: str
    fix: str = ""

    @property
    def label(self) -> str:
        return f"{self.id}[{self.subject}]" if self.subject else self.id

    def line(self) -> str:
        text = f"{self.status.upper():<4}  {self.label}: {self.message}"
        if self.fix and self.status in (FAIL, WARN):
            text += f" (fix: {self.fix})"
        return text

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "subject": self.subject, "status": self.status,
                "message": self.message, "fix": self.fix}


# --------------------------------------------------------------------------
# Shared answers: where to connect, which names, what the documents say.


def connect_host(bind: Bind) -> str:
    """The address the doctor connects to for a TCP bind (wildcards → loopback)."""
    if bind.host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind.host == "::":
        return "::1"
    return bind.host


def where(bind: Bind) -> str:
    """How a listener is named in messages: the address the doctor reaches."""
    if bind.kind == "tcp":
        return discovery.join_host_port(connect_host(bind), bind.port)
    return str(bind)


def reachable(bind: Bind) -> str:
    """Why the doctor cannot connect to *bind*, or ""."""
    if bind.kind == "systemd":
        return f"{bind} is a socket systemd passes in: its address is not in the config"
    if bind.kind == "tcp" and bind.port == 0:
        return f"{bind}: port 0 is chosen when the gate starts"
    return ""


def index_of(cfg: Config, name: str) -> int:
    return next(i for i, lst in enumerate(cfg.listeners) if lst.name == name)


def _host_of(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return discovery.split_host_port(value)[0]
    except ValueError:
        return None


def server_doc(http: Http | None) -> str | None:
    """``m.server`` of a well-known server document that a remote would use."""
    if http is None or http.status != 200:
        return None
    try:
        doc = http.json()
        value = doc["m.server"]
        discovery.split_host_port(value)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def client_doc(http: Http | None) -> str | None:
    """``m.homeserver.base_url`` of a well-known client document, if valid."""
    if http is None or http.status != 200:
        return None
    try:
        url = http.json()["m.homeserver"]["base_url"]
    except (ValueError, KeyError, TypeError):
        return None
    return url if isinstance(url, str) and _base_url(url) else None


def _base_url(url: str) -> urllib.parse.SplitResult | None:
    try:
        u = urllib.parse.urlsplit(url)
        u.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname:
        return None
    return u


def base_url_parts(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of a valid base URL."""
    u = _base_url(url)
    assert u is not None and u.hostname
    return u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80), \
        u.path.rstrip("/")


def listener_names(cfg: Config, lst: Listener, m_server: str | None,
                   base_url: str | None, server_name: str | None) -> tuple[str, ...]:
    """The names a TLS listener serves, so its certificate must cover them:
    its ``hosts``; else the name remote servers use (the ``m.server`` host, or
    the server name itself when there is no delegation) on a federation
    listener, and the base URL's host on a client listener."""
    if lst.hosts is not None:
        return tuple(sorted(lst.hosts))
    if lst.role == "federation":
        name = _host_of(m_server) or _host_of(server_name)
    else:
        name = (base_url_parts(base_url)[1] if base_url else None) or _host_of(server_name)
    return (name,) if name else ()


def listeners_at(cfg: Config, address: str, port: int) -> list[Listener]:
    """This gate's TCP listeners that accept connections to address:port."""
    out = []
    for lst in cfg.listeners:
        b = lst.bind
        if b.kind != "tcp" or b.port != port:
            continue
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if (b.host in ("", "0.0.0.0") and ip.version == 4) or b.host == "::":
            out.append(lst)
        elif b.host == address or _same_ip(b.host, ip):
            out.append(lst)
    return out


def _same_ip(host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(host) == ip
    except ValueError:
        return False


def admin_refused(http: Http) -> bool:
    """The gate's own refusal of a blocked prefix (errors.py: 403 M_FORBIDDEN)."""
    if http.status != 403:
        return False
    try:
        return http.json().get("errcode") == "M_FORBIDDEN"
    except (ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------
# Keys: signature and equality.


def _unb64(s: str) -> bytes:
    s = s.replace("-", "+").replace("_", "/")
    return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON (Matrix spec appendix): sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True,
                      allow_nan=False).encode("utf-8")


def key_doc_problems(doc: Any, now: datetime) -> tuple[str | None, list[str], str]:
    """(server_name, problems, summary) of a ``/_matrix/key/v2/server`` answer:
    its ed25519 signatures by its own verify keys must verify (server-server
    API, "Publishing Keys"; signing as in the appendix "Signing JSON")."""
    if not isinstance(doc, dict):
        return None, ["the answer is not a JSON object"], ""
    name = doc.get("server_name")
    if not isinstance(name, str) or not name:
        return None, ["no server_name"], ""
    keys = {k: v.get("key") for k, v in (doc.get("verify_keys") or {}).items()
            if isinstance(k, str) and k.startswith("ed25519:") and isinstance(v, dict)}
    if not keys:
        return name, ["no ed25519 key in verify_keys"], ""
    sigs = (doc.get("signatures") or {}).get(name)
    if not isinstance(sigs, dict) or not sigs:
        return name, [f"not signed by {name}"], ""
    unsigned = {k: v for k, v in doc.items() if k not in ("signatures", "unsigned")}
    message = canonical_json(unsigned)
    problems: list[str] = []
    verified: list[str] = []
    for key_id, pub in keys.items():
        sig = sigs.get(key_id)
        if sig is None:
            problems.append(f"no signature by {key_id}")
            continue
        try:
            Ed25519PublicKey.from_public_bytes(_unb64(pub)).verify(_unb64(sig), message)
        except (InvalidSignature, ValueError, TypeError, binascii.Error):
            problems.append(f"the signature by {key_id} does not verify")
        else:
            verified.append(key_id)
    until = doc.get("valid_until_ts")
    until_text = ""
    if isinstance(until, int):
        at = datetime.fromtimestamp(until / 1000, UTC)
        until_text = f", valid until {at:%Y-%m-%d %H:%M} UTC"
        if at < now:
            problems.append(f"valid_until_ts {at:%Y-%m-%d %H:%M} UTC has passed")
    else:
        problems.append("no valid_until_ts")
    return name, problems, f"{', '.join(verified)} signature verifies{until_text}"


def same_keys(a: Http, b: Http) -> bool:
    """The same key answer: byte for byte, or (a homeserver that signs each
    answer anew with a fresh valid_until_ts, as Palpo does) equal apart from
    that timestamp and the signatures over it."""
    if a.same_answer(b):
        return True
    if a.status != 200 or b.status != 200:
        return False
    try:
        da, db = a.json(), b.json()
    except ValueError:
        return False
    if not isinstance(da, dict) or not isinstance(db, dict):
        return False
    drop = ("valid_until_ts", "signatures")
    return {k: v for k, v in da.items() if k not in drop} == \
        {k: v for k, v in db.items() if k not in drop}


def _is_key_doc(http: Http) -> bool:
    if http.status != 200:
        return False
    try:
        return isinstance(http.json().get("verify_keys"), dict)
    except (ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------
# 1. The listeners, and TLS


def check_listeners(f: Facts) -> list[Result]:
    """Each listener answers the gate's own ``/health``: the gate is running
    where the config says (and not some other program)."""
    out: list[Result] = []
    for i, lst in enumerate(f.cfg.listeners):
        n = lst.name
        if n in f.unreachable:
            out.append(Result("listener", n, SKIP, f.unreachable[n]))
            continue
        http = f.health.get(n)
        if http is None:
            continue
        addr = where(lst.bind)
        if http.error:
            out.append(Result("listener", n, FAIL, f"{addr} does not answer: {http.error}",
                              f"start the gate, or correct listeners[{i}].bind"))
        elif http.status != 200 or http.body.strip() != b"OK":
            out.append(Result("listener", n, FAIL,
                              f"{addr} answers /health with {http.status} "
                              f"{http.body[:40]!r}: another program listens there",
                              f"stop it, or move listeners[{i}].bind"))
        else:
            scheme = "https" if lst.tls else "http"
            shown = f"{scheme}://{addr}" if lst.bind.kind == "tcp" else f"{addr} ({scheme})"
            out.append(Result("listener", n, PASS, f"{shown} answers /health"))
    return out


def _cert(der: bytes) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def cert_names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of the subjectAltName extension."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return ([n.lower() for n in san.get_values_for_type(x509.DNSName)],
            [str(ip) for ip in san.get_values_for_type(x509.IPAddress)])


def covers(cert: x509.Certificate, name: str) -> bool:
    """RFC 6125: a subjectAltName entry equal to *name*, or a wildcard in the
    left-most label only (``*.example.com`` covers ``a.example.com``, not
    ``example.com`` nor ``a.b.example.com``). No common-name fallback: TLS
    libraries of homeservers (rustls among them) ignore it."""
    dns_names, ips = cert_names(cert)
    if discovery.is_ip(name):
        return any(_same_ip(ip, ipaddress.ip_address(name)) for ip in ips)
    name = name.lower().rstrip(".")
    for pattern in dns_names:
        if pattern == name:
            return True
        if pattern.startswith("*.") and "." in name and name.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def _describe_names(cert: x509.Certificate) -> str:
    dns_names, ips = cert_names(cert)
    names = dns_names + ips
    return ", ".join(names) if names else "no subjectAltName at all"


def check_tls(f: Facts) -> list[Result]:
    out: list[Result] = []
    trust = "the system store" + (f" and {f.cafile}" if f.cafile else "")
    for i, lst in enumerate(f.cfg.listeners):
        if lst.tls is None:
            continue
        n = lst.name
        key = f"listeners[{i}].tls.cert"
        if n in f.unreachable:
            out.append(Result("tls", n, SKIP, f.unreachable[n]))
            continue
        probes = f.tls.get(n, [])
        names = f.tls_names.get(n, ())
        addr = where(lst.bind)
        failed = [p for p in probes if p.error]
        if failed:
            p = failed[0]
            out.append(Result(
                "tls.handshake", n, FAIL,
                f"{addr} does not complete a TLS handshake{_for(p.name)}: {p.error}",
                f"start the gate, or check that listeners[{i}].bind is where it listens"))
        else:
            versions = sorted({p.version for p in probes})
            out.append(Result("tls.handshake", n, PASS, f"{addr} answers {'/'.join(versions)}"
                              + (f" for {', '.join(names)}" if names else " (no SNI)")))
        good = [p for p in probes if p.leaf]
        if not good:
            for check in ("tls.chain", "tls.names", "tls.expiry"):
                out.append(Result(check, n, SKIP, "no certificate (the handshake failed)"))
            continue
        out.append(_chain(n, addr, good, trust, key))
        out.append(_names(n, addr, good, key, lst))
        out.append(_expiry(n, addr, good, f.now, key))
    return out


def _chain(n: str, addr: str, probes: list[TlsProbe], trust: str, key: str) -> Result:
    bad = [p for p in probes if p.verify_error]
    if not bad:
        return Result("tls.chain", n, PASS, f"the chain verifies against {trust}")
    p = bad[0]
    why = p.verify_error
    if "self-signed" in why or "self signed" in why:
        fix = ("use a certificate from a CA that remote servers trust (Let's Encrypt), or "
               "pass --cafile when a private CA is meant")
    elif "issuer" in why:
        fix = (f"put the whole chain (certificate, then intermediates: fullchain.pem) in {key}, "
               "or pass --cafile when a private CA is meant")
    else:
        fix = f"replace {key} with a certificate that {trust} accepts"
    return Result("tls.chain", n, FAIL,
                  f"{addr}: the certificate{_for(p.name)} does not verify against {trust}: "
                  f"{why}", fix)


def _for(name: str) -> str:
    return f" for {name}" if name else ""


def _names(n: str, addr: str, probes: list[TlsProbe], key: str, lst: Listener) -> Result:
    if not any(p.name for p in probes):
        return Result("tls.names", n, SKIP, "no name known to check: set hosts on the "
                      "listener, or [well_known]")
    missing: list[tuple[TlsProbe, x509.Certificate]] = []
    for p in probes:
        cert = _cert(p.leaf)
        if cert is None or not covers(cert, p.name):
            missing.append((p, cert))  # type: ignore[arg-type]
    if not missing:
        return Result("tls.names", n, PASS,
                      f"the certificate covers {', '.join(p.name for p in probes)}")
    p, cert = missing[0]
    names = ", ".join(q.name for q, _ in missing)
    has = _describe_names(cert) if cert is not None else "an unreadable certificate"
    fix = f"set {key} to a certificate for {names}"
    if lst.tls is not None and lst.tls.sni:
        fix += f", or add a [[listeners.tls.sni]] entry for {names}"
    return Result("tls.names", n, FAIL, f"{addr}: certificate covers {has}, not {names}", fix)


def _expiry(n: str, addr: str, probes: list[TlsProbe], now: datetime, key: str) -> Result:
    worst: tuple[float, str, x509.Certificate] | None = None
    for p in probes:
        cert = _cert(p.leaf)
        if cert is None:
            continue
        if cert.not_valid_before_utc > now:
            return Result("tls.expiry", n, FAIL,
                          f"{addr}: the certificate{_for(p.name)} is not valid before "
                          f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                          f"check the clock of this machine, or replace {key}")
        left = (cert.not_valid_after_utc - now) / timedelta(days=1)
        if worst is None or left < worst[0]:
            worst = (left, p.name, cert)
    if worst is None:
        return Result("tls.expiry", n, SKIP, "no readable certificate")
    left, name, cert = worst
    until = f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    renew = f"renew the certificate in {key} (and reload the gate: SIGHUP)"
    if left < 0:
        return Result("tls.expiry", n, FAIL,
                      f"{addr}: the certificate{_for(name)} expired on {until}", renew)
    if left < EXPIRY_FAIL_DAYS:
        return Result("tls.expiry", n, FAIL,
                      f"{addr}: the certificate{_for(name)} expires on {until}, "
                      f"in {left:.1f} days", renew)
    if left < EXPIRY_WARN_DAYS:
        return Result("tls.expiry", n, WARN,
                      f"{addr}: the certificate{_for(name)} expires on {until}, "
                      f"in {left:.1f} days", renew + "; check that automatic renewal runs")
    return Result("tls.expiry", n, PASS, f"valid until {until} ({int(left)} days)")


# --------------------------------------------------------------------------
# 2. The upstream


def _upstream_unreachable(f: Facts, http: Http, probe: str) -> tuple[str, str] | None:
    """(cause, fix) when the upstream gave no usable answer to *http*."""
    url = f.cfg.upstream.url
    target = f"GET {PROBES[probe]}"
    if http.error:
        return (f"{url} does not answer {target}: {http.error}",
                "start the homeserver, or set upstream.url to where it listens")
    if http.status != 200:
        return (f"{url} answers {target} with {http.status}",
                "upstream.url must point at the homeserver's client and federation listener")
    return None


def check_upstream(f: Facts) -> list[Result]:
    out: list[Result] = []
    versions = f.upstream.get("versions")
    keys = f.upstream.get("keys")
    assert versions is not None and keys is not None
    bad = _upstream_unreachable(f, versions, "versions")
    if bad:
        out.append(Result("upstream.versions", "", FAIL, *bad))
    else:
        try:
            doc = versions.json()
            listed = doc["versions"]
            if not isinstance(listed, list) or not listed or \
                    not all(isinstance(v, str) for v in listed):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            out.append(Result("upstream.versions", "", FAIL,
                              f"{f.cfg.upstream.url} answers /_matrix/client/versions with "
                              f"something that is not Matrix JSON: {versions.body[:80]!r}",
                              "upstream.url must point at the homeserver"))
        else:
            out.append(Result("upstream.versions", "", PASS,
                              f"{f.cfg.upstream.url} answers Matrix versions "
                              f"{listed[0]} … {listed[-1]}"))
    bad = _upstream_unreachable(f, keys, "keys")
    if bad:
        out.append(Result("upstream.keys", "", FAIL, *bad))
        return out
    try:
        doc = keys.json()
    except ValueError:
        doc = None
    name, problems, summary = key_doc_problems(doc, f.now)
    if problems:
        out.append(Result("upstream.keys", "", FAIL,
                          f"the key document of {name or 'the homeserver'}: "
                          + "; ".join(problems),
                          "check the homeserver's signing key and clock"))
    else:
        out.append(Result("upstream.keys", "", PASS, f"server_name {name}: {summary}"))
    return out


# --------------------------------------------------------------------------
# 3. Delegation


_CORS = "Access-Control-Allow-Origin"


def _doc_common(f: Facts, http: Http | None, which: str) -> Result | None:
    """The outcome shared by both documents when there is no 200 answer."""
    check = f"wellknown.{which}"
    if http is None:
        return Result(check, "", SKIP, "no listener the doctor can reach")
    if http.error:
        if not f.wk_listener:
            return Result(check, "", FAIL, f"no answer from {_remote(f)}: {http.error}",
                          f"serve https://{_host_of(f.wk_host)}/ (or let the gate answer for "
                          "that name)")
        return Result(check, "", FAIL,
                      f"no answer through listener '{f.wk_listener}': {http.error}",
                      "start the gate, or check the listener's bind")
    if http.status == 421:
        i = index_of(f.cfg, f.wk_listener)
        return Result(check, "", FAIL, f"listener '{f.wk_listener}' refuses Host {f.wk_host} "
                      "(421)", f"add {_host_of(f.wk_host) or f.wk_host} to listeners[{i}].hosts")
    return None


def check_wellknown(f: Facts) -> list[Result]:
    return [_wk_server(f), _wk_client(f)]


def _remote(f: Facts) -> str:
    return f"https://{_host_of(f.wk_host)}/"


def _source(f: Facts) -> str:
    """Who answers the documents: another server at https://<server name>/,
    the gate when [well_known] is set (a document it lacks is a 404 of its
    own), else the homeserver."""
    if not f.wk_listener:
        return _remote(f)
    return "the gate's [well_known]" if f.cfg.well_known else "the homeserver, forwarded"


def _gate_serves(f: Facts, which: str) -> bool:
    wk = f.cfg.well_known
    return bool(f.wk_listener and wk and getattr(wk, which))


def _not_served(f: Facts, which: str) -> str:
    if not f.wk_listener:
        return f"not served (404 at {_remote(f)})"
    if f.cfg.well_known:
        return f"not served ([well_known] has no {which})"
    return "not served (404 from the homeserver)"


def _doc_answer(f: Facts, http: Http | None, which: str,
                missing: tuple[str, str, str]) -> Result | None:
    """The outcome of a document that did not come back with a 200: *missing*
    is (status, consequence, fix) of a 404 the gate was not told to answer."""
    common = _doc_common(f, http, which)
    if common:
        return common
    assert http is not None
    check = f"wellknown.{which}"
    if http.status == 404 and not _gate_serves(f, which):
        status, consequence, fix = missing
        return Result(check, "", status, f"{_not_served(f, which)}: {consequence}", fix)
    if http.status != 200:
        return Result(check, "", FAIL,
                      f"/.well-known/matrix/{which} answers {http.status} (from {_source(f)})",
                      f"set [well_known] {which} in the gate's config")
    return None


def _wk_server(f: Facts) -> Result:
    http = f.wk_server
    early = _doc_answer(f, http, "server", (
        PASS, "no delegation; remote servers look up SRV records, then port 8448 of the "
        "server name", ""))
    if early:
        return early
    assert http is not None
    src = _source(f)
    try:
        doc = http.json()
        value = doc["m.server"]
        if not isinstance(value, str):
            raise TypeError("m.server is not a string")
        discovery.split_host_port(value)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return Result("wellknown.server", "", FAIL,
                      f"/.well-known/matrix/server is not a valid document (from {src}): "
                      f"{_why(exc)}: {http.body[:80]!r}",
                      "serve {\"m.server\": \"host:port\"}: set [well_known] server")
    notes = []
    status = PASS
    if http.header(_CORS) is None:
        # Remote servers do not need CORS; browser-based testers do.
        status = WARN
        notes.append(f"no {_CORS} header")
    ctype = (http.header("Content-Type") or "").split(";")[0].strip()
    if ctype != "application/json":
        status = WARN
        notes.append(f"Content-Type is {ctype or 'missing'}, not application/json")
    msg = f"{http.body.decode(errors='replace')} from {src}"
    if notes:
        fix = (f"make {_remote(f)} send them" if not f.wk_listener else
               "let the gate serve it: set [well_known] server")
        return Result("wellknown.server", "", status, f"{msg}; " + "; ".join(notes), fix)
    return Result("wellknown.server", "", PASS, f"{msg}, JSON with CORS headers")


def _why(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r}"
    if isinstance(exc, json.JSONDecodeError):
        return "not JSON"
    return str(exc) or type(exc).__name__


def _wk_client(f: Facts) -> Result:
    http = f.wk_client
    early = _doc_answer(f, http, "client", (
        WARN, "clients cannot find the homeserver from a user ID",
        "set [well_known] client = \"https://<client listener's name>\""))
    if early:
        return early
    assert http is not None
    configured = _gate_serves(f, "client")
    src = _source(f)
    try:
        doc = http.json()
        base = doc["m.homeserver"]["base_url"]
        if not isinstance(base, str) or _base_url(base) is None:
            raise TypeError(f"m.homeserver.base_url {base!r} is not an http(s) URL")
        ids = doc.get("m.identity_server")
        if ids is not None and not (isinstance(ids, dict) and isinstance(
                ids.get("base_url"), str) and _base_url(ids["base_url"])):
            raise TypeError("m.identity_server has no valid base_url")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return Result("wellknown.client", "", FAIL,
                      f"/.well-known/matrix/client is not a valid document (from {src}): "
                      f"{_why(exc)}",
                      "serve {\"m.homeserver\": {\"base_url\": \"https://...\"}}: "
                      "set [well_known] client")
    # Browsers fetch this document from other origins (web clients): without
    # CORS they cannot read it (Matrix spec, client-server API "Web Browser
    # Clients"; element-web issue 7760).
    cors = http.header(_CORS)
    if cors != "*":
        what = f"no {_CORS} header" if cors is None else f"{_CORS} is {cors!r}, not '*'"
        if not f.wk_listener:
            fix = f"make {_remote(f)} send Access-Control-Allow-Origin: * with it"
        elif configured:
            fix = "report this: the gate sends CORS"
        else:
            fix = ("let the gate serve the documents with CORS: add [well_known] with client = "
                   f"\"{base}\"")
        return Result("wellknown.client", "", FAIL,
                      f"/.well-known/matrix/client from {src} has {what}: web clients "
                      "cannot read it", fix)
    return Result("wellknown.client", "", PASS,
                  f"base_url {base} from {src}, JSON with CORS headers")


def _route(f: Facts) -> discovery.Route | None:
    assert f.server_name is not None
    got = discovery.discover(f.server_name, server_doc(f.wk_server), f.dns)
    return got if isinstance(got, discovery.Route) else None


def _name_listener(f: Facts, att: Attempt) -> str:
    here = listeners_at(f.cfg, att.address, att.port)
    if here:
        return "listener " + ", ".join(f"'{lst.name}' ({lst.role})" for lst in here)
    return "not a listener of this gate by address (port mapping, or another proxy)"


def _endpoint_fix(f: Facts, att: Attempt, role: str, doc_key: str,
                  configured: bool, name: str) -> str:
    """What to change when nothing of ours answers at *att*."""
    ours = [lst for lst in f.cfg.listeners if lst.role == role and lst.bind.kind == "tcp"
            and lst.bind.port]
    if listeners_at(f.cfg, att.address, att.port):
        return "start the gate"
    suggestion = ""
    if ours:
        lst = ours[0]
        scheme = "https://" if role == "client" else ""
        suggestion = (f" (listener '{lst.name}' binds port {lst.bind.port}: "
                      f"{scheme}{name}:{lst.bind.port})")
    if configured:
        return f"no listener of this gate binds port {att.port}: set {doc_key}" + suggestion
    if not f.wk_listener:
        return (f"no listener of this gate binds port {att.port}: correct the document at "
                f"{_remote(f)}" + suggestion)
    return (f"no listener of this gate binds port {att.port}: correct the homeserver's "
            f"/.well-known document, or add [well_known] {doc_key.split('.')[-1]}" + suggestion)


def check_delegation(f: Facts) -> list[Result]:
    return [_delegation_server(f), _delegation_srv(f), _delegation_client(f)]


def _delegation_server(f: Facts) -> Result:
    check = "delegation.server"
    if f.server_name is None:
        return Result(check, "", SKIP, "needs the upstream's key document (its server_name)")
    try:
        route = _route(f)
    except ValueError as exc:
        return Result(check, "", FAIL, f"server name {f.server_name!r}: {exc}",
                      "fix server_name in the homeserver's config")
    if route is None:
        return Result(check, "", SKIP, "a DNS answer is missing")
    s = f.server_name
    path = f"{s}: {route.describe()}"
    dns_fix = f"check the DNS records at {f.dns_resolver}"
    if (route.well_known_problem or route.problem).startswith("DNS lookup failed"):
        return Result(check, "", FAIL, f"{path}: {route.well_known_problem or route.problem}",
                      f"check that {f.dns_resolver} answers (or pass --resolver HOST:PORT)")
    if route.well_known_problem:
        return Result(check, "", FAIL, f"{path}: {route.well_known_problem}",
                      f"add an A/AAAA record for {s} with the address of this gate, or, if "
                      f"{s} is not the name meant, correct server_name in the homeserver's "
                      "config")
    if route.problem:
        return Result(check, "", FAIL, f"{path}: {route.problem}",
                      f"add A/AAAA records with the address of this gate ({dns_fix})")
    keys = f.upstream["keys"]
    configured = _gate_serves(f, "server")
    first_bad: tuple[Attempt, str, str] | None = None
    for att in f.route_attempts:
        addr = discovery.join_host_port(att.address, att.port)
        if att.http.error:
            why = att.http.error
            if "certificate" in why or "SSL" in why or "TLS" in why:
                fix = (f"serve a certificate for {route.tls_name} there "
                       "(see tls.names and tls.chain)")
            else:
                fix = _endpoint_fix(f, att, "federation", "well_known.server", configured,
                                    route.tls_name)
            bad = (att, f"{addr}: {why}", fix)
        elif not same_keys(att.http, keys):
            bad = (att, f"{addr} answers GET /_matrix/key/v2/server with {att.http.status}, "
                   "not this homeserver's key document",
                   "the address reaches another server: correct the DNS record or "
                   "the delegation")
        else:
            return Result(check, "", PASS,
                          f"{path} → {addr}: {_name_listener(f, att)} answers with this "
                          "homeserver's keys")
        first_bad = first_bad or bad
    if first_bad is None:
        return Result(check, "", FAIL, f"{path}: no address was tried", dns_fix)
    return Result(check, "", FAIL, f"{path} → {first_bad[1]}", first_bad[2])


def _delegation_srv(f: Facts) -> Result:
    check = "delegation.srv"
    if f.server_name is None:
        return Result(check, "", SKIP, "needs the upstream's key document (its server_name)")
    try:
        host, port = discovery.split_host_port(f.server_name)
    except ValueError:
        return Result(check, "", SKIP, "the server name is not valid (see delegation.server)")
    if port is not None or discovery.is_ip(host):
        return Result(check, "", PASS, f"{f.server_name} has a port or is an address: "
                      "remote servers use neither .well-known nor SRV")
    m_server = server_doc(f.wk_server)
    if m_server is None:
        return Result(check, "", PASS, "no well-known delegation: SRV records, if any, "
                      "are the route (delegation.server)")
    route = _route(f)
    fallback = discovery.discover(f.server_name, None, f.dns)
    if route is None or not isinstance(fallback, discovery.Route):
        return Result(check, "", SKIP, "a DNS answer is missing")
    failed = [lk for svc in ("_matrix-fed._tcp", "_matrix._tcp")
              if (lk := f.dns.get((f"{svc}.{host}", "SRV"))) is not None and lk.error]
    if failed:
        return Result(check, "", SKIP, f"the SRV lookup of {failed[0].qname} failed: "
                      f"{failed[0].error}")
    if not fallback.via.startswith("SRV"):
        return Result(check, "", PASS, f"no SRV record for {host}: when the well-known "
                      f"lookup fails, remote servers try {host}:{discovery.DEFAULT_PORT}")
    srv_name = fallback.via.split(" ", 1)[1]
    # A remote whose well-known lookup fails (an error is cached for a while)
    # falls back to these records (steps 4-5): they must lead to the same place.
    same = set(fallback.endpoints) & set(route.endpoints) or \
        set(fallback.targets) & set(route.targets)
    targets = ", ".join(discovery.join_host_port(h, p) for h, p in fallback.targets)
    if same:
        return Result(check, "", PASS, f"SRV {srv_name} → {targets} agrees with m.server "
                      f"{m_server}")
    wanted = ", ".join(discovery.join_host_port(h, p) for h, p in route.targets)
    return Result(check, "", FAIL,
                  f"SRV {srv_name} → {targets} disagrees with .well-known/matrix/server "
                  f"(m.server {m_server} → {wanted}): a remote server whose well-known "
                  f"lookup fails goes to {targets}",
                  f"delete the SRV record {srv_name}, or point it at {wanted}")


def _delegation_client(f: Facts) -> Result:
    check = "delegation.client"
    base = client_doc(f.wk_client)
    if base is None:
        return Result(check, "", SKIP, "no valid m.homeserver.base_url (see wellknown.client)")
    versions = f.upstream["versions"]
    if versions.status != 200:
        return Result(check, "", SKIP, "needs the upstream's answer to /_matrix/client/versions")
    _, host, _, _ = base_url_parts(base)
    if not f.client_attempts:
        lookups = [f.dns.get((host, t)) for t in ("A", "AAAA")]
        errors = "; ".join(f"{lk.qtype}: {lk.error}" for lk in lookups if lk and lk.error)
        return Result(check, "", FAIL, f"base_url {base}: {host} has no A or AAAA record"
                      + (f" ({errors})" if errors else ""),
                      f"add an A/AAAA record for {host} with the address of this gate")
    configured = _gate_serves(f, "client")
    first_bad: tuple[str, str] | None = None
    for att in f.client_attempts:
        addr = discovery.join_host_port(att.address, att.port)
        if att.http.error:
            why = att.http.error
            if "certificate" in why or "SSL" in why:
                fix = f"serve a certificate for {host} there (see tls.names and tls.chain)"
            else:
                fix = _endpoint_fix(f, att, "client", "well_known.client", configured, host)
            bad = (f"{addr}: {why}", fix)
        elif not att.http.same_answer(versions):
            bad = (f"{addr} answers GET /_matrix/client/versions with {att.http.status}, "
                   "not what the homeserver answers", "the base URL reaches another server")
        else:
            here = listeners_at(f.cfg, att.address, att.port)
            msg = (f"base_url {base} → {addr}: {_name_listener(f, att)} answers "
                   "/_matrix/client/versions")
            if here and all(lst.role != "client" for lst in here):
                return Result(check, "", WARN, msg + ": a federation listener, which does not "
                              "forward /_palpo/client",
                              "point base_url at a client listener")
            return Result(check, "", PASS, msg)
        first_bad = first_bad or bad
    assert first_bad is not None
    return Result(check, "", FAIL, f"base_url {base} → {first_bad[0]}", first_bad[1])


# --------------------------------------------------------------------------
# 4. Through the gate's own listeners


def check_admin(f: Facts) -> list[Result]:
    out: list[Result] = []
    wide = [str(n) for n in f.cfg.admin.allow_from if n.prefixlen == 0]
    if wide:
        out.append(Result("admin.allow_from", "", FAIL,
                          f"admin.allow_from contains {', '.join(wide)}: the admin API is "
                          "open to every address",
                          "list only the addresses that administer the server, "
                          "e.g. [\"127.0.0.1/32\"]"))
    elif f.cfg.admin.allow_from:
        out.append(Result("admin.allow_from", "", PASS, "admin API allowed from "
                          + ", ".join(str(n) for n in f.cfg.admin.allow_from) + " only"))
    else:
        out.append(Result("admin.allow_from", "", PASS,
                          "empty: the admin API is refused through every listener"))
    if not f.admin:
        out.append(Result("admin.blocked", "", SKIP,
                          f.admin_untested or "no listener the doctor can reach"))
        return out
    reached = [p for p in f.admin if not p.http.error and not admin_refused(p.http)]
    broken = [p for p in f.admin if p.http.error]
    if reached:
        p = reached[0]
        allowed = [str(n) for n in f.cfg.admin.allow_from
                   if discovery.is_ip(p.source) and ipaddress.ip_address(p.source) in n]
        fix = (f"admin.allow_from lets {p.source} in ({', '.join(allowed)}): list only the "
               "addresses that administer the server" if allowed else
               "add the prefix to admin.blocked_prefixes")
        return [*out, Result("admin.blocked", p.listener, FAIL,
                             f"GET {p.path} from {p.source} answered {p.http.status} from the "
                             "homeserver: the admin API is reachable through this listener",
                             fix)]
    if broken:
        p = broken[0]
        return [*out, Result("admin.blocked", p.listener, FAIL,
                             f"GET {p.path}: no answer: {p.http.error}", "start the gate")]
    listeners = sorted({p.listener for p in f.admin})
    sources = sorted({p.source for p in f.admin})
    prefixes = sorted({p.path.removesuffix(ADMIN_PROBE_SUFFIX) for p in f.admin})
    return [*out, Result("admin.blocked", "", PASS,
                         f"{', '.join(prefixes)} refused (403) through "
                         f"{', '.join(listeners)} from {', '.join(sources)}")]


def check_target(f: Facts) -> list[Result]:
    """A federation request with an escaped path and query reaches the
    homeserver unchanged: X-Matrix signs the exact target (server-server
    API, "Request Authentication"; synapse issue 3294)."""
    if not f.through:
        return [Result("federation.target", "", SKIP,
                       "no listener the doctor can reach forwards /_matrix")]
    direct = f.upstream
    if direct["keys"].error or direct["keys"].status != 200:
        return [Result("federation.target", "", SKIP,
                       "needs the upstream's key document (see upstream.keys)")]
    out: list[Result] = []
    url = f.cfg.upstream.url
    slash_ok_direct = _slash_intact(direct)
    for name, answers in f.through.items():
        diffs = []
        for probe in TARGET_PROBES:
            via, dir_ = answers[probe], direct[probe]
            if via.error:
                diffs.append(f"{PROBES[probe]}: no answer through the gate: {via.error}")
            elif not (via.same_answer(dir_) or same_keys(via, dir_)):
                diffs.append(f"{PROBES[probe]}: {via.status} through the gate, "
                             f"{dir_.status} direct")
        if diffs:
            out.append(Result("federation.target", name, FAIL,
                              "through the gate the homeserver answers differently: "
                              + "; ".join(diffs) + ": the request target was changed on "
                              "the way, X-Matrix signatures fail with 401",
                              "the gate forwards targets byte for byte; send this output "
                              "with a bug report"))
            continue
        intact = _slash_intact(answers)
        if intact is False:
            behind = " and directly at upstream.url" if slash_ok_direct is False else ""
            out.append(Result(
                "federation.target", name, FAIL,
                f"{PROBES['keys_slash']} answers {answers['keys_slash'].status} but "
                f"{PROBES['keys_id']} answers the key document, through the gate{behind}: "
                f"something at or behind {url} decodes %2F before the homeserver routes "
                "the request; X-Matrix signatures over such paths fail with 401",
                "point upstream.url at the homeserver itself, or make the proxy there pass "
                "the request target unchanged (nginx: proxy_pass with no URI part)"))
            continue
        note = ("; %2F reached the homeserver's router as data" if intact else
                "; the homeserver does not serve the key-id form, so %2F was compared "
                "through the gate and directly only")
        out.append(Result("federation.target", name, PASS,
                          f"{len(TARGET_PROBES)} escaped targets answer the same through the "
                          f"gate as directly, byte for byte{note}"))
    return out


def _slash_intact(answers: dict[str, Http]) -> bool | None:
    """True: ``%2F`` inside the key-id segment reached the router as data;
    False: it did not (it was decoded to a separator); None: the homeserver
    does not serve the key-id form, so the probe cannot tell."""
    if not _is_key_doc(answers["keys_id"]):
        return None
    return same_keys(answers["keys_slash"], answers["keys_id"])


# --------------------------------------------------------------------------
# The table


#: Every check after ``config``, in the order they are printed.
CHECKS: tuple[Callable[[Facts], list[Result]], ...] = (
    check_listeners,
    check_tls,
    check_upstream,
    check_wellknown,
    check_delegation,
    check_admin,
    check_target,
)


def run(f: Facts) -> list[Result]:
    return [r for check in CHECKS for r in check(f)]


def summary(results: Iterable[Result]) -> dict[str, int]:
    counts = {PASS: 0, WARN: 0, FAIL: 0, SKIP: 0}
    for r in results:
        counts[r.status] += 1
    return counts


def config_result(source: str, errors: list[str] | None) -> Result:
    if errors:
        return Result("config", "", FAIL, f"{source} is not valid: " + "; ".join(errors),
                      f"run `palpo-gate check --config {source}` and fix each key it names")
    return Result("config", "", PASS, f"{source} is valid")
