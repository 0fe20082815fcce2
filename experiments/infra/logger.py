"""Results to Weights & Biases. A logger that cannot start never stops the experiment."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class NullLogger:
    run_dir: Path | None = None

    def log(self, metrics: dict[str, Any], images: dict[str, Path] | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    def __init__(self, run):
        self.run = run
        self.run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None

    def log(self, metrics: dict[str, Any], images: dict[str, Path] | None = None) -> None:
        import wandb

        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        labels = {k: v for k, v in metrics.items() if isinstance(v, str)}  # model, threshold_name, ...
        pictures = {name: wandb.Image(str(path)) for name, path in (images or {}).items() if Path(path).exists()}
        self.run.log({**numbers, **pictures})
        self.run.summary.update({**numbers, **labels})

    def finish(self) -> None:
        self.run.finish()


def _name(cfg: DictConfig, group: str) -> str:
    """The option name of a config group, or '' where the app has no such group."""
    node = cfg.get(group)
    return node.name if node is not None else ""


def start_logger(cfg: DictConfig, out_dir: Path) -> NullLogger:
    """wandb.init with the resolved config; group = the sweep (experiment), job_type = model/technique."""
    settings = cfg.logger
    if settings.backend == "none" or settings.mode == "disabled":
        return NullLogger()
    if settings.backend != "wandb":
        log.warning("logger.backend=%s is unknown (wandb, none); continuing without logging", settings.backend)
        return NullLogger()
    try:
        import wandb
    except ImportError:
        log.warning("logger: wandb is not installed (pip install 'fastattn[wandb]'); continuing without logging")
        return NullLogger()
    try:
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(
            project=settings.project, entity=settings.entity, mode=settings.mode, dir=str(out_dir),
            group=settings.group or cfg.experiment_name, job_type=f"{cfg.model.name}/{_name(cfg, 'technique')}",
            name="-".join(n for n in (cfg.model.name, _name(cfg, "solver"), _name(cfg, "threshold"),
                                      _name(cfg, "technique")) if n),
            tags=list(settings.tags), config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous",
        )
    except Exception as e:  # noqa: BLE001 - any failure to start must not stop the run
        log.warning("logger: wandb could not start (%s: %s); continuing without logging", type(e).__name__, e)
        return NullLogger()
    return WandbLogger(run)


@contextmanager
def started_logger(cfg: DictConfig, out_dir: Path, enabled: bool = True) -> Iterator[NullLogger]:
    """``start_logger`` (a NullLogger where not ``enabled``, e.g. on ranks other than 0), finished on exit."""
    logger = start_logger(cfg, out_dir) if enabled else NullLogger()
    try:
        yield logger
    finally:
        logger.finish()
