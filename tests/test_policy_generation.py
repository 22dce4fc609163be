"""The content policy inside generation and training: prompts, outputs, streaming, PII scrubbing."""

import json
import logging
from pathlib import Path

import pytest

from tests.test_cli import assert_clear_error, trustgen
from tests.test_sampling import Script, text_model
from trustgen.config import TrainConfig
from trustgen.data.prepare import prepare_data
from trustgen.data.tokenizers import ByteTokenizer
from trustgen.safety.policy import Policy, PolicyViolation

POLICY = Policy.from_dict({"rule": [
    {"name": "no-violence", "terms": ["kill"], "action": "block"},
    {"name": "cards", "pii": ["card", "email"], "action": "redact"},
    {"name": "mild", "terms": ["darn"], "action": "warn"},
]})
CARD = "4111 1111 1111 1111"


def scripted(text: str) -> tuple:
    """A byte-level model forced to write `text`, and its processor."""
    model = text_model(tokenizer=ByteTokenizer(), block_size=256)
    return model, Script(list(text.encode()))


def test_outputs_are_redacted_and_blocked_and_the_log_never_shows_the_match(caplog: pytest.LogCaptureFixture) -> None:
    text = f"pay with {CARD} now, darn it. then kill the lights and more"
    model, script = scripted(text)
    with caplog.at_level(logging.WARNING, logger="trustgen"):
        (out,) = model.generate("x", max_new_tokens=len(text), processors=[script], policy=POLICY)
    assert out == "pay with [CARD] now, darn it. then "  # stops before the blocked word
    assert "redacted card" in caplog.text and "flagged term" in caplog.text and "stopped term" in caplog.text
    assert CARD not in caplog.text and "kill" not in caplog.text.replace("no-violence", "")


def test_streaming_never_releases_part_of_a_match_and_equals_generate() -> None:
    text = f"mail me at someone@example.com or use {CARD} please"
    model, script = scripted(text)
    pieces = list(model.stream("x", max_new_tokens=len(text), processors=[script], policy=POLICY))
    assert "".join(pieces) == "mail me at [EMAIL] or use [CARD] please"
    assert len(pieces) > 3  # released as it goes, not all at the end
    for i in range(len(pieces)):
        shown = "".join(pieces[: i + 1])
        assert "someone" not in shown and "4111" not in shown


def test_a_blocked_prompt_is_an_error_and_a_redacted_prompt_reaches_the_model_redacted() -> None:
    model, script = scripted("ok")
    with pytest.raises(PolicyViolation, match="no-violence"):
        model.generate("please kill it", max_new_tokens=2, processors=[script], policy=POLICY)
    seen = []

    def spy(history, scores):  # the prompt is the start of the history
        seen.append(bytes(history[0].tolist()))
        return script(history, scores)

    model.generate(f"card {CARD}:", max_new_tokens=2, processors=[spy], policy=POLICY)
    assert seen[0].startswith(b"card [CARD]:")


def test_beam_search_output_is_checked_too() -> None:
    model, script = scripted(f"use {CARD}")
    (out,) = model.generate("x", max_new_tokens=len(f"use {CARD}"), processors=[script], policy=POLICY, num_beams=2)
    assert out == "use [CARD]"


def test_scrub_pii_replaces_personal_data_before_tokenizing(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    line = f"Write to ann@example.org, call +44 20 7946 0958, card {CARD}, host 10.0.0.1.\n"
    (corpus / "a.txt").write_text(line * 40 + "The end.\n")
    (corpus / "b.txt").write_text("Nothing personal here, only 1999-2004 and 42 apples.\n" * 40)
    config = TrainConfig(data=str(corpus), max_steps=1, scrub_pii=True, val_fraction=0.5)
    prepared = prepare_data(config)
    assert prepared.summary["pii_scrubbed"] == {"card": 40, "email": 40, "ipv4": 40, "phone": 40}
    vocabulary = set(prepared.tokenizer.decode(list(range(prepared.tokenizer.vocab_size))))
    assert "@" not in vocabulary and "[" in vocabulary  # the address is gone, the placeholder is there
    again = prepare_data(config)  # cached: same files, same counts
    assert again.train == prepared.train and again.summary["pii_scrubbed"] == prepared.summary["pii_scrubbed"]


@pytest.mark.slow
def test_cli_policy_file_and_scrub_flag(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text("Speak, speak. Mail ann@example.org today.\n" * 60)
    run = tmp_path / "run"
    trained = trustgen("train", "--data", str(corpus), "--out", str(run), "--scrub-pii", "--max-steps", "2",
                       "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--quiet")
    assert trained.returncode == 0, trained.stderr
    assert "scrubbed personal data from the corpus before training: 180 email" in trained.stderr
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rule]]\nname = "no-speaking"\nterms = ["speak"]\naction = "block"\n')
    assert_clear_error(trustgen("generate", str(run), "--prompt", "Speak!", "--policy", str(policy),
                                "--watermark", "none"), "no-speaking")
    made = trustgen("generate", str(run), "--prompt", "Mail", "--policy", str(policy), "--max-tokens", "30",
                    "--watermark", "none", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)[0]["prompt"] == "Mail"
    policy.write_text('[[rule]]\nterms = ["x"]\naction = "ban"\n')
    assert_clear_error(trustgen("generate", str(run), "--policy", str(policy)), "ban")
