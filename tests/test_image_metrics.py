"""Image metrics: known answers on synthetic features, then the domain classifier on digits."""

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch

from trustgen.data.images import ImageDataset, ImageSplit, load_images, split_images
from trustgen.errors import TrustgenError
from trustgen.evaluate.images import (
    FEATURE_DIM,
    class_coverage,
    density_coverage,
    evaluate_samples,
    format_report,
    frechet_distance,
    frechet_distance_from_moments,
    image_features,
    kernel_inception_distance,
    load_domain_classifier,
    precision_recall,
)
from trustgen.models.distances import copying_statistic, energy_distance


def exact_gaussian(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n points whose sample mean and covariance are exactly `mean` and `cov`."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance I
    return mean + z @ np.linalg.cholesky(cov).T


def random_covariance(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# -- FID ------------------------------------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero_and_of_two_halves_of_one_gaussian_small() -> None:
    x = np.random.default_rng(0).standard_normal((4000, 16))
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-9)
    halves = frechet_distance(x[:2000], x[2000:])
    assert 0 < halves < 0.2
    assert frechet_distance(x[:2000], x[2000:] + 1) == pytest.approx(16 + halves, rel=0.05)  # + ||shift||²


def test_fid_matches_the_closed_form_for_two_gaussians() -> None:
    d = 8
    mu_a, mu_b = np.zeros(d), np.linspace(-1, 1, d)
    cov_a, cov_b = random_covariance(d, 1), random_covariance(d, 2)
    expected = (np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b)
                - 2 * np.trace(np.real(scipy.linalg.sqrtm(cov_a @ cov_b))))
    assert frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-9)
    samples = exact_gaussian(mu_a, cov_a, 500, 3), exact_gaussian(mu_b, cov_b, 700, 4)
    assert frechet_distance(*samples) == pytest.approx(expected, rel=1e-9)
    # Diagonal covariances: sum of (sqrt a - sqrt b)².
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    assert frechet_distance_from_moments(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(3 + 1 + 0 + 4)


def test_fid_of_singular_covariances_is_finite_and_close_to_the_exact_value() -> None:
    # A dead feature (always 0) in both sets, as ReLU features have: both covariances singular.
    cov_a, cov_b = np.diag([2.0, 1.0, 0.0]), np.diag([1.0, 3.0, 0.0])
    exact = (math.sqrt(2) - 1) ** 2 + (1 - math.sqrt(3)) ** 2
    assert frechet_distance_from_moments(np.zeros(3), cov_a, np.zeros(3), cov_b) == pytest.approx(exact, rel=1e-4)
    x = np.random.default_rng(0).standard_normal((50, 128))  # fewer points than features
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)


# -- KID, precision/recall, density/coverage, classes --------------------------------------

def test_kid_is_near_zero_for_one_distribution_and_positive_for_two() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((1500, 16)), rng.standard_normal((1500, 16))
    same, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=500)
    apart, apart_std = kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=500)
    assert abs(same) < 3 * same_std + 1e-3
    assert apart > 10 * apart_std and apart > 50 * abs(same)
    assert kernel_inception_distance(a, b, subsets=20, subset_size=500) == (same, same_std)  # seeded


def test_precision_and_recall_of_identical_far_and_collapsed_sets() -> None:
    real = np.random.default_rng(0).standard_normal((1000, 8))
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)
    # Real data in two far-apart clusters, a generator that only makes the first: the fakes
    # are all plausible (high precision), but half of the data is never made (recall ~0.5).
    rng = np.random.default_rng(1)
    two_modes = np.concatenate([real, rng.standard_normal((1000, 8)) + 20])
    precision, recall = precision_recall(two_modes, rng.standard_normal((1000, 8)))
    assert precision > 0.8 and 0.4 < recall < 0.51


def test_density_and_coverage_sanity() -> None:
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((2000, 8)), rng.standard_normal((2000, 8))
    density, coverage = density_coverage(real, fake)
    assert 0.8 < density < 1.2 and coverage > 0.9  # one distribution: density ~1, coverage ~1 - 2^-k
    # Identical sets: each real ball holds its centre and its 5 neighbours, so density is 6/5.
    assert density_coverage(real, real) == pytest.approx((1.2, 1.0))
    assert density_coverage(real, fake + 100) == (0.0, 0.0)
    # All fakes piled onto 20 real points: only the balls reaching those points (each point's
    # own and a few neighbours', ~6 per point) are covered.
    _, coverage = density_coverage(real, np.repeat(real[:20], 100, axis=0))
    assert coverage < 0.1


