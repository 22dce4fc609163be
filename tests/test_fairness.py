"""Fairness measures on inputs with known answers, a deliberately biased toy generator, the
likelihood scorer against a direct computation, and counterfactual augmentation in training."""

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_cli import TINY, assert_clear_error, trustgen
from trustgen import api
from trustgen.config import TrainConfig
from trustgen.data.prepare import prepare_data
from trustgen.errors import TrustgenError
from trustgen.evaluate import fairness
from trustgen.evaluate.fairness import Group

POSITIVE = "a wonderful, kind and brilliant person, loved by all and happy"
NEGATIVE = "a terrible, cruel and hateful person, despised by all and miserable"


class ToyGenerator:
    """Answers like TextModel.generate. Biased: prompts about a female term get negative text."""

    def __init__(self, biased: bool, free_text: str = "he said and she said") -> None:
        self.biased = biased
        self.free_text = free_text
        female = set(fairness.load_groups()["gender"]["female"].probe)
        self.female = re.compile(r"\b(?:" + "|".join(sorted(female)) + r")\b")

    def generate(self, prompt: str | Sequence[str], n: int = 1, **settings: object) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        out = []
        for p in prompts:
            if p == fairness.FREE_PROMPT:
                text = self.free_text
            elif self.biased and self.female.search(p):
                text = NEGATIVE
            else:
                text = POSITIVE
            out += [text] * n
        return out


def test_wasserstein_of_identical_and_shifted_distributions() -> None:
    values = [-0.5, 0.0, 0.25, 0.9]
    assert fairness.wasserstein1(values, list(reversed(values))) == 0.0
    assert fairness.wasserstein1(values, [v + 0.3 for v in values]) == pytest.approx(0.3)
    # Half the mass moves from 0 to 1: the area between the CDFs is 0.5.
    assert fairness.wasserstein1([0, 0], [0, 1]) == pytest.approx(0.5)
    with pytest.raises(TrustgenError):
        fairness.wasserstein1([], [1.0])


def test_total_variation_from_uniform() -> None:
    assert fairness.tvd_from_uniform([5, 5, 5]) == 0.0
    assert fairness.tvd_from_uniform([1, 0]) == pytest.approx(0.5)
    assert fairness.tvd_from_uniform([3, 1]) == pytest.approx(0.25)
    assert math.isnan(fairness.tvd_from_uniform([0, 0]))
    groups = {"a": Group(("x",), ("he", "him")), "b": Group(("y",), ("she", "her"))}
    balanced = fairness.representation(["He saw her.", "she met him", "the others"], groups)
    assert balanced["counts"] == {"a": 2, "b": 2} and balanced["tvd"] == 0.0
    skewed = fairness.representation(["he and he and him", "nothing, shepherd"], groups)  # not 'she' in shepherd
    assert skewed["counts"] == {"a": 3, "b": 0} and skewed["tvd"] == pytest.approx(0.5)


def test_occupation_cooccurrence() -> None:
    groups = {"m": Group(("x",), ("he",)), "f": Group(("y",), ("she",))}
    found = fairness.occupation_cooccurrence(["the nurse said she", "the soldier said he", "a cook"],
                                             groups, ["nurse", "soldier", "cook"])
    assert found["occupations"] == {"nurse": {"m": 0, "f": 1}, "soldier": {"m": 1, "f": 0}}
    assert found["tvd"] == pytest.approx(0.5)
    even = fairness.occupation_cooccurrence(["the nurse: he and she"], groups, ["nurse"])
    assert even["tvd"] == 0.0


def test_sentiment_is_signed() -> None:
    positive, negative, empty = fairness.sentiment([POSITIVE, NEGATIVE, "  "])
    assert positive > 0.5 and negative < -0.5 and empty == 0.0


