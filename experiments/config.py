"""Checks on a composed config, run before any model is built; one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from fastattn.methods import parse_strategies
from fastattn.models.loaders import parse_dtype
from fastattn.models.solvers import SOLVERS

FAMILIES = ("dit", "pixart", "sd3", "flux")
JOINT_FAMILIES = ("sd3", "flux")  # flow-matching, joint attention: head-wise (V2) search


def _positive_int(cfg: DictConfig, key: str) -> None:
    value = cfg
    for part in key.split("."):
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {value!r}")


REPO_ROOT = Path(__file__).resolve().parents[1]


def latency_table_path(cfg: DictConfig) -> Path | None:
    """The head-wise search's latency table: search.latency_table, else the model's measured one
    (model.latency_table), else None (FLOPs). A relative path that does not exist from the working
    directory is taken from the repository root, where the shipped tables live."""
    name = (cfg.get("search") or {}).get("latency_table") or cfg.model.get("latency_table")
    if not name:
        return None
    path = Path(str(name))
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


def validate_config(cfg: DictConfig) -> None:
    model = cfg.model
    if model.family not in FAMILIES:
        raise ValueError(f"model.family must be one of {FAMILIES}, got {model.family!r}")
    if not model.get("tiny") and not model.get("pipeline_id") and not model.get("builtin"):
        raise ValueError(f"model {model.name!r}: set model.pipeline_id (a checkpoint), model.builtin or model.tiny")
    if model.get("builtin") not in (None, "default"):
        raise ValueError(f"model.builtin must be 'default' or null, got {model.builtin!r}")
    parse_dtype(model.dtype)
    if not 0 < float(cfg.window_fraction) <= 2:
        raise ValueError(f"window_fraction must be in (0, 2], got {cfg.window_fraction}")
    if float(cfg.threshold.delta) < 0:
        raise ValueError(f"threshold.delta must be >= 0, got {cfg.threshold.delta}")
    if cfg.solver.scheduler not in SOLVERS:
        raise ValueError(f"solver.scheduler must be one of {SOLVERS}, got {cfg.solver.scheduler!r}")
    if float(cfg.guidance_scale) < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {cfg.guidance_scale}")
    parse_strategies(cfg.technique.strategies)
    if (model.family in JOINT_FAMILIES) != (cfg.solver.scheduler == "flow_euler"):
        raise ValueError(f"solver.scheduler: {cfg.solver.scheduler!r} does not fit model.family {model.family!r} "
                         "(flow_euler goes with sd3 and flux, and only with them)")
    search = cfg.get("search") or {}
    if search.get("algorithm", "greedy") not in ("greedy", "headwise"):
        raise ValueError(f"search.algorithm must be greedy or headwise, got {search.get('algorithm')!r}")
    if (model.family in JOINT_FAMILIES) != (search.get("algorithm", "greedy") == "headwise"):
        raise ValueError(f"search.algorithm: {search.get('algorithm', 'greedy')!r} does not fit model.family "
                         f"{model.family!r} (search=headwise for sd3 and flux, search=greedy for dit and pixart)")
    if search.get("algorithm", "greedy") == "headwise":
        table = latency_table_path(cfg)
        if table is not None and not table.is_file():
            raise ValueError(f"latency table not found: {table} (search.latency_table / model.latency_table)")
    for key in ("solver.num_steps", "calibration.num_samples", "samples.num", "samples.batch_size", "model.resolution"):
        _positive_int(cfg, key)
    stages = list(cfg.get("stages", []))
    if not stages or any(s not in ("search", "generate", "evaluate") for s in stages):
        raise ValueError(f"stages must be a non-empty subset of [search, generate, evaluate], got {stages}")
    if cfg.get("plan_path") and not Path(cfg.plan_path).is_file():
        raise ValueError(f"plan_path: file not found: {cfg.plan_path}")
    if cfg.device not in ("auto", "cpu") and not str(cfg.device).startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {cfg.device!r}")
    graphs = cfg.get("cuda_graphs", False)
    if graphs not in (True, False):
        raise ValueError(f"cuda_graphs must be true or false, got {graphs!r}")
    if graphs and (cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())):
        raise ValueError("cuda_graphs=true needs a CUDA device (device=cuda)")
