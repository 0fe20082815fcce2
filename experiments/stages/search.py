"""The search stage: load a given plan, reuse a cached one, or search and cache it.

Plans are cached under a key made from everything that determines them (model, solver, steps,
guidance, threshold, strategies, window, calibration set and seed, plan schema), so a sweep
searches each distinct setting once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fastattn import CompressionPlan, search_plan
from fastattn.headwise.plan import HeadPlan
from fastattn.layerwise.methods import parse_strategies
from fastattn.layerwise.plan import LayerPlan
from fastattn.search import search_budget_plan, search_headwise_plan
from fastattn.utils.paths import path_inside, slug

from ..infra import distributed
from ..infra.conditions import Conditions, to_device
from ..infra.config import latency_table_path, load_plan_file

log = logging.getLogger(__name__)


def plan_key(cfg: DictConfig) -> str:
    """Hash of the settings a searched plan depends on."""
    determinants = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "solver": {"scheduler": cfg.solver.scheduler, "num_steps": int(cfg.solver.num_steps)},
        "guidance_scale": float(cfg.guidance_scale),
        "threshold": float(cfg.threshold.delta),
        "strategies": [m.value for m in parse_strategies(cfg.technique.strategies)],
        "window_size": float(cfg.window_size),
        "refresh_on": str(cfg.refresh_on),
        **({"forecast_in": str(cfg.get("forecast_in", "timestep"))} if _forecasts(cfg) else {}),  # older keys unchanged
        "calibration": {"num_samples": int(cfg.calibration.num_samples), "seed": int(cfg.calibration.seed)},
        "schema_version": LayerPlan.SCHEMA_VERSION,
    }
    if _algorithm(cfg) == "budget":  # and on the budget search's settings; on delta only without a budget
        determinants["search"] = OmegaConf.to_container(cfg.search, resolve=True)
        if not determinants["search"].get("sensitivity"):  # its default: the keys of plans made before it
            determinants["search"].pop("sensitivity", None)
        if cfg.search.get("budget") is not None:
            determinants.pop("threshold")
    if _algorithm(cfg) == "fast":  # Algorithm 1's plans keep their keys
        determinants["search"] = {"algorithm": "fast",
                                  "max_raw_generations": float(cfg.search.get("max_raw_generations", 3.0))}
    if _headwise(cfg):  # V2 plans depend on the search settings instead of the strategies and window
        determinants.update(search=OmegaConf.to_container(cfg.search, resolve=True),
                            schema_version=HeadPlan.SCHEMA_VERSION)
        for key in ("strategies", "window_size", "refresh_on", "forecast_in"):
            determinants.pop(key, None)
    blob = json.dumps(determinants, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _forecasts(cfg: DictConfig) -> bool:
    return "forecast" in list(cfg.technique.strategies)


def _algorithm(cfg: DictConfig) -> str:
    return (cfg.get("search") or {}).get("algorithm", "greedy")


def _headwise(cfg: DictConfig) -> bool:
    return _algorithm(cfg) == "headwise"


def find_or_search_plan(pipe, cfg: DictConfig, device, conditions: Conditions) -> tuple[CompressionPlan, str]:
    """The plan for this config and where it came from: 'file', 'cache' or 'search'."""
    if cfg.get("plan_path"):
        return load_plan_file(cfg.plan_path), "file"  # as the config check read it
    cache_file = None
    if cfg.get("plan_cache_dir"):
        cache_file = path_inside(cfg.plan_cache_dir, slug(f"{cfg.model.name}-{plan_key(cfg)}") + ".json")
        cached = cached_plan(cache_file)
        if distributed.broadcast(cached is not None):  # rank 0's answer: all ranks search, or none
            return cached or CompressionPlan.load(cache_file), "cache"
    if _headwise(cfg):  # every rank searches the whole calibration set (the V2 search is not split yet)
        plan = headwise_search(pipe, cfg, device, conditions)
    elif _algorithm(cfg) == "budget":  # likewise
        plan = budget_search(pipe, cfg, device, conditions)
    else:
        plan = distributed_search(pipe, cfg, device, conditions)
    if cache_file is not None and distributed.is_main():
        plan.save(cache_file)
    return plan, "search"


def cached_plan(cache_file: Path) -> CompressionPlan | None:
    """The plan cached in ``cache_file``; None where there is none, or where it does not load (a
    truncated or corrupt entry: one log line, then the search runs again and overwrites it)."""
    if not cache_file.exists():
        return None
    try:
        return CompressionPlan.load(cache_file)
    except ValueError as error:
        log.warning("plan cache: %s; searching again (the new plan replaces it)", error)
        return None


def headwise_search(pipe, cfg: DictConfig, device, conditions: Conditions) -> CompressionPlan:
    """DiTFastAttnV2's head-wise search on the whole calibration set."""
    steps, guidance = int(cfg.solver.num_steps), float(cfg.guidance_scale)
    calibration = conditions.inputs(range(cfg.calibration.num_samples), cfg.calibration.seed, steps, guidance)
    metadata = {"model_name": cfg.model.name, "solver": cfg.solver.name, "technique": "headwise",
                "calibration_seed": int(cfg.calibration.seed), "plan_key": plan_key(cfg)}
    return search_headwise_plan(
        pipe, to_device(calibration, device), threshold=float(cfg.threshold.delta),
        windows=list(cfg.search.windows), use_cache=bool(cfg.search.cache),
        share_cfg=bool(cfg.search.cfg_sharing), residual_sharing=bool(cfg.search.residual_sharing),
        head_coefficient=cfg.search.head_coefficient, latency=latency_table_path(cfg),
        metadata=metadata, progress=distributed.is_main(),
    )


