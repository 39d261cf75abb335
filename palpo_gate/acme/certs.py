"""Keys, CSRs and certificates, made and read with ``cryptography``.

Every key the gate makes is ECDSA P-256: small, fast to sign with, and what
Let's Encrypt and every current TLS client take. A certificate and its key
are kept together in one PEM file (key first, then the chain), so that
replacing the file replaces both at once (:mod:`.store`).
"""

from __future__ import annotations

import datetime
import hashlib
import re
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

#: id-pe-acmeIdentifier, the TLS-ALPN-01 extension (RFC 8737 section 6.1).
ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")

#: How long the temporary certificate (served until the first one is
#: obtained) is valid.
SELF_SIGNED_DAYS = 7


class CertInfo(NamedTuple):
    """What the gate needs to know of a certificate it serves."""

    names: frozenset[str]  # DNS names of the leaf's subjectAltName, lower-case
    serial: int
    not_before: float  # seconds since the epoch
    not_after: float
    issuer: str


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an ECDSA key")
    return key


def csr(key: ec.EllipticCurvePrivateKey, names: tuple[str, ...]) -> bytes:
    """A CSR for *names*, in the subjectAltName only (RFC 8555 section 7.4
    takes the identifiers from there; Let's Encrypt ignores the subject)."""
    req = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                          critical=False)
           .sign(key, hashes.SHA256()))
    return req.public_bytes(serialization.Encoding.PEM)


def _self_signed(key: ec.EllipticCurvePrivateKey, names: tuple[str, ...],
                 lifetime: datetime.timedelta,
                 extra: tuple[x509.ExtensionType, bool] | None = None) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + lifetime)
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                              critical=False))
    if extra is not None:
        builder = builder.add_extension(extra[0], critical=extra[1])
    cert = builder.sign(key, hashes.SHA256())
    return key_pem(key) + cert.public_bytes(serialization.Encoding.PEM)


def self_signed(names: tuple[str, ...]) -> bytes:
    """Key and certificate (PEM) for *names*, signed by itself: served until
    the CA's certificate exists, so that a TLS listener can start."""
    return _self_signed(new_key(), names, datetime.timedelta(days=SELF_SIGNED_DAYS))


def alpn_challenge(name: str, key_authorization: str) -> bytes:
    """Key and certificate (PEM) answering TLS-ALPN-01 for *name*: self-signed,
    *name* its only subjectAltName, and the critical acmeIdentifier extension
    holding the SHA-256 of the key authorization (RFC 8737 section 3)."""
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    # extnValue holds the DER of Authorization ::= OCTET STRING (SIZE (32)).
    value = x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest)
    return _self_signed(new_key(), (name,), datetime.timedelta(days=7), (value, True))


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----(?:\r?\n)?", re.S)


def _blocks(pem: bytes, label: bytes) -> bytes:
    """The PEM blocks of *pem* whose label ends with *label*, concatenated."""
    return b"".join(m.group(0) for m in _PEM_BLOCK.finditer(pem) if m.group(1).endswith(label))


def chain(pem: bytes) -> list[x509.Certificate]:
    """The certificates in *pem*, leaf first (keys and other blocks skipped)."""
    certs = _blocks(pem, b"CERTIFICATE")
    return x509.load_pem_x509_certificates(certs) if certs else []


def info(pem: bytes) -> CertInfo:
    """The leaf certificate's names, serial and validity; ValueError if none."""
    certs = chain(pem)
    if not certs:
        raise ValueError("no certificate in the file")
    leaf = certs[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = frozenset(n.lower() for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = frozenset()
    return CertInfo(names, leaf.serial_number, leaf.not_valid_before_utc.timestamp(),
                    leaf.not_valid_after_utc.timestamp(), leaf.issuer.rfc4514_string())


def split(pem: bytes) -> tuple[bytes, bytes]:
    """(private key PEM, certificate chain PEM) of a combined file."""
    return _blocks(pem, b"PRIVATE KEY"), _blocks(pem, b"CERTIFICATE")
