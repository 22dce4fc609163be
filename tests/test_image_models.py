"""The shared suite every image family passes (GAN, VAE; plain and conditional), plus the
pieces that make each work: augmentation, the R1 penalty, the moving average, the ELBO."""

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from trustgen import io
from trustgen.data.images import ImageBatches, digits
from trustgen.errors import TrustgenError
from trustgen.models import GAN, VAE, GANConfig, VAEConfig, build_model, gan_fitting, vae_fitting
from trustgen.models.distances import copying_statistic, energy_distance
from trustgen.models.gan import diff_augment, stage_plan
from trustgen.models.mixing import PRIOR_WEIGHT, RowSample, calibrate_weights, pixel_rows
from trustgen.sample.images import slerp

SMALLEST = {
    "gan": GANConfig(image_size=16, channels=1, clusters=0, latent_dim=8, width=8, max_width=32),
    "gan-conditional": GANConfig(image_size=16, channels=3, n_classes=4, clusters=0, latent_dim=8, width=8,
                                 max_width=32),
    "gan-clustered": GANConfig(image_size=16, channels=1, clusters=4, calibrate=False, latent_dim=8, width=8,
                               max_width=32),
    "vae": VAEConfig(image_size=16, channels=1, latent_dim=4, width=8, max_width=32, prior="standard",
                     fit_temperature=False),
    "vae-conditional": VAEConfig(image_size=12, channels=3, n_classes=4, latent_dim=4, width=8,
                                 decoder="gaussian", prior="standard"),
    "vae-mixture": VAEConfig(image_size=16, channels=1, latent_dim=4, width=8, max_width=32, prior="mixture",
                             prior_components=3, fit_temperature=False, calibrate=False),
}


