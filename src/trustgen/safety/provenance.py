"""Signed provenance: who made a file, with which model and settings, and whether it changed since.

Images (PNG, JPEG) and WAV audio carry a standard C2PA manifest made with `c2pa-python`, so any
C2PA reader can check them: a `c2pa.actions.v2` assertion saying the image was created by a trained model
(IPTC digital source type `trainedAlgorithmicMedia`) and an `org.trustgen.generation` assertion
holding the generation claim (model id, settings, seed, watermark scheme and key id).

Plain text has no C2PA carrier, so a text file gets a signed sidecar `FILE.manifest.json`: the
claim, the file's SHA-256 and size, the time and the trustgen version, as canonical JSON (sorted
keys, no spaces, UTF-8), signed with the keystore's signing key, with its certificate chain.
The file must be exactly that canonical form, so any changed byte makes it invalid; so does a
re-serialisation with the same content (other spacing or key order): the signed bytes are the
canonical form, trustgen never writes another, and accepting other forms would let two JSON
parsers (duplicate keys, number spellings) disagree about what was signed.

Verification never touches the network: no remote manifests, no OCSP, no timestamp authority.
It fails closed: one `status` says whether the file can be relied on, and only "verified" can:
  verified  - the signature is good, the chain ends at a trust anchor and the content is unmodified;
  modified  - the manifest's signature is good, but the file no longer matches the hash the signer
              recorded (an edit, or a manifest that belongs to another file);
  untrusted - a good signature over unmodified content, by a signer that does not chain to a
              trusted CA (anyone can make a CA);
  invalid   - the manifest was tampered with, truncated, re-serialised or is not one at all;
  missing   - no manifest: stripped, or never signed.
Beside it, `signer` (the signing certificate's common name, when the signature is good),
`content` ("unmodified" / "modified", None when the manifest proves nothing) and `claim` (what
the signer said about the generation) give the detail; `EXIT_CODES` maps each status to the exit
code of `trustgen verify`. A stripped or edited file loses or breaks its manifest but may keep its
watermark, so callers check the watermark too (that says "generated", never "authentic").
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import c2pa
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding

from trustgen import __version__
from trustgen.errors import TrustgenError
from trustgen.io import atomic_write_bytes
from trustgen.safety.keys import (
    Keystore,
    SigningIdentity,
    WatermarkKey,
    certificate_name,
    chain_is_linked,
    issued_by,
)

FORMAT = "trustgen-manifest/1"
SIDECAR_SUFFIX = ".manifest.json"
ASSERTION = "org.trustgen.generation"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
IMAGE_TYPES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}
WAV_TYPE = "audio/wav"  # a RIFF file whose form type is WAVE (bytes 0-3 and 8-11)
_C2PA_ALGORITHMS = {"Ed25519": c2pa.C2paSigningAlg.ED25519, "ES256": c2pa.C2paSigningAlg.ES256}

# Offline: never fetch a manifest named by URL nor ask an OCSP responder about the certificate.
_OFFLINE = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
# Failures that say the pixels no longer match the manifest's hash, as opposed to a bad manifest.
_CONTENT_MISMATCHES = {"assertion.dataHash.mismatch", "assertion.boxesHash.mismatch",
                       "assertion.bmffHash.mismatch", "assertion.collectionHash.mismatch"}
# A claim is plain JSON describing a generation; a field named like this is a key leaking in.
_SECRET_NAME = re.compile(r"secret|private|password|passphrase|^key$", re.IGNORECASE)


# The exit code of `trustgen verify` for each status: 0 only when the file can be relied on
# (2 stays the code of a user error, such as a file that does not exist).
EXIT_CODES = {"verified": 0, "modified": 3, "untrusted": 4, "invalid": 5, "missing": 6}


@dataclass(frozen=True)
class Verification:
    status: str  # "verified" | "modified" | "untrusted" | "invalid" | "missing" (see EXIT_CODES)
    signer: str | None
    content: str | None  # "unmodified" | "modified" | None when the manifest proves nothing
    claim: dict[str, Any] | None
    reason: str

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def summary(self) -> str:
        """One line for `trustgen verify`."""
        if self.status == "missing":
            return f"missing: no manifest ({self.reason})"
        if self.status == "invalid":
            return f"invalid: the manifest does not verify ({self.reason})"
        if self.status == "modified":
            return f"modified: content modified since {self.signer} signed it; the manifest does not cover this file"
        if self.status == "untrusted":
            return (f"untrusted: signed by {self.signer}, who does not chain to a trusted CA (trust theirs with "
                    "--trust ca.pem); content unmodified")
        return f"verified: signed by {self.signer} (trusted CA); content unmodified"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generation_claim(*, model_id: str, family: str, settings: Mapping[str, Any], seed: int | None,
                     watermark: WatermarkKey | None, scheme: str | None = None) -> dict[str, Any]:
    """The claim trustgen signs for one generation; of the watermark key only its id goes in."""
    if (watermark is None) != (scheme is None):
        raise TrustgenError("name the watermark scheme together with its key, or neither.")
    return {
        "model_id": model_id, "family": family, "settings": dict(settings), "seed": seed,
        "watermark": None if watermark is None else {"scheme": scheme, "key_id": watermark.key_id},
    }


def sidecar_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def sign(path: Path, claim: Mapping[str, Any], identity: SigningIdentity) -> Path:
    """Sign a finished file in place: embed C2PA into an image or a WAV, or write a text sidecar.
    Returns the file that now holds the manifest."""
    path = Path(path)
    if _media_type(_head(path)):
        return sign_image(path, path, claim, identity)
    return sign_text(path, claim, identity)


def verify(path: Path, trust_anchors: Sequence[bytes | str] | None = None) -> Verification:
    """Verify an image's or a WAV's C2PA manifest, or a text file's sidecar; see `verify_text`."""
    path = Path(path)
    if _media_type(_head(path)):
        return verify_image(path, trust_anchors)
    return verify_text(path, trust_anchors)


