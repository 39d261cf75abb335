"""TLS material for tests: trustme certificates written as the files a config names."""

from __future__ import annotations

import pathlib

import trustme

#: name -> the hosts its certificate is for
CERTS = (("default", ["localhost", "127.0.0.1", "matrix.test"]),
         ("other", ["other.test"]))


def write_tls_files(ca: trustme.CA, d: pathlib.Path) -> dict[str, str]:
    """Write each of CERTS (key, and chain) and the CA into *d*; their paths as
    ``{name}_cert``, ``{name}_key`` and ``ca``."""
    out: dict[str, str] = {}
    for name, hosts in CERTS:
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
