"""Keys and signed provenance: a local CA + leaf fit for C2PA, text sidecars and C2PA images that
verify offline as verified, untrusted, invalid, modified or missing, and no secret in any output."""

import base64
import datetime
import io
import json
import os
import stat
import struct
from pathlib import Path

import c2pa
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

from trustgen.errors import TrustgenError
from trustgen.safety import provenance
from trustgen.safety.keys import Keystore
from trustgen.safety.provenance import (
    TRAINED_ALGORITHMIC_MEDIA,
    generation_claim,
    sidecar_path,
    sign_image,
    sign_text,
    verify,
    verify_image,
    verify_text,
)
from trustgen.safety.watermark.text import key_id

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Keystore:
    keystore = Keystore(tmp_path_factory.mktemp("ours") / "keys")
    keystore.init(signer_name="trustgen test signer")
    return keystore


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Keystore:
    """Someone else's keystore: same software, same signer name, a different CA."""
    keystore = Keystore(tmp_path_factory.mktemp("theirs") / "keys")
    keystore.init(signer_name="trustgen test signer")
    return keystore


@pytest.fixture(scope="module")
def claim(store: Keystore) -> dict:
    return generation_claim(model_id="ab" * 32, family="gpt", seed=7, watermark=store.watermark_key(),
                            scheme="kgw", settings={"temperature": 0.8, "top_k": 40, "stop": ("\n\n",)})


def as_json(claim: dict) -> dict:
    return json.loads(json.dumps(claim))  # tuples read back as lists


def secrets_of(store: Keystore) -> list[bytes]:
    """Every form in which a keystore secret could leak into an output."""
    key = store.watermark_key().secret
    identity = store.signing_identity()
    raw = identity.private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                             serialization.NoEncryption())
    pem_body = b"".join(identity.private_key_pem().splitlines()[1:-1])
    return [form for secret in (key, raw)
            for form in (secret, secret.hex().encode(), base64.b64encode(secret))] + [pem_body]


def assert_no_secret(store: Keystore, *outputs: bytes | str) -> None:
    for output in outputs:
        data = output.encode() if isinstance(output, str) else output
        for secret in secrets_of(store):
            assert secret not in data


# -- keys -----------------------------------------------------------------------------------

def test_init_makes_a_c2pa_ready_chain_with_owner_only_secrets(store: Keystore) -> None:
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o700
    for secret in [store.path / "signing-key.pem", *store.path.glob("watermark-*.key")]:
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    leaf, ca = x509.load_pem_x509_certificates((store.path / "signing-chain.pem").read_bytes())
    assert (store.path / "ca.pem").read_bytes() == ca.public_bytes(serialization.Encoding.PEM)
    assert isinstance(leaf.public_key(), ed25519.Ed25519PublicKey)
    leaf.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)

    def ext(cert: x509.Certificate, kind: type) -> x509.Extension:
        return cert.extensions.get_extension_for_class(kind)

    assert ext(ca, x509.BasicConstraints).value.ca and ext(ca, x509.BasicConstraints).critical
    assert ext(ca, x509.KeyUsage).value.key_cert_sign
    assert not ext(leaf, x509.BasicConstraints).value.ca
    assert ext(leaf, x509.KeyUsage).value.digital_signature
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in ext(leaf, x509.ExtendedKeyUsage).value
    assert (ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier
            == ext(ca, x509.SubjectKeyIdentifier).value.key_identifier)
    assert ext(leaf, x509.SubjectKeyIdentifier).value.key_identifier
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "trustgen test signer"
    assert store.signing_identity().name == "trustgen test signer"


def test_init_keeps_existing_keys_and_upgrades_an_old_keystore(tmp_path: Path) -> None:
    old = Keystore(tmp_path / "keys")
    old.path.mkdir(mode=0o700)
    secret = os.urandom(32)
    key_file = old.path / f"watermark-{key_id(secret)}.key"
    key_file.write_bytes(secret)
    key_file.chmod(0o600)
    assert old.init().key_id == key_id(secret)  # a keystore from before signing gets an identity
    chain = (old.path / "signing-chain.pem").read_bytes()
    assert old.init().key_id == key_id(secret) and (old.path / "signing-chain.pem").read_bytes() == chain