# -- text: signed sidecar manifests ---------------------------------------------------------

def sign_text(path: Path, claim: Mapping[str, Any], identity: SigningIdentity) -> Path:
    """Write `FILE.manifest.json` for the file at `path`; returns the sidecar's path."""
    path = Path(path)
    data = _read(path)
    body = {
        "format": FORMAT,
        "trustgen_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "content": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
        "claim": _plain_claim(claim),
        "signature_algorithm": identity.algorithm,
        "certificate_chain": identity.chain_pem.decode("ascii"),
    }
    signed = _canonical(body)
    if isinstance(identity.private_key, ed25519.Ed25519PrivateKey):
        signature = identity.private_key.sign(signed)
    else:
        signature = identity.private_key.sign(signed, ec.ECDSA(hashes.SHA256()))
    target = sidecar_path(path)
    atomic_write_bytes(target, _canonical({**body, "signature": base64.b64encode(signature).decode("ascii")}))
    return target


def verify_text(path: Path, trust_anchors: Sequence[bytes | str] | None = None) -> Verification:
    """Check the sidecar of the text file at `path`. `trust_anchors` are PEM CA certificates;
    None means the CA of the keystore at $TRUSTGEN_KEYSTORE (or the default keystore)."""
    path = Path(path)
    data = _read(path)
    manifest = sidecar_path(path)
    if not manifest.exists():
        return Verification("missing", None, None, None, f"{manifest.name} does not exist")
    raw = manifest.read_bytes()

    def invalid(reason: str) -> Verification:
        return Verification("invalid", None, None, None, reason)

    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return invalid(f"{manifest.name} is not valid JSON")
    expected = {"format", "trustgen_version", "created", "content", "claim", "signature_algorithm",
                "certificate_chain", "signature"}
    if not isinstance(doc, dict) or set(doc) != expected or doc["format"] != FORMAT:
        return invalid(f"{manifest.name} is not a {FORMAT} manifest")
    if _canonical(doc) != raw:
        return invalid(f"{manifest.name} was altered (it is no longer in its signed canonical form)")
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        certs = x509.load_pem_x509_certificates(str(doc["certificate_chain"]).encode("ascii"))
        signature = base64.b64decode(str(doc["signature"]), validate=True)
        content = doc["content"]
        recorded = (str(content["sha256"]), int(content["bytes"]))
        created = datetime.datetime.fromisoformat(str(doc["created"]))
        leaf = certs[0]
        in_validity = leaf.not_valid_before_utc <= created <= leaf.not_valid_after_utc
    except (ValueError, TypeError, KeyError):  # TypeError: a time without its UTC offset
        return invalid(f"{manifest.name} has a malformed field")
    if not _signature_ok(leaf, str(doc["signature_algorithm"]), signature, _canonical(body)):
        return invalid("the signature does not match the manifest")
    if not chain_is_linked(certs):
        return invalid("the certificate chain is broken")
    if not in_validity:
        return invalid("the signing certificate was not valid when the manifest was made")
    anchors = _anchors(trust_anchors)
    top = certs[-1]
    trusted = any(top == anchor or issued_by(top, anchor) for anchor in anchors)
    modified = (hashlib.sha256(data).hexdigest(), len(data)) != recorded
    return _verified("signature and certificate chain verify", trusted, certificate_name(leaf), modified,
                     doc["claim"])