def make(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(name.split("-")[0], SMALLEST[name]).eval()
    if name.endswith("clustered"):
        gan_fitting.fit_clusters(model, [fixed_batch(name, 80)])
    return model


def labels_for(name: str, n: int) -> torch.Tensor | None:
    return torch.arange(n) % 4 if name.endswith("conditional") else None


@pytest.fixture(params=list(SMALLEST))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_samples_are_images_in_the_unit_range(name: str) -> None:
    model, config = make(name), SMALLEST[name]
    images = model.sample(5, labels_for(name, 5), torch.Generator().manual_seed(0))
    assert images.shape == (5, config.channels, config.image_size, config.image_size)
    assert images.min() >= 0 and images.max() <= 1


def test_save_load_round_trip_gives_identical_samples(name: str, tmp_path: Path) -> None:
    model = make(name, seed=1)
    io.atomic_write_bytes(tmp_path / "model.safetensors", io.weights_bytes(model))
    other = make(name, seed=2)

    def sample(m: torch.nn.Module) -> torch.Tensor:
        return m.sample(3, labels_for(name, 3), torch.Generator().manual_seed(4))

    assert not torch.equal(sample(model), sample(other))
    io.load_weights(other, io.read_tensors(tmp_path / "model.safetensors"), "model.safetensors")
    assert torch.equal(sample(model), sample(other))


def test_deterministic_under_a_seed(name: str) -> None:
    def sample(model_seed: int, sample_seed: int) -> torch.Tensor:
        return make(name, model_seed).sample(3, labels_for(name, 3), torch.Generator().manual_seed(sample_seed))

    assert torch.equal(sample(5, 1), sample(5, 1))
    assert not torch.equal(sample(5, 1), sample(6, 1))
    assert not torch.equal(sample(5, 1), sample(5, 2))


def fixed_batch(name: str, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Blurry blobs: easy to learn, different per class."""
    config = SMALLEST[name]
    torch.manual_seed(0)
    size = config.image_size
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.arange(n) % 4
    centres = torch.tensor([[size / 4, size / 4], [size / 4, 3 * size / 4], [3 * size / 4, size / 4],
                            [3 * size / 4, 3 * size / 4]])[labels]
    blob = torch.exp(-((ys - centres[:, :1, None]) ** 2 + (xs - centres[:, 1:, None]) ** 2) / (size / 3))
    return blob.unsqueeze(1).expand(n, config.channels, size, size).contiguous(), labels


def descend(loss: Callable[[], torch.Tensor], params: Iterable[torch.nn.Parameter], steps: int,
            lr: float) -> tuple[float, float]:
    """Loss before and after `steps` of Adam on `params`."""
    optimizer = torch.optim.Adam(params, lr=lr)
    first = loss().item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    return first, loss().item()


def test_a_few_dozen_steps_lower_the_loss(name: str) -> None:
    model = make(name).train()
    x, labels = fixed_batch(name)

    def seeded(seed: int, loss: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        # The same noise each time, so losses before and after compare.
        return lambda: (torch.manual_seed(seed), loss())[1]

    if isinstance(model, VAE):
        first, last = descend(seeded(1, lambda: model.loss(x, labels)[0]), model.parameters(), 40, 3e-3)
        assert last < 0.7 * first
        return
    # A GAN's two losses fight each other, so each player is checked against a fixed opponent.
    labels = model.conditions(x, labels)
    first, last = descend(seeded(1, lambda: model.discriminator_loss(x, labels)[0]),
                          model.discriminator.parameters(), 30, 2e-3)
    assert last < 0.7 * first
    first, last = descend(seeded(2, lambda: model.generator_loss(16, labels, torch.device("cpu"))),
                          model.generator.parameters(), 30, 2e-3)
    assert last < first - 0.5


def test_stage_plan_scales_with_the_image_size() -> None:
    assert stage_plan(28) == (7, 2) and stage_plan(64) == (4, 4) and stage_plan(8) == (4, 1)
    assert stage_plan(48) == (6, 3)
    widths = GANConfig(image_size=64, width=32, max_width=128).widths()
    assert widths == [128, 128, 128, 64, 32]


@pytest.mark.parametrize("bad", [{"image_size": 30}, {"image_size": 4}, {"channels": 2}, {"ema_decay": 1.0},
                                 {"augment": "translation,rotate"}, {"loss": "wasserstein"}, {"clusters": -1},
                                 {"clusters": 4, "n_classes": 10}])
def test_bad_gan_config_is_a_clear_error(bad: dict) -> None:
    with pytest.raises(TrustgenError):
        GANConfig.from_dict(bad)


@pytest.mark.parametrize("bad", [{"beta": 0}, {"decoder": "laplace"}, {"latent_dim": 0}, {"prior": "flat"},
                                 {"prior_components": 0}])
def test_bad_vae_config_is_a_clear_error(bad: dict) -> None:
    with pytest.raises(TrustgenError):
        VAEConfig.from_dict(bad)


def test_augmentation_translates_and_cuts_out_but_keeps_gradients() -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 1, 16, 16, requires_grad=True)
    shifted = diff_augment(x * 2 - 1, ["translation"])
    assert shifted.shape == x.shape and not torch.equal(shifted, x * 2 - 1)
    # A shift moves pixels without changing them: what is not fill (-1) comes from the input.
    values = set((x * 2 - 1).detach().flatten().tolist())
    assert all(v in values for v in shifted.detach().flatten().tolist() if v != -1.0)
    cut = diff_augment(torch.ones(8, 1, 16, 16), ["cutout"])
    blacked = (cut == -1).flatten(1).sum(1)
    assert (blacked > 0).all() and (blacked < 16 * 16).all()
    diff_augment(x, ["translation", "cutout"]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_r1_penalty_is_the_gradient_norm_of_the_discriminator_on_real_images() -> None:
    model: GAN = make("gan")
    x, _ = fixed_batch("gan", 4)
    penalty = model.r1_penalty(x, None)
    real = (x * 2 - 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(model.discriminator(real).sum(), real)
    expected = model.config.r1_gamma / 2 * grad.pow(2).sum(dim=(1, 2, 3)).mean() * model.config.r1_interval
    torch.testing.assert_close(penalty, expected)
    assert penalty.requires_grad  # it trains the discriminator


def test_samples_come_from_the_moving_average_of_the_generator() -> None:
    model: GAN = make("gan")
    z = torch.randn(2, 8)
    before = model.decode(z)
    with torch.no_grad():
        for p in model.generator.parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(model.decode(z), before)  # the raw generator moved, the average did not
    model.update_ema(decay=0.5)
    moved = model.decode(z)
    assert not torch.equal(moved, before)
    model.update_ema(decay=0.0)
    torch.testing.assert_close(model.decode(z), (model.generator(z) + 1) / 2)


def test_conditional_models_depend_on_the_label() -> None:
    for name in ("gan-conditional", "vae-conditional"):
        model = make(name)
        z = torch.randn(1, model.latent_dim).expand(4, -1)
        images = model.decode(z, torch.arange(4))
        assert not torch.allclose(images[0], images[1])


def test_vae_loss_is_reconstruction_plus_beta_times_kl() -> None:
    torch.manual_seed(0)
    x, labels = fixed_batch("vae", 8)
    plain = build_model("vae", SMALLEST["vae"])
    beta4 = build_model("vae", SMALLEST["vae"].replace(beta=4.0))
    beta4.load_state_dict(plain.state_dict())
    torch.manual_seed(3)
    loss1, terms1 = plain.loss(x, labels)
    torch.manual_seed(3)
    loss4, terms4 = beta4.loss(x, labels)
    torch.testing.assert_close(loss1, terms1["recon"] + terms1["kl"])
    torch.testing.assert_close(loss4, terms4["recon"] + 4 * terms4["kl"])
    torch.testing.assert_close(terms4["neg_elbo"], terms1["neg_elbo"])  # beta weights the loss, not the ELBO
    assert terms1["kl"] >= 0 and terms1["recon"] > 0


def test_vae_reconstructions_of_trained_inputs_get_close() -> None:
    model: VAE = make("vae").train()
    x, labels = fixed_batch("vae", 16)
    start = (model.reconstruct(x) - x).abs().mean().item()
    descend(lambda: model.loss(x, labels)[0], model.parameters(), 150, 3e-3)
    assert (model.reconstruct(x) - x).abs().mean().item() < 0.5 * start


def test_slerp_ends_at_both_latents_and_keeps_the_norm() -> None:
    a, b = torch.randn(3, 16), torch.randn(3, 16)
    b = b / b.norm(dim=1, keepdim=True) * a.norm(dim=1, keepdim=True)
    path = slerp(a, b, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[:, 0], a)
    torch.testing.assert_close(path[:, -1], b)
    torch.testing.assert_close(path.norm(dim=2), a.norm(dim=1, keepdim=True).expand(3, 5))


def test_a_fitted_mixture_prior_draws_what_the_encoder_produces() -> None:
    model = make("vae-mixture")
    with torch.no_grad():
        model.enc_out.weight *= 100  # codes spread as a trained encoder's do (about unit scale)
    images = torch.rand(600, 1, 16, 16)
    images[:300] *= 0.2  # two kinds of image: two clusters of codes
    vae_fitting.finish_training(model, ((images[i: i + 100], torch.zeros(100, dtype=torch.long)) for i in range(0, 600, 100)))
    codes = model.encode(images)[0].detach()
    drawn = model.draw_latents(20_000, torch.Generator().manual_seed(0))
    assert torch.allclose(drawn.mean(0), codes.mean(0), atol=0.05 * codes.std().item())
    assert torch.allclose(drawn.std(0), codes.std(0), rtol=0.15)
    assert not torch.allclose(model.prior_means, torch.zeros_like(model.prior_means))  # fitted, not N(0, I)
    standard = make("vae")
    assert standard.config.prior == "standard" and not any("prior" in k for k in standard.state_dict())
    vae_fitting.finish_training(model, [(images[:3], torch.zeros(3, dtype=torch.long))])  # too few images for 3: one component
    assert (model.prior_weights > 0).sum() == 1


@pytest.mark.slow
def test_the_mixture_has_as_many_components_as_make_its_samples_as_novel_as_held_out_codes() -> None:
    # Codes on a curved surface in 16 dimensions, as an encoder's lie. The held-out codes are
    # likeliest under 16 components, whose ellipsoids reach far off the surface; the copying
    # test asks for 64, whose samples lie as near the codes as new points of the surface do.
    rng = np.random.default_rng(0)
    projection, phase = rng.normal(0, 1.5, (2, 16)), rng.uniform(0, 2 * np.pi, 16)

    def surface(n: int) -> np.ndarray:
        return np.sin(rng.normal(size=(n, 2)) @ projection + phase) + rng.normal(0, 0.05, (n, 16))

    codes = torch.from_numpy(surface(800)).float()
    model = VAE(VAEConfig(image_size=16, channels=1, latent_dim=16, width=8, max_width=32, prior="mixture",
                          prior_components=128)).eval()
    images = torch.zeros(len(codes), 1, 16, 16)
    images.view(len(codes), -1)[:, :16] = codes  # each image carries its code ...
    model.encode = lambda x, labels=None: (x.flatten(1)[:, :16], torch.zeros(len(x), 16))  # ... to this encoder
    vae_fitting.finish_training(model, ((images[i: i + 100], torch.zeros(100, dtype=torch.long)) for i in range(0, len(codes), 100)))
    assert model.prior_weights.shape == (128,) and (model.prior_weights > 0).sum() == 64
    assert model.prior_weights.sum().item() == pytest.approx(1.0)
    drawn = model.draw_latents(2000, torch.Generator().manual_seed(0))
    assert torch.isfinite(drawn).all() and not (drawn == 0).all(dim=1).any()  # never an unused component
    assert copying_statistic(drawn.double().numpy(), surface(400), codes.double().numpy()) < 0.65


@pytest.mark.parametrize("variant", ["gan", "gan-conditional"])
def test_the_averaged_generator_gets_batch_norm_statistics_of_its_own(variant: str) -> None:
    model = make(variant)
    with torch.no_grad():  # an average that has drifted from the live generator
        for weight in model.ema.parameters():
            weight.mul_(1.5).add_(0.1)
    model.update_ema(decay=1.0)  # as in training: the live generator's statistics are copied in
    norm = model.ema.project_norm
    config = model.config
    images = torch.zeros(64, config.channels, config.image_size, config.image_size)
    labels = torch.arange(64) % 4
    state = torch.get_rng_state()
    gan_fitting.finish_training(model, [(images, labels)] * 16)
    assert torch.equal(torch.get_rng_state(), state)  # the training's random state is untouched

    # The statistics are now those of the average's own activations over many latents.
    z = torch.randn(4000, config.latent_dim)
    conditions = torch.arange(4000) % 4 if config.n_classes else None
    with torch.no_grad():
        inputs = torch.cat([z, model.ema.label_embed(conditions)], dim=1) if config.n_classes else z
        activations = model.ema.project(inputs).view(4000, norm.num_features, -1)
    spread = activations.std().item()
    assert torch.allclose(norm.running_mean, activations.mean(dim=(0, 2)), atol=0.1 * spread)
    assert torch.allclose(norm.running_var, activations.var(dim=(0, 2)), rtol=0.2)
    assert norm.momentum == 0.1 and not model.ema.training


def test_self_conditioning_clusters_the_training_images_and_draws_them_in_proportion() -> None:
    model = make("gan-clustered")
    x, blobs = fixed_batch("gan-clustered", 40)
    clusters = model.conditions(x, blobs)
    # Four blobs, four clusters: each blob is one cluster, whatever the clusters' order.
    assert len(set(clusters.tolist())) == 4
    assert all(len(set(clusters[blobs == b].tolist())) == 1 for b in range(4))
    torch.testing.assert_close(model.cluster_weights, torch.full((4,), 0.25, dtype=torch.float64).float())
    assert model.conditions(x, blobs).dtype == torch.long
    noisy = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    assert torch.equal(model.conditions(noisy, blobs), clusters)  # a new image goes to its nearest centre

    # Latents carry a cluster's embedding, drawn in the clusters' training proportions.
    with torch.no_grad():
        model.cluster_weights.copy_(torch.tensor([0.7, 0.3, 0.0, 0.0]))
    latents = model.draw_latents(4000, torch.Generator().manual_seed(0))
    assert latents.shape == (4000, 2 * SMALLEST["gan-clustered"].latent_dim) == (4000, model.latent_dim)
    embeddings = model.ema.label_embed.weight
    drawn = torch.cdist(latents[:, 8:], embeddings).argmin(dim=1)
    assert torch.equal(embeddings[drawn], latents[:, 8:])
    shares = torch.bincount(drawn, minlength=4) / 4000
    assert abs(shares[0] - 0.7) < 0.03 and shares[2:].sum() == 0


def test_small_sets_get_fewer_clusters_and_the_rest_stay_unused() -> None:
    model = make("gan-clustered")
    x, blobs = fixed_batch("gan-clustered", 80)
    two = x[blobs < 2]  # 40 images of two kinds: two clusters, though 4 are allowed
    gan_fitting.fit_clusters(model, [(two, blobs[blobs < 2])])
    assert model.cluster_weights.tolist() == [0.5, 0.5, 0.0, 0.0]
    assert set(model.conditions(x, blobs).tolist()) == {0, 1}  # empty clusters are never assigned
    again = make("gan-clustered")
    gan_fitting.fit_clusters(again, [(two, blobs[blobs < 2])])
    assert torch.equal(model.cluster_centres, again.cluster_centres)  # seeded: the same data, the same clusters
    gan_fitting.fit_clusters(model, [(x[:39], blobs[:39])])  # four kinds, but 39 images: at most one cluster per 20
    assert (model.cluster_weights > 0).sum() == 1


@pytest.mark.slow
def test_self_conditioning_clusters_digits_by_shape_not_by_pixel_distance() -> None:
    # Real 8x8 digits, which k-means on their pixels mixes up: with 10 clusters, about a fifth
    # of the images share a cluster with another digit's.
    data = ImageBatches(digits())
    model = GAN(GANConfig(image_size=8, clusters=10, calibrate=False, latent_dim=8, width=8, max_width=32))
    gan_fitting.fit_clusters(model, data.sequential(256))
    clusters = torch.cat([model.conditions(x, y) for x, y in data.sequential(256)])
    purity = sum(torch.bincount(data.labels[clusters == c]).max().item() for c in clusters.unique()) / len(data)
    assert purity > 0.9


def noisy_blobs(kinds: list[int], seed: int) -> torch.Tensor:
    """One 16x16 image per entry of `kinds`: that kind of fixed_batch's blobs, with a little noise."""
    blobs, _ = fixed_batch("gan-clustered", 4)
    noise = 0.05 * torch.randn(len(kinds), *blobs.shape[1:], generator=torch.Generator().manual_seed(seed))
    return (blobs[torch.tensor(kinds)] + noise).clamp(0, 1)


def kinds_rows(kinds: list[int], seed: int) -> np.ndarray:
    return pixel_rows(noisy_blobs(kinds, seed)).numpy()


def test_mixing_weights_are_calibrated_to_what_each_component_draws() -> None:
    # Four kinds of image in the data, in shares 0.4, 0.2, 0.2, 0.2. Three components of equal
    # training share: the first draws only the first kind, the second only the second, the
    # third the last two evenly. The data alone says 0.4, 0.2, 0.4; the prior, worth a quarter
    # of the data, pulls towards the training shares.
    data = kinds_rows([0] * 160 + [1] * 80 + [2] * 80 + [3] * 80, seed=0)
    components = [kinds_rows(kinds, seed) for seed, kinds in enumerate([[0] * 300, [1] * 300, [2, 3] * 150], start=1)]
    shares = np.full(3, 1 / 3)
    weights = calibrate_weights(shares, data, components)
    np.testing.assert_allclose(weights, (np.array([0.4, 0.2, 0.4]) + PRIOR_WEIGHT * shares) / (1 + PRIOR_WEIGHT),
                               atol=0.01)
    assert np.array_equal(calibrate_weights(shares, data, components), weights)  # a resumed run: the same
    # Too few images to cut into cells: the shares stay.
    assert calibrate_weights(np.array([0.5, 0.5]), data[:30], components[:2]).tolist() == [0.5, 0.5]


def test_components_the_cells_cannot_tell_apart_keep_their_training_proportions() -> None:
    # The first two components draw the same images: the data decides only their sum.
    data = kinds_rows([0] * 200 + [1] * 200, seed=0)
    components = [kinds_rows([0] * 300, 1), kinds_rows([0] * 300, 1), kinds_rows([1] * 300, 3)]
    weights = calibrate_weights(np.array([0.6, 0.2, 0.2]), data, components)
    assert weights[0] / weights[1] == pytest.approx(3)
    assert weights[2] == pytest.approx(0.5, abs=0.05)
    # A component whose samples look like nothing in the data loses most of its share, but
    # keeps at least a fifth of it.
    weights = calibrate_weights(np.array([0.5, 0.5]), data[:200], [components[0], components[2]])
    assert 0.5 * PRIOR_WEIGHT / (1 + PRIOR_WEIGHT) <= weights[1] < 0.25


@pytest.mark.parametrize("calibrate", [True, False])
def test_a_self_conditioned_gan_draws_its_clusters_as_often_as_the_data_needs(
        monkeypatch: pytest.MonkeyPatch, calibrate: bool) -> None:
    torch.manual_seed(0)
    model = GAN(SMALLEST["gan-clustered"].replace(calibrate=calibrate)).eval()
    gan_fitting.fit_clusters(model, [fixed_batch("gan-clustered", 80)])  # four clusters of equal share, one per kind
    blobs, kinds = fixed_batch("gan-clustered", 4)
    kind_of_cluster = {int(c): k for k, c in enumerate(model.conditions(blobs, kinds))}
    cluster_of_kind = {k: c for c, k in kind_of_cluster.items()}

    def decode(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The first kind's cluster draws the first two kinds evenly, every other cluster its own.
        drawn = [kind_of_cluster[int(c)] for c in labels]
        return noisy_blobs([i % 2 if kind == 0 else kind for i, kind in enumerate(drawn)], seed=1)

    monkeypatch.setattr(model, "decode", decode)
    data = noisy_blobs([0] * 160 + [1] * 80 + [2] * 80 + [3] * 80, seed=0)
    state = torch.get_rng_state()
    gan_fitting.finish_training(model, ((data[i: i + 50], torch.zeros(50, dtype=torch.long)) for i in range(0, 400, 50)))
    assert torch.equal(torch.get_rng_state(), state)
    weights = {kind: model.cluster_weights[cluster].item() for kind, cluster in cluster_of_kind.items()}
    if not calibrate:
        assert list(weights.values()) == [0.25] * 4
        return
    # The first kind is only half of what its cluster draws, and that cluster also draws the
    # second kind: drawn more than its share of the data (0.4), the second kind's cluster less (0.2).
    assert weights[0] > 0.5 and weights[1] < 0.1
    assert weights[2] == pytest.approx(0.2, abs=0.03) and weights[3] == pytest.approx(0.2, abs=0.03)


def test_a_mixture_prior_vae_draws_its_components_as_often_as_the_data_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make("vae-mixture")  # room for three components
    with torch.no_grad():  # two in use, equally weighted, on either side of the first latent axis
        model.prior_weights.copy_(torch.tensor([0.5, 0.5, 0.0]))
        model.prior_means.zero_()[:2, 0] = torch.tensor([-3.0, 3.0])
    # Component 0 decodes to the first kind of image, component 1 to the second; the data holds
    # three of the first to one of the second.
    monkeypatch.setattr(model, "decode", lambda z: noisy_blobs((z[:, 0] > 0).long().tolist(), seed=1))
    vae_fitting.calibrate_mixture_weights(model, kinds_rows([0] * 300 + [1] * 100, seed=0))
    expected = (torch.tensor([0.75, 0.25, 0.0]) + PRIOR_WEIGHT * torch.tensor([0.5, 0.5, 0.0])) / (1 + PRIOR_WEIGHT)
    torch.testing.assert_close(model.prior_weights, expected, atol=0.02, rtol=0)


def test_a_row_sample_is_uniform_over_the_stream_and_keeps_its_order() -> None:
    def stream(sample: RowSample, batches: int) -> np.ndarray:
        for b in range(batches):
            sample.add(torch.arange(b * 100, (b + 1) * 100, dtype=torch.float32).unsqueeze(1))
        return sample.rows()[:, 0]

    rows = stream(RowSample(250, seed=3), 40)  # 4,000 rows through, 250 kept
    assert len(rows) == len(np.unique(rows)) == 250 and np.all(np.diff(rows) > 0)
    assert abs(rows.mean() - 2000) < 250 and rows.min() < 200 and rows.max() > 3800  # from all of the stream
    assert np.array_equal(stream(RowSample(250, seed=3), 40), rows)
    assert not np.array_equal(stream(RowSample(250, seed=4), 40), rows)
    assert np.array_equal(stream(RowSample(250), 2), np.arange(200))  # fewer than the limit: every row


def contrast(images: torch.Tensor) -> float:
    """Mean distance of the pixels from mid-grey: 0.5 for black and white, 0 for all grey."""
    return float((images.detach() - 0.5).abs().mean())


def decoded_at(model: VAE, temperature: float, n: int, seed: int) -> torch.Tensor:
    """The decoder's mean images at a given temperature, of n fresh prior draws."""
    with torch.no_grad():
        logits = model.decoder_output(model.draw_latents(n, torch.Generator().manual_seed(seed)))
    return torch.sigmoid(logits / temperature)


def vae_with_contrast(config: VAEConfig) -> VAE:
    torch.manual_seed(0)
    model = VAE(config).eval()
    with torch.no_grad():  # untrained logits are near 0: spread them so that temperature matters
        model.dec_out.weight *= 60
    return model


@pytest.mark.parametrize("made_at", [0.5, 2.0])
def test_the_decoder_temperature_is_the_one_the_training_images_were_made_at(made_at: float) -> None:
    # Training images that are the decoder's own at some temperature: crisper (0.5) or greyer (2).
    model = vae_with_contrast(SMALLEST["vae"].replace(fit_temperature=True))
    images = decoded_at(model, made_at, 600, seed=5)
    before = model.sample(500, generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    vae_fitting.finish_training(model, [(images[i: i + 50], torch.zeros(50, dtype=torch.long)) for i in range(0, 600, 50)])
    assert torch.equal(torch.get_rng_state(), state)  # an exact resume is untouched
    assert model.temperature.item() == pytest.approx(made_at, rel=0.1)
    after = model.sample(500, generator=torch.Generator().manual_seed(1))
    target = contrast(images)
    assert abs(contrast(after) - target) < 0.2 * abs(contrast(before) - target)
    # The temperature changes what samples show, not the likelihood.
    x, labels = images[:8], torch.zeros(8, dtype=torch.long)
    torch.manual_seed(3)
    tempered = model.loss(x, labels)[1]["neg_elbo"]
    with torch.no_grad():
        model.temperature.fill_(1.0)
    torch.manual_seed(3)
    assert torch.equal(model.loss(x, labels)[1]["neg_elbo"], tempered)


def test_the_decoder_temperature_matches_whole_images_not_only_their_grey_levels() -> None:
    # The same images with their pixels scrambled (one permutation for all): every grey level
    # as common as before, the shapes gone. Matching grey levels alone would still choose 0.5;
    # as whole images, samples at the chosen temperature lie nearer these than at 0.5.
    model = vae_with_contrast(SMALLEST["vae"].replace(fit_temperature=True))
    images = decoded_at(model, 0.5, 600, seed=5).flatten(1)
    scrambled = images[:, torch.randperm(images.shape[1], generator=torch.Generator().manual_seed(0))]
    vae_fitting.fit_temperature(model, scrambled, torch.zeros(1))
    fitted = model.temperature.item()
    samples = {t: decoded_at(model, t, 4000, seed=0).flatten(1) for t in (fitted, 0.5)}
    assert energy_distance(samples[fitted], scrambled) < 0.95 * energy_distance(samples[0.5], scrambled)
    assert fitted > 0.7  # greyer: where shapes cannot match, hedging lies nearer


@pytest.mark.slow
def test_the_temperature_of_large_images_is_fitted_on_a_subset_of_their_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    model = vae_with_contrast(SMALLEST["vae"].replace(image_size=32, channels=3, fit_temperature=True))  # 3,072 pixels
    images = decoded_at(model, 0.5, 1000, seed=5).flatten(1)
    assert len(vae_fitting.temperature_pixels(model.config)) == vae_fitting.TEMPERATURE_PIXELS < 32 * 32 * 3
    vae_fitting.fit_temperature(model, images[:, vae_fitting.temperature_pixels(model.config)], torch.zeros(1))
    from_a_subset = model.temperature.item()
    monkeypatch.setattr(vae_fitting, "TEMPERATURE_PIXELS", 32 * 32 * 3)
    vae_fitting.fit_temperature(model, images, torch.zeros(1))
    assert from_a_subset == pytest.approx(0.5, rel=0.1)
    assert abs(from_a_subset - model.temperature.item()) <= 0.03


def test_only_a_bernoulli_decoder_has_a_temperature() -> None:
    gaussian = VAE(SMALLEST["vae"].replace(decoder="gaussian", fit_temperature=True))
    assert not gaussian.tempered and "temperature" not in gaussian.state_dict()
    assert "temperature" not in make("vae").state_dict()  # older runs' weights load as they were


def test_vae_parameters_live_in_leaf_modules() -> None:
    model = make("vae-conditional")
    for module in model.modules():
        if list(module.children()):
            assert not list(module.parameters(recurse=False)), type(module).__name__
