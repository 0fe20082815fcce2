"""Full-size (and tiny) transformer shapes with random weights: latency does not depend on the
weight values, so the benchmark needs no checkpoint. Built directly on the target device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The published architectures' configs (diffusers class arguments), and their tiny stand-ins.
ARCHITECTURES = {
    "dit_xl_2": dict(family="dit", num_attention_heads=16, attention_head_dim=72, num_layers=28, in_channels=4,
                     out_channels=8, patch_size=2, num_embeds_ada_norm=1000),
    "pixart_sigma_xl": dict(family="pixart", num_attention_heads=16, attention_head_dim=72, num_layers=28,
                            in_channels=4, out_channels=8, patch_size=2, caption_channels=4096,
                            cross_attention_dim=1152, use_additional_conditions=False),
    "tiny_dit": dict(family="dit", num_attention_heads=2, attention_head_dim=16, num_layers=2, in_channels=4,
                     out_channels=8, patch_size=2, num_embeds_ada_norm=10),
    "tiny_pixart": dict(family="pixart", num_attention_heads=2, attention_head_dim=16, num_layers=2, in_channels=4,
                        out_channels=8, patch_size=2, caption_channels=32, cross_attention_dim=32,
                        use_additional_conditions=False),
}
TEXT_TOKENS = 300  # PixArt-Sigma's T5 prompt length


@dataclass
class BenchModel:
    """A transformer with random weights and a function making one CFG forward's inputs."""

    name: str
    transformer: torch.nn.Module
    family: str
    latent_size: int
    images: int  # images per generation; the CFG batch is twice this

    @property
    def seq_len(self) -> int:
        return (self.latent_size // self.transformer.config.patch_size) ** 2

    def latents(self, seed: int = 0) -> torch.Tensor:
        p = next(self.transformer.parameters())
        g = torch.Generator(device=p.device).manual_seed(seed)
        return torch.randn(self.images, 4, self.latent_size, self.latent_size, generator=g, device=p.device,
                           dtype=p.dtype)

    def forward_kwargs(self, batch: int) -> dict:
        p = next(self.transformer.parameters())
        if self.family == "dit":  # a CFG batch as DiTPipeline makes it: real labels, then the null class
            null = self.transformer.config.num_embeds_ada_norm
            labels = torch.arange(batch - batch // 2, device=p.device) % null
            return {"class_labels": torch.cat([labels, torch.full((batch // 2,), null, device=p.device)])}
        g = torch.Generator(device=p.device).manual_seed(1)
        text = torch.randn(batch, TEXT_TOKENS, self.transformer.config.caption_channels, generator=g,
                           device=p.device, dtype=p.dtype)
        return {"encoder_hidden_states": text, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def build(arch: str, resolution: int, images: int, device: torch.device, dtype: torch.dtype, seed: int = 0
          ) -> BenchModel:
    if arch not in ARCHITECTURES:
        raise ValueError(f"benchmark: unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    if resolution % 8:
        raise ValueError(f"benchmark: resolution must be a multiple of 8 (the VAE factor), got {resolution}")
    config = dict(ARCHITECTURES[arch])
    family = config.pop("family")
    latent = resolution // 8
    torch.manual_seed(seed)
    with torch.device(device):
        if family == "dit":
            from diffusers import DiTTransformer2DModel
            model = DiTTransformer2DModel(sample_size=latent, **config)
        else:
            from diffusers import PixArtTransformer2DModel
            model = PixArtTransformer2DModel(sample_size=latent, interpolation_scale=max(1, resolution // 512),
                                             **config)
    model = model.to(dtype).eval().requires_grad_(False)
    return BenchModel(arch, model, family, latent, images)
