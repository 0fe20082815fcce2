"""The scaffold every command-line job shares: ``main = hydra_app("<config>", job)``.

Hydra composes ``conf/<config>.yaml`` (the typed schemas are registered on import) and calls
``job(cfg)``. A job checks its config first and raises :class:`ConfigError`, which Hydra prints
as its one line instead of a traceback. Tests and notebooks call ``job(cfg)`` directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from . import schema  # noqa: F401  (registers the config schemas)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class ConfigError(CompactHydraException, ValueError):
    """A config value that cannot work, found before any expensive work. A ValueError to callers;
    on the command line Hydra prints the message alone."""


def hydra_app(config_name: str, job: Callable[[DictConfig], Any], conf_dir: Path = CONF_DIR) -> Callable[[], None]:
    """The entry point running ``job`` on ``conf_dir/<config_name>.yaml`` plus the command line's
    overrides. Hydra names the job (log file, ``hydra.job.name``) after ``job``'s module."""
    return hydra.main(version_base="1.3", config_path=str(conf_dir), config_name=config_name)(job)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but torch sees no CUDA device")
    return torch.device(name)
