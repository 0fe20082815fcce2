"""What the main job's samples were made with, and what a run resuming into their folder does
when that differs. The evidence, cache-comparison and cache-quality jobs record the same
fingerprint (plus their hook or cache settings) and refuse a mismatch.

Each sample folder (``samples/raw``, ``samples/fastattn``) records a fingerprint in its manifests
(see experiments/stages/generate.py): the plan applied (its hash; ``none (raw)`` for the raw folder), the
seed, steps, guidance scale, solver, the model settings that change images and fastattn's version;
each sample also records its condition. generation.json and metrics.json carry the same
fingerprints. A resumed run compares them as early as it can: the raw folder, and the compressed
one when its plan is given (``plan_path``) or already searched (no search stage), before the model
is built; the compressed folder of a searched or cached plan as soon as the plan is known, before
plan.json is replaced. ``samples.on_mismatch`` says what a difference does: ``refuse`` (the
default: one line naming the fields) or ``regenerate`` (discard that folder's samples, make them
anew). Folders from before fingerprints count as a difference.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fastattn import CompressionPlan

from ..infra import distributed
from ..infra.app import ConfigError
from ..infra.conditions import Conditions
from ..infra.config import input_errors, load_plan_file
from .generate import core_fingerprint, discard_samples, folder_mismatch

log = logging.getLogger(__name__)

ON_MISMATCH = ("refuse", "regenerate")
RAW_PLAN = "none (raw)"
# The model settings that change images; the others steer the search, which the plan's hash covers.
IMAGE_FIELDS = ("name", "family", "pipeline_id", "transformer_id", "resolution", "dtype", "tiny", "builtin",
                "num_classes", "num_frames", "height", "width")
HOW = ("resume with the settings they were made with, run into a new folder, or set "
       "samples.on_mismatch=regenerate to discard them and make them anew")


def on_mismatch(cfg: DictConfig) -> str:
    """``samples.on_mismatch``, checked: refuse | regenerate."""
    value = cfg.samples.get("on_mismatch", "refuse")
    if value not in ON_MISMATCH:
        raise ConfigError(f"samples.on_mismatch must be one of {', '.join(ON_MISMATCH)}, got {value!r}")
    return value


def plan_digest(plan: CompressionPlan | None) -> str:
    """A short hash of what a plan applies (its search record, e.g. seconds, left out); raw: no plan."""
    if plan is None:
        return RAW_PLAN
    applied = {key: value for key, value in plan.to_dict().items() if key != "search"}
    return hashlib.sha256(json.dumps(applied, sort_keys=True).encode()).hexdigest()[:16]


def sample_fingerprint(cfg: DictConfig, plan: CompressionPlan | None) -> dict:
    """The fingerprint of the main job's samples made with ``plan`` (None: the raw samples)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    fields = {f"model.{key}": model.get(key) for key in IMAGE_FIELDS}
    fields |= {"solver.scheduler": str(cfg.solver.scheduler), "plan": plan_digest(plan)}
    if plan is not None:  # float8 caches change the compressed images
        fields["cache_dtype"] = cfg.get("cache_dtype")
    return core_fingerprint(cfg.samples.seed, cfg.solver.num_steps, cfg.guidance_scale) | fields


def check_samples(cfg: DictConfig, folder: Path, plan: CompressionPlan | None, conditions: Conditions,
                  *, can_regenerate: bool = True) -> dict:
    """Refuse, or empty ``folder`` (``samples.on_mismatch=regenerate``), when its samples were made
    with another fingerprint than this run's for ``plan``; return this run's. Rank 0 reads the
    folder and decides for every rank."""
    fingerprint = sample_fingerprint(cfg, plan)
    mismatch = None
    if distributed.is_main() and folder.is_dir():
        with input_errors():  # a corrupt manifest: one line naming it
            mismatch = folder_mismatch(folder, fingerprint, conditions, int(cfg.samples.seed))
    mismatch = distributed.broadcast(mismatch)
    if not mismatch:
        return fingerprint
    if on_mismatch(cfg) == "refuse" or not can_regenerate:
        raise ConfigError(f"{folder}: {mismatch}; {HOW}")
    if distributed.is_main():
        log.warning("%s: %s: discarding them (samples.on_mismatch=regenerate)", folder, mismatch)
        discard_samples(folder)
    distributed.barrier()
    return fingerprint


def check_before_build(cfg: DictConfig, stages: list[str], out_dir: Path, conditions: Conditions) -> None:
    """Before the model is built: the sample folders this run reads or writes whose plan is known already."""
    on_mismatch(cfg)
    if not {"generate", "evaluate"} & set(stages):
        return
    can_regenerate = "generate" in stages
    if cfg.samples.compare_raw:
        check_samples(cfg, out_dir / "samples" / "raw", None, conditions, can_regenerate=can_regenerate)
    plan = known_plan(cfg, stages, out_dir)
    if plan is not None:
        check_samples(cfg, out_dir / "samples" / "fastattn", plan, conditions, can_regenerate=can_regenerate)


def known_plan(cfg: DictConfig, stages: list[str], out_dir: Path) -> CompressionPlan | None:
    """The plan the compressed samples will be made with, where it is known before any search."""
    if "search" not in stages:
        with input_errors():
            return CompressionPlan.load(out_dir / "plan.json")  # there: run.check_stage_inputs
    if cfg.get("plan_path"):
        with input_errors("plan_path"):
            return load_plan_file(cfg.plan_path)  # the config check's read
    return None
