"""The opening the image jobs share once their config checks pass: the output folder, the device
(``cpu_threads`` applied on a CPU), the clock, the conditions and the pipeline."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig

from . import distributed
from .app import resolve_device
from .conditions import Conditions
from .pipelines import build_pipeline


class Opening(NamedTuple):
    """What :func:`open_job` made, in the order a job unpacks it."""

    out_dir: Path
    device: torch.device
    started: float  # time.perf_counter() before the pipeline is built: the job's wall time counts from here
    conditions: Conditions
    pipe: Any


def job_device(cfg: DictConfig) -> torch.device:
    """``cfg.device`` resolved (under torchrun a bare 'cuda' is this rank's GPU), with
    ``cfg.cpu_threads`` applied when it is a CPU."""
    device = distributed.local_device(resolve_device(cfg.device))
    if device.type == "cpu" and cfg.get("cpu_threads") is not None:
        torch.set_num_threads(int(cfg.cpu_threads))
    return device


def open_job(cfg: DictConfig) -> Opening:
    """Make ``cfg.output_dir``, resolve the device, start the clock, build the class-label
    conditions and the pipeline."""
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = job_device(cfg)
    started = time.perf_counter()
    conditions = Conditions(cfg.model, None, cfg.data.class_labels)
    return Opening(out_dir, device, started, conditions, build_pipeline(cfg.model, cfg.solver, device))
