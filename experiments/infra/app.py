"""The scaffold every command-line job shares: ``main = hydra_app("<config>", job)``.

Hydra composes ``conf/<config>.yaml`` (the typed schemas are registered on import) and calls
``job(cfg)``. A job checks its config first and raises :class:`ConfigError`; on the command line
that, and any config Hydra cannot compose (a misspelt key, a wrong type, an unknown option),
is one line on stderr and exit status 1, and what Hydra made for the failed job (its run folder,
or in a folder that was already there its ``.hydra/`` and log) is removed. A full disk, a
read-only file system or a refused write is one line naming the file, status 1.
``HYDRA_FULL_ERROR=1`` shows the traceback instead. ``--help`` lists the options the job accepts.
Tests and notebooks call ``job(cfg)`` directly.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import hydra
import torch
from hydra.experimental.callback import Callback
from hydra.errors import CompactHydraException, HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from fastattn.utils.cli import VERBOSE_ENV, fail, one_line, storage_error, verbose

from . import schema  # noqa: F401  (registers the config schemas)

# The harness's configs: conf/ beside experiments/, in a checkout (the repository root) and
# installed (site-packages/fastattn, see setup.py) alike.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Which options of a group a job lists in --help: {group: {key: accepted values}}; an option file
# whose key holds another value is one the job refuses (the image job and the video models).
Accepts = Mapping[str, Mapping[str, Sequence[Any]]]


class ConfigError(CompactHydraException, ValueError):
    """A config value that cannot work, found before any expensive work. A ValueError to callers;
    on the command line its message is the one line printed."""


def check_finite_settings(node: Any, prefix: str = "") -> None:
    """Every number in the config is finite: ``nan`` / ``inf`` settings are refused, one line
    naming the key (each value once, where it is set: interpolations are skipped)."""
    is_dict = OmegaConf.is_dict(node)
    for k in list(node.keys()) if is_dict else range(len(node)):
        key = f"{prefix}.{k}" if is_dict and prefix else (str(k) if is_dict else f"{prefix}[{k}]")
        if OmegaConf.is_interpolation(node, k):
            continue
        try:
            value = node[k]
        except OmegaConfBaseException:  # ??? (the job names it) or a resolver outside Hydra
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        if OmegaConf.is_config(value):
            check_finite_settings(value, key)


class _BadInput(BaseException):
    """A job's ConfigError on its way out: a BaseException, so Hydra's handlers (which print a
    header and a hint around an Exception) let it through to :func:`hydra_app`'s main."""


def hydra_app(config_name: str, job: Callable[[DictConfig], Any], conf_dir: Path = CONF_DIR,
              accepts: Accepts | None = None) -> Callable[[], None]:
    """The entry point running ``job`` on ``conf_dir/<config_name>.yaml`` plus the command line's
    overrides. Hydra names the job (log file, ``hydra.job.name``) after ``job``'s module."""
    run = {"started": False, "traceback": False}  # set by main: the job began; the user asked for tracebacks

    def task(cfg: DictConfig) -> Any:
        run["started"] = True
        try:
            check_finite_settings(cfg)
            return job(cfg)
        except ConfigError as error:
            if run["traceback"]:
                raise
            discard_run_dir()
            raise _BadInput(one_line(error)) from None
        except OSError as error:  # a full disk, a read-only folder: the machine's state, not a bug
            message = storage_error(error)
            if message is None or run["traceback"]:
                raise
            raise _BadInput(message) from None

    task.__module__, task.__name__, task.__doc__ = module_name(job), job.__name__, job.__doc__
    hydra_main = hydra.main(version_base="1.3", config_path=str(conf_dir), config_name=config_name)(task)

    def main() -> None:
        args = hydra_arguments()
        if args.help:
            print(job_help(job, conf_dir, args.config_name or config_name, args.overrides, accepts))
            return
        run["traceback"] = verbose()
        # diffusers' notices of its upcoming API changes address this code, not whoever runs the job
        warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
        try:
            with hydra_raising(), recording_run_folder():
                hydra_main()
        except _BadInput as error:
            fail(str(error))
        except (HydraException, OmegaConfBaseException) as error:
            if run["started"] or run["traceback"]:  # raised by the job itself: a bug, shown in full
                raise
            fail(composition_error(error, conf_dir, accepts))
        except OSError as error:  # before the job (Hydra's run folder, records, log); after Hydra's own
            message = storage_error(error)
            if message is None or run["traceback"]:
                raise
            fail(message)

    return main


def composition_error(error: Exception, conf_dir: Path, accepts: Accepts | None) -> str:
    """The one line for a config Hydra could not compose; an unknown option lists the accepted ones."""
    missing = getattr(error, "missing_cfg_file", None) if isinstance(error, MissingConfigException) else None
    if missing and "/" in missing:
        group, option = missing.rsplit("/", 1)
        if (conf_dir / group).is_dir():
            options = accepted_options(conf_dir / group, (accepts or {}).get(group, {}), None)
            return f"{group}={option}: no such option (choose from {', '.join(options)})"
    return one_line(error)


def module_name(job: Callable) -> str:
    """``job``'s module, also when it runs as ``python -m <module>`` (``__main__``)."""
    if job.__module__ != "__main__":
        return job.__module__
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec is not None else Path(inspect.getfile(job)).stem


