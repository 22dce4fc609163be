"""Once a keystore exists, no key in it is ever made or replaced implicitly (issue 22, point 2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_cli import assert_clear_error, trustgen
from trustgen.errors import TrustgenError
from trustgen.safety.keys import Keystore
from trustgen.safety.provenance import generation_claim, sign_text
from trustgen.safety.trust import Keys, verify
from trustgen.safety.watermark.text import key_id

TEXT = "To be, or not to be, that is the question.\n"


@pytest.fixture
def store(tmp_path: Path) -> Keystore:
    store = Keystore(tmp_path / "keys")
    store.init(signer_name="trustgen test signer")
    return store


def _files(store: Keystore) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in store.path.iterdir() if p.is_file()}


def _signed(store: Keystore, folder: Path) -> Path:
    target = folder / "poem.txt"
    target.write_text(TEXT, encoding="utf-8")
    claim = generation_claim(model_id="0" * 64, family="gpt", settings={}, seed=1,
                             watermark=store.watermark_key(), scheme="kgw")
    sign_text(target, claim, store.signing_identity())
    return target


def test_a_missing_signing_key_is_an_error_never_a_new_ca(store: Keystore) -> None:
    (store.path / "signing-key.pem").unlink()
    before = _files(store)
    for attempt in (lambda: Keys(store.path).store(), lambda: Keys(store.path).signing_identity(), store.init):
        with pytest.raises(TrustgenError) as error:
            attempt()
        message = str(error.value)
        assert str(store.path / "signing-key.pem") in message
        assert f"trustgen keys init --new-signer --keystore {store.path}" in message
    assert _files(store) == before  # ca.pem untouched, nothing made


def test_a_missing_watermark_key_is_an_error_never_a_new_key(store: Keystore) -> None:
    (store.path / f"watermark-{store.watermark_key().key_id}.key").unlink()
    before = _files(store)
    with pytest.raises(TrustgenError, match=r"watermark-\*\.key.*trustgen keys init --keystore"):
        Keys(store.path).watermark_key()
    with pytest.raises(TrustgenError, match="watermark"):
        Keys(store.path).store()
    assert _files(store) == before


def test_a_corrupt_signing_chain_names_the_file_and_the_remedy(store: Keystore) -> None:
    (store.path / "ca.pem").write_bytes(b"not a certificate")
    with pytest.raises(TrustgenError, match=r"ca\.pem is not the top.*--new-signer"):
        Keys(store.path).store()


def test_a_keystore_open_to_others_is_refused_with_the_chmod(store: Keystore) -> None:
    store.path.chmod(0o755)
    for attempt in (lambda: Keys(store.path).store(), store.watermark_keys, store.signing_identity, store.init):
        with pytest.raises(TrustgenError, match=f"run: chmod 700 {store.path}$"):
            attempt()
    assert store.path.stat().st_mode & 0o777 == 0o755  # refused, not silently repaired


def test_a_new_keystore_is_still_made_on_first_use(tmp_path: Path) -> None:
    keys = Keys(tmp_path / "fresh", announce=None)
    assert keys.watermark_key().key_id and keys.signing_identity().name
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o700


def test_new_signer_retires_the_old_ca_and_explains_old_signatures(store: Keystore, tmp_path: Path) -> None:
    old = _signed(store, tmp_path)
    old_ca = (store.path / "ca.pem").read_bytes()
    (store.path / "signing-key.pem").unlink()  # lost
    store.init(new_signer=True)
    retired = list(store.path.glob("ca-retired-*.pem"))
    assert len(retired) == 1 and retired[0].read_bytes() == old_ca
    assert (store.path / "ca.pem").read_bytes() != old_ca
    report = verify(old, store.path)
    assert report["status"] == "untrusted" and report["retired_ca"] == str(retired[0])
    assert "retired CA" in report["summary"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert verify(_signed(store, fresh), store.path)["status"] == "verified"


@pytest.mark.slow
def test_keys_init_keeps_an_intact_store_and_asks_for_new_signer(store: Keystore) -> None:
    before = _files(store)
    result = trustgen("keys", "init", "--keystore", str(store.path))
    assert result.returncode == 0, result.stderr
    assert _files(store) == before
    (store.path / "signing-key.pem").unlink()
    assert_clear_error(trustgen("keys", "init", "--keystore", str(store.path)), "signing-key.pem", "--new-signer")
    result = trustgen("keys", "init", "--new-signer", "--keystore", str(store.path))
    assert result.returncode == 0, result.stderr
    assert "ca-retired-" in result.stdout and len(list(store.path.glob("ca-retired-*.pem"))) == 1


def test_verify_names_a_watermark_key_the_store_lacks(store: Keystore, tmp_path: Path) -> None:
    signed = _signed(store, tmp_path)
    gone = store.watermark_key().key_id
    (store.path / f"watermark-{gone}.key").unlink()
    other = os.urandom(32)
    (store.path / f"watermark-{key_id(other)}.key").write_bytes(other)
    (store.path / f"watermark-{key_id(other)}.key").chmod(0o600)
    mark = verify(signed, store.path)["watermark"]
    assert not mark["checked"] and gone in mark["reason"] and f"watermark-{gone}.key" in mark["reason"]


def test_the_server_refuses_a_keystore_with_a_missing_key(store: Keystore, tmp_path: Path) -> None:
    from trustgen.serve.app import create_app

    (store.path / "signing-key.pem").unlink()
    with pytest.raises(TrustgenError, match=r"signing-key\.pem"):
        create_app([tmp_path / "no-run"], keystore=store.path)
