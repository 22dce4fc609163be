"""CPU threads on a shared machine: on a busy machine the CLI makes OpenMP's waiting threads sleep
(unless the user chose otherwise) and takes fewer torch threads, on an idle one it leaves both as
torch has them, and --threads is exact (bench/threads.py measured each on a 2-core machine)."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from typer.testing import CliRunner

from trustgen import cli, cores
from trustgen.cli import app

# What the `trustgen` script does, then the environment its commands run with.
ENTRY = """
import os, sys
import trustgen.cli
assert "torch" not in sys.modules, "torch is loaded before main() can set OMP_WAIT_POLICY"
sys.argv = ["trustgen", "train"]  # fails for want of --out, after main() chose
try:
    trustgen.cli.main()
except SystemExit:
    pass
print(os.environ.get("OMP_WAIT_POLICY"))
"""


@pytest.fixture
def busy_core() -> Iterator[None]:
    """One process busy-looping beside the test: a machine that is not idle."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        process.kill()
        process.wait()


def test_on_a_busy_machine_the_cli_sets_a_passive_openmp_wait_policy(busy_core: None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", ENTRY], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "PASSIVE"


@pytest.mark.parametrize(("argv", "idle", "given", "expected"), [
    (["train", "--out", "r"], 1, None, "PASSIVE"),    # busy: waiting threads sleep
    (["train", "--out", "r"], 4, None, None),         # idle: libgomp's default spin stays
    (["generate", "r"], 2, "ACTIVE", "ACTIVE"),       # the user's choice wins
    (["--version"], 1, None, None),                   # no compute command: nothing measured
    (["verify", "x.txt"], 1, None, None),
])
def test_the_openmp_wait_policy_follows_the_load(monkeypatch: pytest.MonkeyPatch, argv: list[str], idle: int,
                                                 given: str | None, expected: str | None) -> None:
    monkeypatch.setattr(cores, "usable_cores", lambda: 4)
    monkeypatch.setattr(cores, "idle_cores", lambda: idle)
    monkeypatch.setattr(cli, "_idle_at_start", None)
    environ = {"OMP_WAIT_POLICY": given} if given else {}
    cli.choose_openmp_wait(argv, environ)
    assert environ.get("OMP_WAIT_POLICY") == expected
    assert cli._idle_at_start == (idle if argv[0] in cli.COMPUTE_COMMANDS else None)


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """The CLI sets torch's threads for the whole process: give the tests' count back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("command", [["train"], ["generate", "no-such-run"]])
def test_threads_sets_torchs_thread_count(torch_threads: None, command: list[str]) -> None:
    torch.set_num_threads(2)
    result = CliRunner().invoke(app, [*command, "--threads", "1"])  # then fails for want of --out / a run
    assert result.exit_code != 0
    assert torch.get_num_threads() == 1


def test_threads_below_one_is_refused(torch_threads: None) -> None:
    result = CliRunner().invoke(app, ["train", "--out", "x", "--threads", "0"])
    assert "--threads must be at least 1, got 0" in str(result.exception)


def test_a_busy_machine_gets_fewer_threads_by_default(torch_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(2)
    monkeypatch.setattr(cli, "_idle_at_start", None)
    monkeypatch.setattr(cores, "idle_cores", lambda: 1)
    result = CliRunner().invoke(app, ["train"])
    assert torch.get_num_threads() == 1
    assert result.output == ""  # silently: a note on stderr would break the one-line errors


@pytest.mark.parametrize(("busy", "expected"), [(0.0, 4), (1.4, 3), (1.6, 2), (3.6, 1), (40.0, 1)])
def test_idle_cores_leaves_the_cores_others_keep_busy(monkeypatch: pytest.MonkeyPatch, busy: float,
                                                      expected: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert cores.idle_cores(busy) == expected


def test_busy_cores_reads_what_the_cpus_did_just_now(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two readings of /proc/stat's totals: 3 of every 4 jiffies busy on a 4-CPU machine is 3 cores."""
    stat = tmp_path / "stat"
    readings = iter(["cpu  100 0 100 800 0 0 0 0 0 0\n", "cpu  400 0 100 900 0 0 0 0 0 0\n"])
    monkeypatch.setattr(cores, "PROC_STAT", stat)
    monkeypatch.setattr(cores.time, "sleep", lambda s: stat.write_text(next(readings)))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    stat.write_text(next(readings))
    assert cores.busy_cores() == pytest.approx(3.0)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")
def test_a_busy_looping_process_counts_as_a_busy_core(busy_core: None) -> None:
    assert cores.busy_cores(0.5) >= 0.7


def test_a_resume_trains_with_the_thread_count_the_run_was_checkpointed_with(
        torch_threads: None, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # Sums split over another thread count round differently: a resume on a machine that has
    # become busier must still continue the run exactly, so it keeps the recorded count.
    from tests.test_cli import TINY

    run = tmp_path / "run"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 200)
    started = CliRunner().invoke(app, ["train", "--data", str(corpus), "--out", str(run), "--max-steps", "2",
                                       "--threads", "2", *TINY])
    assert started.exit_code == 0, started.output
    assert json.loads((run / "trainer_state.json").read_text())["threads"] == 2
    monkeypatch.setattr(cli, "_idle_at_start", None)
    monkeypatch.setattr(cores, "idle_cores", lambda: 1)  # the machine is busy now
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run), "--max-steps", "3"])
    assert resumed.exit_code == 0, resumed.output
    assert torch.get_num_threads() == 2
    assert json.loads((run / "trainer_state.json").read_text())["threads"] == 2
