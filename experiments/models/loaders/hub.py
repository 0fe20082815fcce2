"""Loading the real checkpoints, with an error that says what to fetch when offline."""

from __future__ import annotations

import os

import torch

from ..solvers import make_scheduler

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str, key: str = "model.dtype") -> torch.dtype:
    """The torch dtype a config names; ``key`` names the field in the one-line error."""
    if name not in DTYPES:
        raise ValueError(f"{key}: unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    return DTYPES[name]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


class CheckpointNotFound(RuntimeError):
    """A checkpoint that is neither in the Hugging Face cache nor downloadable; the message says
    what to fetch (the harness prints it as its one line)."""


def quiet_loading() -> dict:
    """``from_pretrained`` arguments that load as diffusers' default does, without its warning
    (once per model, on stderr) that accelerate is missing: diffusers falls back to this then."""
    from diffusers.utils import is_accelerate_available

    return {"low_cpu_mem_usage": is_accelerate_available()}


def from_pretrained(cls, model_id: str, **kwargs):
    """``cls.from_pretrained`` that turns a missing download into one actionable line."""
    try:
        return cls.from_pretrained(model_id, local_files_only=_offline(), **quiet_loading(), **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointNotFound(
            f"cannot load {model_id!r} ({type(e).__name__}): its weights are not in the Hugging Face cache "
            f"and could not be downloaded. On a machine with network run `hf download {model_id}` "
            "and point HF_HOME at that cache (set HF_HUB_OFFLINE=1 to skip network attempts)"
        ) from None


def load_pipeline(family: str, pipeline_id: str, transformer_id: str | None = None,
                  dtype: str = "float16", solver: str = "dpm_solver"):
    """DiT: ``DiTPipeline.from_pretrained(pipeline_id)``. PixArt-Sigma: the transformer from
    ``transformer_id`` inside the ``pipeline_id`` pipeline (VAE, T5). The scheduler becomes ``solver``."""
    from diffusers import DiTPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch_dtype = parse_dtype(dtype)
    if family == "dit":
        pipe = from_pretrained(DiTPipeline, pipeline_id, torch_dtype=torch_dtype)
    elif family == "pixart":
        extra = {}
        if transformer_id:
            extra["transformer"] = from_pretrained(PixArtTransformer2DModel, transformer_id,
                                                    subfolder="transformer", torch_dtype=torch_dtype)
        pipe = from_pretrained(PixArtSigmaPipeline, pipeline_id, torch_dtype=torch_dtype, **extra)
    elif family in ("sd3", "flux"):
        return load_mmdit_pipeline(family, pipeline_id, torch_dtype, solver)
    else:
        raise ValueError(f"model.family: unknown family {family!r} (known: dit, pixart, sd3, flux)")
    pipe.scheduler = make_scheduler(solver, pipe.scheduler.config)
    return pipe


def load_mmdit_pipeline(family: str, pipeline_id: str, torch_dtype: torch.dtype, solver: str = "flow_euler"):
    """``StableDiffusion3Pipeline`` / ``FluxPipeline.from_pretrained(pipeline_id)`` (gated on the Hub:
    accept the licence and log in, or point HF_HOME at a cache that holds it)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if solver != "flow_euler":
        raise ValueError(f"solver.scheduler: {family} is a flow-matching model; use flow_euler, not {solver!r}")
    cls = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]
    pipe = from_pretrained(cls, pipeline_id, torch_dtype=torch_dtype)
    pipe.scheduler = make_scheduler(solver, pipe.scheduler.config)
    return pipe
