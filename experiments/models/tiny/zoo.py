"""Tiny configs of diffusers' DiT transformer classes, for the coverage job (``experiments.coverage``).

One :class:`Tiny` a class name: the constructor's keyword arguments and the inputs of one forward
call, at the sizes diffusers' own model tests use (tests/models/transformers/, values taken as
they are, shrunk only where a test's model is not tiny; a class with no such test is sized from its
constructor and called with the inputs its pipeline passes). ``inputs`` is called after seeding, so
every call builds the same tensors; ``timestep`` names the argument the model reads its timestep
from and ``unit`` says whether it takes timesteps in [0, 1] rather than [0, 1000].
A class this module cannot build tiny has its reason in ``UNBUILT``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Tiny:
    init: dict[str, Any]
    inputs: Callable[[], dict[str, Any]]
    timestep: str = "timestep"
    unit: bool = False  # timesteps in [0, 1] (the test's own timestep is 1.0 or rand)
    notes: dict[str, Any] = field(default_factory=dict)


def rn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def steps(batch: int) -> torch.Tensor:
    return torch.randint(0, 1000, (batch,))


def ones(batch: int) -> torch.Tensor:
    return torch.ones(batch)


def _flux_like(extra: dict | None = None, pooled: bool = False, batch: int = 1, text: int = 48):
    """FLUX-style packed latents: 4 x 4 tokens of 4 channels, 3-axis ids."""
    def make():
        d = {"hidden_states": rn(batch, 16, 4), "encoder_hidden_states": rn(batch, text, 32),
             "img_ids": rn(16, 3), "txt_ids": rn(text, 3), "timestep": ones(batch)}
        if pooled:
            d["pooled_projections"] = rn(batch, 32)
        return {**d, **(extra or {})}
    return make


def _flux2_inputs():
    grid = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    text = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(48))
    return {"hidden_states": rn(1, 16, 4), "encoder_hidden_states": rn(1, 48, 32), "img_ids": grid[None],
            "txt_ids": text[None], "timestep": ones(1), "guidance": ones(1)}


def _wan_inputs(channels=4, text=16, control=0):
    def make():
        d = {"hidden_states": rn(1, channels, 2, 16, 16), "encoder_hidden_states": rn(1, 12, text),
             "timestep": steps(1)}
        if control:
            d["control_hidden_states"] = rn(1, control, 2, 16, 16)
        return d
    return make


def _cogview_inputs(batch=2):
    size = torch.tensor([64, 64]).repeat(batch, 1)
    return {"hidden_states": rn(batch, 4, 8, 8), "encoder_hidden_states": rn(batch, 8, 8), "timestep": steps(batch),
            "original_size": size, "target_size": size, "crop_coords": torch.zeros(batch, 2, dtype=torch.long)}


def _hunyuan_dit_inputs(batch=2):
    meta = torch.tensor([[1024, 1024, 16, 16, 0, 0]] * batch, dtype=torch.float32)
    return {"hidden_states": rn(batch, 4, 8, 8), "encoder_hidden_states": rn(batch, 4, 8),
            "text_embedding_mask": torch.ones(batch, 4), "encoder_hidden_states_t5": rn(batch, 4, 8),
            "text_embedding_mask_t5": torch.ones(batch, 4), "timestep": steps(batch).float(), "image_meta_size": meta,
            "style": torch.zeros(batch, dtype=torch.long), "image_rotary_emb": [torch.ones(1, 8), torch.zeros(1, 8)]}


def _ideogram4_inputs(text=4, image=4, channels=16, llm=24):
    from diffusers.models.transformers.transformer_ideogram4 import (IMAGE_POSITION_OFFSET, LLM_TOKEN_INDICATOR,
                                                                     OUTPUT_IMAGE_INDICATOR)
    hidden, context = torch.zeros(1, text + image, channels), torch.zeros(1, text + image, llm)
    hidden[:, text:], context[:, :text] = rn(1, image, channels), rn(1, text, llm)
    positions = torch.zeros(1, text + image, 3, dtype=torch.long)
    positions[:, :text] = torch.arange(text)[:, None]
    positions[:, text:, 0] = IMAGE_POSITION_OFFSET
    positions[:, text:, 1] = torch.tensor([0, 0, 1, 1]) + IMAGE_POSITION_OFFSET
    positions[:, text:, 2] = torch.tensor([0, 1, 0, 1]) + IMAGE_POSITION_OFFSET
    indicator = torch.full((1, text + image), OUTPUT_IMAGE_INDICATOR, dtype=torch.long)
    indicator[:, :text] = LLM_TOKEN_INDICATOR
    return {"hidden_states": hidden, "encoder_hidden_states": context, "timestep": torch.tensor([0.5]),
            "position_ids": positions, "segment_ids": torch.ones(1, text + image, dtype=torch.long),
            "indicator": indicator}


def _krea2_inputs(text=4, side=2):
    positions = torch.zeros(text + side * side, 3)
    positions[text:, 1] = torch.arange(side).repeat_interleave(side)
    positions[text:, 2] = torch.arange(side).repeat(side)
    mask = torch.ones(1, text, dtype=torch.bool)
    mask[:, -1] = False
    return {"hidden_states": rn(1, side * side, 16), "encoder_hidden_states": rn(1, text, 3, 16),
            "timestep": torch.tensor([0.5]), "position_ids": positions, "encoder_attention_mask": mask}


def _omnigen_inputs(batch=2, text=24):
    attended = text + 1 + 16
    return {"hidden_states": rn(batch, 4, 8, 8), "timestep": torch.rand(batch),
            "input_ids": torch.randint(0, 10, (batch, text)), "input_img_latents": [rn(1, 4, 8, 8)],
            "input_image_sizes": {0: [[0, 16]]}, "attention_mask": torch.ones(batch, attended, attended),
            "position_ids": torch.arange(attended).repeat(batch, 1)}


def _qwen_inputs(batch=1, text=8, channels=16):
    return {"hidden_states": rn(batch, 16, channels), "encoder_hidden_states": rn(batch, text, 16),
            "encoder_hidden_states_mask": torch.ones(batch, text, dtype=torch.long), "timestep": ones(batch),
            "img_shapes": [(1, 4, 4)] * batch}


def _hunyuan_image_inputs(text=6):
    mask = torch.ones(1, text)
    mask[:, -1] = 0  # the pipeline pads the prompt: its last token masked out
    return {"hidden_states": rn(1, 4, 8, 8), "timestep": steps(1).float(), "encoder_hidden_states": rn(1, text, 16),
            "encoder_attention_mask": mask}


def _kandinsky5_inputs(frames=2, side=8, text=6):
    # channels-last latents [batch, frames, rows, cols, channels] and the rope positions of the pipeline
    # (rows and cols over 2, the spatial patch)
    return {"hidden_states": rn(1, frames, side, side, 4), "encoder_hidden_states": rn(1, text, 16),
            "timestep": steps(1).float(), "pooled_projections": rn(1, 8),
            "visual_rope_pos": [torch.arange(frames), torch.arange(side // 2), torch.arange(side // 2)],
            "text_rope_pos": torch.arange(text), "scale_factor": (1.0, 1.0, 1.0)}


def _qwen21_inputs(text=6, side=4):
    # text to image: no condition image, so img_mask is the prompt's slots (False) then one True
    # slot per 2 x 2 target tokens, as the pipeline appends them; no KV cache (an optional speed-up)
    slots = torch.cat([torch.zeros(1, text, dtype=torch.bool), torch.ones(1, side * side // 4, dtype=torch.bool)], 1)
    return {"hidden_states": rn(1, side * side, 16), "timestep": torch.tensor([0.5]),
            "encoder_hidden_states": rn(1, text, 16), "encoder_hidden_states_mask": torch.ones(1, text, dtype=torch.bool),
            "img_shapes": [[(1, side, side)]], "img_mask": slots}


def _sana_wm_inputs(frames=9, side=4, text=6):
    """A still camera (identity poses) through the pipeline's own camera preparation, for the LTX-2
    VAE's strides (8 frames, 32 pixels): 2 latent frames of side x side, 48 Plücker channels."""
    import numpy as np
    from diffusers.pipelines.sana_wm.cam_utils import prepare_camera

    poses = np.tile(np.eye(4, dtype=np.float32), (frames, 1, 1))
    intrinsics = np.full((frames, 4), 16.0 * side, dtype=np.float32)
    cam = prepare_camera(poses, intrinsics, target_size=(32 * side, 32 * side), vae_stride=(8, 32, 32))
    latent_frames = (frames - 1) // 8 + 1
    return {"hidden_states": rn(1, 4, latent_frames, side, side), "timestep": torch.full((1, 1, latent_frames), 500.0),
            "encoder_hidden_states": rn(1, 1, text, 16), "mask": torch.ones(1, text, dtype=torch.long),
            "data_info": {"img_hw": torch.tensor([[32.0 * side, 32.0 * side]])},
            "camera_conditions": cam["raymap"][None], "chunk_plucker": cam["chunk_plucker"][None]}


