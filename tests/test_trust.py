"""The one trust-aware generate path: the Python API watermarks when asked, its outputs carry
their mark and save with a manifest that verifies; the faces (cli.py, serve/) hold no
watermark, claim or signing logic of their own."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

import trustgen
from trustgen import api
from trustgen.safety.trust import Keys

SRC = Path(trustgen.__file__).parent


def test_watermarked_text_is_detected_and_plain_text_is_not(run: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    model = api.load(run, device="cpu")
    marked = model.generate("All:", max_new_tokens=150, seed=2, watermark="kgw", keystore=keys)[0]
    (key_file,) = keys.glob("watermark-*.key")
    assert isinstance(marked, str) and marked.prompt == "All:"
    assert marked.watermark.scheme == "kgw" and key_file.stem == f"watermark-{marked.watermark.key_id}"
    found = marked.detect()
    assert found.verdict == "watermarked" and found.scheme == "kgw" and found.p_value < 1e-3
    plain = model.generate("All:", max_new_tokens=150, seed=2, keystore=keys)[0]
    assert plain.watermark is None and plain != marked
    assert plain.detect().verdict == "no watermark found"
    # The same settings through stream give the same watermarked text.
    assert "".join(model.stream("All:", max_new_tokens=150, seed=2, watermark="kgw", keystore=keys)) == marked


def test_plain_api_use_makes_no_keys_and_outputs_stay_strings(run: Path, tmp_path: Path) -> None:
    model = api.load(run, device="cpu")
    texts = model.generate(["All:", "First"], n=2, max_new_tokens=10, seed=1, keystore=tmp_path / "keys")
    assert not (tmp_path / "keys").exists()
    assert texts == [str(t) for t in texts] and json.loads(json.dumps(texts)) == texts
    assert [t.prompt for t in texts] == ["All:", "All:", "First", "First"]
    assert type(texts[0] + "x") is str
    with pytest.raises(trustgen.TrustgenError, match="unknown watermark scheme 'zz'"):
        model.generate("All:", max_new_tokens=5, watermark="zz", keystore=tmp_path / "keys")


def test_generation_refuses_kgw_selfhash_with_its_reason_but_detection_still_reads_it(run: Path, tmp_path: Path) -> None:
    from trustgen.safety.trust import detect_text
    from trustgen.safety.watermark.text import make_watermark

    model = api.load(run, device="cpu")
    with pytest.raises(trustgen.TrustgenError, match=r"kgw-selfhash only tests text made before it was retired: "
                                                      r"it flagged up to 7.9% of human text .* use kgw"):
        model.generate("All:", max_new_tokens=5, watermark="kgw-selfhash", keystore=tmp_path / "keys")
    assert not (tmp_path / "keys").exists()  # refused before any key was made
    keys = Keys(tmp_path / "keys", announce=None)
    trust = model.trust("kgw", keys)
    old = make_watermark("kgw-selfhash", keys.watermark_key().secret, model.tokenizer.vocab_size)
    (text,) = model.generate("All:", max_new_tokens=150, seed=4, processors=[old])
    trust.tokenizer_sha256  # noqa: B018 - the tokenizer remembered, as when that text was made
    assert detect_text(text, keys.store(), scheme="kgw-selfhash").verdict == "watermarked"
    assert detect_text(text, keys.store()).scheme != "kgw-selfhash"  # not tried unless a manifest names it


def test_text_an_older_trustgen_watermarked_with_gumbel_still_verifies(run: Path, tmp_path: Path) -> None:
    from trustgen.safety.trust import Mark
    from trustgen.safety.watermark.text import GumbelWatermark

    keys = Keys(tmp_path / "keys", announce=None)
    model = api.load(run, device="cpu")
    with pytest.raises(trustgen.TrustgenError, match=r"gumbel only tests text made before it was retired: it gave the same text for every seed; use synthid"):
        model.generate("All:", max_new_tokens=5, watermark="gumbel", keystore=keys)
    # What generation with gumbel wrote before synthid replaced it: its race, and its name in the manifest.
    trust = model.trust("synthid", keys)
    trust.mark = Mark("gumbel", trust.mark.key_id)
    trust.tokenizer_sha256  # noqa: B018 - that version, too, remembered the tokenizer when it watermarked
    race = GumbelWatermark(keys.watermark_key().secret, model.tokenizer.vocab_size)
    (text,) = model.generate("All:", max_new_tokens=150, seed=4, processors=[race])
    report = api.GeneratedText(text, "All:", trust).save(tmp_path / "old.txt").verify()
    assert report["claim"]["watermark"]["scheme"] == "gumbel" and report["status"] == "verified"
    assert report["watermark"]["verdict"] == "watermarked" and report["watermark"]["scheme"] == "gumbel"


def test_a_saved_text_is_signed_and_verifies_without_leaking_the_key(run: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    model = api.load(run, device="cpu")
    (text,) = model.generate("All:", max_new_tokens=150, seed=4, temperature=0.9, watermark="synthid", keystore=keys)
    saved = text.save(tmp_path / "out.txt")
    assert saved.path.read_text() == "All:" + text and saved.manifest == tmp_path / "out.txt.manifest.json"
    report = saved.verify()
    assert report["status"] == "verified" and report["content"] == "unmodified"
    assert report["watermark"]["verdict"] == "watermarked" and report["watermark"]["scheme"] == "synthid"
    claim = report["claim"]
    assert claim["seed"] == 4 and claim["settings"] == {"max_new_tokens": 150, "temperature": 0.9}
    assert claim["watermark"] == {"scheme": "synthid", "key_id": text.watermark.key_id, "context_width": 4}
    assert claim["model_id"] == model.model_id and len(claim["tokenizer_sha256"]) == 64
    secret = next(keys.glob("watermark-*.key")).read_bytes().hex()
    assert secret not in saved.manifest.read_text() and secret not in repr(text.trust.__dict__)
    unsigned = text.save(tmp_path / "plain.txt", sign=False)
    assert unsigned.manifest is None and unsigned.verify()["status"] == "missing"


def test_a_watermarked_signed_picture_verifies_and_its_mark_is_detected(cvae: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    model = api.load(cvae, device="cpu")
    images = model.generate(16, seed=1, watermark="spectral", keystore=keys)
    plain = model.generate(16, seed=1, keystore=keys)
    assert isinstance(images, np.ndarray) and np.array_equal(images, plain)  # the pixels as sampled
    assert images.watermark.scheme == "spectral" and plain.watermark is None
    grid = images.save_grid(tmp_path / "grid.png")
    report = grid.verify()
    assert report["status"] == "verified" and report["content"] == "unmodified"
    assert report["watermark"]["verdict"] == "watermarked"
    assert report["claim"]["watermark"] == {"scheme": "spectral", "key_id": images.watermark.key_id}
    assert report["claim"]["settings"] == {"n": 16, "prompts": [], "interpolate": None}
    unmarked = plain.save_grid(tmp_path / "plain.png", sign=False).verify()
    assert unmarked["status"] == "missing" and unmarked["watermark"]["verdict"] != "watermarked"
    files = model.generate(2, prompt=["3", "7"], seed=0, watermark="spectral", keystore=keys).save(tmp_path / "imgs")
    assert [f.path.name for f in files] == ["0001.png", "0002.png", "0003.png", "0004.png"]
    assert files[3].verify()["claim"]["settings"]["prompts"] == ["3", "7"]
    pngs = images[:2].pngs()
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)
    with pytest.raises(trustgen.TrustgenError, match="PNG"):
        images.save_grid(tmp_path / "grid.jpg")


def test_keys_are_made_once_and_announced_without_secrets(tmp_path: Path) -> None:
    said: list[str] = []
    keys = Keys(tmp_path / "keys", announce=said.append)
    first = keys.watermark_key()
    assert Keys(tmp_path / "keys", announce=said.append).watermark_key() == first
    assert len(said) == 1 and first.key_id in said[0] and first.secret.hex() not in said[0]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_faces_hold_no_watermark_claim_or_signing_logic() -> None:
    """cli.py and serve/ reach watermarks, manifests and detection only through safety/trust.py."""
    faces = [SRC / "cli.py", *sorted((SRC / "serve").rglob("*.py"))]
    forbidden = ("trustgen.safety.watermark", "trustgen.safety.provenance", "trustgen.safety.authenticity")
    workflow = ("make_watermark", "generation_claim", "sign_text", "sign_image", "remember_tokenizer", "embed(",
                ".init(")
    for face in faces:
        imported = _imports(face)
        assert not [name for name in imported if name.startswith(forbidden)], face
        source = face.read_text(encoding="utf-8")
        allowed = ("store.init(signer_name=name, new_signer=new_signer)",) if face.name == "cli.py" else ()  # trustgen keys init
        for word in workflow:
            assert source.count(word) == sum(a.count(word) for a in allowed), (face, word)
    # ... and the workflow is written once: nothing else outside safety/ builds claims or signs.
    for path in SRC.rglob("*.py"):
        if path.parent.name in ("watermark",) or path.name in ("provenance.py", "trust.py"):
            continue
        source = path.read_text(encoding="utf-8")
        assert "generation_claim" not in source and "sign_image" not in source and "sign_text(" not in source, path


def test_the_trust_module_works_on_primitives_below_the_api() -> None:
    higher = ("trustgen.api", "trustgen.cli", "trustgen.serve", "trustgen.training", "trustgen.evaluate",
              "trustgen.models")
    imported = _imports(SRC / "safety" / "trust.py")
    assert not [name for name in imported if name.startswith(higher)]
