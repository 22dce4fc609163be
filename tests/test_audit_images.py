"""The audit of an image run: the image metrics, class balance, and the class-balanced sampling
mitigation of a conditional model with its before/after numbers."""

import json
from pathlib import Path

import numpy as np
import pytest

from trustgen import api


@pytest.mark.slow
def test_image_audit_reports_balance_before_and_after_balanced_sampling(cvae: Path, tmp_path: Path) -> None:
    report = api.audit(cvae, samples=40, out=tmp_path / "audit", fail_on="class_tvd_uniform_balanced>0.5")
    assert report["kind"] == "image"
    names = {row["name"]: row for row in report["summary"]}
    assert {"fid", "fid_ratio", "class_tvd", "class_tvd_uniform_as_trained", "class_tvd_uniform_balanced"} <= set(names)
    mitigation = report["balanced_sampling"]
    assert np.allclose(mitigation["balanced"]["requested"], 0.1)  # every class in turn
    assert abs(sum(mitigation["as_trained"]["requested"]) - 1) < 1e-9
    for way in ("as_trained", "balanced"):
        histogram = np.asarray(mitigation[way]["histogram"])
        expected = 0.5 * np.abs(histogram - 0.1).sum()
        assert abs(histogram.sum() - 1) < 1e-9 and abs(mitigation[way]["tvd_uniform"] - expected) < 1e-9
    # the tiny model draws nearly one class whatever it is asked, so the rule is crossed
    crossed = names["class_tvd_uniform_balanced"]["value"] > 0.5
    assert any(f.startswith("class_tvd_uniform_balanced") for f in report["failed"]) == crossed
    saved = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert saved["balanced_sampling"] == mitigation
    assert "class_tvd_uniform_balanced" in (tmp_path / "audit" / "report.html").read_text()
