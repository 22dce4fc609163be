"""The keystore: one owner-only folder holding a user's secret keys.

Default `~/.trustgen/keys`, overridden by `$TRUSTGEN_KEYSTORE` or a CLI flag. Each watermark key
is 32 random bytes in `watermark-<key id>.key`; the key id (a hash of the key, see
`watermark.text.key_id`) is public and is all that outputs, manifests and logs ever show.

The signing identity signs provenance manifests (see `safety.provenance`): a private key in
`signing-key.pem` and its certificate chain in `signing-chain.pem` (leaf first), whose top
certificate is also kept as `ca.pem`, the trust anchor a verifier is given. C2PA refuses a bare
self-signed certificate, so `init` makes a small local CA and has it issue a leaf with the usages
C2PA asks for; the CA's private key is used once and never stored, so nothing in the keystore can
issue further certificates. Users who hold a certificate from a real CA import it instead.
Private key files are owner-only (0600) and refused when they are not; certificates are public.

Once a keystore holds any key, nothing in it is ever made or replaced implicitly: a missing,
unreadable or corrupt key is an error that names the file and the command that restores or
re-creates it (`trustgen keys init`, `trustgen keys init --new-signer`), because a silently new
key would orphan everything made with the old one. A new signer retires the old CA certificate as
`ca-retired-<fingerprint>.pem`, so files it signed can still be explained. A keystore folder that
other users may enter (group or other permission bits) is refused with the `chmod` to run.
"""

from __future__ import annotations

import datetime
import getpass
import hashlib
import itertools
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustgen.errors import TrustgenError
from trustgen.io import atomic_write_bytes
from trustgen.safety.watermark.text import key_id

ENV_VAR = "TRUSTGEN_KEYSTORE"
KEY_BYTES = 32
SIGNING_KEY = "signing-key.pem"
SIGNING_CHAIN = "signing-chain.pem"
CA_CERT = "ca.pem"
RETIRED_CA = "ca-retired-{}.pem"  # a CA certificate replaced by `init(new_signer=True)`
LEAF_YEARS = 5
CA_YEARS = 10

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def default_keystore() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".trustgen" / "keys")


def default_signer_name() -> str:
    """`trustgen local signer (user@host)`: who signed, as a verifier will see it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # containers may run as a uid with no name
        user = str(os.getuid())
    return f"trustgen local signer ({user}@{socket.gethostname()})"


@dataclass(frozen=True)
class WatermarkKey:
    key_id: str
    secret: bytes

    def __repr__(self) -> str:  # never print the secret, even by accident
        return f"WatermarkKey(key_id={self.key_id!r})"


@dataclass(frozen=True)
class SigningIdentity:
    """A private key with its certificate chain (leaf first) and the chain's top certificate."""

    private_key: PrivateKey
    chain_pem: bytes
    ca_pem: bytes

    def __repr__(self) -> str:  # never print the key, even by accident
        return f"SigningIdentity(name={self.name!r}, algorithm={self.algorithm!r})"

    @property
    def certificates(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.chain_pem)

    @property
    def name(self) -> str:
        return certificate_name(self.certificates[0])

    @property
    def algorithm(self) -> str:
        """The signature algorithm by its C2PA (JOSE) name: Ed25519 or ES256."""
        return "Ed25519" if isinstance(self.private_key, ed25519.Ed25519PrivateKey) else "ES256"

    def private_key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM, for the C2PA signer; never log or store it elsewhere."""
        return self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())


def certificate_name(cert: x509.Certificate) -> str:
    """The subject's common name, or the whole subject when it has none."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when `issuer` signed `cert` (names match and the signature verifies)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def chain_is_linked(certs: list[x509.Certificate]) -> bool:
    """Each certificate in a leaf-first chain is signed by the next one."""
    return all(issued_by(child, parent) for child, parent in itertools.pairwise(certs))


def _write_owner_only(path: Path, data: bytes) -> None:
    """Write a secret file that only its owner can read, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), stat.S_IRUSR | stat.S_IWUSR)  # O_CREAT's mode does not apply to an old file
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_key_file(path: Path, remedy: str, *, secret: bool = True) -> bytes:
    """A key file's bytes (a `secret` one must be owner-only); `remedy` (how to restore or
    re-create it) ends the error when the file is missing or unreadable."""
    try:
        if secret and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TrustgenError(f"{path} is readable by other users; run: chmod 600 {path}")
        return path.read_bytes()
    except FileNotFoundError:
        raise TrustgenError(f"{path} is missing; {remedy}") from None
    except OSError as exc:
        raise TrustgenError(f"{path} cannot be read ({exc.strerror}); {remedy}") from None


def ca_fingerprint(pem: bytes) -> str:
    """The first 16 hex digits of a certificate's SHA-256 fingerprint: names a retired CA (a file
    that is no certificate, being retired because it broke, is named by its bytes' hash)."""
    try:
        return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()[:16]
    except ValueError:
        return hashlib.sha256(pem).hexdigest()[:16]


