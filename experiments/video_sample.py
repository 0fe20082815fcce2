"""The video job: plan, raw and compressed videos of the same seeds, files and per-video metrics.

Writes into the run directory ``plan.json``, ``videos/{raw,fastattn}/{i:06d}.{gif|mp4}`` with
``{i:06d}_grid.png`` frame grids, and ``metrics.json`` (per video: PSNR and SSIM of every frame
against the raw video, optionally CLIP; the plan's attention FLOPs fraction in each layer's
geometry).

    python -m experiments.video_sample                                # tiny Latte on the CPU
    python -m experiments.video_sample model=wan_1_3b_480p num_steps=50 device=cuda
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fastattn import CompressionPlan, apply_fastattn, remove_fastattn, search_plan
from fastattn.layerwise.plan import WINDOW_SHAPES
from fastattn.layerwise.video_flops import VideoShape, video_attention_flops
from fastattn.models import layer_kinds, layers_of_kind
from fastattn.utils.io import atomic_write_json

from .infra.app import ConfigError, hydra_app, resolve_device
from .infra.conditions import DEFAULT_PROMPTS
from .infra.config import check_threshold_metric
from .infra.run_folder import exclusive
from .stages.video_output import FORMATS, save_video_sample, video_clip_score, video_similarity

VIDEO_PIPELINE_FAMILIES = ("latte", "wan")


def build_video_pipeline(model: DictConfig, device: torch.device):
    if model.family not in VIDEO_PIPELINE_FAMILIES:
        raise ConfigError(f"model.family: the video job runs {VIDEO_PIPELINE_FAMILIES}, got {model.family!r}")
    if model.get("tiny"):
        from .models.tiny import TINY_VIDEO_BUILDERS

        kwargs = OmegaConf.to_container(model.tiny)
        kwargs.pop("text_len", None)
        pipe = TINY_VIDEO_BUILDERS[model.family](**kwargs)
    else:
        from .models.loaders.hub import CheckpointNotFound
        from .models.loaders.video import load_video_pipeline

        try:
            pipe = load_video_pipeline(model.family, model.pipeline_id, model.dtype)
        except CheckpointNotFound as error:  # offline: one line naming what to download
            raise ConfigError(f"model.pipeline_id: {error}") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_of(model: DictConfig, index: int) -> str | None:
    return None if model.get("tiny") else DEFAULT_PROMPTS[index % len(DEFAULT_PROMPTS)]


def video_inputs(model: DictConfig, index: int, seed: int, num_steps: int, device: torch.device) -> dict:
    """Keyword arguments of one ``pipe(...)`` call making video ``index`` (seeded by its index)."""
    height, width = model.get("height") or model.resolution, model.get("width") or model.resolution
    inputs = dict(num_inference_steps=num_steps, guidance_scale=model.guidance_scale, height=height, width=width,
                  output_type="np", generator=torch.Generator().manual_seed(seed + index))
    inputs["video_length" if model.family == "latte" else "num_frames"] = model.num_frames
    if model.family == "latte":
        inputs["mask_feature"] = False
    if model.get("tiny"):
        from .models.tiny import tiny_null_embedding, tiny_prompt_embeddings

        t = model.tiny
        channels = t.get("caption_channels") or t.get("text_dim")
        inputs.update(prompt_embeds=tiny_prompt_embeddings([seed + index], t.text_len, channels).to(device),
                      negative_prompt=None,
                      negative_prompt_embeds=tiny_null_embedding(1, t.text_len, channels).to(device))
    else:
        inputs.update(prompt=prompt_of(model, index), negative_prompt="")
    return inputs


class LatentShape:
    """Records the latent's [C, F, H, W] at the transformer's first call (for the FLOPs count)."""

    def __init__(self, transformer):
        self.shape = None
        self.handle = transformer.register_forward_pre_hook(self._read, with_kwargs=True)

    def _read(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.shape = self.shape or tuple(x.shape[1:])

    def video_shape(self, transformer) -> VideoShape:
        self.handle.remove()
        patch = transformer.config.patch_size
        p_t, p_h, p_w = tuple(patch) if isinstance(patch, (list, tuple)) else (1, patch, patch)
        _, f, h, w = self.shape
        heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
        return VideoShape(f // p_t, h // p_h, w // p_w, heads, head_dim, heads * head_dim)


def frames_of(output) -> np.ndarray:
    return np.asarray(output.frames)[0]


def run_video(cfg: DictConfig) -> dict:
    """Check the config, then make and measure the videos while holding the run folder's lock."""
    if cfg.video_format not in FORMATS:
        raise ConfigError(f"video_format: unknown {cfg.video_format!r} (known: {', '.join(FORMATS)})")
    if not cfg.model.get("num_frames"):
        raise ConfigError(f"model.num_frames: {cfg.model.name} is not a video model config")
    check_threshold_metric(cfg, "greedy")  # the video job searches layer-wise plans
    if cfg.model.window_shape not in WINDOW_SHAPES:
        raise ConfigError(f"model.window_shape must be one of {', '.join(WINDOW_SHAPES)}, got {cfg.model.window_shape!r}")
    out = Path(cfg.output_dir)
    with exclusive(out):  # one run at a time writes this folder's videos and metrics
        return _run_video(cfg, out)


