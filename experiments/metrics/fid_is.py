"""FID and Inception Score through torchmetrics, and FID reference statistics kept as .npz.

The default backbone is torch-fidelity's port of the TF Inception (the network FID is defined on).
torch-fidelity fetches it with ``torch.hub.load_state_dict_from_url``; we resolve the file
ourselves first so that a missing file fails at once with one actionable line, offline included.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import urllib.error
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from fastattn.utils.io import atomic_write_bytes

from .similarity import ImageArray, check_images, iter_batches, to_float_nchw, to_uint8

INCEPTION_WEIGHTS_ENV = "FASTATTN_INCEPTION_WEIGHTS"  # path to the weights file, skips the hub cache
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: an unreachable host fails instead of hanging
_POOL_FEATURES, _LOGITS = "2048", "logits_unbiased"  # torch-fidelity layer names used for FID / IS
_FEATURE_SIZES = {_POOL_FEATURES: 2048, _LOGITS: 1008}  # the TF Inception has 1008 logits


# ---------------------------------------------------------------- default Inception backbone

def inception_weights_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def inception_weights_cache_file() -> Path:
    """Where torch.hub (hence torch-fidelity) caches the weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(inception_weights_url())


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _missing_weights_error(cached: Path, reason: str) -> RuntimeError:
    return RuntimeError(
        f"Inception weights for FID/IS unavailable ({reason}): download {inception_weights_url()} "
        f"into {cached.parent} (the torch hub cache, $TORCH_HOME/hub/checkpoints) "
        f"or set {INCEPTION_WEIGHTS_ENV} to the downloaded file"
    )


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torch.hub's urlopen takes no timeout argument, so bound it through the process default.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def inception_weights_path() -> str:
    """Local path of the Inception weights: $FASTATTN_INCEPTION_WEIGHTS, else the torch hub cache,
    else one bounded download attempt (none when HF_HUB_OFFLINE=1); RuntimeError if all fail."""
    explicit = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise RuntimeError(f"{INCEPTION_WEIGHTS_ENV}: no such file {explicit!r}")
        return explicit
    cached = inception_weights_cache_file()
    if cached.is_file():
        return str(cached)
    if _offline():
        raise _missing_weights_error(cached, "not cached and HF_HUB_OFFLINE=1")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(inception_weights_url(), str(cached), progress=False)
    except (OSError, urllib.error.URLError) as e:  # URLError, timeouts and refused connections are OSErrors
        raise _missing_weights_error(cached, f"not cached and download failed: {type(e).__name__}") from None
    return str(cached)


def default_inception(layer: str) -> nn.Module:
    """torchmetrics' eval-only Inception (uint8 [B, 3, H, W] in, ``layer`` out) on locally resolved weights."""
    weights = inception_weights_path()  # first: fail before building a 24M-parameter network
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[layer],
                              feature_extractor_weights_path=weights)


# ---------------------------------------------------------------- feature extraction

class _Features(nn.Module):
    """What torchmetrics is fed: float [B, 3, H, W] in [0, 1] in, float64 [B, D] out.

    ``num_features`` spares torchmetrics its probe with a random 299x299 image, whose flattened size
    would set the covariance size for extractors that flatten. Custom extractors get the float input;
    the Inception gets uint8 as torch-fidelity requires.
    """

    def __init__(self, net: nn.Module, num_features: int, wants_uint8: bool) -> None:
        super().__init__()
        self.net, self.num_features, self.wants_uint8 = net, num_features, wants_uint8

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.net(to_uint8(images) if self.wants_uint8 else images)
        return out.reshape(len(images), -1).double()


def _features(extractor: nn.Module | None, default_layer: str, images: ImageArray, name: str,
              arg_name: str, device: str | torch.device) -> _Features:
    if extractor is None:
        net = default_inception(default_layer)
        return _Features(net, _FEATURE_SIZES[default_layer], wants_uint8=True).to(device)
    if not isinstance(extractor, nn.Module):
        raise TypeError(f"{arg_name}: expected a torch.nn.Module or None, got {type(extractor).__name__}")
    extractor = extractor.to(device)
    with torch.no_grad():  # one image tells the feature size
        probe = extractor(to_float_nchw(images[:1], name).to(device))
    return _Features(extractor, int(probe.reshape(1, -1).shape[1]), wants_uint8=False)


def _require_samples(images: ImageArray, name: str, minimum: int) -> None:
    check_images(images, name)
    if len(images) < minimum:
        raise ValueError(f"{name}: needs at least {minimum} images, got {len(images)}")


# ---------------------------------------------------------------- FID

def compute_fid(real: ImageArray, fake: ImageArray, feature_extractor: nn.Module | None = None,
                batch_size: int = 50, device: str | torch.device = "cpu") -> float:
    """FID between two image sets. ``feature_extractor`` maps float [B, 3, H, W] in [0, 1] to [B, D];
    None means the Inception pool features (2048-d), the standard FID."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _require_samples(real, "real", 2)
    _require_samples(fake, "fake", 2)
    metric = FrechetInceptionDistance(feature=_features(feature_extractor, _POOL_FEATURES, real, "real",
                                                        "feature_extractor", device)).to(device)
    with torch.no_grad():
        for batch in iter_batches(real, "real", batch_size):
            metric.update(batch.to(device), real=True)
        for batch in iter_batches(fake, "fake", batch_size):
            metric.update(batch.to(device), real=False)
    return max(float(metric.compute()), 0.0)  # like fid_from_stats: identical sets can round below 0


def feature_stats(images: ImageArray, feature_extractor: nn.Module | None = None, batch_size: int = 50,
                  device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of the features of ``images``, float64, for ``fid_from_stats``."""
    _require_samples(images, "images", 2)
    return stats_from_moments(*feature_moments(images, feature_extractor, batch_size, device))


