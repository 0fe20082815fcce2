"""The built-in default model, shipped in ``fastattn/models/default/``: a class-conditional
DiTTransformer2DModel trained in pixel space on crops of 8 photographs (see ``training.json``),
and the small classifier for FID-small / IS-small. Loaded with ``from_pretrained``, hashes checked."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

import fastattn.models

from ..solvers import make_scheduler
from .hub import quiet_loading

# The weights stay package data of the library (fastattn/models/default/, see setup.py); only
# the code that loads them is the harness's.
DEFAULT_MODEL_DIR = Path(fastattn.models.__file__).parent / "default"


def verify_checksums(folder: Path = DEFAULT_MODEL_DIR) -> dict[str, str]:
    """Raise if a shipped file is missing or differs from ``checksums.json``."""
    expected = json.loads((folder / "checksums.json").read_text())
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"default model file missing: {path}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ValueError(f"default model file corrupt (sha256 differs from checksums.json): {path}")
    return expected


def training_record(folder: Path = DEFAULT_MODEL_DIR) -> dict:
    return json.loads((folder / "training.json").read_text())


def default_image_size(folder: Path = DEFAULT_MODEL_DIR) -> int:
    """The side in pixels of the images the built-in model makes (pixel space: its sample size)."""
    return int(json.loads((folder / "transformer" / "config.json").read_text())["sample_size"])


def load_default_pipeline(solver: str = "dpm_solver", folder: Path = DEFAULT_MODEL_DIR,
                          dtype: torch.dtype = torch.float32):
    """The unmodified DiTPipeline around the shipped transformer (trained in float32; ``dtype``
    casts it) and an identity VAE."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    from .pixel_space import IdentityVAE

    verify_checksums(folder)
    transformer = DiTTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype,
                                                        **quiet_loading()).eval()
    return DiTPipeline(transformer=transformer, vae=IdentityVAE(), scheduler=make_scheduler(solver))


def load_default_classifier(folder: Path = DEFAULT_MODEL_DIR):
    from .pixel_space import SmallClassifier

    verify_checksums(folder)
    return SmallClassifier.from_pretrained(folder / "classifier", **quiet_loading()).eval()


def class_names(folder: Path = DEFAULT_MODEL_DIR) -> list[str]:
    return training_record(folder)["data"]["classes"]
