"""CLIP score of images against their prompts with open_clip: max(100 * mean cos(image, text), 0),
the definition of torchmetrics' CLIPScore (clipped after averaging)."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import nn

from .similarity import ImageArray, check_images, iter_batches, to_uint8

ImageTransform = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


def _weights_source(tag_cfg: dict) -> str:
    """Where open_clip fetches a tag from: the Hugging Face hub when the tag has an entry, else its URL."""
    if tag_cfg.get("hf_hub"):
        repo, filename = os.path.split(tag_cfg["hf_hub"])  # "org/name/" names the repo's default file
        return f"{filename or 'open_clip_pytorch_model.bin'} (or its .safetensors) of hf-hub {repo} into HF_HOME"
    return f"{tag_cfg.get('url')} into ~/.cache/clip"


def ensure_clip_weights(model_name: str = "ViT-L-14", pretrained: str = "openai", cache_dir: str | None = None) -> dict:
    """Check the model and tag, and fetch or find the weights; a one-line error names what is missing."""
    import open_clip

    if model_name not in open_clip.list_models():
        raise ValueError(f"model_name: unknown open_clip model {model_name!r}")
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg and not os.path.isfile(pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ValueError(f"pretrained: {pretrained!r} is neither a weights file nor a tag of {model_name} ({tags})")
    if tag_cfg:
        # Fetch first, alone: inside create_model, open_clip re-raises failures with raw, multi-line hub text.
        try:
            open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - hub/URL errors have no common base; all mean "not available"
            raise RuntimeError(
                f"CLIP weights {model_name}/{pretrained} not cached and not downloadable ({type(e).__name__}): "
                f"fetch {_weights_source(tag_cfg)} (or cache_dir), e.g. on a machine with network run "
                f"open_clip.create_model({model_name!r}, pretrained={pretrained!r}) and copy the cache here"
            ) from None
    return tag_cfg


def load_clip(model_name: str = "ViT-L-14", pretrained: str = "openai", device: str | torch.device = "cpu",
              cache_dir: str | None = None) -> tuple[nn.Module, ImageTransform, Tokenizer]:
    """(model, eval image transform, tokenizer) for an open_clip model with pretrained weights."""
    import open_clip

    tag_cfg = ensure_clip_weights(model_name, pretrained, cache_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device, cache_dir=cache_dir,
        # OpenAI's weights were trained with QuickGELU, which the plain "ViT-L-14" config lacks.
        force_quick_gelu=bool(tag_cfg and tag_cfg.get("quick_gelu")),
    )
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def eval_transform(model: nn.Module) -> ImageTransform:
    """The evaluation preprocessing (resize, crop, normalize) that ``model`` declares."""
    from open_clip import get_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**get_model_preprocess_cfg(model)), is_train=False)


def mean_image_text_cosine(images: ImageArray, prompts: Sequence[str], model: nn.Module, preprocess: ImageTransform,
                           tokenizer: Tokenizer, batch_size: int = 32, device: str | torch.device = "cpu") -> float:
    """Mean over images of cos(image embedding, its prompt's embedding) under an open_clip model:
    what CLIP score (x 100) and HPSv2 (as is) measure."""
    check_images(images, "images")
    if isinstance(prompts, str) or len(prompts) != len(images):
        raise ValueError(f"prompts: expected a sequence of {len(images)} strings (one per image)")
    model = model.to(device).eval()
    cosine_sum, start = 0.0, 0
    with torch.no_grad():
        for batch in iter_batches(images, "images", batch_size):
            # open_clip's transforms work on PIL images, as in training.
            pixels = torch.stack([preprocess(Image.fromarray(image.permute(1, 2, 0).numpy()))
                                  for image in to_uint8(batch)]).to(device)
            tokens = tokenizer(list(prompts[start:start + len(batch)])).to(device)
            image_embedding = model.encode_image(pixels, normalize=True)
            text_embedding = model.encode_text(tokens, normalize=True)
            cosine_sum += float((image_embedding * text_embedding).sum(-1).double().sum())
            start += len(batch)
    return cosine_sum / len(images)


def compute_clip_score(images: ImageArray, prompts: Sequence[str], model_name: str = "ViT-L-14",
                       pretrained: str = "openai", model: nn.Module | None = None,
                       preprocess: ImageTransform | None = None, tokenizer: Tokenizer | None = None,
                       batch_size: int = 32, device: str | torch.device = "cpu", clip: bool = True) -> float:
    """CLIP score in [0, 100] of ``images`` [N, H, W, 3] against ``prompts`` (one per image).

    A given ``model`` is used as is; missing ``preprocess`` / ``tokenizer`` then come from the model's
    preprocessing config and from ``model_name``'s tokenizer. ``clip=False`` skips the final clip at 0:
    unclipped scores of the shards of a set average to the set's (which is then clipped).
    """
    check_images(images, "images")
    if isinstance(prompts, str) or len(prompts) != len(images):
        raise ValueError(f"prompts: expected a sequence of {len(images)} strings (one per image)")
    if model is None:
        model, default_preprocess, default_tokenizer = load_clip(model_name, pretrained, device)
        preprocess, tokenizer = preprocess or default_preprocess, tokenizer or default_tokenizer
    else:
        import open_clip

        preprocess = preprocess or eval_transform(model)
        tokenizer = tokenizer or open_clip.get_tokenizer(model_name)
    score = 100.0 * mean_image_text_cosine(images, prompts, model, preprocess, tokenizer, batch_size, device)
    return max(score, 0.0) if clip else score
