"""Build the configured pipeline: a tiny offline model or a real checkpoint."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from ..models.loaders import load_pipeline, parse_dtype
from ..models.loaders.hub import CheckpointNotFound
from ..models.tiny import TINY_MMDIT_BUILDERS
from ..models.tiny import TINY_BUILDERS
from .app import ConfigError


def build_pipeline(model: DictConfig, solver: DictConfig, device: torch.device):
    if model.get("builtin"):
        from ..models.loaders.builtin import load_default_pipeline

        pipe = load_default_pipeline(solver.scheduler, dtype=parse_dtype(model.dtype))
    elif model.get("tiny"):
        kwargs = OmegaConf.to_container(model.tiny)
        kwargs.pop("text_len", None)
        builders = {**TINY_BUILDERS, **TINY_MMDIT_BUILDERS}
        pipe = builders[model.family](solver=solver.scheduler, **kwargs)
        dtype = parse_dtype(model.dtype)
        if dtype != torch.float32:  # tiny models are built in float32
            pipe = pipe.to(dtype=dtype)
    else:
        try:
            pipe = load_pipeline(model.family, model.pipeline_id, model.get("transformer_id"), model.dtype,
                                 solver.scheduler)
        except CheckpointNotFound as error:  # offline: one line naming what to download
            raise ConfigError(f"model.pipeline_id: {error}") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
