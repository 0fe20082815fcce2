"""Checks on a composed config, run before any model is built; one-line errors naming the key.

The ``check_*`` helpers serve every job's checks; ``validate_config`` is the main job's.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from fastattn.cache_store import parse_cache_options
from fastattn.family import OTHER_RESOLUTION
from fastattn.kernels import set_fa4
from fastattn.layerwise.methods import FORECAST_AXES, REFRESH_RULES, parse_strategies

from ..models.loaders import DTYPES as LIBRARY_DTYPES
from ..models.loaders import parse_dtype
from ..models.solvers import SOLVERS
from . import distributed
from .app import CONF_DIR, ConfigError, check_finite_settings
from .context_config import LAYERWISE_SEARCHES, check_context, context_degrees

FAMILIES = ("dit", "pixart", "sd3", "flux")
VIDEO_FAMILIES = ("latte", "wan", "opensora")
JOINT_FAMILIES = ("sd3", "flux")  # flow-matching, joint attention: head-wise (V2) search
DTYPES = tuple(LIBRARY_DTYPES)  # the dtype names every tool accepts
# The error each search measures its threshold on: DiTFastAttn's greedy search the mean relative
# absolute error (D0..D6), DiTFastAttnV2's head-wise search each layer's summed relative squared error.
SEARCH_METRICS = {"greedy": "mrae", "fast": "mrae", "headwise": "rse", "budget": "rse"}
METRIC_KINDS = {"mrae": "a DiTFastAttn threshold", "rse": "a DiTFastAttnV2 budget"}

# Sample files are named by a six-digit index (000000.png): at most a million, 20 times the papers'
# largest protocol (50k); a larger count is refused before any work rather than dying after the search.
MAX_SAMPLES = 1_000_000

REPO_ROOT = CONF_DIR.parent  # the checkout's root; installed, the fastattn package (conf/ and experiments/ in it)


def value_at(cfg: DictConfig, key: str) -> Any:
    """``cfg`` at a dotted ``key``."""
    value = cfg
    for part in key.split("."):
        value = value[part]
    return value


def check_set(cfg: DictConfig, key: str, what: str) -> None:
    """A mandatory key (``???`` in its YAML) has a value."""
    if OmegaConf.is_missing(cfg, key):
        raise ConfigError(f"{key} is not set: give {key}=<{what}>")


def check_int(cfg: DictConfig, *keys: str, minimum: int = 1, maximum: int | None = None) -> None:
    for key in keys:
        value = value_at(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{key} must be at most {maximum}, got {value}")


def _in_range(value: Any, upper: float) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= upper


def check_fraction(cfg: DictConfig, key: str, upper: float = 1.0, optional: bool = False) -> None:
    """A number in (0, upper]; with ``optional`` also null."""
    value = value_at(cfg, key)
    if not (optional and value is None) and not _in_range(value, upper):
        raise ConfigError(f"{key} must be a number in (0, {upper:g}]{' or null' if optional else ''}, got {value!r}")


def check_fractions(cfg: DictConfig, key: str, upper: float = 1.0) -> None:
    """A non-empty list of numbers in (0, upper]."""
    values = list(value_at(cfg, key) or [])
    if not values or not all(_in_range(v, upper) for v in values):
        raise ConfigError(f"{key} must be a non-empty list of numbers in (0, {upper:g}], got {values}")


def check_bool(cfg: DictConfig, key: str) -> None:
    value = value_at(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


def check_choice(cfg: DictConfig, key: str, options: Sequence[Any]) -> None:
    value = value_at(cfg, key)
    if value not in options:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, options))}, got {value!r}")


def check_parsed(cfg: DictConfig, key: str, parse: Callable[[Any], Any]) -> None:
    """``parse(value)``: a library parser whose ValueError already names the field."""
    try:
        parse(value_at(cfg, key))
    except ValueError as error:
        raise ConfigError(str(error)) from None


@contextmanager
def input_errors(key: str | None = None) -> Iterator[None]:
    """A library check of the run's inputs (a file, a folder, weights) raising inside this block
    is a ConfigError: its message already says what is wrong; ``key`` names the field it came from."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, OSError, RuntimeError) as error:
        raise ConfigError(f"{key}: {error}" if key and not str(error).startswith(key) else str(error)) from None