def budget_search(pipe, cfg: DictConfig, device, conditions: Conditions) -> CompressionPlan:
    """The budgeted search over V1's methods (fastattn.search.budget) on the whole calibration set."""
    steps, guidance = int(cfg.solver.num_steps), float(cfg.guidance_scale)
    calibration = conditions.inputs(range(cfg.calibration.num_samples), cfg.calibration.seed, steps, guidance)
    budget = cfg.search.get("budget")
    return search_budget_plan(
        pipe, to_device(calibration, device), budget=None if budget is None else float(budget),
        threshold=float(cfg.threshold.delta) if budget is None else None,
        strategies=list(cfg.technique.strategies), window_size=float(cfg.window_size),
        refresh_on=str(cfg.refresh_on), forecast_in=str(cfg.get("forecast_in", "timestep")),
        iterations=int(cfg.search.iterations), tolerance=float(cfg.search.tolerance),
        sensitivity=bool(cfg.search.get("sensitivity", False)),
        progress=distributed.is_main(),
        metadata={"model_name": cfg.model.name, "solver": cfg.solver.name, "technique": cfg.technique.name,
                  "calibration_seed": int(cfg.calibration.seed), "plan_key": plan_key(cfg)},
    )


def distributed_search(pipe, cfg: DictConfig, device, conditions: Conditions) -> CompressionPlan:
    """Search on this rank's share of the calibration samples, the losses summed over the ranks
    that hold one; every rank returns rank 0's plan, checked to be the plan each rank found."""
    import torch.distributed as dist

    steps, guidance = int(cfg.solver.num_steps), float(cfg.guidance_scale)
    num = int(cfg.calibration.num_samples)
    searchers = min(num, distributed.world_size())  # a rank without a calibration sample sits it out
    group = None
    if distributed.world_size() > 1:
        group = dist.new_group(list(range(searchers))) if searchers < distributed.world_size() else dist.group.WORLD
    plan = None
    if distributed.rank() < searchers:
        calibration = conditions.inputs(distributed.shard(range(num), size=searchers), cfg.calibration.seed,
                                        steps, guidance)
        plan = search_plan(
            pipe, to_device(calibration, device), threshold=float(cfg.threshold.delta),
            strategies=list(cfg.technique.strategies), window_size=float(cfg.window_size),
            refresh_on=str(cfg.refresh_on), forecast_in=str(cfg.get("forecast_in", "timestep")),
            progress=distributed.is_main(), group=group, algorithm=_algorithm(cfg),
            max_raw_generations=float(cfg.search.get("max_raw_generations", 3.0)),
            metadata={"model_name": cfg.model.name, "solver": cfg.solver.name, "technique": cfg.technique.name,
                      "calibration_seed": int(cfg.calibration.seed), "plan_key": plan_key(cfg),
                      **({"calibration_ranks": searchers} if searchers > 1 else {})},
        )
    if distributed.world_size() == 1:
        return plan
    rows = distributed.all_gather(plan.to_dict()["methods"] if plan is not None else None)
    distributed.agree(None if rows[distributed.rank()] in (None, rows[0]) else
                      "searched a different plan than rank 0 (the ranks' models or inputs differ)")
    return CompressionPlan.from_dict(distributed.broadcast(plan.to_dict() if plan is not None else None))