def test_the_default_keystore_follows_the_environment_and_anchors_verification(tmp_path: Path) -> None:
    store = Keystore()  # $TRUSTGEN_KEYSTORE, set by conftest
    assert store.path == Path(os.environ["TRUSTGEN_KEYSTORE"])
    store.init()
    target = tmp_path / "poem.txt"
    target.write_text(TEXT, encoding="utf-8")
    sign_text(target, {"model_id": "0" * 64}, store.signing_identity())
    assert verify(target).status == "verified"  # no anchors given: the keystore's own CA


def test_secrets_never_show_in_reprs(store: Keystore) -> None:
    identity, key = store.signing_identity(), store.watermark_key()
    assert repr(identity) == "SigningIdentity(name='trustgen test signer', algorithm='Ed25519')"
    assert repr(key) == f"WatermarkKey(key_id={key.key_id!r})"
    assert_no_secret(store, repr(identity), str(identity), repr(key), repr([identity, key]))


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    store = Keystore(tmp_path / "keys")
    store.init()
    (store.path / "signing-key.pem").chmod(0o644)
    with pytest.raises(TrustgenError, match="chmod 600"):
        store.signing_identity()


def test_signing_needs_a_keystore(tmp_path: Path) -> None:
    with pytest.raises(TrustgenError, match="trustgen keys init"):
        Keystore(tmp_path / "none").signing_identity()


# -- bring your own key ---------------------------------------------------------------------

