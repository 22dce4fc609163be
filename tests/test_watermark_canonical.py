"""Unicode tricks do not hide the text watermark: zero-width characters and look-alike letters
are undone before detection and reported as signs of tampering; other text is left alone."""

import json
from pathlib import Path

import pytest
import torch

from tests.test_cli_authenticity import cli
from trustgen.api import TextModel
from trustgen.data.text import shakespeare_documents
from trustgen.data.tokenizers import BPETokenizer, CharTokenizer, Tokenizer
from trustgen.models.gpt import GPT, GPTConfig
from trustgen.safety.authenticity import remember_tokenizer
from trustgen.safety.keys import Keystore
from trustgen.safety.trust import detect_text
from trustgen.safety.watermark.canonical import Tampering, canonicalize
from trustgen.safety.watermark.edits import TEXT_ATTACKS, homoglyphs, zero_width_every
from trustgen.safety.watermark.text import SCHEMES

SECRET = b"a secret watermark key for tests"


def test_ascii_and_other_scripts_are_left_alone() -> None:
    for text in ("Speak, speak.\n\tAll: resolved!", "Привет, как дела? Всё хорошо.", "Καλημέρα κόσμε",
                 "你好，世界", "naïve café, Ærø", "\u201cquoted\u201d \u2014 dash"):
        assert canonicalize(text) == (text, Tampering()), text
    assert not canonicalize("Привет, как дела?")[1].suspected


def test_invisible_characters_are_removed_and_look_alikes_folded_and_counted() -> None:
    text, signs = canonicalize("p\u0430yp\u0430l\u200b s\u0435rvic\u0435\ufeff")
    assert text == "paypal service"
    assert (signs.invisible_removed, signs.confusables_folded, signs.suspected) == (2, 4, True)
    # NFKC folds compatibility forms; a lone Cyrillic look-alike word in Latin text is folded too
    assert canonicalize("\uff21BC \ufb01ne and \u0430 cat")[0] == "ABC fine and a cat"
    assert canonicalize("\u200b\u200c\u200d\ufeff" * 5) == ("", Tampering(20, 0))


@pytest.fixture(scope="module")
def plays() -> str:
    return {d.name: d.text for d in shakespeare_documents()}["hamlet"]


def random_model(tokenizer: Tokenizer) -> TextModel:
    """An untrained GPT: its near-uniform choices leave the watermark every freedom to show."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=32)
    return TextModel(GPT(config), tokenizer, {"family": "gpt", "model": config.to_dict()}, torch.device("cpu"),
                     precision="fp32")


def ascii_words_only(tokenizer: Tokenizer):
    """A processor that keeps a BPE model to tokens of ASCII letters, spaces and full stops, so
    its text decodes to valid UTF-8 and re-encodes to the same tokens (as a trained model's does)."""
    allowed = torch.tensor([(piece.isascii() and piece.decode().replace(" ", "").isalpha()) or piece in (b" ", b".")
                            for piece in tokenizer.token_bytes])

    def keep(history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(~allowed[: scores.shape[-1]], -torch.inf)
    return keep


@pytest.fixture(scope="module", params=["char", "bpe"])
def model(request: pytest.FixtureRequest, plays: str) -> tuple[TextModel, list]:
    if request.param == "char":
        return random_model(CharTokenizer(plays)), []
    tokenizer = BPETokenizer.train([plays[i: i + 2000] for i in range(0, len(plays), 2000)], 400)
    return random_model(tokenizer), [ascii_words_only(tokenizer)]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_the_watermark_is_found_again_after_unicode_attacks(model: tuple[TextModel, list], scheme: str) -> None:
    text_model, chain = model
    mark = SCHEMES[scheme](SECRET, text_model.tokenizer.vocab_size)
    texts = text_model.generate(["HAMLET:"] * 4, max_new_tokens=120, seed=3, processors=[*chain, mark])
    for text in texts:
        assert mark.detect(text_model.tokenizer.encode_for_detection(text)).is_watermarked(1e-3)
        for name, attack in TEXT_ATTACKS.items():
            attacked = attack(text)
            assert attacked != text
            canonical, signs = canonicalize(attacked)
            assert canonical == text and signs.suspected, name
            assert mark.detect(text_model.tokenizer.encode_for_detection(canonical)).is_watermarked(1e-3), name


def test_detect_reports_the_tampering_beside_its_verdict(tmp_path: Path, plays: str) -> None:
    store = Keystore(tmp_path / "keys")
    key = store.init()
    tokenizer = CharTokenizer(plays)
    tokenizer.save(tmp_path / "tokenizer.json")
    remember_tokenizer(store, tmp_path / "tokenizer.json")
    mark = SCHEMES["kgw"](key.secret, tokenizer.vocab_size)
    text = random_model(tokenizer).generate("HAMLET:", max_new_tokens=150, seed=1, processors=[mark])[0]
    # the sample depends on the fresh key, so count the look-alikes the attack could place in it
    swapped = sum(a != b for a, b in zip(text, homoglyphs(text), strict=True))
    assert swapped >= 2
    attacked = zero_width_every(homoglyphs(text))
    found = detect_text(attacked, store)
    assert found.verdict == "watermarked"
    assert found.to_dict()["tampering"] == {"invisible_removed": len(text) // 3, "confusables_folded": swapped,
                                            "tampering_suspected": True}
    assert detect_text(text, store).to_dict()["tampering"]["tampering_suspected"] is False
    path = tmp_path / "attacked.txt"
    path.write_text(attacked, encoding="utf-8")
    code, out = cli("detect", str(path), "--keystore", str(store.path), "--json")
    assert code == 0 and json.loads(out)["tampering"]["confusables_folded"] == swapped
    code, out = cli("detect", str(path), "--keystore", str(store.path))
    assert code == 0 and out.startswith("watermarked") and f"{swapped} look-alike letters folded" in out
