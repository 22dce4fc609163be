"""The sampling sweep: range parsing, the Pareto frontier and its knee, a real sweep, the CLI."""

import json
from pathlib import Path

import pytest

from tests.test_cli import assert_clear_error, trustgen
from trustgen import api
from trustgen.errors import TrustgenError
from trustgen.evaluate.sweep import knee, pareto_front, parse_values, sweep


def test_parse_ranges_and_lists() -> None:
    assert parse_values("0.5:1.5:0.1", "--temperature") == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    assert parse_values("0.8,0.9,1.0", "--top-p") == [0.8, 0.9, 1.0]
    assert parse_values(" 1 ", "--temperature") == [1.0]
    assert parse_values("0:1:0.4", "--temperature") == [0.0, 0.4, 0.8]  # stop is included only when reached
    for bad, words in [("0.5-1.5", "cannot read"), ("1.5:0.5:0.1", "stop >= start"), ("0:1:0", "positive step"),
                       ("0.8,,0.9", "cannot read"), ("a,b", "cannot read"), ("0:100:0.1", "the most")]:
        with pytest.raises(TrustgenError, match=words):
            parse_values(bad, "--temperature")


def test_pareto_front_of_synthetic_points() -> None:
    costs = [(1.0, 0.9), (2.0, 0.5), (3.0, 0.2), (2.5, 0.6), (1.5, 0.95), (4.0, 0.2), (1.0, 0.9)]
    # (2.5, 0.6) is beaten by (2.0, 0.5); (1.5, 0.95) by (1.0, 0.9); (4.0, 0.2) by (3.0, 0.2);
    # the two equal points do not beat each other.
    assert pareto_front(costs) == [0, 1, 2, 6]
    # The knee of (1, .9), (2, .5), (3, .2) lies in the middle.
    assert knee(costs, [0, 1, 2]) == 1
    assert knee([(1.0, 1.0), (2.0, 0.1)], [0, 1]) == 1  # two points: lower costs relative to their means


def test_sweep_of_a_real_model_writes_table_json_and_plot(run: Path, tmp_path: Path) -> None:
    model = api.load(run, device="cpu")
    result = sweep(model, [0.5, 1.5], [0.9, None], samples=4, max_new_tokens=12, out=tmp_path)
    assert len(result["points"]) == 4 and result["frontier"]
    assert all(p["perplexity"] > 1 and 0 <= p["self_bleu"] <= 1 for p in result["points"])
    hot = next(p for p in result["points"] if p["temperature"] == 1.5 and p["top_p"] is None)
    cold = next(p for p in result["points"] if p["temperature"] == 0.5 and p["top_p"] == 0.9)
    assert hot["perplexity"] > cold["perplexity"]  # hotter sampling drifts from what the model expects
    assert result["recommended"] in result["frontier"]
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["recommended"] == result["recommended"]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(TrustgenError, match="at least 2"):
        sweep(model, [1.0], samples=1)
    with pytest.raises(TrustgenError, match="top_p"):
        sweep(model, [1.0], [1.5], samples=2)


@pytest.mark.slow
def test_cli_sweep_and_its_errors(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = trustgen("sweep", str(run), "--temperature", "0.8,1.2", "--min-p", "0.05", "--samples", "3",
                      "--max-tokens", "8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "recommended: T=" in result.stdout and (out / "sweep.png").exists()
    assert_clear_error(trustgen("sweep", str(run), "--temperature", "1.5:0.5:0.1"), "--temperature", "stop >= start")
    assert_clear_error(trustgen("sweep", str(run), "--top-p", "0.9;1.0"), "--top-p", "cannot read")