def test_biased_generator_gets_a_large_gap_and_an_unbiased_one_none() -> None:
    settings = {"axes": ["gender"], "likelihood": False, "free_samples": 4, "samples": 2}
    biased = fairness.fairness_audit(ToyGenerator(biased=True), **settings)
    fair = fairness.fairness_audit(ToyGenerator(biased=False), **settings)
    b = {m["name"]: m for m in biased["metrics"]}
    f = {m["name"]: m for m in fair["metrics"]}
    assert b["gender_gap"]["value"] > 1.5 and b["gender_gap"]["flag"]
    assert b["gender_w1"]["value"] > 1.5 and b["gender_w1"]["flag"]
    assert f["gender_gap"]["value"] == 0.0 and f["gender_w1"]["value"] == 0.0 and not f["gender_gap"]["flag"]
    assert biased["details"]["axes"]["gender"]["mean_sentiment"]["female"] < -0.5
    assert b["gender_gap_p"]["value"] < 0.001 and f["gender_gap_p"]["value"] == 1.0  # real gap vs none
    # Free samples "he said and she said": both genders equally often.
    assert f["representation_tvd"]["value"] == 0.0
    # Report-ready: strict JSON, a picture, every metric named with a threshold.
    json.dumps(biased, allow_nan=False)
    assert biased["figures"] and biased["figures"][0]["png_base64"].startswith("iVBOR")
    assert all({"name", "value", "threshold", "flag"} <= set(m) for m in biased["metrics"])
    assert [m["name"] for m in biased["metrics"]] == [n for n in fairness.metric_names(["gender"])
                                                       if n != "gender_loglik_gap"]


def test_the_gap_p_value_tells_a_real_difference_from_chance() -> None:
    rng = np.random.default_rng(0)

    def probe(shift: float) -> fairness.Probe:
        keys = [(t, g, i) for g in ("a", "b") for t in range(5) for i in range(8)]
        noise = rng.normal(0, 0.3, size=(40, 4))  # the same random numbers for both groups' prompts...
        scores = [noise[k % 40] + rng.normal(0, 0.2, 4) + (shift if g == "b" else 0) for k, (_, g, _) in
                  enumerate(keys)]  # ...plus each prompt's own noise
        return fairness.Probe("gender", ("a", "b"), keys, [""] * 80, [[""] * 4] * 80, scores)

    chance = [fairness.gap_p_value(probe(0.0), seed=s) for s in range(20)]
    assert sum(p < 0.05 for p in chance) <= 3 and 0.2 < float(np.median(chance)) < 0.8
    assert fairness.gap_p_value(probe(0.2)) < 0.001


def test_representation_reference_and_unmeasurable_values() -> None:
    male_only = ToyGenerator(biased=False, free_text="the king and his son")
    result = fairness.fairness_audit(male_only, axes=["gender", "religion"], likelihood=False, free_samples=3,
                                     samples=1, reference_texts=["the king and the queen", "his wife"])
    metrics = {m["name"]: m for m in result["metrics"]}
    assert metrics["representation_tvd"]["value"] == pytest.approx(0.5)  # flags: tests/test_audit_flags.py
    assert metrics["representation_tvd"]["reference"] == 0.0
    # Nobody's religion is mentioned: nothing to measure, so no value and no flag.
    assert metrics["religion_representation_tvd"]["value"] is None
    assert not metrics["religion_representation_tvd"]["flag"]
    with pytest.raises(TrustgenError, match="unknown fairness axis"):
        fairness.fairness_audit(male_only, axes=["height"])


def test_swap_is_whole_word_and_case_preserving() -> None:
    swaps = fairness.load_word_pairs()
    text = "He gave HIS king's crown to her; the Manor of Hebron stays. SHE is a Lady, sir.\nMr Smith."
    swapped, count = fairness.swap_words(text, swaps)
    assert swapped == ("She gave HER queen's crown to his; the Manor of Hebron stays. HE is a Lord, madam.\n"
                       "Mrs Smith.")
    assert count == 8
    assert fairness.swap_words("nothing gendered here: shepherd, hermit, manage", swaps) == (
        "nothing gendered here: shepherd, hermit, manage", 0)


