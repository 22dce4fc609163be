"""Signed, watermarked artifacts through the CLI: generate --out signs, verify and detect find
them (with and without the run), edits and stripped manifests are still recognised, keys never leak."""

import json
import subprocess
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
    assert report["status"] == "verified" and report["content"] == "unmodified"
    assert report["watermark"]["verdict"] == "watermarked"
    assert report["claim"]["watermark"]["scheme"] == "kgw" and report["claim"]["seed"] == 4
    line = trustgen("verify", str(out), "--keystore", str(keys)).stdout
    assert "verified" in line and "unmodified" in line and "watermark present" in line

    text = out.read_text()
    # An edit: ten characters become a word in curly quotes, characters the char tokenizer never
    # saw (they are read around, not refused). The manifest no longer matches.
    out.write_text(text[:60] + "\u201cZounds\u201d" + text[70:])
    run_edited = trustgen("verify", str(out), "--keystore", str(keys), "--json")
    edited = json.loads(run_edited.stdout)  # fails closed: never "trusted" beside modified content
    assert edited["status"] == "modified" and edited["content"] == "modified" and run_edited.returncode == 3
    assert edited["watermark"]["verdict"] == "watermarked"
    manifest.unlink()  # stripped: no manifest, but the watermark still says generated
    run_stripped = trustgen("verify", str(out), "--keystore", str(keys), "--json")
    stripped = json.loads(run_stripped.stdout)
    assert stripped["status"] == "missing" and stripped["watermark"]["verdict"] == "watermarked"
    assert run_stripped.returncode == 6
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
    run_foreign = trustgen("verify", str(out), "--keystore", str(other), "--json")
    foreign = json.loads(run_foreign.stdout)
    assert foreign["status"] == "untrusted" and foreign["content"] == "unmodified" and run_foreign.returncode == 4
    assert foreign["watermark"]["checked"] is False  # the other keystore never watermarked anything
    trusted = json.loads(trustgen("verify", str(out), "--trust", str(keys / "ca.pem"), "--keystore", str(other),
                                  "--json").stdout)
    assert trusted["status"] == "verified"
    manifest = out.with_name("a.txt.manifest.json")
    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 0x01
    manifest.write_bytes(bytes(data))
    run_broken = trustgen("verify", str(out), "--keystore", str(keys), "--json")
    assert json.loads(run_broken.stdout)["status"] == "invalid" and run_broken.returncode == 5