@lru_cache(maxsize=1)
def _plan_version(path: str, mtime_ns: int, size: int):
    from fastattn import CompressionPlan

    return CompressionPlan.load(path)


def load_plan_file(path: str | Path):
    """The plan in ``path``, read once per version of the file: the config check and the search
    stage share it (a large plan is not parsed twice)."""
    stat = Path(path).stat()
    return _plan_version(str(path), stat.st_mtime_ns, stat.st_size)  # errors name the path as given


def check_plan_file(cfg: DictConfig) -> None:
    """plan_path: a plan file that loads, holds the model fields the run's FLOPs need and has the
    run's step count (its fit to the model is checked once the model is built, before any sample)."""
    if not Path(cfg.plan_path).is_file():
        raise ConfigError(f"plan_path: file not found: {cfg.plan_path}")
    with input_errors("plan_path"):
        plan = load_plan_file(cfg.plan_path)
    try:
        plan.check_flops_fields()
    except ValueError as error:
        raise ConfigError(f"plan_path: {cfg.plan_path}: {error}") from None
    steps = int(cfg.solver.num_steps)
    if plan.num_steps != steps:
        raise ConfigError(f"plan_path: plan has {plan.num_steps} steps but solver.num_steps={steps} "
                          f"(set solver.num_steps={plan.num_steps}, or search a plan for {steps} steps)")


def check_latency_table(cfg: DictConfig) -> None:
    """The head-wise search's latency table, when one is set: there, and every cost in it finite
    and positive (read whole now, before any model is built; the search reads it again)."""
    from fastattn.headwise import LatencyTable

    table = latency_table_path(cfg)
    if table is None:
        return
    if not table.is_file():
        raise ConfigError(f"latency table not found: {table} (search.latency_table / model.latency_table)")
    with input_errors():
        LatencyTable.load(table)


def check_model_resolution(cfg: DictConfig) -> None:
    """model.resolution where the model fixes its image size (a DiT pipeline makes images of its
    transformer's sample size, whatever the resolution says): it must be that size."""
    model = cfg.model
    if model.family != "dit" or not (model.get("builtin") or model.get("tiny")):
        return  # a checkpoint's size is known once it loads; the other families take height / width
    if model.get("builtin"):
        from ..models.loaders.builtin import default_image_size

        size = default_image_size()
    else:
        size = model.tiny.sample_size  # the tiny VAE does not downsample
    if model.resolution != size:
        raise ConfigError(f"model.resolution={model.resolution}: model {model.name} generates {size}x{size} "
                          f"images only (set model.resolution={size})")


def check_device(cfg: DictConfig, key: str = "device", needs_cuda: str | None = None) -> None:
    """auto, cpu or cuda[:N]. ``needs_cuda`` names what needs a GPU: then the device must be one
    (auto only where torch sees a GPU)."""
    device = str(value_at(cfg, key))
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ConfigError(f"{key} must be auto, cpu or cuda[:N], got {device!r}")
    if needs_cuda and (device == "cpu" or (device == "auto" and not torch.cuda.is_available())):
        raise ConfigError(f"{needs_cuda} needs a CUDA device ({key}=cuda)")


def use_fa4(cfg: DictConfig) -> None:
    """Set the FlashAttention-4 mode from ``cfg.fa4`` (auto | true | false), for the raw and the
    compressed model alike; a value that cannot work is a one-line error."""
    try:
        set_fa4(cfg.get("fa4", "auto"))
    except (ValueError, RuntimeError) as error:
        raise ConfigError(str(error)) from None  # the message names the key