def _public_key_der(key: PrivateKey | x509.Certificate) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _checked_identity(key: object, certs: list[x509.Certificate], source: str) -> SigningIdentity:
    """A SigningIdentity, after the checks C2PA and our own verifier would otherwise fail on later."""
    if not (isinstance(key, ed25519.Ed25519PrivateKey)
            or (isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1))):
        raise TrustgenError(f"{source}: the signing key must be Ed25519 or ECDSA P-256.")
    if len(certs) < 2:
        raise TrustgenError(f"{source}: the chain must hold the signing certificate followed by the CA "
                            "certificate that issued it (C2PA refuses a self-signed certificate).")
    leaf = certs[0]
    if _public_key_der(key) != _public_key_der(leaf):
        raise TrustgenError(f"{source}: the private key does not match the first certificate of the chain.")
    if not chain_is_linked(certs):
        raise TrustgenError(f"{source}: the chain is broken (each certificate must be issued by the next).")
    constraints, usage, extended, authority = (_extension(leaf, kind) for kind in (
        x509.BasicConstraints, x509.KeyUsage, x509.ExtendedKeyUsage, x509.AuthorityKeyIdentifier))
    if (constraints is None or constraints.ca or usage is None or not usage.digital_signature
            or extended is None or authority is None):
        raise TrustgenError(f"{source}: C2PA needs the signing certificate to be an end-entity certificate "
                            "(CA:FALSE) with the digitalSignature key usage, an extended key usage such as "
                            "emailProtection and an authority key identifier.")
    return SigningIdentity(key, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs),
                           certs[-1].public_bytes(serialization.Encoding.PEM))