def _cosmos3_inputs(text=5, frames=2, side=4):
    """Text to video: the packed sequence (text, then the vision tokens) and its index lists, built by
    the pipeline's own segment builders on a stand-in holding the tiny config (they read nothing else)."""
    import inspect
    from types import SimpleNamespace

    import diffusers
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import Cosmos3OmniPipeline as Pipe

    params = inspect.signature(diffusers.Cosmos3OmniTransformer.__init__).parameters
    defaults = {k: p.default for k, p in params.items()}
    pipe = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(**{**defaults, **_COSMOS3})),
                           vae_scale_factor_temporal=4)
    latents = rn(1, _COSMOS3["latent_channel"], frames, side, side)
    txt = Pipe._prepare_text_segment(pipe, list(range(1, text + 1)), "cpu")
    vis = Pipe._prepare_vision_segment(pipe, latents, False, txt["vision_start_temporal_offset"], 24.0, txt["und_len"],
                                       "cpu")
    return {"input_ids": txt["input_ids"], "text_indexes": txt["text_indexes"], "und_len": txt["und_len"],
            "position_ids": torch.cat([txt["text_mrope_ids"], vis["vision_mrope_ids"]], dim=1),
            "sequence_length": txt["und_len"] + vis["num_vision_tokens"], "vision_tokens": [latents],
            "vision_token_shapes": vis["vision_token_shapes"],
            "vision_sequence_indexes": vis["vision_sequence_indexes"],
            "vision_mse_loss_indexes": vis["vision_mse_loss_indexes"],
            "vision_timesteps": torch.full((vis["num_noisy_vision_tokens"],), 500.0),
            "vision_noisy_frame_indexes": vis["vision_noisy_frame_indexes"]}


