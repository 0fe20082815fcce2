"""Tiny random-weight video pipelines (Latte, Wan) built from diffusers configs, offline and seeded.

Same classes as the checkpoints, a few frames of a few tokens, so every code path runs on a CPU
in well under a second. No text encoder: callers pass prompt embeddings.
"""

from __future__ import annotations

import torch

from ..solvers import make_scheduler
from .image import tiny_vae


def tiny_latte_pipeline(sample_size: int = 8, video_length: int = 4, num_layers: int = 2, num_heads: int = 2,
                        head_dim: int = 8, caption_channels: int = 32, seed: int = 0, solver: str = "ddim"):
    """Latte with ``num_layers`` spatial + ``num_layers`` temporal blocks; the VAE keeps the grid."""
    from diffusers import LattePipeline, LatteTransformer3DModel

    torch.manual_seed(seed)
    transformer = LatteTransformer3DModel(
        num_attention_heads=num_heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=num_layers, sample_size=sample_size, patch_size=2, cross_attention_dim=num_heads * head_dim,
        caption_channels=caption_channels, video_length=video_length, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, activation_fn="gelu-approximate",
    ).eval()
    return LattePipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(seed + 1), transformer=transformer,
                         scheduler=make_scheduler(solver))


def tiny_wan_vae(seed: int = 0, z_dim: int = 4):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    # One down stage: 2x spatial and 2x temporal compression (frames = 2·latent frames - 1).
    return AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                            latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
                            scale_factor_temporal=2, scale_factor_spatial=2).eval()


def tiny_wan_pipeline(num_layers: int = 2, num_heads: int = 2, head_dim: int = 12, text_dim: int = 32,
                      seed: int = 0, shift: float = 3.0):
    """Wan 2.1-style T2V with flow matching; the conditional and unconditional passes are two calls."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=num_heads, attention_head_dim=head_dim, in_channels=4,
        out_channels=4, text_dim=text_dim, freq_dim=16, ffn_dim=32, num_layers=num_layers, rope_max_seq_len=32,
    ).eval()
    return WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(seed + 1), transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))


TINY_VIDEO_BUILDERS = {"latte": tiny_latte_pipeline, "wan": tiny_wan_pipeline}
