"""The training loop: learning, run-directory contents, exact resume after kill -9, fine-tuning."""

import csv
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import trustgen
from trustgen import io, runs
from trustgen.errors import TrustgenError
from trustgen.training.optim import learning_rate
from trustgen.training.trainer import Trainer

TINY_GPT = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16}
TINY_RNN = {"cell": "gru", "n_layer": 1, "hidden_size": 24, "embed_size": 8, "block_size": 16}
FAST = {"batch_size": 8, "warmup_steps": 5, "eval_batches": 2, "log_interval": 5, "learning_rate": 1e-2}


def val_losses(run: Path) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(r["val_loss"]) for r in csv.DictReader(f) if r["val_loss"]]


@pytest.mark.parametrize(("family", "shape"), [("gpt", TINY_GPT), ("rnn", TINY_RNN)])
def test_training_lowers_the_validation_loss_and_writes_a_complete_run(
        corpus: Path, tmp_path: Path, family: str, shape: dict) -> None:
    run = tmp_path / "run"
    summary = trustgen.train(run, data=str(corpus), model=family, model_config=shape, max_steps=60,
                             eval_interval=10, progress=False, **FAST)
    losses = val_losses(run)
    assert len(losses) == 6
    assert losses[-1] < 0.85 * losses[0]
    assert summary["step"] == 60 and summary["final_val_loss"] < losses[0]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json",
                 "optimizer.safetensors", "metrics.csv", "loss.png", "summary.json"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert not list(run.glob("*.tmp")) and not (run / io.JOURNAL).exists()
    config = runs.read_run_config(run)
    assert config["family"] == family and config["tokenizer"] == "char"
    assert trustgen.load(run).generate("First", max_new_tokens=10, seed=0)[0]


def test_bpe_tokenizer_run(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "bpe"
    trustgen.train(run, data=str(corpus), tokenizer="bpe", vocab_size=300, model_config=TINY_GPT,
                   max_steps=5, progress=False, **FAST)
    model = trustgen.load(run)
    assert model.tokenizer.kind == "bpe" and 256 < model.tokenizer.vocab_size <= 300
    assert isinstance(model.generate("Speak", max_new_tokens=5, seed=1)[0], str)
    tuned = tmp_path / "tuned"  # fine-tuned with the tokenizer it brings, and recorded as trained
    trustgen.train(tuned, data=str(corpus), init_from=str(run), max_steps=1, progress=False, **FAST)
    assert runs.read_run_config(tuned)["train"]["tokenizer"] == "bpe"


def test_learning_rate_warms_up_then_decays_to_the_minimum() -> None:
    config = trustgen.TrainConfig(max_steps=100, warmup_steps=10, learning_rate=1.0, min_learning_rate=0.1)
    rates = [learning_rate(config, s, s / 100) for s in range(101)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert rates[100] == pytest.approx(0.1)


def _train_command(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trustgen.cli", "train", "--data", str(data), "--out", str(out),
            "--max-steps", str(steps), "--eval-interval", "3", "--batch-size", "8", "--n-layer", "1",
            "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--quiet", "--seed", "5", *extra]


# With DP on, the accountant's history, the noise generator and the Poisson sampler resume too.
PRIVATE_RUN = ("--dp-epsilon", "8", "--dp-accountant", "rdp", "--batch-size", "16")


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
EXIT_CODES = {signal.SIGKILL: -signal.SIGKILL, signal.SIGINT: 130, signal.SIGTERM: 143}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[tuple[str, ...]], tuple[Path, Path, int]]:
    """Tiny runs trained without interruption, one per set of extra options: (data, run, steps)."""
    from tests.conftest import tiny_corpus

    folder = tmp_path_factory.mktemp("straight")
    data, steps, made = tiny_corpus(folder / "data"), 60, {}

    def run(extra: tuple[str, ...]) -> tuple[Path, Path, int]:
        if extra not in made:
            out = folder / f"run{len(made)}"
            subprocess.run(_train_command(data, out, steps, *extra), check=True, env=ONE_THREAD, capture_output=True)
            made[extra] = out
        return data, made[extra], steps

    return run


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "extra"), [(signal.SIGKILL, ()), (signal.SIGINT, ()), (signal.SIGTERM, ()),
                                             (signal.SIGKILL, PRIVATE_RUN)],
                         ids=["SIGKILL", "SIGINT", "SIGTERM", "SIGKILL-private"])
