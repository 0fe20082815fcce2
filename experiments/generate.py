"""Generate samples in batches, timed, with each sample seeded by its index."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from .conditions import pipeline_inputs, to_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(pipe, model: DictConfig, indices: Sequence[int], *, seed: int, num_steps: int,
             guidance_scale: float, batch_size: int, device: torch.device, desc: str = "generate",
             ) -> tuple[np.ndarray, float]:
    """Images as float [N, H, W, 3] in [0, 1], and the seconds spent in the pipeline."""
    indices = list(indices)
    images, seconds = [], 0.0
    with torch.no_grad():
        for start in tqdm(range(0, len(indices), batch_size), desc=desc, unit="batch"):
            batch = indices[start:start + batch_size]
            inputs = to_device(pipeline_inputs(model, batch, seed, num_steps, guidance_scale), device)
            _sync(device)
            began = time.perf_counter()
            out = pipe(**inputs).images
            _sync(device)
            seconds += time.perf_counter() - began
            images.append(np.asarray(out, dtype=np.float32))
    return np.concatenate(images), seconds