def require_cuda(what: str) -> None:
    """For a job that runs CUDA kernels only."""
    if not torch.cuda.is_available():
        raise ConfigError(f"{what} needs a CUDA device; torch sees none")


def latency_table_path(cfg: DictConfig) -> Path | None:
    """The head-wise search's latency table: search.latency_table, else the model's measured one
    (model.latency_table), else None (FLOPs). A relative path that does not exist from the working
    directory is taken from REPO_ROOT, where the shipped tables live (experiments/latency_tables/)."""
    name = (cfg.get("search") or {}).get("latency_table") or cfg.model.get("latency_table")
    if not name:
        return None
    path = Path(str(name))
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


def check_threshold_metric(cfg: DictConfig, algorithm: str) -> None:
    """The threshold must be on the error ``algorithm`` measures (SEARCH_METRICS)."""
    metric, wanted = cfg.threshold.metric, SEARCH_METRICS[algorithm]
    if metric == wanted:
        return
    if metric not in METRIC_KINDS:
        raise ConfigError(f"threshold.metric must be one of {', '.join(METRIC_KINDS)}, got {metric!r}")
    raise ConfigError(f"threshold.metric: {metric!r} (threshold {cfg.threshold.name}) is {METRIC_KINDS[metric]}; "
                      f"search={algorithm} needs an {wanted} threshold ({', '.join(thresholds_on(wanted))})")


def check_budget_search(cfg: DictConfig) -> None:
    """search=budget: the FLOPs fraction reachable at solver.num_steps, and its bisection's limits."""
    from fastattn.search.budget import check_budget

    try:
        check_budget(cfg.search.budget, int(cfg.solver.num_steps))
    except ValueError as error:
        raise ConfigError(f"search.budget: {error}") from None
    check_int(cfg, "search.iterations")
    check_fraction(cfg, "search.tolerance")
    check_bool(cfg, "search.sensitivity")


def thresholds_on(metric: str) -> list[str]:
    """The threshold options (conf/threshold/) on ``metric``."""
    return sorted(path.stem for path in (CONF_DIR / "threshold").glob("*.yaml")
                  if OmegaConf.load(path).get("metric") == metric)


def validate_config(cfg: DictConfig) -> None:
    # Sections are checked in a fixed order so that a config with several faults names the same one first.
    check_finite_settings(cfg)
    check_model_section(cfg)
    check_sampling_settings(cfg)
    check_search_section(cfg)
    check_run_settings(cfg)
    check_context(cfg, distributed.world_from_env().size)  # parallel.context: after the plan file is checked


def check_model_section(cfg: DictConfig) -> None:
    """model.*: an image family, where its weights come from, its dtype and resolution."""
    model = cfg.model
    if model.family not in FAMILIES:
        raise ConfigError(f"model.family must be one of {', '.join(FAMILIES)}, got {model.family!r}"
                          + (" (a video model: run it with the video job, fastattn video)"
                             if model.family in VIDEO_FAMILIES else ""))
    if not model.get("tiny") and not model.get("pipeline_id") and not model.get("builtin"):
        raise ConfigError(f"model {model.name!r}: set model.pipeline_id (a checkpoint), model.builtin or model.tiny")
    if model.get("builtin") not in (None, "default"):
        raise ConfigError(f"model.builtin must be 'default' or null, got {model.builtin!r}")
    check_parsed(cfg, "model.dtype", parse_dtype)
    check_model_resolution(cfg)


