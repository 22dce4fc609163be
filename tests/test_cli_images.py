"""The image commands through a real subprocess: train, generate grids/strips/files, info, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_cli import assert_clear_error, trustgen


@pytest.mark.slow
def test_generate_a_grid_for_a_prompt_and_one_file_per_image(cvae: Path, tmp_path: Path) -> None:
    grid = tmp_path / "sevens.png"
    made = trustgen("generate", str(cvae), "--prompt", "7", "-n", "16", "--grid", str(grid), "--seed", "1")
    assert made.returncode == 0, made.stderr
    with Image.open(grid) as picture:
        assert picture.mode == "L" and picture.size[0] == picture.size[1]  # 4 x 4 tiles
    again = tmp_path / "again.png"
    trustgen("generate", str(cvae), "--prompt", "seven", "-n", "16", "--grid", str(again), "--seed", "1")
    with Image.open(grid) as first, Image.open(again) as second:  # "seven" is "7"; the seed fixes the images
        assert np.array_equal(np.asarray(first), np.asarray(second))
    folder = tmp_path / "imgs"
    files = trustgen("generate", str(cvae), "-n", "3", "--out", str(folder), "--seed", "2")
    assert files.returncode == 0, files.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["0001.png", "0002.png", "0003.png"]
    with Image.open(folder / "0001.png") as image:
        assert image.size == (8, 8)


def test_interpolate_writes_a_strip(cvae: Path, tmp_path: Path) -> None:
    walk = tmp_path / "walk.png"
    made = trustgen("generate", str(cvae), "--interpolate", "8", "-n", "2", "--out", str(walk), "--seed", "3")
    assert made.returncode == 0, made.stderr
    with Image.open(walk) as picture:
        pixels = np.asarray(picture)
    assert pixels.shape[1] > 3 * pixels.shape[0]  # 8 columns, 2 rows


@pytest.mark.slow
def test_info_lists_the_pictures(cvae: Path) -> None:
    details = json.loads(trustgen("info", str(cvae), "--json").stdout)
    assert details["family"] == "vae" and details["classes"] == list("0123456789")
    assert {"samples.png", "interpolation.png", "reconstructions.png", "loss.png"} <= set(details["pictures"])
    text = trustgen("info", str(cvae)).stdout
    assert "pictures" in text and "samples.png" in text and "held-out images, 8x8x1" in text


@pytest.mark.parametrize(("args", "words"), [
    (["--prompt", "eleven", "--grid", "x.png"], ["unknown label 'eleven'", "0, 1, 2"]),
    (["-n", "2"], ["--grid"]),
    (["--grid", "x.jpg"], ["PNG"]),
    (["--interpolate", "1", "--out", "w.png"], ["at least 2 steps"]),
    (["--watermark", "kgw", "--grid", "x.png"], ["--watermark spectral", "or none"]),
    (["--temperature", "0.7", "--top-p", "0.9", "--grid", "x.png"], ["--temperature, --top-p only apply to text"]),


    (["-n", "100000000", "--grid", "x.png"], ["100,000,000 images", "GB of pixels", "at most"]),
    (["--interpolate", "100000", "-n", "100000", "--out", "w.png"], ["images would hold", "at most"]),
])
def test_bad_image_generation(cvae: Path, tmp_path: Path, args: list[str], words: list[str]) -> None:
    assert_clear_error(trustgen("generate", str(cvae), *args, cwd=tmp_path), *words)


@pytest.mark.slow
def test_text_options_on_image_runs_and_back(cvae: Path, tmp_path: Path) -> None:
    assert_clear_error(trustgen("train", "--model", "gan", "--data", "digits", "--conditional", "--out",
                                str(tmp_path / "x"), "--image-size", "30", "--max-steps", "1"), "image_size")
    assert_clear_error(trustgen("train", "--model", "diffusion", "--out", str(tmp_path / "y")), "gan, vae")


@pytest.mark.slow
def test_evaluate_prints_the_table_beside_the_floor(cvae: Path, run: Path) -> None:
    result = trustgen("evaluate", str(cvae), "-n", "60")
    assert result.returncode == 0, result.stderr
    assert "floor (n=" in result.stdout and "FID ratio" in result.stdout and "requested class" in result.stdout
    assert "evaluated    FID" in trustgen("info", str(cvae)).stdout
    assert_clear_error(trustgen("evaluate", str(cvae), "-n", "3"), "-n must be at least")
    assert_clear_error(trustgen("evaluate", str(run)), "image and music models")
