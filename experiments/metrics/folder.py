"""A folder of images seen as a lazy [N, H, W, 3] uint8 array: metrics stream it in batches, so
50k samples at 2048² never sit in memory at once."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class UnreadableImage(ValueError):
    """An image file that does not decode (truncated, corrupt); its message names the file."""


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


class ImageFolderArray:
    """Images loaded on indexing; ``size`` (H, W) centre-crops and resizes images of other shapes."""

    ndim = 4
    dtype = np.uint8

    def __init__(self, files: Sequence[str | Path], size: tuple[int, int] | None = None):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("ImageFolderArray: no files")
        if size is None:
            width, height = Image.open(self.files[0]).size
            size = (height, width)
        self.size = (int(size[0]), int(size[1]))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), *self.size, 3)

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> np.ndarray:
        try:
            image = Image.open(path).convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for truncated or corrupt files
            raise UnreadableImage(f"{path}: not a readable image ({error})") from None
        height, width = self.size
        if image.size != (width, height):
            scale = max(width / image.width, height / image.height)
            image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                                 Image.BICUBIC)
            left, top = (image.width - width) // 2, (image.height - height) // 2
            image = image.crop((left, top, left + width, top + height))
        return np.asarray(image, dtype=np.uint8)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return np.stack([self._load(p) for p in self.files[index]])
        return self._load(self.files[index])
