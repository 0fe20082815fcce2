"""Known answers for the image metrics (experiments/metrics). Offline: custom feature extractors and
classifiers stand in for Inception, a random open_clip model or a stub for CLIP, and every
download entry point is replaced by one that fails the test if it is ever reached."""

import socket
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from experiments.metrics import (
    compute_clip_score,
    compute_fid,
    compute_inception_score,
    compute_lpips,
    compute_psnr,
    compute_ssim,
    feature_stats,
    fid_from_stats,
    inception_weights_path,
    load_clip,
    load_stats,
    save_stats,
)
from experiments.metrics import fid_is
from experiments.metrics.similarity import MAX_PSNR_DB

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def _no_network(*args, **kwargs):
    raise AssertionError("a metric tried to download")


@pytest.fixture
def empty_torch_cache(tmp_path, monkeypatch):
    """Empty torch hub cache, and torch.hub downloads that fail the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(fid_is.INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


class PoolProject(nn.Module):
    """Custom FID features: 2x2 average pool of each channel, then a fixed random projection."""

    def __init__(self, out_features: int = 6) -> None:
        super().__init__()
        self.register_buffer("weight", torch.randn(out_features, 12, generator=torch.Generator().manual_seed(0),
                                                   dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 2).flatten(1).double() @ self.weight.T


class Project(nn.Module):
    """Flattened pixels times a fixed matrix: Gaussian pixels give Gaussian features of known moments."""

    def __init__(self, weight: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double() @ self.weight.T


# ---------------------------------------------------------------- FID

def test_fid_of_a_set_against_itself_is_zero():
    images = np.random.default_rng(0).random((40, 8, 8, 3), dtype=np.float32)
    assert compute_fid(images, images, PoolProject(), batch_size=16) == pytest.approx(0, abs=1e-8)


def test_fid_takes_uint8_as_its_float_equivalent():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8), rng.integers(0, 200, (30, 8, 8, 3), dtype=np.uint8)
    from_uint8 = compute_fid(a, b, PoolProject())
    assert from_uint8 > 0.01
    assert compute_fid(a / 255, b / 255, PoolProject()) == pytest.approx(from_uint8, rel=1e-6)


def test_fid_equals_the_closed_form_on_gaussian_features():
    rng = np.random.default_rng(2)
    n, pixels, features = 20_000, 12, 4  # images 2x2x3; pixel vectors in the NCHW flatten order
    weight = rng.standard_normal((features, pixels))
    mean_real, mean_fake = np.full(pixels, 0.5), np.full(pixels, 0.5) + 0.02 * rng.standard_normal(pixels)
    mix_real = 0.02 * (np.eye(pixels) + 0.3 * rng.standard_normal((pixels, pixels)))
    mix_fake = 0.03 * (np.eye(pixels) + 0.3 * rng.standard_normal((pixels, pixels)))
    real = (mean_real + rng.standard_normal((n, pixels)) @ mix_real.T).astype(np.float32)
    fake = (mean_fake + rng.standard_normal((n, pixels)) @ mix_fake.T).astype(np.float32)
    assert 0 < real.min() and real.max() < 1 and 0 < fake.min() and fake.max() < 1  # no clipping: still Gaussian

    def as_images(x):
        return x.reshape(n, 3, 2, 2).transpose(0, 2, 3, 1)

    extractor = Project(weight)
    fid = compute_fid(as_images(real), as_images(fake), extractor, batch_size=4096)

    real_features, fake_features = real.astype(np.float64) @ weight.T, fake.astype(np.float64) @ weight.T
    sample_fid = fid_from_stats(real_features.mean(0), np.cov(real_features, rowvar=False),
                                fake_features.mean(0), np.cov(fake_features, rowvar=False))
    assert fid == pytest.approx(sample_fid, rel=1e-6)  # torchmetrics' eigvals route vs our eigh route

    population_fid = fid_from_stats(weight @ mean_real, weight @ mix_real @ mix_real.T @ weight.T,
                                    weight @ mean_fake, weight @ mix_fake @ mix_fake.T @ weight.T)
    assert fid == pytest.approx(population_fid, rel=0.03)  # sampling error of 20k draws

    mu, sigma = feature_stats(as_images(real), extractor, batch_size=3000)
    np.testing.assert_allclose(mu, real_features.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(real_features, rowvar=False), rtol=1e-9, atol=1e-14)


def test_fid_from_stats_hand_example_and_scipy_sqrtm():
    # Isotropic: ||mu1 - mu2||^2 + d (sqrt(a) - sqrt(b))^2 = 25 + 2 * (2 - 1)^2.
    assert fid_from_stats(np.zeros(2), 4 * np.eye(2), np.array([3.0, 4.0]), np.eye(2)) == pytest.approx(27)

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)  # SPD, not commuting
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    reference = (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1 + sigma2 - 2 * scipy.linalg.sqrtm(sigma1 @ sigma2).real)
    assert fid_from_stats(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-9)


def test_fid_from_stats_on_singular_covariances_is_finite_and_zero_against_itself():
    features = np.random.default_rng(4).standard_normal((10, 50))  # 10 samples, 50 dims: rank 9
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    assert fid_from_stats(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    assert np.isfinite(fid_from_stats(mu, sigma, mu + 1, 2 * sigma))


def test_fid_rejects_bad_arguments_naming_them():
    good = np.random.default_rng(5).random((4, 8, 8, 3))
    with pytest.raises(ValueError, match="^real: .*shape"):
        compute_fid(good.transpose(0, 3, 1, 2), good, PoolProject())
    with pytest.raises(ValueError, match=r"^fake: .*\[0, 1\]"):
        compute_fid(good, good * 2, PoolProject())
    with pytest.raises(ValueError, match="^fake: needs at least 2"):
        compute_fid(good, good[:1], PoolProject())
    with pytest.raises(TypeError, match="^feature_extractor:"):
        compute_fid(good, good, feature_extractor=lambda x: x)
    with pytest.raises(ValueError, match="^mu2:"):
        fid_from_stats(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="^sigma1:"):
        fid_from_stats(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------- reference statistics files

def test_stats_save_load_round_trip_is_exact_and_atomic(tmp_path):
    rng = np.random.default_rng(6)
    mu, a = rng.standard_normal(7), rng.standard_normal((7, 7))
    path = tmp_path / "stats" / "reference.npz"
    save_stats(path, mu, a @ a.T)
    save_stats(path, mu, a @ a.T)  # overwriting goes through os.replace too
    loaded_mu, loaded_sigma = load_stats(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, a @ a.T)
    assert [p.name for p in path.parent.iterdir()] == ["reference.npz"]  # no temp file left behind
    assert fid_from_stats(*load_stats(path), *load_stats(path)) == pytest.approx(0, abs=1e-9)

    np.savez(tmp_path / "other.npz", mean=mu)
    with pytest.raises(ValueError, match="^path: .*lacks mu, sigma"):
        load_stats(tmp_path / "other.npz")


# ---------------------------------------------------------------- Inception Score

class ConstantLogits(nn.Module):
    """Equal logits for every class: p(y|x) is uniform, so IS = 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), 10)


