"""Differentially private training (trustgen.training.privacy) and the empirical privacy audit
(trustgen.evaluate.privacy_audit): units of privacy, budgets, accounting, noise, every family."""

import itertools
import math
import string
from pathlib import Path

import numpy as np
import pytest
import torch

import trustgen
from tests.test_cli import assert_clear_error
from tests.test_cli import trustgen as cli
from trustgen import io, runs
from trustgen.config import ConfigError, TrainConfig
from trustgen.errors import TrustgenError
from trustgen.evaluate.memorization import log_perplexities
from trustgen.evaluate.privacy_audit import epsilon_lower_bound
from trustgen.training.privacy import (
    DisjointWindows,
    DocumentWindows,
    check_private,
    default_delta,
    describe,
    group_bound,
)

TINY_GPT = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16}
PRIVATE = {"dp_epsilon": 8.0, "dp_accountant": "rdp", "batch_size": 16, "warmup_steps": 0, "eval_batches": 2,
           "eval_interval": 3, "log_interval": 1}


class Stream:
    """A token stream standing in for TokenWindows: batch(starts) reads windows of T + 1 tokens."""

    def __init__(self, n_tokens: int, block_size: int) -> None:
        self.n_tokens, self.block_size = n_tokens, block_size

    def batch(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block = starts.unsqueeze(1) + torch.arange(self.block_size + 1)
        return block[:, :-1], block[:, 1:]


# -- fast: units, deltas, settings, the bound --------------------------------------------------

def test_disjoint_windows_put_every_token_in_exactly_one_example() -> None:
    examples = DisjointWindows(Stream(1000, 15))
    x, y = examples.batch(torch.arange(len(examples)))
    tokens = torch.cat([x, y[:, -1:]], dim=1).flatten()
    assert len(examples) == 1000 // 16 and len(tokens) == len(set(tokens.tolist()))


def test_document_windows_stay_inside_their_document_and_report_the_group() -> None:
    # Documents of 10, 40 and 5 tokens with a 2-token separator; windows of 16 tokens.
    examples = DocumentWindows(Stream(59, 15), [10, 40, 5], separator=2)
    assert len(examples) == 1 + 3 + 1 and examples.group == 3
    x, y = examples.batch(torch.arange(len(examples)))
    documents = [range(0, 10), range(12, 52), range(54, 59)]
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        targets = [t for t in row_y if t != -100]
        home = next(d for d in documents if targets[0] in d)
        assert all(t in home for t in targets)  # no target from another document
        assert all(t in home or t == 0 for t in row_x[1:])
    assert group_bound(1.0, 1e-6, 3) == (3.0, pytest.approx(3 * math.exp(2) * 1e-6))


def test_default_delta_is_below_one_over_n_and_a_larger_one_is_refused() -> None:
    config = TrainConfig(max_steps=1, dp_epsilon=1.0, batch_size=16)
    assert check_private(config, 1000) == default_delta(1000) < 1 / 1000
    with pytest.raises(TrustgenError, match="must be below 1/N"):
        check_private(config.replace(dp_delta=1e-3), 1000)
    with pytest.raises(TrustgenError, match="grad_accum"):
        check_private(config.replace(grad_accum=2), 1000)
    with pytest.raises(TrustgenError, match="at least 14"):
        check_private(config.replace(batch_size=8), 1000)


@pytest.mark.parametrize(("field", "value", "words"), [
    ("dp_epsilon", 0.0, "dp_epsilon must be positive"), ("dp_epsilon", -1.0, "dp_epsilon must be positive"),
    ("dp_delta", 1.0, "dp_delta must lie in (0, 1)"), ("dp_delta", 0.0, "dp_delta must lie in (0, 1)"),
    ("max_grad_norm", 0.0, "max_grad_norm must be positive")])
def test_bad_privacy_settings_fail_with_a_sentence(field: str, value: float, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(max_steps=1, dp_epsilon=1.0).replace(**{field: value})


def test_the_claim_names_the_unit_the_group_and_what_fine_tuning_covers() -> None:
    record = {"epsilon": 2.0, "delta": 1e-6, "unit": "document", "group": 3, "document_epsilon": 6.0,
              "document_delta": 2e-4, "covers": "the fine-tuning data only"}
    line = describe(record)
    assert line.startswith("trained with (2, 1e-06)-DP, unit: one document")
    assert "up to 3 windows: (6, 0.0002)-DP" in line and "covers the fine-tuning data only" in line


def test_the_bound_is_positive_for_a_perfect_test_and_small_for_chance() -> None:
    perfect = epsilon_lower_bound(np.zeros(200), np.ones(200))
    assert perfect["epsilon_lower"] > 2.5
    rng = np.random.default_rng(0)
    chance = epsilon_lower_bound(rng.normal(size=200), rng.normal(size=200))
    assert chance["epsilon_lower"] < 0.5


# -- slow: private training of every family ---------------------------------------------------

def _text(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("\n".join(lines) + "\n")
    return folder


FAMILIES = [("gpt", TINY_GPT, {}), ("rnn", {"cell": "lstm", "hidden_size": 16, "embed_size": 8, "block_size": 16}, {}),
            ("vae", {"width": 8, "latent_dim": 4}, {"data": "digits"}),
            ("gan", {"width": 8, "discriminator_width": 8, "latent_dim": 4}, {"data": "digits"})]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "shape", "data"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_trains_privately_and_records_its_guarantee(family: str, shape: dict, data: dict,
                                                                  corpus: Path, tmp_path: Path) -> None:
    from opacus.accountants import RDPAccountant

    run = tmp_path / family
    summary = trustgen.train(run, model=family, model_config=shape, max_steps=4, progress=False,
                             **{"data": str(corpus), **data, **PRIVATE})
    privacy = summary["privacy"]
    # The accountant's epsilon is Opacus' own for the same noise, rate and steps.
    reference = RDPAccountant()
    reference.history = [(privacy["noise_multiplier"], privacy["sample_rate"], 4)]
    assert privacy["epsilon"] == pytest.approx(reference.get_epsilon(privacy["delta"]))
    assert 7.5 < privacy["epsilon"] <= 8.0 and privacy["steps"] == privacy["planned_steps"] == 4
    assert io.read_json(run / "config.json")["privacy"]["epsilon"] == privacy["epsilon"]
    assert io.read_json(run / "summary.json")["privacy"]["unit"] == ("image" if data else "window")
    runs.load_run_model(run)  # the weights read back into the plain model
    metrics = (run / "metrics.csv").read_text()
    assert "epsilon" in metrics.splitlines()[0]
    if family == "gpt":
        assert "unit: one window of 17 tokens" in trustgen.load(run).info()["privacy"]
        text = trustgen.load(run).generate("All", max_new_tokens=5, seed=1)[0]
        sidecar = text.save(tmp_path / "out.txt").manifest
        assert "trained with (" in io.read_json(sidecar)["claim"]["privacy"]


@pytest.mark.slow
def test_dp_noise_changes_the_update_and_the_run_stops_at_its_budget(corpus: Path, tmp_path: Path) -> None:
    settings = {"data": str(corpus), "model_config": TINY_GPT, "progress": False, **PRIVATE}
    noisy = trustgen.train(tmp_path / "noisy", max_steps=3, **settings)
    quiet = trustgen.train(tmp_path / "quiet", max_steps=3, **{**settings, "dp_epsilon": 100.0})
    a, b = (io.read_tensors(tmp_path / name / "model.safetensors") for name in ("noisy", "quiet"))
    assert noisy["privacy"]["noise_multiplier"] > quiet["privacy"]["noise_multiplier"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # Resuming with more steps cannot spend more than the target: the plan is kept.
    again = trustgen.resume(tmp_path / "noisy", progress=False, max_steps=10)
    assert again["step"] == 3 and again["privacy"]["epsilon"] <= 8.0


@pytest.mark.slow
def test_a_time_budget_is_replanned_at_the_pace_the_steps_really_go(corpus: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe before the first step guesses 0.2 s a step, far slower than this tiny model's
    steps: after half of the guessed plan the run measures its own pace, plans the steps that fit
    in the rest of the budget and gives them the larger noise that keeps the whole run within
    the target, instead of stopping at the guess with most of the budget unused."""
    from opacus.accountants.utils import get_noise_multiplier

    from trustgen.training import privacy

    monkeypatch.setattr(privacy, "probe_seconds", lambda *args: 0.2)
    budget = 4.0
    summary = trustgen.train(tmp_path / "r", data=str(corpus), model_config=TINY_GPT, time_budget=budget,
                             progress=False, **{**PRIVATE, "eval_interval": 10_000})
    record = summary["privacy"]
    guessed = int(budget / (0.2 * privacy.PROBE_OVERHEAD))
    assert record["steps"] > guessed and record["planned_steps"] > guessed
    assert record["epsilon"] <= 8.0
    guessed_noise = get_noise_multiplier(target_epsilon=8.0, target_delta=record["delta"],
                                         sample_rate=record["sample_rate"], steps=guessed, accountant="rdp")
    assert record["noise_multiplier"] > guessed_noise


def test_private_image_runs_refuse_settings_that_fit_the_data_outside_dp_sgd(tmp_path: Path) -> None:
    with pytest.raises(TrustgenError, match="prior='standard'"):
        trustgen.train(tmp_path / "v", model="vae", model_config={"prior": "mixture"}, data="digits",
                       max_steps=1, progress=False, **PRIVATE)


@pytest.mark.slow  # a CLI process
def test_cli_privacy_options_need_an_epsilon(tmp_path: Path) -> None:
    result = cli("train", "--data", "x", "--out", str(tmp_path / "r"), "--dp-delta", "1e-6", "--max-steps", "1")
    assert_clear_error(result, "--dp-epsilon")


def _secrets(n: int, seed: int) -> tuple[list[str], list[str]]:
    """2n distinct two-letter secrets, split in two."""
    pairs = ["".join(p) for p in itertools.product(string.ascii_lowercase, repeat=2)]
    lines = [f"code {pairs[i]}" for i in np.random.default_rng(seed).choice(len(pairs), 2 * n, replace=False)]
    return lines[:n], lines[n:]


@pytest.mark.slow
def test_the_canary_bound_is_clearly_positive_without_dp_and_within_the_claim_with_it(tmp_path: Path) -> None:
    """One run each: 200 secrets inserted once (nearly the whole corpus, so a small model learns
    which they are in a few hundred steps) against 200 never inserted. Without DP the inserted
    ones are bits more likely and the bound is above 1; with DP at epsilon 1 neither holds."""
    members, controls = _secrets(200, 1)
    # The held-out tail (the last tenth of a one-file corpus) is filler, so every secret is trained on.
    data = _text(tmp_path / "data", members + ["and nothing else to see here"] * 30)
    shape = {"n_layer": 1, "n_head": 2, "n_embd": 64, "block_size": 32}
    bounds, gaps = {}, {}
    for name, extra in (("plain", {}), ("private", {"dp_epsilon": 1.0, "dp_accountant": "rdp"})):
        trustgen.train(tmp_path / name, data=str(data), model_config=shape, max_steps=400, batch_size=16,
                       learning_rate=1e-2, warmup_steps=10, eval_interval=400, eval_batches=1, weight_decay=0.0,
                       progress=False, **extra)
        model = trustgen.load(tmp_path / name, device="cpu", precision="fp32")
        scores = log_perplexities(model.model, model.tokenizer, members + controls)
        bounds[name] = epsilon_lower_bound(scores[:200], scores[200:])["epsilon_lower"]
        gaps[name] = scores[200:].mean() - scores[:200].mean()  # bits by which inserted secrets are likelier
    assert bounds["plain"] > 1.0 and gaps["plain"] > 2.0, (bounds, gaps)
    assert bounds["private"] <= 1.0 and abs(gaps["private"]) < 0.5, (bounds, gaps)


@pytest.mark.slow  # imports Opacus
def test_a_layer_opacus_cannot_handle_is_named_with_the_family() -> None:
    from trustgen.training.privacy import check_layers

    with pytest.raises(TrustgenError, match=r"a layer of the vae model: .*BatchNorm"):
        check_layers(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)), "vae")
