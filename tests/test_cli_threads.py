"""CPU threads on a shared machine: the CLI makes OpenMP's waiting threads sleep (unless the user
chose otherwise), and takes fewer torch threads while other processes keep the cores busy, or
exactly --threads (bench/threads.py measured both on a loaded 2-core machine)."""

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from typer.testing import CliRunner

from trustgen import runtime
from trustgen.cli import app

# What the `trustgen` script does, then the environment its commands run with.
ENTRY = """
import os, sys
import trustgen.cli
assert "torch" not in sys.modules, "torch is loaded before main() can set OMP_WAIT_POLICY"
sys.argv = ["trustgen", "--version"]
try:
    trustgen.cli.main()
except SystemExit:
    pass
print(os.environ.get("OMP_WAIT_POLICY"))
"""


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_cli_sets_a_passive_openmp_wait_policy_unless_the_user_chose_one(given: str | None,
                                                                            expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": given} if given else {})
    result = subprocess.run([sys.executable, "-c", ENTRY], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == expected


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
    monkeypatch.setattr(runtime, "idle_cores", lambda: 1)
    result = CliRunner().invoke(app, ["train"])
    assert torch.get_num_threads() == 1
    assert result.output == ""  # silently: a note on stderr would break the one-line errors


@pytest.mark.parametrize(("load", "expected"), [(0.0, 4), (1.4, 3), (1.6, 2), (3.6, 1), (40.0, 1)])
def test_idle_cores_leaves_the_cores_the_load_average_holds(monkeypatch: pytest.MonkeyPatch, load: float,
                                                            expected: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert runtime.idle_cores() == expected
