"""An empirical lower bound on epsilon from canaries in one training run.

Jagielski, Ullman & Oprea 2020 ("Auditing Differentially Private Machine Learning", arXiv:2006.07709):
a membership test that calls an example "in" with false-positive rate FPR and false-negative
rate FNR proves that any (eps, delta)-DP training has

    eps >= max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR)).

The rates are counted on canaries inserted once (members) and never-inserted controls of the
same format (non-members), with the test "log-perplexity below a threshold", and replaced by
their Clopper-Pearson upper confidence limits; every threshold is tried, so the confidence
level is split among them (Bonferroni). The bound then holds with probability 1 - alpha. A bound
above the claimed epsilon means the DP implementation is broken.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

ALPHA = 0.05


def clopper_pearson_upper(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided upper confidence limits (level 1 - alpha) of binomial rates."""
    from scipy import stats

    successes = np.asarray(successes)
    upper = stats.beta.ppf(1 - alpha, successes + 1, np.maximum(trials - successes, 1))
    return np.where(successes >= trials, 1.0, upper)


def epsilon_lower_bound(member_scores: Sequence[float], non_member_scores: Sequence[float],
                        delta: float = 0.0, alpha: float = ALPHA) -> dict[str, Any]:
    """The largest epsilon lower bound over thresholds of the test "score <= threshold means
    member" (scores: log-perplexities, lower for memorized secrets)."""
    members, others = np.sort(np.asarray(member_scores, float)), np.sort(np.asarray(non_member_scores, float))
    if len(members) == 0 or len(others) == 0:
        return {"epsilon_lower": 0.0, "members": len(members), "non_members": len(others), "alpha": alpha}
    thresholds = np.unique(np.r_[members, others])
    false_pos = np.searchsorted(others, thresholds, side="right")  # controls called members
    false_neg = len(members) - np.searchsorted(members, thresholds, side="right")  # canaries missed
    level = alpha / (2 * len(thresholds))  # both rates, every threshold
    fpr = clopper_pearson_upper(false_pos, len(others), level)
    fnr = clopper_pearson_upper(false_neg, len(members), level)
    with np.errstate(divide="ignore", invalid="ignore"):
        bounds = np.fmax(np.log((1 - delta - fnr) / fpr), np.log((1 - delta - fpr) / fnr))
    bounds = np.nan_to_num(bounds, nan=0.0, neginf=0.0)
    best = int(np.argmax(bounds))
    return {"epsilon_lower": max(0.0, float(bounds[best])), "threshold": float(thresholds[best]),
            "fpr_upper": float(fpr[best]), "fnr_upper": float(fnr[best]), "members": len(members),
            "non_members": len(others), "alpha": alpha, "delta": delta}


def canary_audit(exposure: dict[str, Any], claimed: dict[str, Any] | None) -> dict[str, Any]:
    """The lower bound from an exposure report (trustgen.evaluate.memorization.exposures):
    canaries inserted once against the controls, beside the run's claimed guarantee (None
    for a run trained without DP)."""
    rows = exposure["canaries"]
    members = [r["log_perplexity"] for r in rows if r["repetitions"] == 1]
    controls = [r["log_perplexity"] for r in rows if r["repetitions"] == 0]
    delta = claimed["delta"] if claimed else 0.0
    bound = epsilon_lower_bound(members, controls, delta)
    bound["claimed_epsilon"] = claimed["epsilon"] if claimed else None
    bound["consistent"] = claimed is None or bound["epsilon_lower"] <= claimed["epsilon"] + 1e-9
    bound["max_possible"] = _max_bound(len(members), len(controls), delta)
    return bound


def _max_bound(members: int, non_members: int, delta: float) -> float:
    """The largest bound these counts could show (a perfect test): how strong the audit can be."""
    perfect = epsilon_lower_bound(np.zeros(members), np.ones(non_members), delta)
    return perfect["epsilon_lower"] if members and non_members else math.nan


__all__ = ["canary_audit", "clopper_pearson_upper", "epsilon_lower_bound"]
