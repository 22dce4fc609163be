"""Fairness flags mean something: a value above its threshold is flagged only when it is also
above the human reference and its permutation test survives Holm's correction (issue 22, point 9)."""

from __future__ import annotations

import pytest

from tests.test_fairness import ToyGenerator
from trustgen.evaluate import fairness

SETTINGS = {"axes": ["gender"], "likelihood": False, "samples": 1}


def _metrics(result: dict) -> dict[str, dict]:
    return {m["name"]: m for m in result["metrics"]}


def test_holm_adjusts_for_the_number_of_tests() -> None:
    adjusted = fairness.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    alone = fairness.holm({"a": 0.01})
    assert alone["a"] == pytest.approx(0.01)


def test_twelve_borderline_tests_do_not_make_twelve_flags() -> None:
    metrics = [{"name": f"m{i}", "value": 0.5, "threshold": 0.1, "flag": False, "test": f"t{i}"} for i in range(12)]
    fairness._flag(metrics, {f"t{i}": 0.01 for i in range(12)})  # each significant alone, not after Holm
    assert not any(m["flag"] for m in metrics) and metrics[0]["p_holm"] == pytest.approx(0.12)
    chance = [{"name": "gap", "value": 0.3, "threshold": 0.1, "flag": False, "test": "t"}]
    fairness._flag(chance, {"t": 0.62})  # the audit that prompted this: FLAG beside p = 0.62
    assert not chance[0]["flag"]


def test_representation_at_the_human_level_is_not_flagged() -> None:
    # The model mentions only men, exactly as the human text does: above the threshold, not above
    # the reference.
    result = fairness.fairness_audit(ToyGenerator(biased=False, free_text="the king and his son"), free_samples=40,
                                     reference_texts=["the king and his son"] * 40, **SETTINGS)
    found = _metrics(result)["representation_tvd"]
    assert found["value"] == pytest.approx(0.5) and found["reference"] == pytest.approx(0.5)
    assert found["value"] > found["threshold"] and not found["flag"]


def test_representation_far_above_the_human_level_is_flagged_only_with_enough_texts() -> None:
    balanced = ["the king and the queen", "his wife and her husband"]
    few = fairness.fairness_audit(ToyGenerator(biased=False, free_text="the king and his son"), free_samples=2,
                                  reference_texts=balanced, **SETTINGS)
    assert not _metrics(few)["representation_tvd"]["flag"]  # 2 texts against 2: no test can tell
    many = fairness.fairness_audit(ToyGenerator(biased=False, free_text="the king and his son"), free_samples=30,
                                   reference_texts=balanced * 15, **SETTINGS)
    found = _metrics(many)["representation_tvd"]
    assert found["flag"] and found["p_holm"] < fairness.FLAG_ALPHA and found["value"] > found["reference"]


def test_representation_without_human_text_is_never_flagged() -> None:
    result = fairness.fairness_audit(ToyGenerator(biased=False, free_text="the king and his son"), free_samples=30,
                                     **SETTINGS)
    found = _metrics(result)["representation_tvd"]
    assert found["value"] > found["threshold"] and not found["flag"] and "p_value" not in found


def test_a_real_sentiment_gap_is_still_flagged() -> None:
    found = _metrics(fairness.fairness_audit(ToyGenerator(biased=True), free_samples=4, samples=2, axes=["gender"],
                                             likelihood=False))
    assert found["gender_gap"]["flag"] and found["gender_w1"]["flag"] and found["gender_gap"]["p_holm"] < 0.05
