"""The loop of the per-model GPU benchmarks (benchmark_video, benchmark_zoo): each model timed on
its own, raw and compressed on the same dense kernel, the results written after each model."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from fastattn.kernels import prefer_fast_dense
from fastattn.utils.io import atomic_write_json

from ..infra.app import ConfigError, resolve_device
from ..infra.config import DTYPES, check_choice, check_fraction, check_int, check_set, use_fa4


def check_model_settings(cfg: DictConfig, json_name: str, models: tuple[str, ...], size_key: str) -> None:
    """One-line errors for what every per-model benchmark names: its folder, models, size and dtype."""
    check_set(cfg, "out", f"folder of {json_name}")
    if not cfg.models or any(m not in models for m in cfg.models):
        raise ConfigError(f"models must be a non-empty list of {', '.join(models)}, got {list(cfg.models)}")
    check_choice(cfg, size_key, ("full", "tiny"))
    if cfg.dtype is not None:
        check_choice(cfg, "dtype", DTYPES)


def check_run_settings(cfg: DictConfig, json_name: str, models: tuple[str, ...], size_key: str) -> None:
    """One-line errors for the settings the step benchmarks (a loop of ``steps`` calls) share."""
    check_model_settings(cfg, json_name, models, size_key)
    check_int(cfg, "steps", minimum=2)
    check_int(cfg, "warmup", "loop_warmup", minimum=0)
    check_int(cfg, "repeats", "loop_repeats")
    check_fraction(cfg, "target")
    check_fraction(cfg, "window_size", upper=1)


def run_models(cfg: DictConfig, json_name: str, benchmark: Callable, print_table: Callable) -> list[dict]:
    """``benchmark(model, cfg, device, dtype)`` for each of ``cfg.models``; one model failing still
    leaves the others' numbers in ``cfg.out/json_name``, and the run raises at the end."""
    use_fa4(cfg)
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "config": OmegaConf.to_container(cfg, resolve=True)}
    results, errors = [], {}
    for m in cfg.models:
        try:
            with prefer_fast_dense():  # raw and compressed on the same dense kernel
                results.append(benchmark(m, cfg, device, dtype))
        except Exception as e:  # noqa: BLE001  (reported, then re-raised at the end)
            errors[m] = f"{type(e).__name__}: {e}"
            print(f"{m} failed: {errors[m]}")
        finally:
            gc.collect()  # a model in a reference cycle would stay on the GPU beside the next one
            if device.type == "cuda":
                torch.cuda.empty_cache()
        atomic_write_json(Path(cfg.out) / json_name, {"meta": meta, "results": results, "errors": errors})
    print_table(results)
    if errors:
        raise RuntimeError(f"benchmark failed for {', '.join(errors)}; see {cfg.out}/{json_name}")
    return results


__all__ = ["check_model_settings", "check_run_settings", "run_models"]
