"""Tiny random-weight SD3 and FLUX pipelines without text encoders, and their stand-in prompt inputs."""

from __future__ import annotations

import torch


def _tiny_flow_vae(seed: int, latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # One block: no downsampling. shift_factor is read by both pipelines when decoding.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(32,),
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=8, shift_factor=0.0, scaling_factor=1.0,
    ).eval()


def tiny_sd3_pipeline(sample_size: int = 16, num_layers: int = 2, num_heads: int = 2, head_dim: int = 16,
                      text_channels: int = 32, pooled_channels: int = 32, seed: int = 0, **_):
    """A random-weight SD3 pipeline without text encoders: pass prompt_embeds / pooled_prompt_embeds."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=text_channels,
        caption_projection_dim=num_heads * head_dim, pooled_projection_dim=pooled_channels,
        pos_embed_max_size=sample_size,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_flow_vae(seed + 1, 4),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )


def tiny_flux_pipeline(sample_size: int = 16, num_layers: int = 1, num_single_layers: int = 1, num_heads: int = 2,
                       head_dim: int = 16, text_channels: int = 32, pooled_channels: int = 32, seed: int = 0, **_):
    """A random-weight FLUX.1-dev-like pipeline (guidance embedding) without text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    if head_dim % 4:
        raise ValueError(f"tiny FLUX needs head_dim divisible by 4 for its RoPE axes, got {head_dim}")
    torch.manual_seed(seed)
    axes = (head_dim // 4, 3 * head_dim // 8, head_dim - head_dim // 4 - 3 * head_dim // 8)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=text_channels,
        pooled_projection_dim=pooled_channels, guidance_embeds=True, axes_dims_rope=axes,
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_flow_vae(seed + 1, 4), text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )


def tiny_text_inputs(family: str, indices, text_len: int = 8, text_channels: int = 32, pooled_channels: int = 32,
                     guidance_scale: float | None = None) -> dict[str, torch.Tensor]:
    """Seeded stand-in prompt embeddings (one per prompt index) in the keyword form the pipeline takes."""

    def seeded(shape, i):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(int(i)))

    embeds = torch.stack([seeded((text_len, text_channels), i) for i in indices])
    pooled = torch.stack([seeded((pooled_channels,), 10_000 + int(i)) for i in indices])
    inputs = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if family == "sd3" and (guidance_scale is None or guidance_scale > 1):
        null = seeded((text_len, text_channels), 2**31 - 1)
        inputs["negative_prompt_embeds"] = null.expand(len(embeds), -1, -1).clone()
        inputs["negative_pooled_prompt_embeds"] = seeded((pooled_channels,), 2**31 - 2).expand(len(embeds), -1).clone()
    return inputs


TINY_MMDIT_BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
