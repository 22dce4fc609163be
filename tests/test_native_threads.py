"""The GAN's clustering runs with every native thread pool at one thread (on a loaded 2-core
machine, scikit-learn's and scipy's own OpenMP and BLAS pools beside torch's slowed the
self-conditioned GAN about 40-fold)."""

import pytest
from threadpoolctl import threadpool_info

from tests.test_image_models import fixed_batch, make
from trustgen.models import gan_fitting
from trustgen.runtime import one_native_thread


def test_one_native_thread_limits_every_pool_and_restores_them() -> None:
    import sklearn.cluster  # noqa: F401 -- loads scikit-learn's own OpenMP runtime

    before = [pool["num_threads"] for pool in threadpool_info()]
    with one_native_thread():
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
    assert [pool["num_threads"] for pool in threadpool_info()] == before


def test_the_clustering_runs_in_one_native_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real_fit = gan_fitting._fit_clusters

    def fit(*args: object) -> None:
        seen.append(max(pool["num_threads"] for pool in threadpool_info()))
        real_fit(*args)

    monkeypatch.setattr(gan_fitting, "_fit_clusters", fit)
    x, blobs = fixed_batch("gan-clustered", 40)
    gan_fitting.fit_clusters(make("gan-clustered"), [(x, blobs)])
    assert seen and set(seen) == {1}
