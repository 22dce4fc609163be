"""Canaries, exposure, membership inference and the audit report, on a tiny over-trained model
trained once through the CLI with --canaries."""

import json
import random
import re
from pathlib import Path

import pytest

from tests.test_cli import assert_clear_error, trustgen
from trustgen import api, io
from trustgen.evaluate import memorization as mem
from trustgen.evaluate.report import fmt

WORDS = ["speak", "hear", "me", "citizen", "resolved", "rather", "die", "famish", "first", "all", "before",
         "proceed", "further", "you", "are", "we", "to", "than", "and", "the"]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One layer, 150 steps at a high learning rate on 6 small documents of random word lines
    (so held-out documents really are different), with 3 canaries: 1, 10 and 100 copies."""
    root = tmp_path_factory.mktemp("audit")
    rng = random.Random(0)
    (root / "data").mkdir()
    for i in range(6):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(60)]
        (root / "data" / f"d{i}.txt").write_text("\n".join(lines) + "\n")
    result = trustgen("train", "--data", str(root / "data"), "--out", str(root / "run"), "--canaries", "3",
                      "--max-steps", "150", "--lr", "0.01", "--warmup-steps", "10", "--eval-interval", "1000",
                      "--val-fraction", "0.3", "--precision", "fp32", "--batch-size", "32", "--n-layer", "1",
                      "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--quiet")
    assert result.returncode == 0, result.stderr
    return root / "run"


@pytest.mark.slow
def test_canaries_are_recorded_and_marked(overfit: Path) -> None:
    record = json.loads((overfit / "canaries.json").read_text())
    assert "NOT REAL DATA" in record["note"]
    assert [c["repetitions"] for c in record["inserted"]] == [1, 10, 100]
    assert len(record["controls"]) == 3 and all(c["repetitions"] == 0 for c in record["controls"])
    assert io.read_json(overfit / "trainer_state.json")["data"]["canaries"] == 3


def test_inserted_canary_is_exposed_and_a_never_seen_one_is_not(overfit: Path) -> None:
    model = api.load(overfit, device="cpu")
    found = mem.exposures(model.model, model.tokenizer, io.read_json(overfit / "canaries.json"), candidates=500)
    by_reps = {c["repetitions"]: c for c in found["canaries"] if c["repetitions"]}
    controls = [c for c in found["canaries"] if c["repetitions"] == 0]
    assert by_reps[100]["exposure_skewnorm"] > 10
    assert by_reps[100]["exposure_rank"] == pytest.approx(found["rank_limit_bits"])  # beats every candidate
    assert max(c["exposure_skewnorm"] for c in controls) < by_reps[100]["exposure_skewnorm"] - 5
    assert sum(c["exposure_skewnorm"] for c in controls) / len(controls) < 5


def test_membership_inference_separates_an_overfit_model(overfit: Path) -> None:
    from trustgen.config import TrainConfig
    from trustgen.data.prepare import prepare_data
    from trustgen.data.text import TokenWindows

    model = api.load(overfit, device="cpu")
    prepared = prepare_data(TrainConfig.from_dict(model.run_config["train"]), model.tokenizer)
    found = mem.membership_inference(model.model, TokenWindows(prepared.train, 32), TokenWindows(prepared.val, 32),
                                     n=200)
    assert found["auc"] > 0.6
    assert found["member_loss_mean"] < found["non_member_loss_mean"]


def test_report_structure_and_numbers_match_json(overfit: Path, tmp_path: Path) -> None:
    report = api.audit(overfit, samples=6, max_new_tokens=60, out=tmp_path, device="cpu", canary_candidates=300,
                       extraction_prompts=10, mia_examples=50, heldout_tokens=2000, fairness=False)
    saved = json.loads((tmp_path / "report.json").read_text())
    page = (tmp_path / "report.html").read_text()
    for section in ("summary", "quality", "diversity", "memorization", "canaries", "privacy", "samples"):
        assert f'<section id="{section}">' in page
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained
    assert page.count("data:image/png;base64,") >= 4
    names = [row["name"] for row in saved["summary"]]
    assert {"perplexity", "distinct_2", "self_bleu", "memorized_fraction", "canary_exposure_100", "control_exposure",
            "mia_auc", "mia_tpr_at_0.1%_fpr", "extraction_rate", "empirical_epsilon_lower"} <= set(names)
    # One canary inserted once against its control: the audit runs, but so few cannot prove much.
    assert saved["privacy_audit"]["claimed_epsilon"] is None and saved["privacy_audit"]["members"] == 1
    for row in saved["summary"]:
        cells = re.search(rf'<tr data-metric="{re.escape(row["name"])}"[^>]*>.*?<td class="num value">(.*?)</td>'
                          r'<td class="num reference">(.*?)</td>', page)
        assert cells is not None, row["name"]
        assert cells.group(1) == fmt(row["value"]) and cells.group(2) == fmt(row["reference"])
    assert report["summary"] == saved["summary"]


@pytest.mark.slow
def test_audit_fail_on_exit_codes(overfit: Path, tmp_path: Path) -> None:
    args = ["audit", str(overfit), "--samples", "4", "--max-tokens", "40", "--no-fairness", "--out", str(tmp_path),
            "--canary-candidates", "300", "--mia-examples", "50"]
    failed = trustgen(*args, "--fail-on", "canary_exposure_100>5,memorized_fraction>1")
    assert failed.returncode == 1, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("audit failed: canary_exposure_100>5") and "memorized_fraction" not in last
    # A gate on a measure this run cannot give (a tiny corpus holds nothing out for membership
    # inference) fails closed, saying so.
    unmeasured = trustgen(*args, "--fail-on", "mia_auc>0.99")
    assert unmeasured.returncode == 1 and "mia_auc>0.99 (not measured)" in unmeasured.stderr
    assert (tmp_path / "report.html").exists()  # the report is written before failing
    passed = trustgen(*args, "--fail-on", "memorized_fraction>1", "--json")
    assert passed.returncode == 0, passed.stderr
    assert any(row["name"] == "memorized_fraction" and row["threshold"] == "> 1" for row in json.loads(passed.stdout))


@pytest.mark.slow
def test_audit_bad_input_is_one_clear_line(run: Path, tmp_path: Path) -> None:
    assert_clear_error(trustgen("audit", str(tmp_path / "missing")), "not a run directory")
    assert_clear_error(trustgen("audit", str(run), "--fail-on", "memorized_fraction=>0.1"), "--fail-on")
    assert_clear_error(trustgen("audit", str(run), "--fail-on", "memorised>0.1"), "memorised")
    assert_clear_error(trustgen("audit", str(run), "--fail-on", "canary_exposure_100>10"), "--canaries")
    assert_clear_error(trustgen("audit", str(run), "--samples", "1"), "--samples")
    assert_clear_error(trustgen("train", "--model", "vae", "--data", "digits", "--canaries", "2", "--out",
                                str(tmp_path / "v"), "--max-steps", "1"), "canaries")
