"""Full-size shapes of models fastattn serves, with random weights (a step's time does not depend on
the weight values): HunyuanVideo at 720p x 129 frames, CogVideoX-5B at 480 x 720 x 49 frames,
Qwen-Image at 2048² (the generic adapter's zoo), and the context-parallel benchmark's Wan 2.1 T2V
14B at 720p x 81 frames and FLUX.1-dev at 2048². ``tiny`` stands in for each on the CPU (the
coverage zoo's configs and inputs).

Each entry: the diffusers class, its constructor arguments (the published checkpoints' configs),
and the inputs of one transformer call as its pipeline makes them (a CFG batch of two equal
halves where the pipeline batches CFG: CogVideoX; HunyuanVideo is guidance-distilled and
Qwen-Image, Wan and FLUX.1-dev run theirs as separate calls or distil it, so one sample each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..models.architectures import ARCHITECTURES
from ..models.tiny.zoo import TINY


@dataclass(frozen=True)
class ZooShape:
    class_name: str
    config: dict[str, Any]
    inputs: Callable[[torch.Generator], dict[str, Any]]  # CPU tensors, cast and moved by the caller
    note: str = ""


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
        "17,550 video + 226 text tokens; without the pipeline's rotary embedding (element-wise, not timed)"),
    "qwen_image": ZooShape("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)), _qwen_image,
        "16,384 image + 256 text tokens"),
    "wan_14b_720p": ZooShape("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6), _wan_14b_720p, "75,600 video tokens; 512 text tokens through cross-attention"),
    "flux_dev_2k": ZooShape("FluxTransformer2DModel", ARCHITECTURES["flux_dev"]["config"], _flux_dev_2k,
                            "16,384 image + 512 text tokens"),
}
TINY_CLASSES = {name: shape.class_name for name, shape in FULL.items()}
MODELS = tuple(FULL)


def zoo_shape(model: str, size: str) -> ZooShape:
    if size == "full":
        return FULL[model]
    tiny = TINY[TINY_CLASSES[model]]

    def inputs(g: torch.Generator) -> dict[str, Any]:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        return tiny.inputs()
    return ZooShape(TINY_CLASSES[model], tiny.init, inputs, "tiny")


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


__all__ = ["FULL", "MODELS", "ZooShape", "build", "zoo_shape"]