def test_resume_after_a_kill_or_a_stop_signal_ends_with_the_same_weights(
        straight_run: Callable[[tuple[str, ...]], tuple[Path, Path, int]], tmp_path: Path, stop: signal.Signals,
        extra: tuple[str, ...]) -> None:
    data, straight, steps = straight_run(extra)
    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_command(data, killed, steps, *extra), env=ONE_THREAD,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # a private run first imports Opacus and plans its noise
    while time.time() < deadline:
        state = killed / "trainer_state.json"
        if state.exists() and io.read_json(state)["step"] >= 12:
            break
        time.sleep(0.02)
    process.send_signal(stop)
    _, stderr = process.communicate()
    interrupted_at = io.read_json(killed / "trainer_state.json")["step"]
    assert 12 <= interrupted_at < steps, "the run finished before it could be stopped"
    assert process.returncode == EXIT_CODES[stop], stderr
    if stop != signal.SIGKILL:  # a stop at a step boundary, with a checkpoint and a way on
        assert f"stopped by {stop.name} at step {interrupted_at}" in stderr and "--resume" in stderr
        assert "Traceback" not in stderr

    resumed = subprocess.run([sys.executable, "-m", "trustgen.cli", "train", "--resume", str(killed), "--quiet"],
                             env=ONE_THREAD, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = io.read_tensors(straight / "model.safetensors")
    b = io.read_tensors(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert io.read_json(killed / "trainer_state.json")["step"] == steps
    if extra:
        assert io.read_json(killed / "summary.json")["privacy"] == io.read_json(straight / "summary.json")["privacy"]


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    process = subprocess.Popen([*_train_command(corpus, run, 40), "--eval-interval", "1000"], env=ONE_THREAD,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "config.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "trainer_state.json").exists(), "the run wrote a checkpoint before it could be killed"
    again = subprocess.run([sys.executable, "-m", "trustgen.cli", "train", "--data", str(corpus), "--out", str(run)],
                           env=ONE_THREAD, capture_output=True, text=True)
    assert again.returncode == 2 and f"--resume {run}" in again.stderr
    resumed = subprocess.run([sys.executable, "-m", "trustgen.cli", "train", "--resume", str(run), "--quiet"],
                             env=ONE_THREAD, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "before its first checkpoint" in resumed.stderr and "from step 0" in resumed.stderr
    assert io.read_json(run / "trainer_state.json")["step"] == 40


@pytest.mark.slow
def test_resume_saves_overrides_with_its_first_checkpoint_and_refuses_a_finished_run(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    trustgen.train(run, data=str(corpus), model_config=TINY_GPT, max_steps=4, progress=False, **FAST)
    config, summary = (run / "config.json").read_bytes(), (run / "summary.json").read_bytes()
    with pytest.raises(TrustgenError, match=r"is finished \(4 steps.*larger --max-steps or --time-budget"):
        trustgen.resume(run, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(TrustgenError, match="no CUDA GPU"):
            trustgen.resume(run, progress=False, device="cuda", max_steps=6)

    def diverge(self: Trainer, progress: float) -> dict:
        raise TrustgenError("the training loss became nan at step 5.")

    monkeypatch.setattr(Trainer, "step", diverge)
    with pytest.raises(TrustgenError, match="nan"):
        trustgen.resume(run, progress=False, max_steps=6)
    monkeypatch.undo()
    assert (run / "config.json").read_bytes() == config and (run / "summary.json").read_bytes() == summary
    trustgen.resume(run, progress=False, max_steps=6)
    assert runs.read_run_config(run)["train"]["max_steps"] == 6
    assert io.read_json(run / "trainer_state.json")["step"] == io.read_json(run / "summary.json")["step"] == 6


def test_an_interrupted_checkpoint_commit_is_rolled_forward(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("old a")
    (tmp_path / "b.json").write_text("old b")
    # Simulate a crash after the journal was written and one file was already renamed.
    (tmp_path / "a.json").write_text("new a")
    (tmp_path / "b.json.tmp").write_text("new b")
    (tmp_path / io.JOURNAL).write_text('["a.json", "b.json"]')
    io.recover(tmp_path)
    assert (tmp_path / "a.json").read_text() == "new a" and (tmp_path / "b.json").read_text() == "new b"
    assert not (tmp_path / io.JOURNAL).exists()
    # A crash before the journal leaves the old files in force.
    (tmp_path / "a.json.tmp").write_text("newer a")
    io.recover(tmp_path)
    assert (tmp_path / "a.json").read_text() == "new a"


def test_fine_tuning_from_a_run_freezes_the_first_layers(corpus: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    trustgen.train(base, data=str(corpus), model_config={**TINY_GPT, "n_layer": 2}, max_steps=10,
                   progress=False, **FAST)
    more = tmp_path / "more"
    more.mkdir()
    (more / "extra.txt").write_text("All:\nSpeak, speak, resolved.\n" * 50)
    tuned = tmp_path / "tuned"
    trustgen.train(tuned, data=str(more), init_from=str(base), freeze_layers=1, max_steps=10,
                   progress=False, **FAST)
    before = io.read_tensors(base / "model.safetensors")
    after = io.read_tensors(tuned / "model.safetensors")
    frozen = [n for n in before if n.startswith(("wte.", "wpe.", "blocks.0."))]
    trained = [n for n in before if n.startswith(("blocks.1.", "norm_f."))]
    assert frozen and trained
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in trained)
    assert (tuned / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()


def test_fine_tuning_data_with_unknown_characters_is_a_clear_error(corpus: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    trustgen.train(base, data=str(corpus), model_config=TINY_GPT, max_steps=2, progress=False, **FAST)
    other = tmp_path / "other.txt"
    other.write_text("日本語のテキスト\n" * 100)
    with pytest.raises(TrustgenError, match="never saw"):
        trustgen.train(tmp_path / "t", data=str(other), init_from=str(base), max_steps=2, progress=False)


def test_training_refuses_to_overwrite_a_run_and_checks_its_settings(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trustgen.train(run, data=str(corpus), model_config=TINY_GPT, max_steps=2, progress=False, **FAST)
    with pytest.raises(TrustgenError, match="already holds a run"):
        trustgen.train(run, data=str(corpus), model_config=TINY_GPT, max_steps=2, progress=False)
    with pytest.raises(TrustgenError, match="freeze"):
        trustgen.train(tmp_path / "x", data=str(corpus), freeze_layers=1, max_steps=2, progress=False)
    with pytest.raises(TrustgenError, match="max_steps or time_budget"):
        trustgen.TrainConfig(data=str(corpus))
    assert trustgen.api.train_config({"data": str(corpus)}).time_budget == 300
    with pytest.raises(TrustgenError, match="duration"):
        trustgen.train(tmp_path / "z", data=str(corpus), time_budget="soon", progress=False)


@pytest.mark.slow
def test_compiled_training_saves_plain_parameter_names(corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch._inductor")
    run = tmp_path / "compiled"
    trustgen.train(run, data=str(corpus), model_config=TINY_GPT, max_steps=2, compile=True, progress=False, **FAST)
    names = set(io.read_tensors(run / "model.safetensors"))
    assert names and not any("_orig_mod" in n for n in names)
    assert trustgen.load(run).generate("All", max_new_tokens=3, seed=0)


def test_training_and_resuming_leave_the_callers_random_state_alone(corpus: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    trustgen.train(tmp_path / "a", data=str(corpus), model_config=TINY_GPT, max_steps=3, progress=False, **FAST)
    assert torch.equal(torch.get_rng_state(), before)
    trustgen.resume(tmp_path / "a", progress=False, max_steps=5)
    assert torch.equal(torch.get_rng_state(), before)
    # The run's seed alone decides the model, whatever the caller's random state was.
    torch.manual_seed(999)
    trustgen.train(tmp_path / "b", data=str(corpus), model_config=TINY_GPT, max_steps=5, progress=False, **FAST)
    a, b = io.read_tensors(tmp_path / "a" / "model.safetensors"), io.read_tensors(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def tiny_text_training(corpus: Path) -> tuple:
    from trustgen.data.prepare import prepare_data
    from trustgen.models.registry import build_model, model_config
    from trustgen.training.data import text_training_data

    config = trustgen.api.train_config({"data": str(corpus), "max_steps": 4, "eval_interval": 2, **FAST})
    prepared = prepare_data(config)
    model = build_model("gpt", model_config("gpt", {**TINY_GPT, "vocab_size": prepared.tokenizer.vocab_size}))
    return config, model, text_training_data(prepared, TINY_GPT["block_size"])


def test_a_wrap_hook_gets_model_optimizers_and_data_once_before_training(corpus: Path, tmp_path: Path) -> None:
    """Where a privacy engine will wrap the model, the optimizer and the data sampler."""
    from trustgen.training.trainer import Trainer

    config, model, data = tiny_text_training(corpus)

    class CountingSource:
        def __init__(self, inner: object) -> None:
            self.inner, self.drawn = inner, 0

        def sample(self, batch_size: int, generator: torch.Generator) -> tuple:
            self.drawn += 1
            return self.inner.sample(batch_size, generator)

    calls = []

    def wrap(module: torch.nn.Module, optimizers: dict, source: object) -> tuple:
        calls.append((module, sorted(optimizers)))
        counting = CountingSource(source)
        calls.append(counting)
        return module, {"model": torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)}, counting

    (tmp_path / "run").mkdir()
    trainer = Trainer(tmp_path / "run", config, model, data, torch.device("cpu"), wrap=wrap)
    trainer.fit(show_progress=False)
    (wrapped_model, names), counting = calls
    assert wrapped_model is model and names == ["model"]
    assert counting.drawn == 4  # every training batch came through the wrapped source
    assert isinstance(trainer.objective.optimizers["model"], torch.optim.SGD)
    saved = io.read_tensors(tmp_path / "run" / "optimizer.safetensors")
    assert saved and all(key.endswith("momentum_buffer") for key in saved)  # the wrapped optimizer was trained


def test_train_steps_trains_a_model_with_no_run_directory_and_no_global_state(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The function a federated client or a launched worker calls: weights in and out through the model."""
    from trustgen.training.trainer import train_steps

    monkeypatch.chdir(tmp_path)
    config, model, data = tiny_text_training(corpus)
    config = config.replace(warmup_steps=0, precision="fp32")
    batch = data.train.sample(8, torch.Generator().manual_seed(0))
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return model.loss(*batch)[0].item()

    before = loss()
    rng = torch.get_rng_state()
    files = sorted(tmp_path.rglob("*"))
    metrics = train_steps(model, data.train, config, steps=40)
    assert loss() < 0.8 * before
    assert metrics["steps"] == 40 and metrics["rows"] == 40 * config.batch_size and metrics["train_loss"] < before
    assert torch.equal(torch.get_rng_state(), rng)
    assert sorted(tmp_path.rglob("*")) == files  # no files, no run directory
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    train_steps(model, data.train, config, steps=40)
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())  # same seed, same weights