class BrightnessClassifier(nn.Module):
    """Confidently predicts class floor(K * mean pixel)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = (x.mean((1, 2, 3)) * self.num_classes).long().clamp(max=self.num_classes - 1)
        return 30.0 * nn.functional.one_hot(label, self.num_classes).float()


def test_inception_score_of_a_uniform_classifier_is_one():
    images = np.random.default_rng(7).random((50, 4, 4, 3))
    mean, std = compute_inception_score(images, ConstantLogits(), splits=5)
    assert mean == pytest.approx(1.0, abs=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_of_a_confident_classifier_over_balanced_classes_approaches_k():
    k, per_class = 5, 400
    levels = np.repeat((np.arange(k) + 0.5) / k, per_class)  # one brightness per class
    images = np.broadcast_to(levels[:, None, None, None], (k * per_class, 4, 4, 3)).astype(np.float32)
    rng_before = torch.get_rng_state()

    assert compute_inception_score(images, BrightnessClassifier(k), splits=1)[0] == pytest.approx(k, rel=1e-5)
    mean, std = compute_inception_score(images, BrightnessClassifier(k), splits=10)
    assert k - 0.2 < mean <= k + 1e-5  # each split's class mix is only nearly balanced
    assert compute_inception_score(images, BrightnessClassifier(k), splits=10) == (mean, std)  # seeded shuffle
    assert torch.equal(torch.get_rng_state(), rng_before)  # ... that leaves the global RNG alone


def test_inception_score_rejects_more_splits_than_images():
    with pytest.raises(ValueError, match="^splits:"):
        compute_inception_score(np.zeros((3, 4, 4, 3)), ConstantLogits(), splits=4)


# ---------------------------------------------------------------- default Inception weights, offline

def _assert_one_line_naming_the_fetch(error: RuntimeError, cache_dir) -> None:
    message = str(error)
    assert "\n" not in message
    assert INCEPTION_FILE in message and str(cache_dir) in message and fid_is.INCEPTION_WEIGHTS_ENV in message


def test_default_inception_offline_fails_at_once_with_one_line(empty_torch_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images = np.random.default_rng(8).random((4, 8, 8, 3))
    for call in (lambda: compute_fid(images, images), lambda: compute_inception_score(images, splits=2),
                 lambda: feature_stats(images)):
        with pytest.raises(RuntimeError) as raised:
            call()
        _assert_one_line_naming_the_fetch(raised.value, empty_torch_cache)
        assert "HF_HUB_OFFLINE" in str(raised.value)


def test_default_inception_failed_download_is_one_line_and_bounded(empty_torch_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    seen_timeouts = []

    def unreachable(url, dst, *args, **kwargs):
        seen_timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(RuntimeError, match="download failed: URLError") as raised:
        compute_fid(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3)))
    _assert_one_line_naming_the_fetch(raised.value, empty_torch_cache)
    assert fid_is.inception_weights_url() in str(raised.value)
    assert seen_timeouts == [fid_is.DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() is None


def test_inception_weights_come_from_cache_or_env_without_download(empty_torch_cache, monkeypatch, tmp_path):
    empty_torch_cache.mkdir(parents=True)
    (empty_torch_cache / INCEPTION_FILE).write_bytes(b"")
    assert inception_weights_path() == str(empty_torch_cache / INCEPTION_FILE)
    monkeypatch.setenv(fid_is.INCEPTION_WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(RuntimeError, match=f"^{fid_is.INCEPTION_WEIGHTS_ENV}: no such file"):
        inception_weights_path()


# ---------------------------------------------------------------- CLIP score

class StubClip(nn.Module):
    """Every image embeds to e1; prompts pick their text embedding by name."""

    TEXT = {"same": [1.0, 0.0], "orthogonal": [0.0, 1.0], "opposite": [-1.0, 0.0]}

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0]]).expand(len(pixels), 2)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return tokens


def _stub_score(prompts: list[str]) -> float:
    images = np.zeros((len(prompts), 4, 4, 3), dtype=np.uint8)
    return compute_clip_score(images, prompts, model=StubClip(), preprocess=lambda image: torch.zeros(3, 4, 4),
                              tokenizer=lambda texts: torch.tensor([StubClip.TEXT[t] for t in texts]), batch_size=2)


def test_clip_score_is_100_times_mean_cosine_clipped_after_averaging():
    assert _stub_score(["same", "same"]) == pytest.approx(100)
    assert _stub_score(["same", "orthogonal"]) == pytest.approx(50)
    assert _stub_score(["same", "same", "opposite"]) == pytest.approx(100 / 3)  # not clipped per image
    assert _stub_score(["opposite", "opposite"]) == 0.0


def test_hpsv2_is_the_mean_cosine_unscaled_and_unclipped():
    from experiments.metrics import compute_hpsv2
    from experiments.metrics.sharded import sharded_hpsv2

    def score(prompts, scorer=compute_hpsv2):
        images = np.zeros((len(prompts), 4, 4, 3), dtype=np.uint8)
        return scorer(images, prompts, model=StubClip(), preprocess=lambda image: torch.zeros(3, 4, 4),
                      tokenizer=lambda texts: torch.tensor([StubClip.TEXT[t] for t in texts]), **(
                          {"batch_size": 2} if scorer is compute_hpsv2 else {"device": "cpu"}))

    assert score(["same", "orthogonal"]) == pytest.approx(0.5)
    assert score(["opposite", "opposite"]) == pytest.approx(-1.0)  # not clipped, not x 100
    assert score(["same", "orthogonal", "opposite"], sharded_hpsv2) == pytest.approx(0.0)


def test_hpsv2_without_its_weights_offline_is_one_line_naming_them(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from experiments.metrics import hpsv2_checkpoint

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("FASTATTN_HPSV2_CHECKPOINT", raising=False)
    with pytest.raises(RuntimeError) as raised:
        hpsv2_checkpoint()
    assert "\n" not in str(raised.value) and "`hf download xswu/HPSv2 HPS_v2_compressed.pt`" in str(raised.value)
    with pytest.raises(RuntimeError, match=r"^HPSv2 checkpoint not found: .*nowhere.pt"):
        hpsv2_checkpoint(tmp_path / "nowhere.pt")
    weights = tmp_path / "hps.pt"
    weights.write_bytes(b"")
    monkeypatch.setenv("FASTATTN_HPSV2_CHECKPOINT", str(weights))
    assert hpsv2_checkpoint() == weights


@pytest.fixture(scope="module")
def tiny_open_clip():
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model("ViT-S-32-alt", pretrained=None), open_clip.get_tokenizer("ViT-S-32-alt")


def test_clip_score_with_a_random_open_clip_model_lies_in_0_100(tiny_open_clip):
    model, tokenizer = tiny_open_clip
    images = np.random.default_rng(9).random((3, 40, 48, 3), dtype=np.float32)
    prompts = ["a photo of a cat", "a red bus", "two giraffes"]
    score = compute_clip_score(images, prompts, model=model, tokenizer=tokenizer, batch_size=2)
    assert 0.0 <= score <= 100.0
    assert compute_clip_score(images, prompts, model=model, tokenizer=tokenizer) == pytest.approx(score, rel=1e-5)


def test_clip_score_needs_one_prompt_per_image():
    with pytest.raises(ValueError, match="^prompts:"):
        compute_clip_score(np.zeros((2, 4, 4, 3)), ["only one"], model=StubClip())


def test_clip_without_cached_weights_offline_is_one_line_naming_them(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub reads this, not the env
    with pytest.raises(RuntimeError) as raised:
        load_clip("ViT-L-14", "openai", cache_dir=str(tmp_path))
    message = str(raised.value)
    assert "\n" not in message
    assert "ViT-L-14/openai" in message and "timm/vit_large_patch14_clip_224.openai" in message
    with pytest.raises(ValueError, match="^pretrained:"):
        load_clip("ViT-L-14", "no-such-tag")


# ---------------------------------------------------------------- PSNR / SSIM / LPIPS

def test_psnr_of_identical_images_hits_the_cap():
    images = np.random.default_rng(10).random((2, 8, 8, 3))
    assert compute_psnr(images, images) == MAX_PSNR_DB


def test_psnr_is_the_mean_of_per_image_10_log10_one_over_mse():
    raw = np.zeros((2, 4, 4, 3))
    compressed = np.stack([np.full((4, 4, 3), 0.1), np.full((4, 4, 3), 0.01)])  # MSE 1e-2 and 1e-4
    assert compute_psnr(raw, compressed) == pytest.approx((20 + 40) / 2)


def test_ssim_of_identical_images_is_one_and_less_for_noise():
    rng = np.random.default_rng(11)
    images = rng.random((3, 16, 16, 3))
    assert compute_ssim(images, images) == pytest.approx(1.0, abs=1e-9)
    noisy = np.clip(images + 0.2 * rng.standard_normal(images.shape), 0, 1)
    assert compute_ssim(images, noisy) < 0.95
    with pytest.raises(ValueError, match="^compressed: shape"):
        compute_ssim(images, images[:2])


def test_lpips_without_cached_weights_is_none_with_a_warning(empty_torch_cache, caplog):
    images = np.zeros((1, 64, 64, 3))
    with caplog.at_level("WARNING", logger="experiments.metrics.similarity"):
        assert compute_lpips(images, images) is None
    assert "LPIPS skipped" in caplog.text and str(empty_torch_cache) in caplog.text


def test_lpips_runs_on_locally_cached_backbone_weights(empty_torch_cache):
    import torchvision

    # Random SqueezeNet weights (5 MB) at the cached name: torch.hub loads an existing file unchecked.
    empty_torch_cache.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(),
               empty_torch_cache / "squeezenet1_1-b8a52dc0.pth")
    rng = np.random.default_rng(12)
    raw, other = rng.random((2, 64, 64, 3)), rng.random((2, 64, 64, 3))
    assert compute_lpips(raw, raw, net_type="squeeze") == pytest.approx(0, abs=1e-6)
    assert compute_lpips(raw, other, net_type="squeeze") > 0


# ---------------------------------------------------------------- FID-small / IS-small (shipped classifier)

def test_small_reference_crops_are_seeded_balanced_real_images():
    from experiments.metrics import reference_crops

    first, again, other = reference_crops(16, seed=0), reference_crops(16, seed=0), reference_crops(16, seed=1)
    assert first.shape == (16, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    with pytest.raises(ValueError, match="reference num: expected an int >= 2"):
        reference_crops(1, seed=0)


def test_fid_small_and_is_small_known_answers_offline():
    """Real crops against themselves: FID-small ~0 and IS-small near the 8 classes (the classifier
    labels training crops perfectly); uniform noise is far from them."""
    from experiments.metrics import compute_small_metrics, default_classifier, reference_crops, small_reference_stats

    classifier = default_classifier()
    reference = small_reference_stats(classifier, 128, seed=0)
    real = compute_small_metrics(reference_crops(128, seed=0), classifier, reference)
    assert set(real) == {"fid_small", "is_small", "is_small_std"}
    assert real["fid_small"] < 1e-6 and real["is_small"] > 5
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    fake = compute_small_metrics(noise, classifier, reference)
    assert fake["fid_small"] > 10 * (1 + real["fid_small"])
    only_is = compute_small_metrics(noise[:4], classifier, None, fid=False)
    assert set(only_is) == {"is_small", "is_small_std"}


@pytest.mark.parametrize("images, message", [
    (np.zeros((4, 32, 32)), "expected images of shape"),
    (np.zeros((1, 32, 32, 3), dtype=np.uint8), "FID-small needs at least 2 images"),
])
def test_small_metrics_bad_input_is_one_line_error(images, message):
    from experiments.metrics import compute_small_metrics, default_classifier

    reference = (np.zeros(128), np.eye(128))
    with pytest.raises(ValueError, match=message) as error:
        compute_small_metrics(images, default_classifier(), reference)
    assert "\n" not in str(error.value)
