"""Audit flags mean something (issue 22, point 9): a fairness value above its threshold is flagged
only when it is also above the human reference and its permutation test survives Holm's
correction; membership inference compares training windows with held-out windows of the same
documents, and a run without such a hold-out is reported as not comparable, never flagged."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from tests.test_audit_privacy import WORDS
from tests.test_fairness import ToyGenerator
from trustgen import api, io
from trustgen.config import TrainConfig
from trustgen.data.prepare import prepare_data
from trustgen.data.text import Document, TokenWindows, hold_out_pieces
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


# -- membership inference: members and non-members from the same documents ------------------------

def _word_lines(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + "\n" for _ in range(lines))


def _corpus(folder: Path, documents: int = 3, lines: int = 1200) -> Path:
    folder.mkdir(parents=True)
    for i in range(documents):
        (folder / f"play{i}.txt").write_text(_word_lines(i, lines), encoding="utf-8")
    return folder


@pytest.mark.parametrize("in_memory", [True, False])
def test_held_out_pieces_and_training_pieces_rebuild_each_document(tmp_path: Path, in_memory: bool) -> None:
    folder = _corpus(tmp_path / "plays")
    documents = [Document(p.name, text=p.read_text()) if in_memory else Document(p.name, path=p)
                 for p in sorted(folder.iterdir())]
    split = hold_out_pieces(documents, 0.05, seed=3)
    assert split.val and split.train
    for doc in documents:
        pieces = sorted((d for d in [*split.train, *split.val] if d.name.split("[")[0] == doc.name),
                        key=lambda d: int(d.name.split("[")[1].split(":")[0]) if "[" in d.name else 0)
        assert "".join(p.read() for p in pieces) == doc.read()  # nothing lost, nothing doubled
    held = sum(d.size for d in split.val) / sum(d.size for d in documents)
    assert 0.03 < held < 0.08 and all(d.read().endswith("\n") for d in split.val)  # cut at line starts
    assert hold_out_pieces(documents, 0.05, seed=3) == split  # the run's seed rebuilds the same hold-out
    assert hold_out_pieces(documents, 0.05, seed=4) != split
    assert hold_out_pieces([Document("one", text=_word_lines(9, 3000))], 0.05, seed=3).val  # even one document
    tiny = [Document("t", text="a line\n" * 100)]
    assert hold_out_pieces(tiny, 0.05, seed=3).val == []  # too little text: nothing held out


def test_old_runs_held_nothing_out_and_new_ones_do() -> None:
    assert TrainConfig(max_steps=1).membership_holdout == 0.02
    old = TrainConfig(max_steps=1).to_dict()
    del old["membership_holdout"]
    assert TrainConfig.from_run(old).membership_holdout == 0.0


def test_the_held_out_pieces_never_reach_the_training_tokens(tmp_path: Path) -> None:
    config = TrainConfig(data=str(_corpus(tmp_path / "plays")), max_steps=1, membership_holdout=0.05)
    prepared = prepare_data(config)
    assert prepared.holdout is not None and prepared.summary["membership_holdout"]["pieces"] >= 2
    training = "".join(d.read() for d in prepared.split.train)
    held_tokens = np.fromfile(prepared.holdout, dtype=TokenWindows(prepared.holdout, 8).dtype)
    assert len(held_tokens) >= prepared.summary["membership_holdout"]["bytes"] * 0.9  # char tokens
    for piece in hold_out_pieces(prepare_data(config.replace(membership_holdout=0.0)).split.train, 0.05,
                                 config.seed).val:
        assert piece.read()[:600] not in training


@pytest.mark.slow
def test_the_audit_states_the_split_and_never_flags_a_run_without_a_holdout(tmp_path: Path) -> None:
    run = tmp_path / "run"
    api.train(run, data=str(_corpus(tmp_path / "plays")), model_config={"n_layer": 1, "n_head": 2, "n_embd": 16,
                                                                      "block_size": 32},
              max_steps=2, batch_size=8, eval_batches=1, precision="fp32", progress=False)
    settings = {"samples": 2, "max_new_tokens": 10, "device": "cpu", "extraction_prompts": 2, "mia_examples": 20,
                "heldout_tokens": 500, "fairness": False}
    report = api.audit(run, out=tmp_path / "new", **settings)
    assert report["privacy"]["comparable"] and "same documents" in report["privacy"]["split"]
    assert {r["name"]: r for r in report["summary"]}["mia_auc"]["value"] is not None
    config = io.read_json(run / "config.json")
    del config["train"]["membership_holdout"]  # as a run from before the hold-out recorded it
    io.write_json(run / "config.json", config)
    old = api.audit(run, out=tmp_path / "old", **settings)
    rows = {r["name"]: r for r in old["summary"]}
    assert not old["privacy"]["comparable"]
    for name in ("mia_auc", "mia_tpr_at_0.1%_fpr"):
        assert rows[name]["value"] is None and not rows[name]["flag"]
        assert rows[name]["description"].startswith("not comparable (distribution shift)")
    assert "Not comparable (distribution shift)" in (tmp_path / "old" / "report.html").read_text()