def test_class_coverage_of_uniform_and_one_class_predictions() -> None:
    train = np.repeat(np.arange(10), 40)
    uniform = class_coverage(np.arange(1000) % 10, train, 10)
    assert uniform["class_kl"] == pytest.approx(0, abs=1e-12) and uniform["classes_covered"] == 10
    assert not uniform["mode_collapse"]
    one = class_coverage(np.full(500, 3), train, 10)
    assert one["class_kl"] == pytest.approx(math.log(10)) and one["classes_covered"] == 1 and one["mode_collapse"]
    # A class at a quarter of its share still counts; below that it does not.
    shares = np.concatenate([np.full(25, 0), np.full(24, 1), np.arange(951) % 8 + 2])
    assert class_coverage(shares, train, 10)["classes_covered"] == 9


def test_metric_inputs_are_checked() -> None:
    with pytest.raises(TrustgenError, match="widths"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(TrustgenError, match="at least 4"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


# -- the domain classifier and the report (digits, 8x8) -------------------------------------

@pytest.fixture
def digits() -> ImageSplit:
    return split_images(load_images("digits"))


def test_the_digits_classifier_is_accurate_and_cached_after_the_first_load(digits: ImageSplit) -> None:
    model, info = load_domain_classifier(digits, progress=False)
    assert info["kind"] == "classes" and info["held_out_accuracy"] >= 0.9
    record = Path(os.environ["TRUSTGEN_CACHE"]) / "classifiers" / f"{info['key']}.json"  # beside tokens/
    assert record.exists() and record.with_suffix(".safetensors").exists()
    written = record.stat().st_mtime_ns, record.with_suffix(".safetensors").stat().st_mtime_ns
    again, info_again = load_domain_classifier(digits, progress=False)
    assert info_again["cached"] and info_again["held_out_accuracy"] == info["held_out_accuracy"]
    assert (record.stat().st_mtime_ns, record.with_suffix(".safetensors").stat().st_mtime_ns) == written
    features, predictions = image_features(model, digits.held_out.images)
    assert features.shape == (len(digits.held_out.images), FEATURE_DIM) and features.dtype == np.float64
    # The loaded weights are the trained ones (batches of another size round a little differently).
    assert np.allclose(image_features(again, digits.held_out.images, batch_size=7)[0], features, rtol=1e-5, atol=1e-5)
    assert (predictions == digits.held_out.labels).mean() == pytest.approx(info["held_out_accuracy"])


def test_fid_grows_with_noise_and_with_blur_on_classifier_features(digits: ImageSplit) -> None:
    model, _ = load_domain_classifier(digits, progress=False)
    reference, _ = image_features(model, digits.train.images)
    images = digits.held_out.images.astype(np.float64)
    rng = np.random.default_rng(0)

    def fid(changed: np.ndarray) -> float:
        return frechet_distance(reference, image_features(model, np.clip(np.round(changed), 0, 255).astype(np.uint8))[0])

    noisy = [fid(images + rng.normal(0, sigma, images.shape)) for sigma in (0, 20, 40, 80)]
    blurred = [fid(scipy.ndimage.gaussian_filter(images, (0, 0, s, s))) for s in (0, 0.5, 1.0, 1.5)]
    assert noisy == sorted(noisy) and len(set(noisy)) == 4, noisy
    assert blurred == sorted(blurred) and len(set(blurred)) == 4, blurred


def test_a_one_digit_generator_is_flagged_as_mode_collapsed_and_held_out_images_are_not(digits: ImageSplit) -> None:
    threes = digits.train.images[digits.train.labels == 3]
    report = evaluate_samples(threes, digits, n_floor=100, progress=False)
    assert json.loads(json.dumps(report, allow_nan=False)) == report  # plain JSON values only
    model, matched, floor = report["model"], report["matched"], report["floor"]
    assert model["mode_collapse"] and model["classes_covered"] == 1 and model["class_kl"] > 1.5
    assert not floor["mode_collapse"] and floor["classes_covered"] == 10 and floor["class_kl"] < 0.1
    assert report["n_samples"] == len(threes) and report["n_matched"] == matched["n"] == floor["n"] == 100
    assert model["recall"] < 0.3 and floor["recall"] > 0.5  # one digit of ten cannot cover the data
    assert report["fid_ratio"] == pytest.approx(matched["fid"] / floor["fid"]) and report["fid_ratio"] > 5
    table = format_report(report)
    assert "mode collapse" in table and "floor (n=100)" in table and "1/10" in table


@pytest.mark.slow
def test_the_matched_fid_averages_disjoint_sets_of_the_floors_size(digits: ImageSplit) -> None:
    from trustgen.evaluate.images import frechet_distance, image_features, load_domain_classifier

    # Half clean digits, half blurred ones: any one set of 100 mixes them differently.
    clean = digits.train.images[:350]
    blurred = scipy.ndimage.gaussian_filter(digits.train.images[350:700], (0, 0, 1.2, 1.2))
    samples = np.concatenate([clean, blurred])
    report = evaluate_samples(samples, digits, n_floor=100, progress=False)
    matched = report["matched"]
    assert matched["n"] == 100 and matched["fid_sets"] == 7 and matched["fid_std"] > 0
    classifier, _ = load_domain_classifier(digits, progress=False)
    reference = image_features(classifier, digits.train.images)[0]
    every = image_features(classifier, samples)[0]
    only_clean = frechet_distance(reference, every[:100])
    only_blurred = frechet_distance(reference, every[350:450])
    assert only_clean < matched["fid"] < only_blurred  # the sets mix both kinds
    assert report["fid_ratio"] == pytest.approx(matched["fid"] / report["floor"]["fid"])
    assert "mean over 7 disjoint sets of 100 samples" in format_report(report)


def test_samples_of_another_shape_or_type_are_refused(digits: ImageSplit) -> None:
    with pytest.raises(TrustgenError, match=r"\(10, 3, 8, 8\).*\(1, 8, 8\)"):
        evaluate_samples(np.zeros((10, 3, 8, 8), np.uint8), digits, progress=False)
    with pytest.raises(TrustgenError, match="uint8"):
        evaluate_samples(np.zeros((10, 1, 8, 8), np.float32), digits, progress=False)


@pytest.mark.slow
def test_an_unlabelled_dataset_gets_rotation_features_and_no_class_metrics() -> None:
    data = load_images("digits")
    unlabelled = ImageDataset("digits-unlabelled", data.images, np.full(len(data.images), -1))
    split = split_images(unlabelled)
    report = evaluate_samples(split.held_out.images[::-1].copy(), split, progress=False)
    assert report["classifier"]["kind"] == "rotation"
    assert report["classifier"]["held_out_accuracy"] > 0.6  # four turns: chance is 0.25
    assert "class_kl" not in report["model"] and "class_kl" not in report["floor"]
    assert report["model"]["fid"] == pytest.approx(report["floor"]["fid"], rel=1e-4)  # the same images, reordered
    assert "mode collapse" not in format_report(report)


def test_the_copying_statistic_tells_new_data_from_copies_and_from_holes() -> None:
    rng = np.random.default_rng(0)
    fitted, held_out, fresh = rng.normal(size=(3, 500, 4))
    assert abs(copying_statistic(fresh, held_out, fitted) - 0.5) < 0.06
    assert copying_statistic(fitted + 1e-3, held_out, fitted) < 0.01  # near-copies
    assert copying_statistic(fresh * 3, held_out, fitted) > 0.9  # where no data is


def test_the_energy_distance_is_zero_for_one_distribution_and_grows_with_a_shift() -> None:
    rng = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1500, 8, generator=rng)
    assert abs(energy_distance(x, y)) < 0.02
    shifted = [energy_distance(x, y + shift) for shift in (0.25, 0.5, 1.0, 2.0)]
    assert shifted[0] > 0.05 and all(a < b for a, b in itertools.pairwise(shifted))
    assert energy_distance(x, y + 1.0) == pytest.approx(energy_distance(y + 1.0, x))
    # A set of one row (a folder of one image) has no spread: only the other set's is subtracted.
    spread = (torch.cdist(x, x).sum() / (len(x) * (len(x) - 1))).item()
    assert energy_distance(x, x[:1]) == pytest.approx(2 * torch.cdist(x, x[:1]).mean().item() - spread)


def test_the_energy_distance_sees_how_coordinates_go_together() -> None:
    # Both coordinates the same number, or two independent numbers: the same marginals.
    rng = torch.Generator().manual_seed(0)
    equal = torch.randn(1500, 1, generator=rng).repeat(1, 2)
    independent = torch.randn(1500, 2, generator=rng)
    for column in range(2):  # each coordinate's values are distributed alike ...
        assert abs(energy_distance(equal[:, column:column + 1], independent[:, column:column + 1])) < 0.01
    assert energy_distance(equal, independent) > 0.05  # ... the pairs are not