def hydra_arguments():
    """The command line as Hydra's own parser reads it (its flags, config name, overrides)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args()


@contextmanager
def hydra_raising() -> Iterator[None]:
    """Hydra re-raises what fails (rather than printing it over several lines) while this is on."""
    before = os.environ.get(VERBOSE_ENV)
    os.environ[VERBOSE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[VERBOSE_ENV]
        else:
            os.environ[VERBOSE_ENV] = before


@dataclass(frozen=True)
class FolderBefore:
    """What was on disk, before Hydra made anything, where a job's run folder goes: ``base`` (the
    run folder, or a sweep's folder), its nearest folder that already existed (``anchor``), and the
    entries of ``base`` (and of a sweep's job folders) that existed, by folder."""

    base: Path
    anchor: Path
    entries: dict[Path, frozenset[str]]


_folder_before: list[FolderBefore] = []  # set by RunFolderRecorder, read by discard_run_dir


class RunFolderRecorder(Callback):
    """Hydra callback taking :class:`FolderBefore` at the start of a run or sweep, before Hydra
    makes the folder, so a failed config removes only what this invocation made."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        record_folder(config, "hydra.run.dir", sweep=False)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        record_folder(config, "hydra.sweep.dir", sweep=True)


def record_folder(config: DictConfig, key: str, sweep: bool) -> None:
    try:
        base = Path(str(OmegaConf.select(config, key))).resolve()
    except (OmegaConfBaseException, ValueError):  # an interpolation not resolvable yet: clean nothing
        return
    anchor = next(p for p in (base, *base.parents) if p.exists())
    folders = [base] + ([p for p in base.iterdir() if p.is_dir()] if sweep and base.is_dir() else [])
    entries = {folder: frozenset(p.name for p in folder.iterdir()) for folder in folders if folder.is_dir()}
    _folder_before.append(FolderBefore(base, anchor, entries))


@contextmanager
def recording_run_folder() -> Iterator[None]:
    """Hydra runs :class:`RunFolderRecorder` for the jobs started inside (added to the command
    line's Hydra overrides, which Hydra reads from ``sys.argv``)."""
    argv = sys.argv[:]
    sys.argv.append(f"++hydra.callbacks.fastattn_run_folder._target_={__name__}.{RunFolderRecorder.__name__}")
    _folder_before.clear()
    try:
        yield
    finally:
        sys.argv[:] = argv
        _folder_before.clear()


def discard_run_dir() -> None:
    """Remove what Hydra made for this failed job: the entries of its run folder that were not
    there before (``.hydra/``, the job's log), then the folder and the parents it leaves empty if
    this invocation made them. Nothing is removed when the job wrote anything else (a run folder
    with results is kept) or when what was there before is unknown."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or not _folder_before:
        return
    out = Path(HydraConfig.get().runtime.output_dir).resolve()
    before = _folder_before[-1]
    if not out.is_dir() or (out != before.base and before.base not in out.parents):
        return
    existed = before.entries.get(out)
    made = [p for p in out.iterdir() if existed is None or p.name not in existed]
    if any(p.name != ".hydra" and p.suffix != ".log" for p in made):
        return
    close_log_files(out)
    for path in made:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if existed is None:
        remove_empty_folders(out, before.anchor)


def close_log_files(folder: Path) -> None:
    """Close the logging handlers writing into ``folder`` (the job's log file) so it can go."""
    for handler in logging.getLogger().handlers[:]:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder:
            logging.getLogger().removeHandler(handler)
            handler.close()


def remove_empty_folders(folder: Path, anchor: Path) -> None:
    """Remove ``folder`` and its parents below ``anchor`` (which existed before) while empty."""
    for path in (folder, *folder.parents):
        if path == anchor or anchor not in path.parents:
            return
        try:
            path.rmdir()  # only if empty
        except OSError:
            return


def job_help(job: Callable, conf_dir: Path, config_name: str, overrides: Sequence[str],
             accepts: Accepts | None) -> str:
    """``--help``: the job's summary, its config groups with the options it accepts, its settings."""
    from hydra import compose, initialize_config_dir

    prog = command_name(job)
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as error:
        fail(one_line(error))
    choices = cfg.hydra.runtime.choices
    # Hydra records the choices last default first; the job's groups in its defaults' order, Hydra's after
    groups = [g for g in reversed(list(choices)) if not g.startswith("hydra/")] + \
             [g for g in choices if g.startswith("hydra/") and (conf_dir / g).is_dir()]
    summary = (inspect.getmodule(job).__doc__ or "").strip().split("\n\n")[0]
    lines = [f"{prog}: {' '.join(summary.split())}", "",
             f"usage: {prog} [GROUP=OPTION ...] [KEY=VALUE ...]   (-m with comma-separated values: a sweep)"]
    if groups:
        lines += ["", "config groups (* the default):"]
        for group in groups:
            options = accepted_options(conf_dir / group, (accepts or {}).get(group, {}), choices[group])
            lines.append(f"  {group}: " + ", ".join(o + "*" * (o == choices[group]) for o in options))
    with open_dict(cfg):
        del cfg["hydra"]
    settings = OmegaConf.to_yaml(cfg).rstrip()
    lines += ["", "settings (KEY=VALUE):", *("  " + line for line in settings.splitlines())]
    lines += ["", f"A bad value stops the job with one line; {VERBOSE_ENV}=1 shows the traceback. "
                  "Hydra's own flags: --hydra-help."]
    return "\n".join(lines)


def accepted_options(folder: Path, accepted: Mapping[str, Sequence[Any]], chosen: str | None) -> list[str]:
    """The option files of a group folder whose values the job accepts (schemas are not files)."""
    options = {path.stem for path in folder.glob("*.yaml")
               if all(OmegaConf.load(path).get(key) in values for key, values in accepted.items())}
    return sorted(options | ({chosen} if chosen else set()))


def command_name(job: Callable) -> str:
    """How this job was started: ``fastattn run`` (set by the dispatcher) or ``python -m <module>``."""
    if not sys.argv[0].endswith(".py"):
        return sys.argv[0]
    return f"python -m {module_name(job)}"


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but torch sees no CUDA device")
    return torch.device(name)
