"""TLS for a federation: a private CA and a SuperLink certificate it signs.

The SuperLink serves with `server.pem`/`server.key`; every SuperNode and the `flwr` CLI
trust only `ca.pem` (`--root-certificates`). ECDSA P-256, which every TLS stack accepts; the
server certificate names the hosts it answers on (127.0.0.1 and localhost, plus any given).
Keys are written owner-only.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustgen import io

VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trustgen federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificates(folder: Path, hosts: tuple[str, ...] = ()) -> dict[str, Path]:
    """Write ca.pem, server.pem and server.key into `folder` (created owner-only); returns
    their paths by name. The server certificate is valid for 127.0.0.1, localhost and `hosts`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("trustgen federation CA")).issuer_name(_name("trustgen federation CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = [_alt_name(h) for h in dict.fromkeys(("127.0.0.1", "localhost", *hosts))]
    server = (x509.CertificateBuilder().subject_name(_name("trustgen superlink")).issuer_name(ca.subject)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    io.atomic_write_bytes(paths["ca"], ca.public_bytes(serialization.Encoding.PEM))
    io.atomic_write_bytes(paths["cert"], server.public_bytes(serialization.Encoding.PEM))
    io.atomic_write_bytes(paths["key"], _key_pem(key))
    paths["key"].chmod(0o600)
    return paths


__all__ = ["make_certificates"]