_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32)
_WAN_QK = dict(_WAN, qk_norm="rms_norm_across_heads")
_FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32)
_ADANORM = dict(num_layers=1, patch_size=2, in_channels=4, out_channels=8, attention_bias=True,
                activation_fn="gelu-approximate")
_HUNYUAN_15 = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                   num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
                   text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")
_COSMOS3 = dict(head_dim=8, hidden_size=32, intermediate_size=64, latent_channel=4, latent_patch_size=2,
                patch_latent_dim=16, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=64,
                rope_axes_dim=(2, 1, 1))

TINY: dict[str, Tiny] = {
    "DiTTransformer2DModel": Tiny(
        dict(_ADANORM, num_attention_heads=2, attention_head_dim=4, norm_type="ada_norm_zero", num_embeds_ada_norm=8,
             sample_size=8),
        lambda: {"hidden_states": rn(4, 4, 8, 8), "timestep": steps(4), "class_labels": torch.randint(0, 4, (4,))}),
    "PixArtTransformer2DModel": Tiny(
        dict(_ADANORM, sample_size=8, attention_head_dim=2, num_attention_heads=2, cross_attention_dim=8,
             num_embeds_ada_norm=8, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
             use_additional_conditions=False, caption_channels=None),
        lambda: {"hidden_states": rn(4, 4, 8, 8), "timestep": steps(4), "encoder_hidden_states": rn(4, 8, 8),
                 "added_cond_kwargs": {"aspect_ratio": None, "resolution": None}}),
    "LatteTransformer3DModel": Tiny(
        dict(_ADANORM, sample_size=8, attention_head_dim=4, num_attention_heads=2, caption_channels=8,
             cross_attention_dim=8, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
             norm_elementwise_affine=False, norm_eps=1e-6),
        lambda: {"hidden_states": rn(2, 4, 1, 8, 8), "encoder_hidden_states": rn(2, 8, 8), "timestep": steps(2),
                 "enable_temporal_attentions": True}),
    "SD3Transformer2DModel": Tiny(
        dict(sample_size=32, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
             caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
             pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None),
        lambda: {"hidden_states": rn(2, 4, 32, 32), "encoder_hidden_states": rn(2, 154, 32),
                 "pooled_projections": rn(2, 64), "timestep": steps(2)}),
    "FluxTransformer2DModel": Tiny(dict(_FLUX, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
                                   _flux_like(pooled=True), unit=True),
    "ChromaTransformer2DModel": Tiny(
        dict(_FLUX, axes_dims_rope=[4, 4, 8], approximator_num_channels=8, approximator_hidden_dim=16,
             approximator_layers=1), _flux_like(), unit=True),
    "BriaTransformer2DModel": Tiny(
        dict(_FLUX, attention_head_dim=8, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4]), _flux_like(), unit=True),
    "OvisImageTransformer2DModel": Tiny(dict(_FLUX, out_channels=4, axes_dims_rope=(4, 4, 8)), _flux_like(), unit=True),
    "LongCatImageTransformer2DModel": Tiny(
        dict(_FLUX, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
        _flux_like({"guidance": torch.tensor([3.5])}), unit=True),
    "Flux2Transformer2DModel": Tiny(dict(_FLUX, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4]),
                                    _flux2_inputs, unit=True),
    "AuraFlowTransformer2DModel": Tiny(
        dict(sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
             attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
             out_channels=4, pos_embed_max_size=256),
        lambda: {"hidden_states": rn(2, 4, 32, 32), "encoder_hidden_states": rn(2, 256, 32), "timestep": steps(2)}),
    "AllegroTransformer3DModel": Tiny(
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
             cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8),
        lambda: {"hidden_states": rn(2, 4, 2, 8, 8), "encoder_hidden_states": rn(2, 16, 8), "timestep": steps(2)}),
    "CogVideoXTransformer3DModel": Tiny(
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
             text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
             patch_size_t=None, temporal_compression_ratio=4, max_text_seq_length=8),
        lambda: {"hidden_states": rn(2, 1, 4, 8, 8), "encoder_hidden_states": rn(2, 8, 8), "timestep": steps(2)}),
    "CogView3PlusTransformer2DModel": Tiny(
        dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2, out_channels=4,
             text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8),
        _cogview_inputs),
    "CogView4Transformer2DModel": Tiny(
        dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4,
             text_embed_dim=8, time_embed_dim=8, condition_dim=4), _cogview_inputs),
    "CosmosTransformer3DModel": Tiny(
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
             text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
             rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=True, extra_pos_embed_type="learnable"),
        lambda: {"hidden_states": rn(1, 4, 1, 16, 16), "timestep": steps(1), "encoder_hidden_states": rn(1, 12, 16),
                 "attention_mask": torch.ones(1, 12), "fps": 30, "padding_mask": torch.zeros(1, 1, 16, 16)}),
    "EasyAnimateTransformer3DModel": Tiny(
        dict(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=2,
             out_channels=4, patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16, time_embed_dim=8,
             time_position_encoding_type="3d_rope", timestep_activation_fn="silu"),
        lambda: {"hidden_states": rn(2, 4, 2, 16, 16), "timestep": steps(2), "encoder_hidden_states": rn(2, 16, 16)}),
    "ErnieImageTransformer2DModel": Tiny(
        dict(hidden_size=16, num_attention_heads=1, num_layers=1, ffn_hidden_size=16, in_channels=16, out_channels=16,
             patch_size=1, text_in_dim=16, rope_theta=256, rope_axes_dim=(8, 4, 4), eps=1e-6, qk_layernorm=True),
        lambda: {"hidden_states": rn(1, 16, 16, 16), "timestep": ones(1), "text_bth": rn(1, 16, 16),
                 "text_lens": torch.tensor([16])}, unit=True),
    "GlmImageTransformer2DModel": Tiny(
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
             text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=64),
        lambda: {"hidden_states": rn(1, 4, 8, 8), "encoder_hidden_states": rn(1, 12, 32),
                 "prior_token_id": torch.randint(0, 64, (1,)), "prior_token_drop": torch.zeros(1, dtype=torch.bool),
                 "timestep": steps(1), "target_size": torch.tensor([[8.0, 8.0]]), "crop_coords": torch.zeros(1, 2)}),
    "HeliosTransformer3DModel": Tiny(
        dict({k: v for k, v in _WAN_QK.items() if k != "rope_max_seq_len"}, rope_dim=(4, 4, 4), has_multi_term_memory_patch=True, guidance_cross_attn=True,
             zero_history_timestep=True, is_amplify_history=False),
        lambda: {"hidden_states": rn(1, 4, 2, 16, 16), "timestep": steps(1), "encoder_hidden_states": rn(1, 12, 16),
                 "indices_hidden_states": torch.ones(1, 2), "indices_latents_history_short": torch.ones(1, 1),
                 "indices_latents_history_mid": torch.ones(1, 1), "indices_latents_history_long": torch.ones(1, 4),
                 "latents_history_short": rn(1, 4, 1, 16, 16), "latents_history_mid": rn(1, 4, 1, 16, 16),
                 "latents_history_long": rn(1, 4, 4, 16, 16)}),
    "HiDreamImageTransformer2DModel": Tiny(
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
             num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
             num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1),
             force_inference_output=True),
        lambda: {"hidden_states": rn(2, 4, 32, 32), "encoder_hidden_states_t5": rn(2, 8, 8),
                 "encoder_hidden_states_llama3": rn(2, 2, 8, 4), "pooled_embeds": rn(2, 8), "timesteps": steps(2)},
        timestep="timesteps"),
    "HunyuanDiT2DModel": Tiny(
        dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
             cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16, text_len=4,
             text_len_t5=4, activation_fn="gelu-approximate"), _hunyuan_dit_inputs),
    "HunyuanVideoTransformer3DModel": Tiny(
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
             text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None),
        lambda: {"hidden_states": rn(2, 4, 1, 16, 16), "timestep": steps(2).float(),
                 "encoder_hidden_states": rn(2, 12, 16), "pooled_projections": rn(2, 8),
                 "encoder_attention_mask": torch.ones(2, 12), "guidance": steps(2).float()}),
    "HunyuanVideo15Transformer3DModel": Tiny(
        _HUNYUAN_15,
        lambda: {"hidden_states": rn(2, 4, 1, 8, 8), "timestep": ones(2), "encoder_hidden_states": rn(2, 6, 16),
                 "encoder_hidden_states_2": rn(2, 4, 8), "encoder_attention_mask": torch.ones(2, 6),
                 "encoder_attention_mask_2": torch.ones(2, 4), "image_embeds": torch.zeros(2, 3, 12)}, unit=True),
    "Ideogram4Transformer2DModel": Tiny(
        dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, intermediate_size=32,
             adaln_dim=16, llm_features_dim=24, rope_theta=10_000, mrope_section=(2, 1, 1), norm_eps=1e-5),
        _ideogram4_inputs, unit=True),
    "Krea2Transformer2DModel": Tiny(
        dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3,
             text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16,
             num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 2, 2), rope_theta=1000.0,
             norm_eps=1e-5), _krea2_inputs, unit=True),
    "LTXVideoTransformer3DModel": Tiny(
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
             num_layers=1, qk_norm="rms_norm_across_heads", caption_channels=16),
        lambda: {"hidden_states": rn(2, 512, 4), "encoder_hidden_states": rn(2, 16, 16), "timestep": steps(2),
                 "encoder_attention_mask": torch.ones(2, 16, dtype=torch.bool), "num_frames": 2, "height": 16,
                 "width": 16}),
    "LTX2VideoTransformer3DModel": Tiny(
        dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
             cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
             audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
             caption_channels=16, rope_double_precision=False),
        lambda: {"hidden_states": rn(2, 512, 4), "audio_hidden_states": rn(2, 9, 4),
                 "encoder_hidden_states": rn(2, 16, 16), "audio_encoder_hidden_states": rn(2, 16, 16),
                 "timestep": rn(2).abs() * 1000, "encoder_attention_mask": torch.ones(2, 16, dtype=torch.bool),
                 "num_frames": 2, "height": 16, "width": 16, "audio_num_frames": 9, "fps": 25.0}),
    "LuminaNextDiT2DModel": Tiny(
        dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_attention_heads=3,
             num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=False, qk_norm=True,
             cross_attention_dim=32, scaling_factor=1.0),
        lambda: {"hidden_states": rn(2, 4, 16, 16), "encoder_hidden_states": rn(2, 16, 32), "timestep": torch.rand(2),
                 "encoder_mask": rn(2, 16), "image_rotary_emb": rn(384, 384, 4), "cross_attention_kwargs": {}},
        unit=True),
    "Lumina2Transformer2DModel": Tiny(
        dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
             num_attention_heads=3, num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5,
             scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128), cap_feat_dim=32),
        lambda: {"hidden_states": rn(2, 4, 16, 16), "encoder_hidden_states": rn(2, 16, 32), "timestep": torch.rand(2),
                 "encoder_attention_mask": torch.ones(2, 16, dtype=torch.bool)}, unit=True),
    "MochiTransformer3DModel": Tiny(
        dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
             in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
             activation_fn="swiglu", max_sequence_length=16),
        lambda: {"hidden_states": rn(2, 4, 2, 16, 16), "encoder_hidden_states": rn(2, 16, 16), "timestep": steps(2),
                 "encoder_attention_mask": torch.ones(2, 16, dtype=torch.bool)}),
    "MotifVideoTransformer3DModel": Tiny(
        dict(in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=1,
             num_single_layers=1, num_decoder_layers=0, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
             norm_type="layer_norm", text_embed_dim=32, image_embed_dim=4, rope_theta=256.0, rope_axes_dim=(4, 4, 4),
             enable_text_cross_attention_dual=False, enable_text_cross_attention_single=False),
        lambda: {"hidden_states": rn(1, 33, 9, 16, 16), "encoder_hidden_states": rn(1, 12, 32), "timestep": steps(1)}),
    "NucleusMoEImageTransformer2DModel": Tiny(
        dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
             joint_attention_dim=16, axes_dims_rope=(8, 4, 4), moe_enabled=False, capacity_factors=[8.0, 8.0]),
        _qwen_inputs, unit=True),
    "OmniGenTransformer2DModel": Tiny(
        dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_layers=20,
             pad_token_id=0, vocab_size=1000, in_channels=4, time_step_dim=4,
             rope_scaling={"long_factor": [1, 2], "short_factor": [1, 2]}), _omnigen_inputs, unit=True),
    # diffusers' test builds a 1792-wide, 4-deep PRX (not tiny): the same layout at width 32
    "PRXTransformer2DModel": Tiny(
        dict(in_channels=16, patch_size=2, context_in_dim=32, hidden_size=32, mlp_ratio=3.5, num_heads=2, depth=2,
             axes_dim=[8, 8], theta=10_000),
        lambda: {"hidden_states": rn(1, 16, 16, 16), "encoder_hidden_states": rn(1, 16, 32), "timestep": ones(1)},
        unit=True),
    "QwenImageTransformer2DModel": Tiny(
        dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
             joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)), _qwen_inputs, unit=True),
    "SanaTransformer2DModel": Tiny(
        dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2,
             num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
             sample_size=32),
        lambda: {"hidden_states": rn(2, 4, 32, 32), "encoder_hidden_states": rn(2, 8, 8), "timestep": steps(2)}),
    "SanaVideoTransformer3DModel": Tiny(
        dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=2,
             num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
             mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8, patch_size=(1, 2, 2),
             norm_elementwise_affine=False, norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        lambda: {"hidden_states": rn(2, 16, 2, 16, 16), "encoder_hidden_states": rn(2, 12, 16), "timestep": steps(2)}),
    "SkyReelsV2Transformer3DModel": Tiny(_WAN_QK, _wan_inputs()),
    "WanTransformer3DModel": Tiny(_WAN_QK, _wan_inputs()),
    "WanVACETransformer3DModel": Tiny(
        dict(_WAN_QK, in_channels=16, out_channels=16, text_dim=32, num_layers=4, vace_layers=[0, 2],
             vace_in_channels=48), _wan_inputs(channels=16, text=32, control=48)),
    "ZImageTransformer2DModel": Tiny(
        dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=16, n_layers=1, n_refiner_layers=1,
             n_heads=1, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
             axes_dims=[8, 4, 4], axes_lens=[256, 32, 32]),
        lambda: {"x": [rn(16, 1, 16, 16)], "cap_feats": [rn(16, 16)], "t": torch.tensor([0.0])}, timestep="t",
        unit=True),
    "AnyFlowTransformer3DModel": Tiny(
        dict(_WAN, gate_value=0.25, deltatime_type="r"),
        lambda: {"hidden_states": rn(1, 2, 4, 16, 16), "timestep": torch.full((1, 2), 500.0),
                 "r_timestep": torch.full((1, 2), 250.0), "encoder_hidden_states": rn(1, 12, 16)}),
    "AnyFlowFARTransformer3DModel": Tiny(
        dict(_WAN, compressed_patch_size=(1, 4, 4), full_chunk_limit=3, gate_value=0.25, deltatime_type="r"),
        lambda: {"hidden_states": rn(1, 4, 4, 16, 16), "timestep": torch.full((1, 4), 500.0),
                 "r_timestep": torch.full((1, 4), 250.0), "encoder_hidden_states": rn(1, 12, 16),
                 "chunk_partition": [2, 2]}),
    "BriaFiboTransformer2DModel": Tiny(
        dict(_FLUX, in_channels=48, attention_head_dim=8, joint_attention_dim=64, text_encoder_dim=32,
             pooled_projection_dim=None, axes_dims_rope=[0, 4, 4]),
        lambda: (lambda context: {"hidden_states": rn(1, 256, 48), "encoder_hidden_states": context,
                                  "img_ids": rn(256, 3), "txt_ids": rn(32, 3), "timestep": ones(1),
                                  "text_encoder_layers": [context[:, :, :32], context[:, :, :32]]})(rn(1, 32, 64)),
        unit=True),
    # No model test in diffusers for the classes below: sized from each constructor, called with the
    # inputs its pipeline passes (timesteps in the pipeline's own range)
    "HunyuanImageTransformer2DModel": Tiny(
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=(1, 1), text_embed_dim=16,
             rope_axes_dim=(4, 4)), _hunyuan_image_inputs),
    "Kandinsky5Transformer3DModel": Tiny(
        dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
             model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6)), _kandinsky5_inputs),
    # one injection block (the last) reads the second text bundle; gist tokens 4 to 8
    "BriaFibo2Transformer2DModel": Tiny(
        dict(in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=16,
             injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8,
             gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(64, 32, 32)),
        lambda: {"hidden_states": rn(1, 4, 8, 8), "timestep": torch.tensor([0.5]),
                 "encoder_hidden_states": rn(1, 2, 8, 16)},
        unit=True),
    "QwenImage21Transformer2DModel": Tiny(
        dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             context_in_dim=16, mlp_ratio=2, axes_dims_rope=(4, 6, 6)), _qwen21_inputs, unit=True),
    # two blocks: a linear-attention one and (softmax_every_n=2) a softmax one
    "SanaWMTransformer3DModel": Tiny(
        dict(in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, softmax_every_n=2, linear_head_dim=16,
             chunk_plucker_post_attn_blocks=2, caption_channels=16, mlp_ratio=2.0, mixed_precision="fp32"),
        _sana_wm_inputs),
    "Cosmos3OmniTransformer": Tiny(_COSMOS3, _cosmos3_inputs, timestep="vision_timesteps"),
}

# Classes with no tiny config here, and why (none today: every listed class has one)
UNBUILT: dict[str, str] = {}
