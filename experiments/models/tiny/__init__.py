"""Tiny random-weight pipelines built from diffusers configs, offline and seeded: every real code
path (the same transformer, pipeline and scheduler classes as the checkpoints) in milliseconds
on a CPU. Their weights are random, so they prove mechanics, not quality."""

from .image import TINY_BUILDERS, tiny_dit_pipeline, tiny_null_embedding, tiny_pixart_pipeline, tiny_prompt_embeddings, tiny_vae
from .mmdit import TINY_MMDIT_BUILDERS, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_text_inputs
from .video import TINY_VIDEO_BUILDERS, tiny_latte_pipeline, tiny_wan_pipeline

__all__ = ["TINY_BUILDERS", "TINY_MMDIT_BUILDERS", "TINY_VIDEO_BUILDERS", "tiny_dit_pipeline", "tiny_flux_pipeline",
           "tiny_latte_pipeline", "tiny_null_embedding", "tiny_pixart_pipeline", "tiny_prompt_embeddings",
           "tiny_sd3_pipeline", "tiny_text_inputs", "tiny_vae", "tiny_wan_pipeline"]
