"""Full-size shapes of models fastattn serves, with random weights (a step's time does not depend on
the weight values): HunyuanVideo at 720p x 129 frames, CogVideoX-5B at 480 x 720 x 49 frames,
Qwen-Image at 2048² (the generic adapter's zoo), the context-parallel benchmark's Wan 2.1 T2V
14B at 720p x 81 frames and FLUX.1-dev at 2048², and PixArt-Σ-XL at 2048² and Wan 2.1 T2V 1.3B at
480p x 81 frames (the equal-quality benchmark's). ``tiny`` stands in for each on the CPU (the
coverage zoo's configs and inputs; the latents of a CFG batch made two equal halves, as the
pipeline makes them).

Each entry: the diffusers class, its constructor arguments (the published checkpoints' configs),
the inputs of one transformer call as its pipeline makes them (a CFG batch of two equal
halves where the pipeline batches CFG: CogVideoX, PixArt-Σ; HunyuanVideo is guidance-distilled and
Qwen-Image, Wan and FLUX.1-dev run theirs as separate calls or distil it, so one sample each), and
how the pipeline runs CFG (``cfg``). :func:`step_inputs` moves a call's timestep along a loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fastattn.layerwise.methods import Method

from ..models.architectures import ARCHITECTURES
from ..models.tiny.zoo import TINY
from .architectures import ARCHITECTURES as IMAGE_ARCHITECTURES
from .architectures import TEXT_TOKENS

# How a pipeline runs classifier-free guidance: both halves in one call's batch, the conditional and
# unconditional passes as two calls per step, or not at all (guidance-distilled: one call per step).
CFG_BATCH, CFG_CALLS, CFG_NONE = "batch", "calls", "none"
NO_CFG = {Method.ASC: Method.FULL, Method.WARS_ASC: Method.WARS}  # a pipeline without a CFG batch


@dataclass(frozen=True)
class ZooShape:
    class_name: str
    config: dict[str, Any]
    inputs: Callable[[torch.Generator], dict[str, Any]]  # CPU tensors, cast and moved by the caller
    note: str = ""
    cfg: str = CFG_NONE  # CFG_BATCH, CFG_CALLS or CFG_NONE: how the pipeline runs guidance


def _hunyuan_video(g: torch.Generator) -> dict[str, Any]:
    text = 256  # the pipeline's max_sequence_length
    return {"hidden_states": torch.randn(1, 16, 33, 90, 160, generator=g),  # 129 frames of 720 x 1280
            "encoder_hidden_states": torch.randn(1, text, 4096, generator=g),
            "encoder_attention_mask": torch.ones(1, text), "pooled_projections": torch.randn(1, 768, generator=g),
            "timestep": torch.tensor([500.0]), "guidance": torch.tensor([6000.0])}


def _cogvideox(g: torch.Generator) -> dict[str, Any]:
    latents = torch.randn(1, 13, 16, 60, 90, generator=g)  # 49 frames of 480 x 720
    text = torch.randn(1, 226, 4096, generator=g)
    return {"hidden_states": latents.repeat(2, 1, 1, 1, 1), "encoder_hidden_states": text.repeat(2, 1, 1),
            "timestep": torch.tensor([500, 500])}


def _qwen_image(g: torch.Generator) -> dict[str, Any]:
    text = 256
    return {"hidden_states": torch.randn(1, 128 * 128, 64, generator=g),  # 2048² packed in 2 x 2 patches
            "encoder_hidden_states": torch.randn(1, text, 3584, generator=g),
            "encoder_hidden_states_mask": torch.ones(1, text, dtype=torch.long), "timestep": torch.tensor([0.5]),
            "img_shapes": [(1, 128, 128)]}


def _wan_14b_720p(g: torch.Generator) -> dict[str, Any]:
    return {"hidden_states": torch.randn(1, 16, 21, 90, 160, generator=g),  # 81 frames of 720 x 1280
            "encoder_hidden_states": torch.randn(1, 512, 4096, generator=g), "timestep": torch.tensor([500])}


def _flux_dev_2k(g: torch.Generator) -> dict[str, Any]:
    side, text = 128, 512  # 2048² packed in 2 x 2 patches; the pipeline pads the prompt to 512 T5 tokens
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return {"hidden_states": torch.randn(1, side * side, 64, generator=g),
            "encoder_hidden_states": torch.randn(1, text, 4096, generator=g),
            "pooled_projections": torch.randn(1, 768, generator=g), "timestep": torch.tensor([0.5]),
            "img_ids": torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float(),
            "txt_ids": torch.zeros(text, 3), "guidance": torch.tensor([3.5])}


def _pixart_sigma_2k(g: torch.Generator) -> dict[str, Any]:
    latents = torch.randn(1, 4, 256, 256, generator=g)  # 2048² through the VAE's 8x
    return {"hidden_states": latents.repeat(2, 1, 1, 1),  # the CFG batch: the same latents twice
            "encoder_hidden_states": torch.randn(2, TEXT_TOKENS, 4096, generator=g), "timestep": torch.tensor([500, 500]),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def _wan_1_3b_480p(g: torch.Generator) -> dict[str, Any]:
    return {"hidden_states": torch.randn(1, 16, 21, 60, 104, generator=g),  # 81 frames of 480 x 832
            "encoder_hidden_states": torch.randn(1, 512, 4096, generator=g), "timestep": torch.tensor([500])}


_WAN_2_1 = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)

FULL = {
    "hunyuan_video": ZooShape("HunyuanVideoTransformer3DModel", dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
        rope_axes_dim=(16, 56, 56)), _hunyuan_video, "118,800 video + 256 text tokens"),
    "cogvideox_5b": ZooShape("CogVideoXTransformer3DModel", dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
        text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False), _cogvideox,
        "17,550 video + 226 text tokens; without the pipeline's rotary embedding (element-wise, not timed)", CFG_BATCH),
    "qwen_image": ZooShape("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)), _qwen_image,
        "16,384 image + 256 text tokens", CFG_CALLS),
    "wan_14b_720p": ZooShape("WanTransformer3DModel", dict(
        _WAN_2_1, num_attention_heads=40, ffn_dim=13824, num_layers=40), _wan_14b_720p,
        "75,600 video tokens; 512 text tokens through cross-attention", CFG_CALLS),
    "flux_dev_2k": ZooShape("FluxTransformer2DModel", ARCHITECTURES["flux_dev"]["config"], _flux_dev_2k,
                            "16,384 image + 512 text tokens"),
    "pixart_sigma_2k": ZooShape("PixArtTransformer2DModel", dict(
        {k: v for k, v in IMAGE_ARCHITECTURES["pixart_sigma_xl"].items() if k != "family"}, sample_size=256),
        _pixart_sigma_2k, "16,384 image tokens; 300 text tokens through cross-attention (no prompt mask)", CFG_BATCH),
    "wan_1_3b_480p": ZooShape("WanTransformer3DModel", dict(_WAN_2_1, num_attention_heads=12, ffn_dim=8960,
                                                            num_layers=30), _wan_1_3b_480p,
                              "32,760 video tokens; 512 text tokens through cross-attention", CFG_CALLS),
}
TINY_CLASSES = {name: shape.class_name for name, shape in FULL.items()}
MODELS = tuple(FULL)


def zoo_shape(model: str, size: str) -> ZooShape:
    if size == "full":
        return FULL[model]
    tiny, cfg = TINY[TINY_CLASSES[model]], FULL[model].cfg

    def inputs(g: torch.Generator) -> dict[str, Any]:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        made = tiny.inputs()
        return cfg_halves(made) if cfg == CFG_BATCH else made
    return ZooShape(TINY_CLASSES[model], tiny.init, inputs, "tiny", cfg)


def cfg_halves(inputs: dict[str, Any]) -> dict[str, Any]:
    """A batch made a CFG batch as a pipeline makes it: the latents and timesteps of the first half
    repeated in the second (the prompts differ)."""
    def tied(value):
        half = value.shape[0] // 2
        return torch.cat([value[:half], value[:half]]) if value.shape[0] % 2 == 0 else value
    return {k: tied(v) if k in ("hidden_states", "timestep") and isinstance(v, torch.Tensor) and v.ndim else v
            for k, v in inputs.items()}


def step_inputs(inputs: dict, timestep_arg: str, step: int, steps: int) -> dict:
    """The call's inputs at ``step`` of the loop: its timestep moved (each call a new step)."""
    t = inputs[timestep_arg]
    return {**inputs, timestep_arg: t * (1 - 0.8 * step / steps) + (1 if t.max() > 1 else 1e-3) * step}


def build(model: str, size: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    """The transformer with random weights in ``dtype`` on ``device``, and one call's inputs."""
    import diffusers

    shape = zoo_shape(model, size)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a 20B model in float32 would not fit
    try:
        with torch.device(device):
            transformer = getattr(diffusers, shape.class_name)(**shape.config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)

    def cast(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, dtype) if value.is_floating_point() else value.to(device)
        return value
    inputs = {k: cast(v) for k, v in shape.inputs(torch.Generator().manual_seed(1)).items()}
    return transformer, inputs


__all__ = ["CFG_BATCH", "CFG_CALLS", "CFG_NONE", "FULL", "MODELS", "NO_CFG", "ZooShape", "build", "cfg_halves",
           "step_inputs", "zoo_shape"]