@pytest.mark.slow
def test_images_carry_c2pa_manifests_and_a_watermark_that_outlives_them(cvae: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    folder = tmp_path / "imgs"
    made = trustgen("generate", str(cvae), "-n", "3", "--out", str(folder), "--keystore", str(keys), "--seed", "1")
    assert made.returncode == 0, made.stderr
    # 8x8 digits cannot carry the mark: they are written, and signed, as not watermarked.
    assert "(not watermarked (image too small: 8x8;" in made.stderr and "with C2PA manifests" in made.stderr
    report = json.loads(trustgen("verify", str(folder / "0002.png"), "--keystore", str(keys), "--json").stdout)
    assert report["status"] == "verified" and report["content"] == "unmodified"
    assert report["claim"]["family"] == "vae" and len(report["claim"]["model_id"]) == 64
    assert report["claim"]["watermark"] is None and "too small" in report["claim"]["watermark_note"]
    with Image.open(folder / "0002.png") as image:
        image.load()
        image.save(tmp_path / "resaved.png")  # re-encoding drops the manifest
    stripped = json.loads(trustgen("verify", str(tmp_path / "resaved.png"), "--keystore", str(keys), "--json").stdout)
    assert stripped["status"] == "missing"

    grid = tmp_path / "grid.png"  # 16 tiles of 56 pixels: large enough for the watermark to be found
    trustgen("generate", str(cvae), "-n", "16", "--grid", str(grid), "--keystore", str(keys), "--seed", "1")
    report = json.loads(trustgen("verify", str(grid), "--keystore", str(keys), "--json").stdout)
    assert report["status"] == "verified" and report["watermark"]["verdict"] == "watermarked"
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


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """`trustgen demo` with enough training for its samples to be text of low entropy, where a
    watermark is hard to carry (a 3-second model samples near-random characters, which any
    watermark marks easily)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, trustgen("demo", "--out", str(out), "--time-budget", "40s")


@pytest.mark.slow
def test_demo_trains_prints_samples_then_signs_verifies_and_recognises_an_edited_copy(demo) -> None:
    out, result = demo
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ROMEO:") == 2
    assert "validation loss on Hamlet, Macbeth, The Tempest and Julius Caesar" in result.stderr
    lines = [line for line in result.stdout.splitlines() if "sample-1" in line]
    assert len(lines) == 2
    assert "verified" in lines[0] and "unmodified" in lines[0] and "watermark present" in lines[0]
    assert "modified: content modified" in lines[1] and "watermark present" in lines[1]
    assert "trusted" not in lines[1]
    assert (out / "audit" / "report.html").exists() and "audit report:" in result.stdout
    assert "membership-inference AUC" in result.stdout


@pytest.mark.slow
def test_synthid_samples_of_a_trained_model_are_as_diverse_as_unwatermarked_ones(demo) -> None:
    from trustgen import api
    from trustgen.evaluate.text import distinct_n
    from trustgen.safety.watermark.text import SynthIDWatermark

    model = api.load(demo[0])
    mark = SynthIDWatermark(b"a key", model.tokenizer.vocab_size)
    settings = {"n": 32, "seed": 3, "max_new_tokens": 150, "temperature": 0.8}
    plain, marked = (model.generate("ROMEO:", processors=chain, **settings) for chain in ([], [mark]))
    assert len(set(marked)) == 32
    assert distinct_n(marked, 2) >= 0.9 * distinct_n(plain, 2)  # 0.95-1.0 in bench/watermark_diversity.py
    assert sum(mark.detect(model.tokenizer.encode(text)).is_watermarked(0.01) for text in marked) >= 28


# -- exit codes: a CI gate reading them accepts only verified files ---------------------------

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


def cli(*args: str) -> tuple[int, str]:
    """The CLI in this process (seconds faster than a subprocess): exit code and stdout."""
    from typer.testing import CliRunner

    from trustgen.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(text, our keystore, a stranger's keystore): a text signed with our keys."""
    from trustgen.safety.keys import Keystore
    from trustgen.safety.provenance import generation_claim, sign_text

    ours, theirs = Keystore(tmp_path / "keys"), Keystore(tmp_path / "other")
    ours.init(), theirs.init()
    text = tmp_path / "speech.txt"
    text.write_text(TEXT, encoding="utf-8")
    claim = generation_claim(model_id="ab" * 32, family="gpt", settings={}, seed=1, watermark=None)
    sign_text(text, claim, ours.signing_identity())
    return text, ours.path, theirs.path


def test_verify_exit_codes_and_json_for_each_status(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from trustgen.safety.keys import Keystore
    from trustgen.safety.provenance import sidecar_path, sign_text

    text, keys, other = signed
    manifest = sidecar_path(text)

    def check(keystore: Path = keys) -> tuple[int, dict]:
        code, out = cli("verify", str(text), "--keystore", str(keystore), "--json")
        return code, json.loads(out)

    code, report = check()
    assert (code, report["status"], report["content"]) == (0, "verified", "unmodified")
    code, report = check(other)  # a good signature, but by someone whose CA we do not trust
    assert (code, report["status"], report["content"]) == (4, "untrusted", "unmodified")
    code, line = cli("verify", str(text), "--keystore", str(other), "--trust", str(keys / "ca.pem"))
    assert code == 0 and line.startswith(f"{text}: verified: signed by")

    text.write_text(TEXT.replace("soft", "sift"), encoding="utf-8")  # one character
    code, report = check()
    assert (code, report["status"], report["content"]) == (3, "modified", "modified")
    assert "trusted" not in json.dumps({k: v for k, v in report.items() if k != "watermark"})
    text.write_text(TEXT, encoding="utf-8")

    twin = tmp_path / "twin.txt"  # swapped manifests: another file's sidecar beside this one
    twin.write_text(TEXT + "Ay me!\n", encoding="utf-8")
    original = manifest.read_bytes()
    sign_text(twin, {"model_id": "cd" * 32}, Keystore(keys).signing_identity())
    manifest.write_bytes(sidecar_path(twin).read_bytes())
    assert check()[0] == 3

    manifest.write_bytes(original[: len(original) // 2])  # truncated
    code, report = check()
    assert (code, report["status"], report["signer"]) == (5, "invalid", None)
    manifest.unlink()
    code, report = check()
    assert (code, report["status"]) == (6, "missing")


@pytest.mark.slow
def test_the_verify_exit_code_reaches_the_shell(signed: tuple[Path, Path, Path]) -> None:
    text, keys, _ = signed
    assert trustgen("verify", str(text), "--keystore", str(keys)).returncode == 0
    text.write_text(TEXT.upper(), encoding="utf-8")
    edited = trustgen("verify", str(text), "--keystore", str(keys))
    assert edited.returncode == 3 and ": modified: " in edited.stdout, edited.stdout
    help_text = trustgen("verify", "--help").stdout
    assert "3 modified" in help_text and "6 missing" in help_text


def test_detect_says_too_short_to_tell_below_the_minimum(tmp_path: Path) -> None:
    from tests.conftest import TINY_TEXT
    from trustgen.data.tokenizers import CharTokenizer
    from trustgen.safety.authenticity import ALPHA, minimum_tokens, remember_tokenizer
    from trustgen.safety.keys import Keystore
    from trustgen.safety.trust import detect_text

    store = Keystore(tmp_path / "keys")
    store.init()
    tokenizer_file = tmp_path / "tokenizer.json"
    CharTokenizer.train([TINY_TEXT + "\u201c\u201d"]).save(tokenizer_file)
    remember_tokenizer(store, tokenizer_file)
    needed = minimum_tokens(len(SCHEMES))
    # The fewest tokens at which a text, every token green under KGW (γ = 0.25), could pass.
    assert 0.25 ** needed * len(SCHEMES) < ALPHA <= 0.25 ** (needed - 1) * len(SCHEMES)
    assert (minimum_tokens(1), needed) == (5, 6)
    for short in ("", "\u200b\u200c\u200d\ufeff" * 20, "All:", "Speak"):
        found = detect_text(short, store)
        assert found.verdict == "too short to tell" and found.whole.scored < needed, short
        assert found.to_dict()["minimum_scored"] == needed
        path = tmp_path / "short.txt"
        path.write_text(short, encoding="utf-8")
        code, out = cli("detect", str(path), "--keystore", str(store.path))
        assert code == 3 and out.startswith(f"too short to tell: {found.whole.scored} scored tokens, at least "
                                            f"{needed} are needed"), out
    assert detect_text(TINY_TEXT, store).verdict == "no watermark found"
    path.write_text(TINY_TEXT, encoding="utf-8")
    code, out = cli("detect", str(path), "--keystore", str(store.path), "--json")
    assert code == 1 and json.loads(out)["verdict"] == "no watermark found"
