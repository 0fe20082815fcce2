"""HPSv2: the Human Preference Score v2 of images against their prompts, as DiTFastAttnV2 reports
it: the mean cosine of the image and text embeddings of open_clip's ViT-H-14 with the HPS v2
weights (about 0.29 for SD3 and FLUX at their defaults).

The weights come from ``metrics.hpsv2_checkpoint`` (a path), ``FASTATTN_HPSV2_CHECKPOINT``, or
the Hugging Face cache (``xswu/HPSv2``, ``HPS_v2_compressed.pt``); nothing downloads when
``HF_HUB_OFFLINE`` is set, and a missing file is one line naming what to fetch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .clip_score import ImageTransform, Tokenizer, eval_transform, mean_image_text_cosine
from .similarity import ImageArray

HPS_ARCHITECTURE = "ViT-H-14"
HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2_compressed.pt"
CHECKPOINT_ENV = "FASTATTN_HPSV2_CHECKPOINT"


def hpsv2_checkpoint(path: str | os.PathLike | None = None) -> Path:
    """The HPS v2 weights file: ``path``, else $FASTATTN_HPSV2_CHECKPOINT, else the HF cache
    (downloaded there when the hub is reachable and not offline)."""
    path = path or os.environ.get(CHECKPOINT_ENV)
    if path:
        if not Path(path).is_file():
            raise RuntimeError(f"HPSv2 checkpoint not found: {path} (metrics.hpsv2_checkpoint / {CHECKPOINT_ENV})")
        return Path(path)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    try:
        return Path(hf_hub_download(HPS_REPO, HPS_FILE, local_files_only=HF_HUB_OFFLINE))
    except Exception as e:  # noqa: BLE001 - hub errors have no common base; all mean "not available"
        raise RuntimeError(f"HPSv2 weights not cached and not downloadable ({type(e).__name__}): on a machine with "
                           f"network run `hf download {HPS_REPO} {HPS_FILE}` and point HF_HOME at that cache, or set "
                           f"metrics.hpsv2_checkpoint / {CHECKPOINT_ENV} to the file") from None


def load_hpsv2(checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, ImageTransform, Tokenizer]:
    """(model, eval transform, tokenizer): ViT-H-14 built without pretrained weights, then the
    HPS v2 state dict (the whole fine-tuned model) loaded over it."""
    import open_clip

    path = hpsv2_checkpoint(checkpoint)
    model = open_clip.create_model(HPS_ARCHITECTURE, pretrained=None, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state))
    return model.to(device).eval(), eval_transform(model), open_clip.get_tokenizer(HPS_ARCHITECTURE)


def compute_hpsv2(images: ImageArray, prompts: Sequence[str], model: nn.Module | None = None,
                  preprocess: ImageTransform | None = None, tokenizer: Tokenizer | None = None,
                  checkpoint: str | os.PathLike | None = None, batch_size: int = 32,
                  device: str | torch.device = "cpu") -> float:
    """HPSv2 of ``images`` [N, H, W, 3] against ``prompts`` (one per image): the mean cosine."""
    if model is None:
        model, preprocess, tokenizer = load_hpsv2(checkpoint, device)
    else:
        import open_clip

        preprocess = preprocess or eval_transform(model)
        tokenizer = tokenizer or open_clip.get_tokenizer(HPS_ARCHITECTURE)
    return mean_image_text_cosine(images, prompts, model, preprocess, tokenizer, batch_size, device)