def ec_chain(tmp_path: Path, *, leaf_only: bool = False, c2pa_ready: bool = True) -> tuple[Path, Path, Path]:
    """An ECDSA P-256 CA and leaf such as a real CA would issue: (key.pem, chain.pem, ca.pem)."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
             is_ca: bool) -> x509.Certificate:
        name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # noqa: E731
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=not is_ca, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=is_ca, crl_sign=is_ca,
                       encipher_only=False, decipher_only=False), critical=True))
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        if not is_ca and c2pa_ready:
            builder = (builder
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                       .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                      critical=False))
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("Example Media CA", ca_key, "Example Media CA", ca_key, True)
    leaf = cert("Example Newsroom", leaf_key, "Example Media CA", ca_key, False)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    paths = tmp_path / "key.pem", tmp_path / "chain.pem", tmp_path / "their-ca.pem"
    paths[0].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    paths[1].write_bytes(pem(leaf) if leaf_only else pem(leaf) + pem(ca))
    paths[2].write_bytes(pem(ca))
    return paths


def test_bring_your_own_key_and_chain(tmp_path: Path, claim: dict) -> None:
    key_pem, chain_pem, ca_pem = ec_chain(tmp_path)
    store = Keystore(tmp_path / "keys")
    identity = store.import_signing_identity(key_pem, chain_pem)
    assert (identity.name, identity.algorithm) == ("Example Newsroom", "ES256")
    assert stat.S_IMODE((store.path / "signing-key.pem").stat().st_mode) == 0o600
    assert store.trust_anchors() == [ca_pem.read_bytes()]
    loaded = store.signing_identity()
    target = tmp_path / "story.txt"
    target.write_text(TEXT, encoding="utf-8")
    sign_text(target, claim, loaded)
    picture = sign_image(png(28, "L"), tmp_path / "p.png", claim, loaded)
    for path in (target, picture):
        result = verify(path, [ca_pem.read_bytes()])
        assert (result.status, result.signer, result.content) == ("verified", "Example Newsroom", "unmodified")


def test_a_key_that_does_not_match_the_chain_is_a_clear_error(tmp_path: Path, store: Keystore) -> None:
    _, chain_pem, _ = ec_chain(tmp_path)
    with pytest.raises(TrustgenError, match="does not match the first certificate"):
        Keystore(tmp_path / "keys").import_signing_identity(store.path / "signing-key.pem", chain_pem)
    assert not (tmp_path / "keys" / "signing-key.pem").exists()


def test_a_chain_c2pa_would_refuse_or_an_encrypted_key_is_refused(tmp_path: Path) -> None:
    key_pem, chain_pem, _ = ec_chain(tmp_path, leaf_only=True)
    with pytest.raises(TrustgenError, match="self-signed"):
        Keystore(tmp_path / "keys").import_signing_identity(key_pem, chain_pem)
    key_pem, chain_pem, _ = ec_chain(tmp_path, c2pa_ready=False)
    with pytest.raises(TrustgenError, match="C2PA needs"):
        Keystore(tmp_path / "keys").import_signing_identity(key_pem, chain_pem)
    key = serialization.load_pem_private_key(key_pem.read_bytes(), None)
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(b"hunter2")))
    with pytest.raises(TrustgenError, match="encrypted"):
        Keystore(tmp_path / "keys").import_signing_identity(key_pem, chain_pem)


# -- text sidecars --------------------------------------------------------------------------

@pytest.fixture
def signed_text(tmp_path: Path, store: Keystore, claim: dict) -> Path:
    target = tmp_path / "sample.txt"
    target.write_text(TEXT, encoding="utf-8")
    assert sign_text(target, claim, store.signing_identity()) == sidecar_path(target)
    return target


def test_text_verifies_as_trusted_with_its_claim(signed_text: Path, store: Keystore, claim: dict) -> None:
    result = verify_text(signed_text, store.trust_anchors())
    assert (result.status, result.signer, result.content) == ("verified", "trustgen test signer", "unmodified")
    assert result.claim == as_json(claim)
    assert result.summary() == "verified: signed by trustgen test signer (trusted CA); content unmodified"
    assert result.exit_code == 0
    json.dumps(result.to_dict())
    manifest = json.loads(sidecar_path(signed_text).read_text(encoding="utf-8"))
    assert manifest["content"]["bytes"] == len(TEXT.encode())
    assert manifest["claim"]["watermark"] == {"scheme": "kgw", "key_id": store.watermark_key().key_id}


def test_text_without_a_trusted_anchor_is_only_valid(signed_text: Path, stranger: Keystore) -> None:
    for anchors in ([], stranger.trust_anchors()):
        result = verify_text(signed_text, anchors)
        assert (result.status, result.content) == ("untrusted", "unmodified")
        assert "does not chain to a trusted CA" in result.summary() and result.exit_code == 4


def test_a_strangers_manifest_is_not_trusted(tmp_path: Path, store: Keystore, stranger: Keystore,
                                             claim: dict) -> None:
    target = tmp_path / "forged.txt"
    target.write_text(TEXT, encoding="utf-8")
    sign_text(target, claim, stranger.signing_identity())
    assert verify_text(target, store.trust_anchors()).status == "untrusted"
    assert verify_text(target, stranger.trust_anchors()).status == "verified"


def test_a_flipped_byte_anywhere_in_the_manifest_makes_it_invalid(signed_text: Path, store: Keystore) -> None:
    manifest = sidecar_path(signed_text)
    original = manifest.read_bytes()
    for i in range(0, len(original), 3):  # every third byte: each field, the chain and the signature
        flipped = bytearray(original)
        flipped[i] ^= 0x01
        manifest.write_bytes(bytes(flipped))
        result = verify_text(signed_text, store.trust_anchors())
        assert (result.status, result.content, result.claim) == ("invalid", None, None), i


def test_an_edited_text_keeps_a_valid_signature_but_reads_modified(signed_text: Path, store: Keystore) -> None:
    signed_text.write_text(TEXT.replace("soft", "hard"), encoding="utf-8")
    result = verify_text(signed_text, store.trust_anchors())
    # Fails closed: the status is "modified" (exit 3), and no trust word goes with modified content.
    assert (result.status, result.content, result.exit_code) == ("modified", "modified", 3)
    assert "trusted" not in result.summary() and "trusted" not in result.reason


def test_a_text_without_its_sidecar_reads_missing(signed_text: Path, store: Keystore) -> None:
    sidecar_path(signed_text).unlink()
    result = verify(signed_text, store.trust_anchors())
    assert (result.status, result.signer, result.content) == ("missing", None, None)
    assert result.summary().startswith("missing: no manifest") and result.exit_code == 6


def test_no_secret_reaches_a_manifest(signed_text: Path, store: Keystore, claim: dict, tmp_path: Path) -> None:
    picture = sign_image(png(28, "L"), tmp_path / "p.png", claim, store.signing_identity())
    assert_no_secret(store, sidecar_path(signed_text).read_bytes(), picture.read_bytes(),
                     repr(verify(picture, store.trust_anchors())), repr(verify(signed_text, store.trust_anchors())))


@pytest.mark.parametrize("bad", [
    {"secret": "00"}, {"settings": {"private_key": "x"}}, {"watermark": {"key": "ab"}}, {"key": b"raw"},
])
def test_a_claim_that_carries_a_secret_is_refused(signed_text: Path, store: Keystore, bad: dict) -> None:
    with pytest.raises(TrustgenError, match="claim"):
        sign_text(signed_text, bad, store.signing_identity())


def test_a_claim_holding_a_key_object_is_refused(signed_text: Path, store: Keystore) -> None:
    with pytest.raises(TrustgenError, match="WatermarkKey"):
        sign_text(signed_text, {"watermark": [store.watermark_key()]}, store.signing_identity())
    with pytest.raises(TrustgenError, match="together"):
        generation_claim(model_id="0", family="gpt", settings={}, seed=None, watermark=store.watermark_key())


# -- images ---------------------------------------------------------------------------------

def png(size: int, mode: str, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(size)
    shape = (size, size) if mode == "L" else (size, size, 3)
    buffer = io.BytesIO()
    Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode).save(buffer, fmt)
    return buffer.getvalue()


def png_chunks(data: bytes) -> dict[bytes, tuple[int, int]]:
    """Chunk type -> (offset of its data, length), for the first chunk of each type."""
    chunks, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.setdefault(data[pos + 4:pos + 8], (pos + 8, length))
        pos += 12 + length
    return chunks


@pytest.mark.parametrize(("size", "mode", "fmt", "suffix"), [
    (28, "L", "PNG", ".png"), (64, "RGB", "PNG", ".png"), (64, "RGB", "JPEG", ".jpg"),
])
def test_images_carry_a_trusted_c2pa_manifest(tmp_path: Path, store: Keystore, claim: dict, size: int,
                                              mode: str, fmt: str, suffix: str) -> None:
    picture = sign_image(png(size, mode, fmt), tmp_path / f"sample{suffix}", claim, store.signing_identity())
    result = verify_image(picture, store.trust_anchors())
    assert (result.status, result.signer, result.content) == ("verified", "trustgen test signer", "unmodified")
    assert result.claim == as_json(claim)
    with Image.open(picture) as image:
        assert (image.size, image.mode) == ((size, size), mode)
    with c2pa.Reader(picture) as reader:  # any C2PA reader sees a created-by-a-trained-model action
        actions = next(a for a in reader.get_active_manifest()["assertions"] if a["label"] == "c2pa.actions.v2")
    assert actions["data"]["actions"][0]["action"] == "c2pa.created"
    assert actions["data"]["actions"][0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA


def test_an_image_signed_by_a_stranger_is_only_valid(tmp_path: Path, store: Keystore, stranger: Keystore,
                                                      claim: dict) -> None:
    picture = sign_image(png(28, "L"), tmp_path / "p.png", claim, stranger.signing_identity())
    assert verify_image(picture, store.trust_anchors()).status == "untrusted"
    assert verify_image(picture, []).status == "untrusted"
    assert verify_image(picture, stranger.trust_anchors()).status == "verified"


def test_a_flipped_pixel_byte_reads_modified(tmp_path: Path, store: Keystore, claim: dict) -> None:
    picture = sign_image(png(64, "RGB"), tmp_path / "p.png", claim, store.signing_identity())
    data = bytearray(picture.read_bytes())
    start, length = png_chunks(bytes(data))[b"IDAT"]
    data[start + length // 2] ^= 0x01
    picture.write_bytes(bytes(data))
    result = verify_image(picture, store.trust_anchors())
    # The manifest itself is intact and still names its signer; the pixels no longer match it,
    # so the verdict fails closed: "modified", never a trust word.
    assert (result.status, result.content) == ("modified", "modified")


def test_a_flipped_manifest_byte_reads_invalid(tmp_path: Path, store: Keystore, claim: dict) -> None:
    picture = sign_image(png(28, "L"), tmp_path / "p.png", claim, store.signing_identity())
    original = picture.read_bytes()
    start, length = png_chunks(original)[b"caBX"]
    for offset in (16, length // 3, length // 2, length - 8):
        data = bytearray(original)
        data[start + offset] ^= 0x01
        picture.write_bytes(bytes(data))
        result = verify_image(picture, store.trust_anchors())
        assert (result.status, result.content, result.claim) == ("invalid", None, None), offset


def test_a_stripped_image_reads_missing(tmp_path: Path, store: Keystore, claim: dict) -> None:
    picture = sign_image(png(28, "L"), tmp_path / "p.png", claim, store.signing_identity())
    with Image.open(picture) as image:
        pixels = np.asarray(image)
    Image.fromarray(pixels).save(picture)  # what a re-save in any editor does
    result = verify(picture, store.trust_anchors())
    assert (result.status, result.signer, result.content) == ("missing", None, None)


def test_sign_in_place_and_refuse_what_c2pa_cannot_carry(tmp_path: Path, store: Keystore, claim: dict) -> None:
    picture = tmp_path / "p.png"
    picture.write_bytes(png(28, "L"))
    assert provenance.sign(picture, claim, store.signing_identity()) == picture
    assert verify(picture, store.trust_anchors()).status == "verified"
    with pytest.raises(TrustgenError, match="PNG and JPEG"):
        sign_image(b"GIF89a....", tmp_path / "p.gif", claim, store.signing_identity())



def test_a_wav_carries_c2pa_and_one_changed_sample_reads_modified(tmp_path: Path, store: Keystore,
                                                                 claim: dict) -> None:
    from trustgen.sample.music import read_wav, wav_bytes

    audio = (0.3 * np.sin(np.arange(4410) * 2 * np.pi * 440 / 44_100)).astype(np.float32)
    path = tmp_path / "tone.wav"
    path.write_bytes(wav_bytes(audio))
    assert provenance.sign(path, claim, store.signing_identity()) == path  # embedded, no sidecar
    assert not sidecar_path(path).exists()
    result = verify(path, store.trust_anchors())
    assert (result.status, result.content, result.claim) == ("verified", "unmodified", as_json(claim))
    read, rate = read_wav(path.read_bytes())  # the C2PA chunk does not disturb a WAV reader
    assert rate == 44_100 and np.abs(read - audio).max() < 1e-4
    data = bytearray(path.read_bytes())
    data[data.find(b"data") + 8 + 1000] ^= 0x01  # one sample, its lowest bit
    path.write_bytes(bytes(data))
    assert verify(path, store.trust_anchors()).status == "modified"

# -- tampering: each case fails closed, with its own status and exit code ---------------------

def test_one_edited_character_reads_modified(signed_text: Path, store: Keystore) -> None:
    signed_text.write_text(TEXT.replace("But", "Bat"), encoding="utf-8")
    result = verify_text(signed_text, store.trust_anchors())
    assert (result.status, result.content, result.exit_code) == ("modified", "modified", 3)


def test_a_manifest_from_another_file_reads_modified(signed_text: Path, store: Keystore, claim: dict,
                                                     tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text(TEXT + "JULIET:\nAy me!\n", encoding="utf-8")
    sign_text(other, claim, store.signing_identity())
    sidecar_path(signed_text).write_bytes(sidecar_path(other).read_bytes())  # swapped manifests
    result = verify_text(signed_text, store.trust_anchors())
    assert (result.status, result.content, result.exit_code) == ("modified", "modified", 3)
    assert "trusted" not in result.summary()


def test_an_edited_claim_reads_invalid(signed_text: Path, store: Keystore) -> None:
    manifest = sidecar_path(signed_text)
    doc = json.loads(manifest.read_text(encoding="utf-8"))
    doc["claim"]["seed"] = 8
    manifest.write_bytes(provenance._canonical(doc))  # still canonical: only the signature catches it
    result = verify_text(signed_text, store.trust_anchors())
    assert (result.status, result.signer, result.content, result.claim) == ("invalid", None, None, None)
    assert result.reason == "the signature does not match the manifest" and result.exit_code == 5


def test_a_reserialised_manifest_reads_invalid(signed_text: Path, store: Keystore) -> None:
    """The same content in another JSON form (indented, keys reversed) is refused: the signed
    bytes are the canonical form, and accepting others would let JSON parsers disagree (duplicate
    keys, number spellings) about what was signed."""
    manifest = sidecar_path(signed_text)
    doc = json.loads(manifest.read_text(encoding="utf-8"))
    for form in (json.dumps(doc, indent=2), json.dumps(dict(reversed(doc.items()))), manifest.read_text() + "\n"):
        manifest.write_text(form, encoding="utf-8")
        result = verify_text(signed_text, store.trust_anchors())
        assert (result.status, result.content, result.exit_code) == ("invalid", None, 5)
        assert "canonical form" in result.reason


def test_a_truncated_manifest_reads_invalid(signed_text: Path, store: Keystore) -> None:
    manifest = sidecar_path(signed_text)
    original = manifest.read_bytes()
    for length in (0, 1, len(original) // 2, len(original) - 1):
        manifest.write_bytes(original[:length])
        result = verify_text(signed_text, store.trust_anchors())
        assert (result.status, result.content, result.exit_code) == ("invalid", None, 5), length


def with_one_pixel_changed(signed: bytes) -> bytes:
    """The signed PNG with one pixel changed and everything else (its C2PA chunk too) kept: the
    image data chunks are replaced by those of the edited pixels, as an editor that keeps
    metadata would write them."""
    with Image.open(io.BytesIO(signed)) as image:
        pixels = np.array(image)
    pixels[3, 5] = 255 - pixels[3, 5]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")

    def chunks(data: bytes) -> list[bytes]:
        found, pos = [], 8
        while pos < len(data):
            (length,) = struct.unpack(">I", data[pos:pos + 4])
            found.append(data[pos:pos + 12 + length])
            pos += 12 + length
        return found

    idat = b"".join(c for c in chunks(buffer.getvalue()) if c[4:8] == b"IDAT")
    out, placed = [signed[:8]], False
    for chunk in chunks(signed):
        if chunk[4:8] != b"IDAT":
            out.append(chunk)
        elif not placed:
            out.append(idat)
            placed = True
    return b"".join(out)


def test_a_one_pixel_edit_reads_modified_as_the_c2pa_reader_says(tmp_path: Path, store: Keystore,
                                                                  claim: dict) -> None:
    picture = sign_image(png(28, "L"), tmp_path / "p.png", claim, store.signing_identity())
    before = np.asarray(Image.open(picture))
    picture.write_bytes(with_one_pixel_changed(picture.read_bytes()))
    after = np.asarray(Image.open(picture))
    assert (before != after).sum() == 1 and b"caBX" in picture.read_bytes()  # one pixel; the manifest kept
    with c2pa.Reader(picture) as reader:  # the C2PA reader's own verdict
        assert reader.get_validation_state() == "Invalid"
        codes = {item["code"] for item in reader.get_validation_results()["activeManifest"]["failure"]}
    assert "assertion.dataHash.mismatch" in codes
    result = verify_image(picture, store.trust_anchors())
    assert (result.status, result.content, result.exit_code) == ("modified", "modified", 3)
    assert "trusted" not in result.summary()


def test_only_verified_exits_zero() -> None:
    assert provenance.EXIT_CODES["verified"] == 0
    codes = [code for status, code in provenance.EXIT_CODES.items() if status != "verified"]
    assert len(set(codes)) == len(codes) == 4 and 0 not in codes and 2 not in codes  # 2: a user error