def feature_moments(images: ImageArray, feature_extractor: nn.Module | None = None, batch_size: int = 50,
                    device: str | torch.device = "cpu") -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, shift, sum and outer-product sum of features - shift): what ``feature_stats`` reduces;
    the moments of several image sets add up (after a change of shift) to those of their union."""
    features = _features(feature_extractor, _POOL_FEATURES, images, "images", "feature_extractor", device)
    count, shift, shifted_sum, shifted_outer = 0, None, 0.0, 0.0
    with torch.no_grad():
        for batch in iter_batches(images, "images", batch_size):
            f = features(batch.to(device)).cpu()
            if shift is None:  # accumulate around a rough mean: sums of squares far from 0 lose digits
                shift = f.mean(0)
            centered = f - shift
            shifted_sum = shifted_sum + centered.sum(0)
            shifted_outer = shifted_outer + centered.T @ centered
            count += len(f)
    return count, shift, shifted_sum, shifted_outer


def stats_from_moments(count: int, shift: torch.Tensor, shifted_sum: torch.Tensor,
                       shifted_outer: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    offset = shifted_sum / count
    sigma = (shifted_outer - count * torch.outer(offset, offset)) / (count - 1)
    return (shift + offset).numpy(), sigma.numpy()


def _vector(value: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 1 or not np.isfinite(array).all():
        raise ValueError(f"{name}: expected a finite 1-D mean vector, got shape {array.shape}")
    return array


def _covariance(value: np.ndarray, name: str, size: int) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (size, size) or not np.isfinite(array).all():
        raise ValueError(f"{name}: expected a finite {size}x{size} covariance, got shape {array.shape}")
    return (array + array.T) / 2  # saved/accumulated covariances are symmetric only up to round-off


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), in float64.

    Tr (S1 S2)^1/2 = Tr (S1^1/2 S2 S1^1/2)^1/2, and the inner matrix is symmetric PSD: its eigenvalues
    come from eigh and are clipped at 0, where sqrtm of the non-symmetric S1 S2 of singular
    covariances (fewer samples than features) can go complex or non-finite.
    """
    mu1, mu2 = _vector(mu1, "mu1"), _vector(mu2, "mu2")
    if mu2.shape != mu1.shape:
        raise ValueError(f"mu2: shape {mu2.shape} differs from mu1 {mu1.shape}")
    sigma1, sigma2 = _covariance(sigma1, "sigma1", len(mu1)), _covariance(sigma2, "sigma2", len(mu1))
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    fid = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(fid, 0.0))  # identical statistics can round to -1e-13


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write (mu, sigma) to an .npz atomically (temp file in the same folder, then os.replace)."""
    mu = _vector(mu, "mu")
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"sigma: expected shape {(len(mu), len(mu))}, got {sigma.shape}")
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma)
    return atomic_write_bytes(path, buffer.getvalue())


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) saved by ``save_stats``."""
    with np.load(path, allow_pickle=False) as data:
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise ValueError(f"path: {os.fspath(path)} lacks {', '.join(sorted(missing))} (not a save_stats file)")
        return data["mu"], data["sigma"]


# ---------------------------------------------------------------- Inception Score

def compute_inception_score(images: ImageArray, classifier: nn.Module | None = None, splits: int = 10,
                            batch_size: int = 50, device: str | torch.device = "cpu",
                            seed: int = 0) -> tuple[float, float]:
    """(mean, std over ``splits``) of exp(E KL(p(y|x) || p(y))). ``classifier`` maps float
    [B, 3, H, W] in [0, 1] to logits [B, K]; None means the Inception's 1008 logits."""
    check_images(images, "images")
    if not isinstance(splits, int) or not 1 <= splits <= len(images):
        raise ValueError(f"splits: expected an int in [1, {len(images)}] (the number of images), got {splits!r}")
    return inception_score_from_logits(inception_logits(images, classifier, batch_size, device), splits, seed)


def inception_logits(images: ImageArray, classifier: nn.Module | None = None, batch_size: int = 50,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """The classifier's logits of ``images``, float64 [N, K], in order (what the Inception Score reduces)."""
    features = _features(classifier, _LOGITS, images, "images", "classifier", device)
    with torch.no_grad():
        return torch.cat([features(batch.to(device)) for batch in iter_batches(images, "images", batch_size)])


def inception_score_from_logits(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """(mean, std over ``splits``) of the Inception Score of precomputed logits [N, K]."""
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():  # its "saves all features in a buffer" notice, on every construction
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        # The logits are the features here; sync off: the caller chooses which images it scores.
        metric = InceptionScore(feature=nn.Identity(), splits=splits, sync_on_compute=False).to(logits.device)
    with torch.no_grad():
        metric.update(logits)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)  # compute() shuffles with the global RNG: seed it, then restore it
            warnings.filterwarnings("ignore", message="std\\(\\): degrees of freedom")  # one split has no std
            mean, std = metric.compute()
    return float(mean), float(std) if splits > 1 else 0.0
