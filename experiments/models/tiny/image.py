"""Tiny DiT and PixArt pipelines.

They run every real code path (the same transformer, pipeline and scheduler classes as the
checkpoints) in milliseconds on a CPU. Their weights are random, so they prove mechanics, not
quality. PixArt gets no text encoder: callers pass prompt embeddings.
"""

from __future__ import annotations

import torch

from ..solvers import make_scheduler


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # One block, so no downsampling: the latent grid is the pixel grid.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=8,
    ).eval()


def tiny_dit_pipeline(sample_size: int = 16, num_layers: int = 4, num_heads: int = 2, head_dim: int = 16,
                      seed: int = 0, solver: str = "dpm_solver"):
    from diffusers import DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=num_heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=num_layers, sample_size=sample_size, patch_size=2, norm_num_groups=8,
        num_embeds_ada_norm=1000,  # DiTPipeline's null class is label 1000
    ).eval()
    return DiTPipeline(transformer=transformer, vae=tiny_vae(seed + 1), scheduler=make_scheduler(solver))


def tiny_pixart_pipeline(sample_size: int = 16, num_layers: int = 4, num_heads: int = 2, head_dim: int = 16,
                         caption_channels: int = 32, seed: int = 0, solver: str = "dpm_solver"):
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=num_heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=num_layers, sample_size=sample_size, patch_size=2, norm_num_groups=8,
        cross_attention_dim=num_heads * head_dim, caption_channels=caption_channels,
    ).eval()
    return PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(seed + 1),
                               transformer=transformer, scheduler=make_scheduler(solver))


def tiny_prompt_embeddings(indices, text_len: int = 8, channels: int = 32) -> torch.Tensor:
    """Stand-in T5 embeddings, one seeded tensor per prompt index, so any subset reproduces."""
    rows = [torch.randn(text_len, channels, generator=torch.Generator().manual_seed(int(i))) for i in indices]
    return torch.stack(rows)


def tiny_null_embedding(n: int, text_len: int = 8, channels: int = 32) -> torch.Tensor:
    """The unconditional ("empty prompt") embedding, the same for every sample."""
    return tiny_prompt_embeddings([2**31 - 1], text_len, channels).expand(n, -1, -1).clone()


TINY_BUILDERS = {"dit": tiny_dit_pipeline, "pixart": tiny_pixart_pipeline}
