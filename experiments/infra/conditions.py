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


def class_label(index: int, seed: int, num_classes: int = NUM_IMAGENET_CLASSES) -> int:
    """The class of sample ``index``: a seeded permutation of the classes, cycled."""
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
    return int(perm[index % num_classes])


class Conditions:
    """What sample i is conditioned on: a class label, a prompt, or (tiny PixArt) a seeded embedding."""

    def __init__(self, model: DictConfig, prompts: Sequence[str] | None = None,
                 class_labels: Sequence[int] | None = None):
        self.model = model
        self.prompts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
        self.class_labels = list(class_labels) if class_labels else None

    def label(self, index: int, seed: int) -> int:
        if self.class_labels:
            return int(self.class_labels[index % len(self.class_labels)])
        return class_label(index, seed, int(self.model.get("num_classes") or NUM_IMAGENET_CLASSES))

    def prompt(self, index: int) -> str | None:
        """The text of sample ``index``; None for models without text (DiT, the tiny models)."""
        if self.model.family == "dit" or self.model.get("tiny"):
            return None
        return self.prompts[index % len(self.prompts)]

    def inputs(self, indices: Sequence[int], seed: int, num_steps: int, guidance_scale: float) -> dict[str, Any]:
        """Keyword arguments for one ``pipe(...)`` call generating the samples ``indices``."""
        model, indices = self.model, list(indices)
        inputs: dict[str, Any] = {
            "generator": [torch.Generator().manual_seed(seed + i) for i in indices],
            "num_inference_steps": num_steps,
            "guidance_scale": guidance_scale,
            "output_type": "np",
        }
        if model.family == "dit":
            inputs["class_labels"] = [self.label(i, seed) for i in indices]
            return inputs
        inputs.update(height=model.resolution, width=model.resolution)
        if model.get("tiny") and model.family in ("sd3", "flux"):
            from ..models.tiny import tiny_text_inputs

            t = model.tiny
            inputs.update(tiny_text_inputs(model.family, [seed + i for i in indices], t.text_len, t.text_channels,
                                           t.pooled_channels, guidance_scale))
        elif model.get("tiny"):
            from ..models.tiny import tiny_null_embedding, tiny_prompt_embeddings

            t, n = model.tiny, len(indices)
            inputs.update(
                prompt_embeds=tiny_prompt_embeddings([seed + i for i in indices], t.text_len, t.caption_channels),
                prompt_attention_mask=torch.ones(n, t.text_len),
                negative_prompt=None,
                negative_prompt_embeds=tiny_null_embedding(n, t.text_len, t.caption_channels),
                negative_prompt_attention_mask=torch.ones(n, t.text_len),
                use_resolution_binning=False,
            )
        else:
            inputs["prompt"] = [self.prompt(i) for i in indices]
        return inputs


def load_prompts(path: str | None) -> list[str] | None:
    """One prompt per non-empty line of ``path``."""
    if not path:
        return None
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"data.captions_file: file not found: {path}")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"data.captions_file: no prompts in {path}")
    return prompts


def to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move tensor inputs (embeddings, masks) to the pipeline's device; generators stay on CPU."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