def _extension(cert: x509.Certificate, kind: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _new_local_chain(name: str) -> tuple[ed25519.Ed25519PrivateKey, list[x509.Certificate]]:
    """A fresh Ed25519 leaf for `name`, issued by a fresh local CA whose key is then dropped."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(hours=1)  # tolerate a verifier whose clock runs a little behind

    def subject(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trustgen"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def usage(*, signer: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=signer, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=not signer,
                             crl_sign=not signer, encipher_only=False, decipher_only=False)

    ca_key = ed25519.Ed25519PrivateKey.generate()
    # A random suffix keeps two local CAs apart by name as well as by key (path builders match names).
    ca_name = subject(f"trustgen local CA {secrets.token_hex(4)}")
    ca = (x509.CertificateBuilder()
          .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(signer=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, None))
    key = ed25519.Ed25519PrivateKey.generate()
    leaf = (x509.CertificateBuilder()
            .subject_name(subject(name)).issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=365 * LEAF_YEARS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(signer=True), critical=True)
            # C2PA accepts a signing certificate only with one of a few extended key usages.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, None))
    return key, [leaf, ca]


class Keystore:
    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_keystore()

    def exists(self) -> bool:
        """True once the folder holds any key or certificate: from then on nothing is made implicitly."""
        return self.path.is_dir() and (self._has_signer_files() or bool(self._watermark_files()))

    def _has_signer_files(self) -> bool:
        return any((self.path / name).exists() for name in (SIGNING_KEY, SIGNING_CHAIN, CA_CERT))

    def check_folder(self) -> None:
        """Refuse a keystore folder that other users may enter or list."""
        if self.path.is_dir() and self.path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TrustgenError(f"the keystore {self.path} is open to other users; run: chmod 700 {self.path}")

    def _command(self, *flags: str) -> str:
        return " ".join(("trustgen keys init", *flags, "--keystore", str(self.path)))

    def init(self, signer_name: str | None = None, *, new_signer: bool = False) -> WatermarkKey:
        """Create the folder (owner-only), a watermark key and a signing identity (the leaf
        certificate names `signer_name`), keeping any that exist. An incomplete signing identity
        is an error unless `new_signer`, which makes a new one and retires the old CA certificate
        as ca-retired-<fingerprint>.pem."""
        if self.exists():
            self.check_folder()
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            os.chmod(self.path, stat.S_IRWXU)  # an empty folder is still ours to set up
        if new_signer:
            self._retire_ca()
        if new_signer or not self._has_signer_files():
            key, certs = _new_local_chain(signer_name or default_signer_name())
            self._store_identity(_checked_identity(key, certs, "new local signer"))
        self.signing_identity()  # an incomplete identity is reported, never replaced without new_signer
        if self._watermark_files():
            return self.watermark_key()
        secret = secrets.token_bytes(KEY_BYTES)
        _write_owner_only(self.path / f"watermark-{key_id(secret)}.key", secret)
        return WatermarkKey(key_id(secret), secret)

    def _retire_ca(self, unless: bytes | None = None) -> None:
        """Keep the current CA certificate as ca-retired-<fingerprint>.pem (unless it is `unless`)."""
        ca = self.path / CA_CERT
        if ca.is_file() and (pem := ca.read_bytes()) != unless:
            atomic_write_bytes(self.path / RETIRED_CA.format(ca_fingerprint(pem)), pem)
            ca.unlink()

    def retired_anchors(self) -> dict[Path, bytes]:
        """The CA certificates retired by `init(new_signer=True)`: what signed this store's older files."""
        return {p: p.read_bytes() for p in sorted(self.path.glob(RETIRED_CA.format("*")))} if self.path.is_dir() else {}

    def has_watermark_key(self) -> bool:
        return bool(self._watermark_files())

    def _watermark_files(self) -> list[Path]:
        return sorted(self.path.glob("watermark-*.key")) if self.path.is_dir() else []

    def watermark_keys(self) -> list[WatermarkKey]:
        """Every watermark key in the store (a detector tests each)."""
        self.check_folder()
        keys = []
        for path in self._watermark_files():
            secret = _read_key_file(path, "restore it from your backup.")
            if len(secret) != KEY_BYTES or path.stem != f"watermark-{key_id(secret)}":
                raise TrustgenError(f"{path} is not a trustgen watermark key (corrupt or renamed); "
                                    "restore it from your backup.")
            keys.append(WatermarkKey(key_id(secret), secret))
        return keys

    def watermark_key(self, wanted: str | None = None) -> WatermarkKey:
        """The watermark key with id `wanted`, or the only/first one."""
        keys = self.watermark_keys()
        if not keys:
            raise TrustgenError(f"there is no watermark key (watermark-*.key) in {self.path}; restore it from your "
                                f"backup, or make a new one with: {self._command()}")
        for key in keys:
            if wanted is None or key.key_id == wanted:
                return key
        raise TrustgenError(f"no watermark key with id {wanted} in {self.path} (watermark-{wanted}.key); "
                            "restore it from your backup.")

    # -- signing identity ------------------------------------------------------------------

    def has_signing_identity(self) -> bool:
        return all((self.path / name).is_file() for name in (SIGNING_KEY, SIGNING_CHAIN, CA_CERT))

    def signing_identity(self) -> SigningIdentity:
        if not self.exists():
            raise TrustgenError(f"there is no signing key in {self.path}; run: {self._command()}")
        self.check_folder()
        remedy = (f"restore it from your backup, or make a new signer with: {self._command('--new-signer')} "
                  f"(files signed before then verify as untrusted)")
        key_path, chain_path, ca_path = (self.path / name for name in (SIGNING_KEY, SIGNING_CHAIN, CA_CERT))
        key = _load_private_key(_read_key_file(key_path, remedy), key_path)
        chain = _load_chain(_read_key_file(chain_path, remedy, secret=False), chain_path)
        identity = _checked_identity(key, chain, str(chain_path))
        if identity.ca_pem != _read_key_file(ca_path, remedy, secret=False):
            raise TrustgenError(f"{ca_path} is not the top of {chain_path}; {remedy}")
        return identity

    def import_signing_identity(self, key_pem_path: Path, chain_pem_path: Path) -> SigningIdentity:
        """Replace the signing identity with the user's own key (unencrypted PEM) and chain
        (PEM, signing certificate first), after checking that they belong together."""
        key_pem_path, chain_pem_path = Path(key_pem_path), Path(chain_pem_path)
        try:
            key_pem, chain_pem = key_pem_path.read_bytes(), chain_pem_path.read_bytes()
        except FileNotFoundError as missing:
            raise TrustgenError(f"{missing.filename} does not exist.") from None
        identity = _checked_identity(_load_private_key(key_pem, key_pem_path),
                                     _load_chain(chain_pem, chain_pem_path), str(chain_pem_path))
        if self.exists():
            self.check_folder()
            self._retire_ca(unless=identity.ca_pem)
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            os.chmod(self.path, stat.S_IRWXU)
        self._store_identity(identity)
        return identity

    def _store_identity(self, identity: SigningIdentity) -> None:
        # The key goes last: a crash before it leaves a chain that `signing_identity` rejects as
        # not matching the key, never a key silently paired with someone else's certificate.
        atomic_write_bytes(self.path / SIGNING_CHAIN, identity.chain_pem)
        atomic_write_bytes(self.path / CA_CERT, identity.ca_pem)
        _write_owner_only(self.path / SIGNING_KEY, identity.private_key_pem())

    def trust_anchors(self) -> list[bytes]:
        """The CA certificates this keystore trusts: its own signing identity's CA, if any."""
        path = self.path / CA_CERT
        return [path.read_bytes()] if path.is_file() else []


def _load_private_key(pem: bytes, source: Path) -> object:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise TrustgenError(f"{source} is encrypted; give trustgen an unencrypted copy "
                            "(the keystore protects it with owner-only permissions).") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TrustgenError(f"{source} is not a PEM private key.") from None


def _load_chain(pem: bytes, source: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise TrustgenError(f"{source} is not a PEM certificate chain.") from None
