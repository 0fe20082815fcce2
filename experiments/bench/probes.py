"""What the kernel probes (arrow_probe, window_probe) share: the block density of a FlexAttention
mask, and the JSON record of a probe's rows."""

from __future__ import annotations

import json

import torch
from omegaconf import DictConfig, OmegaConf


def block_density(block_mask) -> float:
    """The share of (query block, key block) pairs a FlexAttention block mask runs."""
    return 1 - block_mask.sparsity() / 100


def save_rows(cfg: DictConfig, rows: list[dict], **extra) -> None:
    """With ``out`` set: the device, the config, ``extra`` and the rows as JSON."""
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "config": OmegaConf.to_container(cfg), **extra,
                       "rows": rows}, f, indent=1)
