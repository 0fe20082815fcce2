"""Shared tiny models and inputs. Everything here is offline and seeded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.models.tiny import tiny_dit_pipeline, tiny_null_embedding, tiny_pixart_pipeline, tiny_prompt_embeddings

CONF = Path(__file__).resolve().parents[1] / "conf"
SAMPLE = 16  # latent side: 8x8 patches = 64 tokens
LAYERS = 3
TEXT_LEN, CAPTION = 6, 32


@pytest.fixture
def dit_pipe():
    pipe = tiny_dit_pipeline(sample_size=SAMPLE, num_layers=LAYERS, num_heads=2, head_dim=8, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pixart_pipe():
    pipe = tiny_pixart_pipeline(sample_size=SAMPLE, num_layers=LAYERS, num_heads=2, head_dim=8,
                                caption_channels=CAPTION, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_inputs(steps=6, n=2, seed=0, guidance=4.0):
    return dict(class_labels=list(range(3, 3 + n)), num_inference_steps=steps, guidance_scale=guidance,
                generator=[torch.Generator().manual_seed(seed + i) for i in range(n)], output_type="np")


def pixart_inputs(steps=6, n=2, seed=0, guidance=4.5):
    return dict(
        prompt_embeds=tiny_prompt_embeddings(range(seed, seed + n), TEXT_LEN, CAPTION),
        prompt_attention_mask=torch.ones(n, TEXT_LEN),
        negative_prompt=None,
        negative_prompt_embeds=tiny_null_embedding(n, TEXT_LEN, CAPTION),
        negative_prompt_attention_mask=torch.ones(n, TEXT_LEN),
        num_inference_steps=steps, guidance_scale=guidance, height=SAMPLE, width=SAMPLE,
        use_resolution_binning=False, output_type="np",
        generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
    )


@pytest.fixture(params=["dit", "pixart"])
def pipe_and_inputs(request, dit_pipe, pixart_pipe):
    """Both architectures, for tests that hold for each."""
    if request.param == "dit":
        return dit_pipe, dit_inputs
    return pixart_pipe, pixart_inputs


def compose_app(config_name: str, overrides=(), return_hydra_config: bool = False):
    """A job's config as Hydra composes it from conf/<config_name>.yaml and ``overrides``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
