"""Multimodal DiTs (joint image + text attention): SD3 and FLUX adapters and tiny offline pipelines.

SD3's joint sequence is the image tokens then the text tokens; FLUX puts the text first and
has double-stream blocks (separate projections, joint attention) followed by single-stream
blocks that attend over the already concatenated [text, image] sequence. Every block's ``attn``
is one layer, double-stream blocks first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import ModelAdapter


@dataclass(frozen=True)
class MMDiTAdapter(ModelAdapter):
    text_first: bool = False  # where the text tokens sit in the joint sequence
    single_blocks_attr: str | None = None  # FLUX's single-stream blocks, after the double-stream ones

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        blocks = list(getattr(transformer, self.blocks_attr))
        if self.single_blocks_attr:
            blocks += list(getattr(transformer, self.single_blocks_attr))
        return blocks

    def image_span(self, seq_len: int, text_len: int) -> tuple[int, int]:
        """(first image token, number of image tokens) in a joint sequence of ``seq_len``."""
        if not 0 <= text_len < seq_len:
            raise ValueError(f"text length {text_len} does not fit a joint sequence of {seq_len} tokens")
        return (text_len if self.text_first else 0), seq_len - text_len

    def describe(self, transformer: nn.Module) -> dict[str, Any]:
        info = super().describe(transformer)
        info["joint"] = True
        info["text_first"] = self.text_first
        return info


SD3_ADAPTER = MMDiTAdapter("SD3Transformer2DModel", cond_first=False, default_guidance_scale=7.0,
                           attention_attr="attn", text_first=False)
# FLUX.1-dev distils guidance into an embedding; true CFG (true_cfg_scale > 1) runs the
# conditional and unconditional passes as separate calls, so no call holds a CFG batch.
FLUX_ADAPTER = MMDiTAdapter("FluxTransformer2DModel", cond_first=True, default_guidance_scale=3.5,
                            attention_attr="attn", text_first=True, single_blocks_attr="single_transformer_blocks",
                            cfg_batched=False)

MMDIT_ADAPTERS = {a.class_name: a for a in (SD3_ADAPTER, FLUX_ADAPTER)}


# ---------------------------------------------------------------------------------- tiny models
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


def load_mmdit_pipeline(family: str, pipeline_id: str, torch_dtype: torch.dtype, solver: str = "flow_euler"):
    """``StableDiffusion3Pipeline`` / ``FluxPipeline.from_pretrained(pipeline_id)`` (gated on the Hub:
    accept the licence and log in, or point HF_HOME at a cache that holds it)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from .loading import _from_pretrained
    from .solvers import make_scheduler

    if solver != "flow_euler":
        raise ValueError(f"solver.scheduler: {family} is a flow-matching model; use flow_euler, not {solver!r}")
    cls = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]
    pipe = _from_pretrained(cls, pipeline_id, torch_dtype=torch_dtype)
    pipe.scheduler = make_scheduler(solver, pipe.scheduler.config)
    return pipe


# ------------------------------------------------------------ full-size architectures (random weights)
# The transformer configs of the real checkpoints, for benchmarks that need their shapes but not
# their weights (the weights load through ``from_pretrained`` in fastattn.models.loading).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd3_medium": dict(cls="SD3Transformer2DModel", text_len=333, latent_scale=8, config=dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192)),
    "flux_dev": dict(cls="FluxTransformer2DModel", text_len=512, latent_scale=8, config=dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    # CPU-sized stand-ins with the same code paths, for tests of the benchmark itself
    "tiny_sd3": dict(cls="SD3Transformer2DModel", text_len=5, latent_scale=1, config=dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=16)),
    "tiny_flux": dict(cls="FluxTransformer2DModel", text_len=7, latent_scale=1, config=dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))),
}


def build_random_transformer(arch: str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A transformer of architecture ``arch`` with random weights, built directly on ``device`` in ``dtype``."""
    import diffusers

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    spec = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no float32 copy of a 12B-parameter model
    try:
        with torch.device(device):
            model = getattr(diffusers, spec["cls"])(**spec["config"])
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def random_transformer_inputs(arch: str, transformer, resolution: int, batch: int, text_len: int | None = None,
                              seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for one transformer call at ``resolution`` pixels (random latents and text)."""
    spec = ARCHITECTURES[arch]
    cfg = spec["config"]
    text_len = spec["text_len"] if text_len is None else text_len
    p = next(transformer.parameters())
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=p.device, dtype=p.dtype)

    latent = resolution // spec["latent_scale"]
    text = rand(batch, text_len, cfg["joint_attention_dim"])
    pooled = rand(batch, cfg["pooled_projection_dim"])
    timestep = torch.full((batch,), 500.0, device=p.device)
    if spec["cls"] == "SD3Transformer2DModel":
        return dict(hidden_states=rand(batch, cfg["in_channels"], latent, latent), encoder_hidden_states=text,
                    pooled_projections=pooled, timestep=timestep, return_dict=False)
    side = latent // 2  # FLUX packs 2x2 latent patches into one token
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return dict(hidden_states=rand(batch, side * side, cfg["in_channels"]), encoder_hidden_states=text,
                pooled_projections=pooled, timestep=timestep / 1000, img_ids=img_ids.reshape(-1, 3).to(p.device),
                txt_ids=torch.zeros(text_len, 3, device=p.device),
                guidance=torch.full((batch,), 3.5, device=p.device) if cfg.get("guidance_embeds") else None,
                return_dict=False)


def image_tokens(arch: str, resolution: int) -> int:
    spec = ARCHITECTURES[arch]
    latent = resolution // spec["latent_scale"]
    return (latent // 2) ** 2  # both: 2x2 latent patches per token