def check_sampling_settings(cfg: DictConfig) -> None:
    """The compression technique and the solver, and that the solver fits the model family."""
    if not 0 < float(cfg.window_size) <= 1:
        raise ConfigError(f"window_size must be in (0, 1] (the fraction of the tokens on each side of a query; "
                          f"the paper's 1/8 is 0.125), got {cfg.window_size}")
    check_choice(cfg, "refresh_on", REFRESH_RULES)
    if "forecast_in" in cfg:
        check_choice(cfg, "forecast_in", FORECAST_AXES)
    if float(cfg.threshold.delta) < 0:
        raise ConfigError(f"threshold.delta must be >= 0, got {cfg.threshold.delta}")
    if cfg.solver.scheduler not in SOLVERS:
        raise ConfigError(f"solver.scheduler must be one of {SOLVERS}, got {cfg.solver.scheduler!r}")
    if float(cfg.guidance_scale) < 0:
        raise ConfigError(f"guidance_scale must be >= 0, got {cfg.guidance_scale}")
    check_parsed(cfg, "technique.strategies", parse_strategies)
    if (cfg.model.family in JOINT_FAMILIES) != (cfg.solver.scheduler == "flow_euler"):
        raise ConfigError(f"solver.scheduler: {cfg.solver.scheduler!r} does not fit model.family {cfg.model.family!r} "
                          "(flow_euler goes with sd3 and flux, and only with them)")


def check_search_section(cfg: DictConfig) -> None:
    """search.*: an algorithm that fits the model family, then that algorithm's own settings."""
    search = cfg.get("search") or {}
    algorithm = search.get("algorithm", "greedy")
    if algorithm not in SEARCH_METRICS:
        raise ConfigError(f"search.algorithm must be one of {', '.join(SEARCH_METRICS)}, got {algorithm!r}")
    # under context parallelism fastattn runs layer-wise plans only: a joint model searches one too
    layerwise_joint = cfg.model.family in JOINT_FAMILIES and algorithm in LAYERWISE_SEARCHES and context_degrees(cfg).on
    if (cfg.model.family in JOINT_FAMILIES) != (algorithm == "headwise") and not layerwise_joint:
        raise ConfigError(f"search.algorithm: {algorithm!r} does not fit model.family {cfg.model.family!r} "
                          "(search=headwise for sd3 and flux, search=greedy, fast or budget for dit and pixart)")
    if algorithm == "budget" and search.get("budget") is not None:
        check_budget_search(cfg)  # the budget replaces the threshold
    else:
        check_threshold_metric(cfg, algorithm)
    if algorithm == "fast":
        from fastattn.search.fast import check_max_raw_generations

        try:
            check_max_raw_generations(search.get("max_raw_generations", 3.0))
        except ValueError as error:
            raise ConfigError(f"search.{error}") from None
    if algorithm == "headwise":
        c = search.get("head_coefficient")
        if c is not None and not (isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0):
            raise ConfigError(f"search.head_coefficient must be a number > 0 or null (no per-head constraint), got {c!r}")
        check_latency_table(cfg)


def check_run_settings(cfg: DictConfig) -> None:
    """Sizes, stages, an optional plan file, and where and how the run executes."""
    check_int(cfg, "solver.num_steps", "samples.batch_size", "model.resolution")
    check_int(cfg, "calibration.num_samples", "samples.num", maximum=MAX_SAMPLES)
    stages = list(cfg.get("stages", []))
    if not stages or any(s not in ("search", "generate", "evaluate") for s in stages):
        raise ConfigError(f"stages must be a non-empty subset of [search, generate, evaluate], got {stages}")
    if cfg.get("plan_path"):
        check_plan_file(cfg)
    check_choice(cfg, "other_resolution", OTHER_RESOLUTION)
    check_bool(cfg, "cuda_graphs")
    check_device(cfg, needs_cuda="cuda_graphs=true" if cfg.cuda_graphs else None)
    check_cache_options(cfg)
    if cfg.get("cpu_threads") is not None:
        check_int(cfg, "cpu_threads")


def check_cache_options(cfg: DictConfig) -> None:
    """cache_dtype / cache_device (how compressed runs keep their caches): one-line errors."""
    try:
        parse_cache_options(cfg.get("cache_dtype"), cfg.get("cache_device"), bool(cfg.get("cuda_graphs")))
    except ValueError as error:
        raise ConfigError(str(error)) from None