def _signature_ok(leaf: x509.Certificate, algorithm: str, signature: bytes, message: bytes) -> bool:
    try:
        key = leaf.public_key()  # parsed lazily, so a damaged certificate fails here
        if algorithm == "Ed25519" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        elif algorithm == "ES256" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        return False
    return True


def _canonical(value: Any) -> bytes:
    """The one byte form of a JSON value that trustgen signs and writes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _plain_claim(claim: Mapping[str, Any]) -> dict[str, Any]:
    """The claim as plain JSON data; refuses bytes, objects and secret-looking field names, so a
    key cannot slip into a manifest that anyone can read."""
    def check(value: Any, where: str) -> None:
        if isinstance(value, Mapping):
            for name, item in value.items():
                if not isinstance(name, str) or _SECRET_NAME.search(name):
                    raise TrustgenError(f"the provenance claim may not hold a field named {name!r} "
                                        f"(at {where}); manifests are public.")
                check(item, f"{where}.{name}")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                check(item, f"{where}[{i}]")
        elif not (value is None or isinstance(value, str | int | float | bool)):
            raise TrustgenError(f"the provenance claim must be plain JSON data; {where} is a "
                                f"{type(value).__name__}.")

    check(claim, "claim")
    try:
        return json.loads(_canonical(claim))  # tuples become lists, as they will read back
    except ValueError:
        raise TrustgenError("the provenance claim holds a number JSON cannot store (NaN or infinity).") from None


# -- images and audio: embedded C2PA manifests ----------------------------------------------

def sign_image(source: Path | bytes, dest: Path, claim: Mapping[str, Any], identity: SigningIdentity) -> Path:
    """Write the PNG, JPEG or WAV `source` (a path or its bytes) to `dest` with a C2PA manifest
    embedded (in a WAV, as a RIFF chunk of its own); `dest` may be the source file itself.
    Returns `dest`."""
    dest = Path(dest)
    data = _read(Path(source)) if isinstance(source, str | Path) else bytes(source)
    mime = _media_type(data)
    if mime is None:
        raise TrustgenError(f"{dest.name}: only PNG and JPEG images and WAV audio can carry a C2PA manifest.")
    manifest = {
        "claim_generator_info": [{"name": "trustgen", "version": __version__}],
        "title": dest.name,
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": [{
                "action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": {"name": "trustgen", "version": __version__}}]}},
            {"label": ASSERTION, "data": {"trustgen_version": __version__, "claim": _plain_claim(claim)}},
        ],
    }
    # A thumbnail of a 28x28 picture would be larger than the picture and says nothing new
    # (and a WAV has no picture to make one of).
    settings = {**_OFFLINE, "builder": {"thumbnail": {"enabled": False}}}
    # No timestamp authority (ta_url=None) keeps signing offline; the price is that verifiers have
    # no trusted signing time, so the leaf certificate must still be valid when a file is checked.
    info = c2pa.C2paSignerInfo(_C2PA_ALGORITHMS[identity.algorithm], identity.chain_pem,
                               identity.private_key_pem(), None)
    out = io.BytesIO()
    try:
        with c2pa.Context.from_dict(settings) as context, c2pa.Signer.from_info(info) as signer, \
                c2pa.Builder(manifest, context=context) as builder:
            builder.sign(signer, mime, io.BytesIO(data), out)
    except c2pa.C2paError as exc:
        raise TrustgenError(f"could not sign {dest.name} with C2PA ({exc}).") from None
    atomic_write_bytes(dest, out.getvalue())
    return dest


def verify_image(path: Path, trust_anchors: Sequence[bytes | str] | None = None) -> Verification:
    """Check the C2PA manifest embedded in a PNG, JPEG or WAV; see `verify_text` for `trust_anchors`."""
    path = Path(path)
    data = _read(path)
    mime = _media_type(data)
    if mime is None:
        raise TrustgenError(f"{path} is not a PNG or JPEG image nor a WAV file.")
    anchors = _anchors(trust_anchors)
    settings: dict[str, Any] = dict(_OFFLINE)
    if anchors:  # replaces c2pa's own list; without anchors every signer reads back untrusted
        pems = b"".join(anchor.public_bytes(Encoding.PEM) for anchor in anchors)
        settings["trust"] = {"trust_anchors": pems.decode("ascii")}
    try:
        with c2pa.Context.from_dict(settings) as context:
            reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, context)
            if reader is None:
                return Verification("missing", None, None, None,
                                    "the file has no C2PA manifest (stripped, or never signed)")
            with reader:
                manifest = reader.get_active_manifest() or {}
                results = (reader.get_validation_results() or {}).get("activeManifest", {})
    except c2pa.C2paError as exc:
        return Verification("invalid", None, None, None, f"the C2PA manifest is unreadable ({exc})")
    failures = {item["code"] for item in results.get("failure", [])}
    passed = {item["code"] for item in results.get("success", [])}
    broken = failures - _CONTENT_MISMATCHES - {"signingCredential.untrusted"}
    if broken or "claimSignature.validated" not in passed:
        return Verification("invalid", None, None, None,
                            "C2PA validation failed: " + ", ".join(sorted(broken) or ["claimSignature.missing"]))
    info = manifest.get("signature_info", {})
    claim = next((a["data"].get("claim") for a in manifest.get("assertions", []) if a.get("label") == ASSERTION),
                 None)
    return _verified("C2PA signature verifies", "signingCredential.trusted" in passed,
                     info.get("common_name") or info.get("issuer"), bool(failures & _CONTENT_MISMATCHES), claim)


# -- shared helpers -------------------------------------------------------------------------

def _verified(checked: str, trusted: bool, signer: str | None, modified: bool,
              claim: dict[str, Any] | None) -> Verification:
    """The result for a manifest whose signature verifies, for text and images alike: verified
    only when the content is unmodified and the signer trusted. Modified content wins over an
    untrusted signer (either fails); no trust word is ever said of modified content."""
    if modified:
        return Verification("modified", signer, "modified", claim,
                            f"{checked}, but the content changed after signing (or the manifest is another file's)")
    if not trusted:
        return Verification("untrusted", signer, "unmodified", claim,
                            f"{checked}, but the signer does not chain to a trusted CA")
    return Verification("verified", signer, "unmodified", claim, f"{checked}; the signer chains to a trusted CA")


def _anchors(trust_anchors: Sequence[bytes | str] | None) -> list[x509.Certificate]:
    pems = Keystore().trust_anchors() if trust_anchors is None else list(trust_anchors)
    try:
        return [cert for pem in pems for cert in x509.load_pem_x509_certificates(_pem(pem))]
    except ValueError:
        raise TrustgenError("a trust anchor is not a PEM certificate.") from None


def _pem(value: bytes | str) -> bytes:
    return value.encode("ascii") if isinstance(value, str) else bytes(value)


def is_image(path: Path) -> bool:
    """Whether a file is a PNG or JPEG (by its first bytes, not its name)."""
    return _image_type(_head(Path(path))) is not None


def is_wav(path: Path) -> bool:
    """Whether a file is a WAV (RIFF/WAVE, by its first bytes, not its name)."""
    return _media_type(_head(Path(path))) == WAV_TYPE


def _image_type(head: bytes) -> str | None:
    return next((mime for magic, mime in IMAGE_TYPES.items() if head.startswith(magic)), None)


def _media_type(head: bytes) -> str | None:
    """The MIME type of a file that carries its C2PA manifest inside (image or WAV), else None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return WAV_TYPE
    return _image_type(head)


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(12)
    except FileNotFoundError:
        raise TrustgenError(f"{path} does not exist.") from None


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TrustgenError(f"{path} does not exist.") from None
