"""Full-size transformer architectures with random weights, for benchmarks that need the real
checkpoints' shapes but not their weights (the weights load through ``from_pretrained`` in
:mod:`experiments.models.loaders`)."""

from __future__ import annotations

from typing import Any

import torch

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