def _run_video(cfg: DictConfig, out: Path) -> dict:
    device = resolve_device(cfg.device)
    pipe = build_video_pipeline(cfg.model, device)
    transformer = pipe.transformer
    latent = LatentShape(transformer)
    if cfg.plan_path:
        plan = CompressionPlan.load(cfg.plan_path)
    else:
        kinds = cfg.model.get("attention_kinds")
        layers = layers_of_kind(transformer, list(kinds)) if kinds else None
        calibration = video_inputs(cfg.model, 0, cfg.calibration.seed, cfg.num_steps, device)
        plan = search_plan(pipe, calibration, threshold=cfg.threshold.delta, window_size=cfg.model.window_size,
                           window_shape=cfg.model.window_shape, progress=False, layers=layers, metadata={"model_config": cfg.model.name})
        plan.save(out / "plan.json")
    videos = []
    for i in range(cfg.samples.num):
        inputs = lambda: video_inputs(cfg.model, i, cfg.samples.seed, cfg.num_steps, device)  # noqa: E731
        remove_fastattn(pipe)
        with torch.no_grad():
            raw = frames_of(pipe(**inputs()))
        apply_fastattn(pipe, plan)
        with torch.no_grad():
            compressed = frames_of(pipe(**inputs()))
        remove_fastattn(pipe)
        name = f"{i:06d}"
        entry = {"index": i, "seed": cfg.samples.seed + i, "prompt": prompt_of(cfg.model, i),
                 "raw": save_video_sample(raw, out / "videos" / "raw", name, cfg.video_format, cfg.model.fps),
                 "fastattn": save_video_sample(compressed, out / "videos" / "fastattn", name, cfg.video_format,
                                               cfg.model.fps),
                 **video_similarity(raw, compressed)}
        if cfg.clip_score and entry["prompt"]:
            entry["clip_score_raw"] = video_clip_score(raw, entry["prompt"])
            entry["clip_score"] = video_clip_score(compressed, entry["prompt"])
        videos.append(entry)
    flops = video_attention_flops(plan, layer_kinds(transformer), latent.video_shape(transformer))
    metrics = {"model": cfg.model.name, "num_steps": cfg.num_steps, "threshold": cfg.threshold.delta,
               "attn_flops_fraction": flops["fraction"], "plan_counts": plan.counts(),
               "psnr": float(np.mean([v["psnr"] for v in videos])), "ssim": float(np.mean([v["ssim"] for v in videos])),
               "videos": videos}
    atomic_write_json(out / "metrics.json", metrics)
    print(f"{cfg.model.name}: attention FLOPs {flops['fraction']:.3f}, PSNR {metrics['psnr']:.2f} dB, "
          f"SSIM {metrics['ssim']:.4f} over {len(videos)} videos -> {out}")
    return metrics


# --help lists these options: the video models and the layer-wise search's thresholds
ACCEPTS = {"model": {"family": VIDEO_PIPELINE_FAMILIES}, "threshold": {"metric": ["mrae"]}}
main = hydra_app("video", run_video, accepts=ACCEPTS)

if __name__ == "__main__":
    main()
