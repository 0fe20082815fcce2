"""Loading the real video checkpoints (Latte-1, Wan 2.1 T2V 1.3B, Open-Sora 1.1 STDiT2).

The same one-line error as :mod:`.loading` when weights are neither cached nor downloadable.
"""

from __future__ import annotations

import importlib.util

from .hub import from_pretrained, parse_dtype

VIDEO_FAMILIES = ("latte", "wan", "opensora")


def load_video_pipeline(family: str, pipeline_id: str, dtype: str = "bfloat16"):
    """Latte: ``LattePipeline.from_pretrained``. Wan: ``WanPipeline`` with its VAE kept in float32,
    as the model card recommends. The pipeline's own scheduler is kept (the checkpoints' setting)."""
    from diffusers import AutoencoderKLWan, LattePipeline, WanPipeline

    torch_dtype = parse_dtype(dtype)
    if family == "latte":
        return from_pretrained(LattePipeline, pipeline_id, torch_dtype=torch_dtype)
    if family == "wan":
        import torch

        vae = from_pretrained(AutoencoderKLWan, pipeline_id, subfolder="vae", torch_dtype=torch.float32)
        return from_pretrained(WanPipeline, pipeline_id, vae=vae, torch_dtype=torch_dtype)
    if family == "opensora":
        raise ValueError("model.family: opensora has no diffusers pipeline; load STDiT2 with "
                         "experiments.models.loaders.video.load_opensora_stdit2 and sample with Open-Sora's scripts")
    raise ValueError(f"model.family: unknown video family {family!r} (known: {', '.join(VIDEO_FAMILIES)})")


def load_opensora_stdit2(model_id: str = "hpcai-tech/OpenSora-STDiT-v2-stage3", dtype: str = "bfloat16"):
    """Open-Sora 1.1's STDiT2-XL/2 through Open-Sora's own registry (its 240p inference config)."""
    if importlib.util.find_spec("opensora") is None:
        raise ValueError("model.family opensora needs the Open-Sora 1.1 package importable (`opensora`); "
                         "install it from https://github.com/hpcaitech/Open-Sora (tag v1.1.0)")
    from opensora.registry import MODELS, build_module

    model = build_module(dict(type="STDiT2-XL/2", from_pretrained=model_id, input_sq_size=512, qk_norm=True,
                              enable_flashattn=False, enable_layernorm_kernel=False), MODELS)
    return model.to(parse_dtype(dtype)).eval()
