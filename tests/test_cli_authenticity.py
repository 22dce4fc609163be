"""Signed, watermarked artifacts through the CLI: generate --out signs, verify and detect find
them (with and without the run), edits and stripped manifests are still recognised, keys never leak."""

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.test_cli import assert_clear_error, trustgen
from trustgen.safety.watermark.text import SCHEMES


def secrets_of(keystore: Path) -> list[str]:
    """Every secret in the keystore, in the forms a leak could take."""
    found = []
    for path in keystore.glob("*.key"):
        found.append(path.read_bytes().hex())
    pem = (keystore / "signing-key.pem").read_text()
    found.append("".join(pem.strip().splitlines()[1:-1]))
    return found


@pytest.mark.slow
def test_text_is_signed_verified_and_still_recognised_after_an_edit(run: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    out = tmp_path / "romeo.txt"
    made = trustgen("generate", str(run), "--prompt", "All:", "--max-tokens", "200", "--seed", "4",
                    "--keystore", str(keys), "--out", str(out))
    assert made.returncode == 0, made.stderr
    manifest = out.with_name("romeo.txt.manifest.json")
    assert manifest.is_file() and "created keys" in made.stderr
    checked = trustgen("verify", str(out), "--keystore", str(keys), "--json")
    assert checked.returncode == 0, checked.stderr
    report = json.loads(checked.stdout)
    assert report["status"] == "trusted" and report["content"] == "unmodified"
    assert report["watermark"]["verdict"] == "watermarked"
    assert report["claim"]["watermark"]["scheme"] == "kgw" and report["claim"]["seed"] == 4
    line = trustgen("verify", str(out), "--keystore", str(keys)).stdout
    assert "trusted" in line and "unmodified" in line and "watermark present" in line

    text = out.read_text()
    # An edit: ten characters become a word in curly quotes, characters the char tokenizer never
    # saw (they are read around, not refused). The manifest no longer matches.
    out.write_text(text[:60] + "\u201cZounds\u201d" + text[70:])
    edited = json.loads(trustgen("verify", str(out), "--keystore", str(keys), "--json").stdout)
    assert edited["status"] == "trusted" and edited["content"] == "modified"
    assert edited["watermark"]["verdict"] == "watermarked"
    manifest.unlink()  # stripped: no manifest, but the watermark still says generated
    stripped = json.loads(trustgen("verify", str(out), "--keystore", str(keys), "--json").stdout)
    assert stripped["status"] == "missing" and stripped["watermark"]["verdict"] == "watermarked"
    # detect needs no --run: the keystore remembers the tokenizer it watermarked with.
    found = json.loads(trustgen("detect", str(out), "--keystore", str(keys), "--json").stdout)
    assert found["verdict"] == "watermarked" and found["candidates_tried"] == len(SCHEMES)
    leaked = made.stdout + made.stderr + checked.stdout + manifest.parent.joinpath("romeo.txt").read_text()
    assert not any(secret in leaked for secret in secrets_of(keys))


@pytest.mark.slow
def test_a_flipped_byte_in_the_manifest_is_invalid_and_another_ca_is_untrusted(run: Path, tmp_path: Path) -> None:
    keys, other = tmp_path / "keys", tmp_path / "other"
    out = tmp_path / "a.txt"
    trustgen("generate", str(run), "--max-tokens", "50", "--seed", "1", "--keystore", str(keys), "--out", str(out))
    trustgen("keys", "init", "--keystore", str(other))
    foreign = json.loads(trustgen("verify", str(out), "--keystore", str(other), "--json").stdout)
    assert foreign["status"] == "valid" and foreign["content"] == "unmodified"
    assert foreign["watermark"]["checked"] is False  # the other keystore never watermarked anything
    trusted = json.loads(trustgen("verify", str(out), "--trust", str(keys / "ca.pem"), "--keystore", str(other),
                                  "--json").stdout)
    assert trusted["status"] == "trusted"
    manifest = out.with_name("a.txt.manifest.json")
    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 0x01
    manifest.write_bytes(bytes(data))
    broken = json.loads(trustgen("verify", str(out), "--keystore", str(keys), "--json").stdout)
    assert broken["status"] == "invalid"


@pytest.mark.slow
def test_images_carry_c2pa_manifests_and_a_watermark_that_outlives_them(cvae: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    folder = tmp_path / "imgs"
    made = trustgen("generate", str(cvae), "-n", "3", "--out", str(folder), "--keystore", str(keys), "--seed", "1")
    assert made.returncode == 0, made.stderr
    assert "watermarked, with C2PA manifests" in made.stderr
    report = json.loads(trustgen("verify", str(folder / "0002.png"), "--keystore", str(keys), "--json").stdout)
    assert report["status"] == "trusted" and report["content"] == "unmodified"
    assert report["claim"]["family"] == "vae" and len(report["claim"]["model_id"]) == 64
    assert report["claim"]["watermark"]["scheme"] == "spectral"
    with Image.open(folder / "0002.png") as image:
        image.load()
        image.save(tmp_path / "resaved.png")  # re-encoding drops the manifest
    stripped = json.loads(trustgen("verify", str(tmp_path / "resaved.png"), "--keystore", str(keys), "--json").stdout)
    assert stripped["status"] == "missing"

    grid = tmp_path / "grid.png"  # 16 tiles of 56 pixels: large enough for the watermark to be found
    trustgen("generate", str(cvae), "-n", "16", "--grid", str(grid), "--keystore", str(keys), "--seed", "1")
    report = json.loads(trustgen("verify", str(grid), "--keystore", str(keys), "--json").stdout)
    assert report["status"] == "trusted" and report["watermark"]["verdict"] == "watermarked"
    assert report["watermark"]["key_id"] == report["claim"]["watermark"]["key_id"]
    with Image.open(grid) as image:
        image.convert("RGB").save(tmp_path / "grid.jpg", quality=75)  # a re-upload: JPEG, manifest gone
    line = trustgen("verify", str(tmp_path / "grid.jpg"), "--keystore", str(keys)).stdout
    assert "no manifest" in line and "watermark present (spectral" in line, line
    found = trustgen("detect", str(tmp_path / "grid.jpg"), "--keystore", str(keys))
    assert found.returncode == 0 and found.stdout.startswith("watermarked: spectral key"), found.stdout
    assert json.loads(trustgen("detect", str(grid), "--keystore", str(keys), "--json").stdout)["p_value"] < 1e-3

    plain = tmp_path / "plain.png"
    trustgen("generate", str(cvae), "-n", "16", "--grid", str(plain), "--keystore", str(keys), "--seed", "1",
             "--no-sign", "--watermark", "none")
    assert json.loads(trustgen("verify", str(plain), "--keystore", str(keys), "--json").stdout)["status"] == "missing"
    assert trustgen("detect", str(plain), "--keystore", str(keys)).stdout.startswith("no watermark found")


@pytest.mark.slow
def test_keys_init_names_the_signer_and_verify_errors_are_clear(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    made = trustgen("keys", "init", "--keystore", str(keys), "--name", "Ann's studio")
    assert made.returncode == 0 and "signer 'Ann's studio'" in made.stdout and "ca.pem" in made.stdout
    assert not any(secret in made.stdout for secret in secrets_of(keys))
    assert_clear_error(trustgen("verify", str(tmp_path / "missing.txt"), "--keystore", str(keys)), "does not exist")
    assert_clear_error(trustgen("detect", str(tmp_path / "x.txt"), "--keystore", str(keys), "--scheme", "zz"),
                       "unknown watermark scheme")
    plain = tmp_path / "plain.txt"
    plain.write_text("Nothing generated here at all.\n")
    assert_clear_error(trustgen("detect", str(plain), "--keystore", str(keys)), "remembers no tokenizer")


@pytest.mark.slow
def test_demo_trains_prints_samples_then_signs_verifies_and_recognises_an_edited_copy(tmp_path: Path) -> None:
    result = trustgen("demo", "--out", str(tmp_path / "demo"), "--time-budget", "3s")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ROMEO:") == 2
    assert "validation loss on Hamlet, Macbeth, The Tempest and Julius Caesar" in result.stderr
    lines = [line for line in result.stdout.splitlines() if "sample-1" in line]
    assert len(lines) == 2
    assert "trusted" in lines[0] and "unmodified" in lines[0] and "watermark present" in lines[0]
    assert "content modified" in lines[1] and "watermark present" in lines[1]
    assert (tmp_path / "demo" / "audit" / "report.html").exists() and "audit report:" in result.stdout
    assert "membership-inference AUC" in result.stdout