def test_word_pair_and_group_files_are_checked(tmp_path: Path) -> None:
    bad = tmp_path / "pairs.tsv"
    bad.write_text("he she\n")
    with pytest.raises(TrustgenError, match="tab"):
        fairness.load_word_pairs(bad)
    uneven = tmp_path / "groups.toml"
    uneven.write_text('[g.a]\nprobe = ["x", "y"]\nwords = ["x"]\n[g.b]\nprobe = ["z"]\nwords = ["z"]\n')
    with pytest.raises(TrustgenError, match="aligned"):
        fairness.load_groups(uneven)
    assert len(fairness.load_templates()) >= 3 and "soldier" in fairness.load_occupations()


def test_continuation_log_likelihood_matches_the_model(run: Path) -> None:
    model = api.load(run, device="cpu", precision="fp32")
    prompt, continuation = "All:\nSpe", "ak, spea"
    total, count = fairness.continuation_log_likelihoods(model, [prompt] * 3, [continuation, "", "ak, speak. Speak"])
    ids = torch.tensor([model.tokenizer.encode(prompt + continuation)])
    with torch.no_grad():
        logp = model.model(ids[:, :-1]).float().log_softmax(-1)[0]
    start = len(model.tokenizer.encode(prompt))
    expected = sum(logp[i - 1, ids[0, i]].item() for i in range(start, ids.shape[1]))
    assert count[0] == len(continuation) and total[0] == pytest.approx(expected, abs=1e-4)
    assert count[1] == 0 and total[1] == 0.0
    assert count[2] == 16 + 1 - len(prompt)  # cut at the model's context of 16 (+ the first target)


def test_audit_of_a_real_model_skips_what_its_tokenizer_cannot_write(run: Path, tmp_path: Path) -> None:
    model = api.load(run, device="cpu")
    templates = tmp_path / "templates.txt"
    templates.write_text("# the tiny corpus has no capital T\nthe {person} was\nThe {person} was\n")
    result = fairness.fairness_audit(model, axes=["gender"], samples=1, free_samples=2, max_new_tokens=8,
                                     free_tokens=20, figures=False, templates_path=templates)
    names = {m["name"] for m in result["metrics"]}
    assert {"gender_gap", "gender_w1", "gender_loglik_gap", "representation_tvd"} <= names
    assert "gender" in result["details"]["skipped"]  # capital T, q (queen), daughter (past the context)
    prompts = result["details"]["axes"]["gender"]["examples"]
    assert set(prompts) == {"male", "female"}
    with pytest.raises(TrustgenError, match="no fairness probe prompt"):
        templates.write_text("The {person} was\n")
        fairness.fairness_audit(model, axes=["gender"], templates_path=templates)
    loglik = result["details"]["axes"]["gender"]["log_likelihood"]
    assert set(loglik["mean_log_likelihood"]) == {"male", "female"}


@pytest.mark.slow
def test_counterfactual_augmentation_in_training(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"story{i}.txt").write_text("The king said he would marry the lady.\nAll: Speak.\n" * (30 + i))
    plain = prepare_data(TrainConfig(data=str(corpus), max_steps=1, val_fraction=0.2))
    augmented = prepare_data(TrainConfig(data=str(corpus), max_steps=1, val_fraction=0.2,
                                         counterfactual_augment="gender"))
    assert augmented.summary["counterfactual_augment"]["swapped_words"] > 0
    assert augmented.summary["train_tokens"] > 1.9 * plain.summary["train_tokens"]
    assert augmented.split.val == plain.split.val  # held-out text is never augmented
    copies = [d for d in augmented.split.train if d.name.endswith("(counterfactual gender)")]
    assert len(copies) == len(plain.split.train)
    assert copies[0].path.read_text().startswith("The queen said she would marry the lord.\nAll: Speak.\n")

    out = tmp_path / "run"
    api.train(out, data=str(corpus), max_steps=1, counterfactual_augment="gender", progress=False, batch_size=2,
              model_config={"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16})
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["counterfactual_augment"] == "gender"
    # The CLI passes the option through to the config, which names it when the value is wrong.
    assert_clear_error(trustgen("train", "--data", str(corpus), "--out", str(tmp_path / "x"), "--max-steps", "2",
                                "--counterfactual-augment", "race", *TINY), "counterfactual_augment")
