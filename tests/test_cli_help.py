"""The command line explains itself: every option has help text, the main verbs show examples,
`--version` answers, and `trustgen runs` lists run directories."""

import json
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from tests.test_runs import write_format_1_run
from trustgen import __version__
from trustgen.cli import app
from trustgen.runs import find_runs

COMMAND = typer.main.get_command(app)


def commands(group: click.Group = COMMAND, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += commands(command, f"{prefix}{name} ")
        else:
            found.append((prefix + name, command))
    return found


@pytest.mark.parametrize(("name", "command"), commands(), ids=[name for name, _ in commands()])
def test_every_option_and_argument_has_help_text(name: str, command: click.Command) -> None:
    assert command.help, name
    missing = [param.name for param in command.params if not getattr(param, "help", None)]
    assert missing == [], f"trustgen {name}: {missing} have no help text"


@pytest.mark.parametrize("verb", ["train", "generate", "runs"])
def test_the_main_verbs_show_examples(verb: str) -> None:
    result = CliRunner().invoke(app, [verb, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and f"trustgen {verb} " in result.output


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"trustgen {__version__}"


def test_runs_lists_run_directories_newest_first(tmp_path: Path) -> None:
    write_format_1_run(tmp_path / "older")
    (tmp_path / "group").mkdir()
    write_format_1_run(tmp_path / "group" / "newer")
    (tmp_path / "group" / "newer" / "trainer_state.json").write_text(json.dumps({"step": 42, "best_val_loss": 1.5}))
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "config.json").write_text("{}")
    found = find_runs(tmp_path)
    assert [Path(run["run"]).name for run in found] == ["newer", "older"]
    assert found[0]["family"] == "vae" and found[0]["steps"] == 42 and found[0]["val_loss"] == 1.5
    result = CliRunner().invoke(app, ["runs", str(tmp_path)])
    assert result.exit_code == 0 and "newer" in result.output and "1.5000" in result.output
    assert "not-a-run" not in result.output
    assert json.loads(CliRunner().invoke(app, ["runs", str(tmp_path), "--json"]).output) == found
