"""The command line through a real subprocess: the happy path and one clear line per mistake."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "8",
        "--quiet"]


def trustgen(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "trustgen.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def assert_clear_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: ") and message.count("\n") == 0, message
    for word in words:
        assert word in message, message


@pytest.mark.slow
def test_generate_info_and_stream(run: Path) -> None:
    result = trustgen("generate", str(run), "--prompt", "All:", "-n", "2", "--max-tokens", "20", "--seed", "1",
                      "--top-p", "0.95", "--json")
    assert result.returncode == 0, result.stderr
    samples = json.loads(result.stdout)
    assert len(samples) == 2 and all(s["prompt"] == "All:" for s in samples)
    streamed = trustgen("generate", str(run), "--prompt", "All:", "--stream", "--max-tokens", "20", "--seed", "1")
    assert streamed.returncode == 0 and streamed.stdout.startswith("All:")
    info = trustgen("info", str(run), "--json")
    details = json.loads(info.stdout)
    assert details["family"] == "gpt" and details["parameters"] > 0 and details["best_val_loss"] > 0


@pytest.mark.slow
def test_resume_extends_a_finished_run(run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    result = trustgen("train", "--resume", str(copy), "--max-steps", "12", "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads((copy / "trainer_state.json").read_text())["step"] == 12


@pytest.mark.parametrize(("args", "words"), [
    (["--top-p", "1.5"], ["top_p"]),
    (["--temperature", "-1"], ["temperature"]),
    (["--prompt", "Speak " * 8], ["longer than the model's context"]),
    (["--prompt", "Ωmega"], ["never saw"]),
    (["-n", "0"], ["-n"]),
    (["--max-tokens", "5000000000"], ["at most 1,000,000", "several parts"]),
    (["-n", "100000000"], ["100,000,000 samples", "at most 10,000"]),
    (["--min-bars", "8"], ["--min-bars only apply to music models"]),
])
def test_bad_generation_settings(run: Path, args: list[str], words: list[str]) -> None:
    assert_clear_error(trustgen("generate", str(run), *args), *words)


@pytest.mark.slow
def test_missing_corrupt_and_foreign_runs(run: Path, tmp_path: Path) -> None:
    assert_clear_error(trustgen("generate", str(tmp_path / "nowhere")), "not a run directory")
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(run, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert_clear_error(trustgen("generate", str(corrupt)), "safetensors")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "llama"}')
    assert_clear_error(trustgen("info", str(foreign)), "not a trustgen run")


@pytest.mark.slow
def test_bad_training_data(tmp_path: Path) -> None:
    args = ["--max-steps", "2", *TINY]
    assert_clear_error(trustgen("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "a"), *args),
                       "does not exist")
    (tmp_path / "empty").mkdir()
    assert_clear_error(trustgen("train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "b"), *args),
                       "no .txt or .md")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café crème\n".encode("latin-1") * 200)
    assert_clear_error(trustgen("train", "--data", str(latin1), "--out", str(tmp_path / "c"), *args), "UTF-8")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    assert_clear_error(trustgen("train", "--data", str(binary), "--out", str(tmp_path / "d"), *args), "binary")
    assert_clear_error(trustgen("train", "--data", str(latin1), "--out", str(tmp_path / "e"), "--tokenizer", "words",
                                "--max-steps", "2"), "tokenizer")
    assert_clear_error(trustgen("train", "--resume", str(tmp_path / "nothing")), "not a run directory")


@pytest.mark.slow
def test_generate_watermarks_by_default_and_detect_finds_it(run: Path, tmp_path: Path) -> None:
    keystore = tmp_path / "keys"
    out = tmp_path / "sample.txt"
    made = trustgen("generate", str(run), "--prompt", "All:", "--max-tokens", "150", "--seed", "2",
                    "--keystore", str(keystore), "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert "created keys" in made.stderr and out.read_text().startswith("All:")
    (key_file,) = keystore.glob("watermark-*.key")
    assert oct(keystore.stat().st_mode & 0o777) == "0o700" and oct(key_file.stat().st_mode & 0o777) == "0o600"
    secret = key_file.read_bytes()
    found = trustgen("detect", str(out), "--run", str(run), "--keystore", str(keystore), "--json")
    assert found.returncode == 0, found.stderr
    report = json.loads(found.stdout)
    assert report["verdict"] == "watermarked" and report["p_value"] < 1e-3
    assert secret.hex() not in found.stdout + made.stdout + made.stderr
    page = tmp_path / "marks.html"
    shown = trustgen("detect", str(out), "--run", str(run), "--keystore", str(keystore), "--highlight",
                     "--html", str(page))
    assert "\033[32m" in shown.stdout and '<span class="green">' in page.read_text()
    plain = tmp_path / "plain.txt"
    plain.write_text((run.parent / "data" / "d0.txt").read_text()[:600])
    quiet = trustgen("detect", str(plain), "--run", str(run), "--keystore", str(keystore))
    assert quiet.returncode == 1 and quiet.stdout.startswith("no watermark found")  # 0 only when found
    assert_clear_error(trustgen("detect", str(plain), "--run", str(run), "--keystore", str(tmp_path / "none")),
                       "trustgen keys init")
