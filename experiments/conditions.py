"""Pipeline inputs for sample i: its condition (class label / prompt) and its own seeded noise.

Every sample is seeded by its index, so a sample is the same image whichever batch or shard
makes it, and raw and compressed runs see identical noise.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from omegaconf import DictConfig

# Captions for real text-to-image runs when no caption file is configured (MS-COCO-like).
DEFAULT_PROMPTS = (
    "A red double-decker bus driving down a city street.",
    "A bowl of fresh fruit on a wooden kitchen table.",
    "A small boat on a calm lake at sunrise.",
    "A cat sleeping on a sofa next to a window.",
    "Two giraffes standing in a grassy field.",
    "A snowy mountain road with a single car.",
    "A plate with a sandwich and french fries.",
    "A lighthouse on a rocky coast under a cloudy sky.",
)

NUM_IMAGENET_CLASSES = 1000


def class_label(index: int, seed: int) -> int:
    """The class of sample ``index``: a seeded permutation of the ImageNet classes."""
    perm = torch.randperm(NUM_IMAGENET_CLASSES, generator=torch.Generator().manual_seed(seed))
    return int(perm[index % NUM_IMAGENET_CLASSES])


def pipeline_inputs(model: DictConfig, indices: Sequence[int], seed: int, num_steps: int,
                    guidance_scale: float) -> dict[str, Any]:
    """Keyword arguments for one ``pipe(...)`` call generating the samples ``indices``."""
    indices = list(indices)
    inputs: dict[str, Any] = {
        "generator": [torch.Generator().manual_seed(seed + i) for i in indices],
        "num_inference_steps": num_steps,
        "guidance_scale": guidance_scale,
        "output_type": "np",
    }
    if model.family == "dit":
        inputs["class_labels"] = [class_label(i, seed) for i in indices]
        return inputs
    inputs.update(height=model.resolution, width=model.resolution)
    if model.get("tiny"):
        from fastattn.models.tiny import tiny_null_embedding, tiny_prompt_embeddings

        t = model.tiny
        n = len(indices)
        inputs.update(
            prompt_embeds=tiny_prompt_embeddings([seed + i for i in indices], t.text_len, t.caption_channels),
            prompt_attention_mask=torch.ones(n, t.text_len),
            negative_prompt=None,
            negative_prompt_embeds=tiny_null_embedding(n, t.text_len, t.caption_channels),
            negative_prompt_attention_mask=torch.ones(n, t.text_len),
            use_resolution_binning=False,
        )
    else:
        inputs["prompt"] = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in indices]
    return inputs


def to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move tensor inputs (embeddings, masks) to the pipeline's device; generators stay on CPU."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
