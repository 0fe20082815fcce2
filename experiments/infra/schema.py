"""Typed schemas of the config groups, registered in Hydra's ConfigStore.

Each YAML option lists its group's schema first in its defaults, so a misspelt key or a value of
the wrong type fails at composition with Hydra naming the key. Range checks that types cannot
express live in ``experiments/infra/config.py``. Also registers ``${unique_now:FORMAT}``, the resolver
naming default run folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = MISSING  # dit | pixart | sd3 | flux | latte | wan | opensora
    pipeline_id: Optional[str] = None  # a Hugging Face id or local folder; None for tiny models
    transformer_id: Optional[str] = None  # PixArt-Sigma: the transformer checkpoint in the pipeline
    resolution: int = MISSING  # pixels
    guidance_scale: float = 4.0
    window_size: float = 0.125
    window_shape: str = "band"  # the video job's search: band (the paper's) | tile (3-D tiles on Wan's full attention)
    dtype: str = "float16"
    tiny: Optional[dict[str, Any]] = None  # builds a random-weight model from a diffusers config
    builtin: Optional[str] = None  # "default": the small DiT shipped in fastattn/models/default
    num_classes: int = 1000  # class-conditional models: labels are drawn from 0 .. num_classes - 1
    # Video models (families latte, wan, opensora): frames in pixels-space, frame size, playback.
    num_frames: Optional[int] = None
    height: Optional[int] = None  # pixels; None: resolution
    width: Optional[int] = None
    fps: int = 8
    attention_kinds: Optional[list[str]] = None  # kinds the search may compress; None: all
    latency_table: Optional[str] = None  # head-wise search: a measured latency_table.json for this model


@dataclass
class SolverConfig:
    name: str = MISSING
    scheduler: str = MISSING  # dpm_solver | ddim | iddpm
    num_steps: int = MISSING


@dataclass
class ThresholdConfig:
    name: str = MISSING
    delta: float = MISSING
    metric: str = MISSING  # what delta bounds: mrae (DiTFastAttn, search=greedy) | rse (DiTFastAttnV2, search=headwise)


@dataclass
class TechniqueConfig:
    name: str = MISSING
    strategies: list[str] = MISSING


@dataclass
class SearchConfig:
    name: str = MISSING
    algorithm: str = "greedy"  # greedy (V1 Algorithm 1) | fast (its rule on predicted losses) | budget (V1 methods, V2 integer program) | headwise (V2)
    windows: list[float] = field(default_factory=lambda: [0.0625, 0.03125, 0.015625])  # headwise: arrow windows, each side
    head_coefficient: Optional[float] = 1.5  # headwise: c in RSE(head) <= (c / heads) * delta; null: no such constraint
    cache: bool = True  # headwise: head-wise caching as a candidate
    cfg_sharing: bool = True  # headwise: CFG sharing as a candidate (models with a CFG batch)
    residual_sharing: bool = True  # headwise: arrow+rs (arrow plus the head's residual from its last full step)
    latency_table: Optional[str] = None  # headwise: the benchmark's latency_table.json; None: the model's, else FLOPs
    budget: Optional[float] = None  # budget: target attention FLOPs fraction; None: threshold.delta bounds each step's RSE
    iterations: int = 8  # budget: calibration generations the bisection on delta may run
    tolerance: float = 0.02  # budget: stop once the plan's fraction is this close below the budget
    max_raw_generations: float = 3.0  # fast: the most the search may cost, in raw generations
    sensitivity: bool = False  # budget: scale each layer's RSE to the transformer output's (one trial per layer and step)


@dataclass
class LatencyConfig:
    enabled: bool = True
    batch_size: int = 2
    warmup: int = 1
    repeats: int = 3
    attention: bool = True  # also time the self-attention modules alone


@dataclass
class MetricsConfig:
    name: str = MISSING
    fid: bool = False
    inception_score: bool = False
    clip_score: bool = False
    similarity: bool = True  # PSNR / SSIM of compressed against raw samples
    lpips: bool = False
    fid_small: bool = False  # FID with the default model's shipped classifier (built-in model only)
    is_small: bool = False  # Inception Score with that classifier's logits (built-in model only)
    small_reference_num: int = 2048  # seeded real crops of the training photographs: FID-small's reference
    small_reference_seed: int = 0
    hpsv2: bool = False  # HPSv2 (DiTFastAttnV2's tables): open_clip ViT-H-14 with the HPS v2 weights
    hpsv2_checkpoint: Optional[str] = None  # the HPS v2 weights file; null: $FASTATTN_HPSV2_CHECKPOINT or the HF cache
    clip_model: str = "ViT-L-14"
    clip_pretrained: str = "openai"
    feature_batch_size: int = 64
    latency: LatencyConfig = field(default_factory=LatencyConfig)


@dataclass
class DataConfig:
    name: str = MISSING
    reference_dir: Optional[str] = None  # real images for FID
    reference_stats: Optional[str] = None  # or their precomputed Inception statistics (.npz)
    captions_file: Optional[str] = None  # one prompt per line, for text-to-image models
    class_labels: Optional[list[int]] = None  # fixed class labels instead of the seeded draw


@dataclass
class LoggerConfig:
    name: str = MISSING
    backend: str = "wandb"  # wandb | none
    mode: str = "offline"  # online | offline | disabled
    project: str = "fastattn"
    entity: Optional[str] = None
    group: Optional[str] = None  # defaults to the sweep's name
    tags: list[str] = field(default_factory=list)


def register() -> None:
    cs = ConfigStore.instance()
    for group, node in (("model", ModelConfig), ("solver", SolverConfig), ("threshold", ThresholdConfig),
                        ("technique", TechniqueConfig), ("search", SearchConfig), ("metrics", MetricsConfig),
                        ("data", DataConfig), ("logger", LoggerConfig)):
        cs.store(group=group, name=f"{group}_schema", node=node)


def unique_now(pattern: str) -> str:
    """Hydra's ``${now:pattern}`` plus microseconds and the process id: two runs started in the same
    second get different folders (the process id settles a tie on one host), and names still sort by time."""
    now = datetime.now()
    return f"{now.strftime(pattern)}_{now.microsecond:06d}-{os.getpid()}"


register()
# cached like Hydra's `now`: one value per composed config; replace: this module may load under two names
OmegaConf.register_new_resolver("unique_now", unique_now, use_cache=True, replace=True)
