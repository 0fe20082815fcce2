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
        raise RuntimeError("the built-in model's photographs need scikit-image: pip install scikit-image") from None
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
