"""The default model's data: random crops of photographs bundled with scikit-image, one class per
photograph. Installs from PyPI with nothing downloaded at run time; real photographic structure
(local correlations, textures) that the attention techniques can exploit, unlike noise."""

from __future__ import annotations

import numpy as np
import torch

# (class name, loader attribute of skimage.data); grayscale textures are repeated to RGB.
PHOTOS = (
    ("astronaut", "astronaut"), ("cat", "chelsea"), ("coffee", "coffee"), ("galaxies", "hubble_deep_field"),
    ("retina", "retina"), ("rocket", "rocket"), ("brick", "brick"), ("grass", "grass"),
)
SOURCE_SIDE = 128  # photographs are resized so their shorter side is this many pixels before cropping


def load_photos(side: int = SOURCE_SIDE) -> list[torch.Tensor]:
    """The photographs as float [3, H, W] in [-1, 1], shorter side resized to ``side``."""
    try:
        import skimage.data
    except ImportError:
        raise RuntimeError("the default model's data needs scikit-image: pip install 'fastattn[train]'") from None
    from PIL import Image

    photos = []
    for _, attr in PHOTOS:
        array = getattr(skimage.data, attr)()
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        image = Image.fromarray(array[..., :3])
        scale = side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        photos.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    return photos


class PhotoCrops:
    """Random ``size`` x ``size`` crops with horizontal flips; ``sample(n, generator)`` -> (images, labels)."""

    def __init__(self, size: int = 32, photos: list[torch.Tensor] | None = None):
        self.size = size
        self.photos = photos if photos is not None else load_photos()
        self.num_classes = len(self.photos)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(self.num_classes, (n,), generator=generator)
        images = torch.empty(n, 3, self.size, self.size)
        for i, label in enumerate(labels.tolist()):
            photo = self.photos[label]
            top = int(torch.randint(photo.shape[1] - self.size + 1, (1,), generator=generator))
            left = int(torch.randint(photo.shape[2] - self.size + 1, (1,), generator=generator))
            crop = photo[:, top:top + self.size, left:left + self.size]
            images[i] = crop.flip(-1) if torch.rand((), generator=generator) < 0.5 else crop
        return images, labels
