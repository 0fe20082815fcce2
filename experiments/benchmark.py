"""GPU benchmark of the kernels issue: kernel sweep, the paper's Table 2 (per technique) and
Tables 3-4 (end to end), on full-size architectures with random weights.

    python -m experiments.benchmark                       # everything (conf/benchmark/paper.yaml)
    python -m experiments.benchmark --config-name quick   # kernels + Table 2
    python -m experiments.benchmark --config-name tiny    # CPU smoke test
    python -m experiments.benchmark --config-name memory  # PixArt 2K: transformer and whole-pipeline peaks, FP8 caches

Writes ``benchmark.json`` (all measurements, device, commit) and one ``metrics.json`` per
Table 2 cell under ``records/`` (``python -m analysis.tables OUT_DIR`` turns them into Table 2),
and prints a short table.
"""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fastattn.cache_store import CACHE_DEVICES, CACHE_DTYPES
from fastattn.kernels import get_fa4
from fastattn.utils.io import atomic_write_json
from fastattn.utils.paths import path_inside, slug

from .bench import architectures, end_to_end, kernels, pipeline_memory, techniques
from .infra.app import CONF_DIR, ConfigError, hydra_app
from .infra.config import DTYPES, check_choice, use_fa4
from .models.loaders import parse_dtype

SECTIONS = ("kernels", "techniques", "end_to_end", "pipeline_memory")


def check_config(cfg: DictConfig) -> None:
    """One-line errors before any model is built."""
    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"benchmark.sections: unknown {unknown} (known: {', '.join(SECTIONS)})")
    check_choice(cfg, "dtype", DTYPES)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("benchmark.device is 'cuda' but no GPU is visible; use --config-name tiny on a CPU")
    for name in list(cfg.techniques.models) + list(cfg.end_to_end.fractions):
        if name not in cfg.models:
            raise ConfigError(f"benchmark: model {name!r} is not defined under models")
    for name, spec in cfg.models.items():
        if spec.arch not in architectures.ARCHITECTURES:
            raise ConfigError(f"benchmark.models.{name}.arch: unknown {spec.arch!r}")
    for name, fractions in cfg.end_to_end.fractions.items():
        if any(not 0 < f <= 1 for f in fractions):
            raise ConfigError(f"benchmark.end_to_end.fractions.{name}: fractions must be in (0, 1]")
    if any(m not in (True, False) for m in cfg.end_to_end.get("cuda_graphs", [False])):
        raise ConfigError("benchmark.end_to_end.cuda_graphs must be a list of booleans (false: eager, true: graphs)")
    for how in cfg.end_to_end.get("compile", [None]):
        if how is not None and how not in end_to_end.COMPILE_MODES:
            raise ConfigError(f"benchmark.end_to_end.compile: {how!r} is not null, "
                              f"{' or '.join(end_to_end.COMPILE_MODES)}")
    for key, spec in (("end_to_end", cfg.end_to_end), ("pipeline_memory", cfg.get("pipeline_memory") or {})):
        for dtype in spec.get("cache_dtypes", [None]):
            if dtype is not None and dtype not in CACHE_DTYPES:
                raise ConfigError(f"benchmark.{key}.cache_dtypes: {dtype!r} is not null or one of {', '.join(CACHE_DTYPES)}")
        for where in spec.get("cache_devices", [None]):
            if where is not None and where not in CACHE_DEVICES:
                raise ConfigError(f"benchmark.{key}.cache_devices: {where!r} is not null or one of "
                                  f"{', '.join(CACHE_DEVICES)} (host memory)")
    if "pipeline_memory" in cfg.sections:
        spec = cfg.get("pipeline_memory")
        if spec is None:
            raise ConfigError("benchmark.sections has pipeline_memory but the config has no pipeline_memory block")
        for name in spec.fractions:
            if name not in cfg.models:
                raise ConfigError(f"benchmark.pipeline_memory: model {name!r} is not defined under models")
            if architectures.ARCHITECTURES[cfg.models[name].arch]["family"] != "pixart":
                raise ConfigError(f"benchmark.pipeline_memory.fractions.{name}: PixArt-Sigma models only")
        if spec.text_encoder not in pipeline_memory.TEXT_ENCODERS or spec.vae not in pipeline_memory.VAES:
            raise ConfigError(f"benchmark.pipeline_memory: text_encoder one of {', '.join(pipeline_memory.TEXT_ENCODERS)}"
                              f", vae one of {', '.join(pipeline_memory.VAES)}")
    for name, files in (cfg.end_to_end.plan_files or {}).items():
        for plan_name, path in files.items():
            if not Path(path).is_file():
                raise ConfigError(f"benchmark.end_to_end.plan_files.{name}.{plan_name}: {path} not found")


def graph_modes(e2e, device) -> tuple[bool, ...]:
    """The end-to-end modes to measure: eager, and CUDA graphs where the device has them."""
    modes = tuple(bool(m) for m in e2e.get("cuda_graphs", [False]))
    return tuple(m for m in modes if not m or device.type == "cuda") or (False,)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def build(cfg, name, device, dtype):
    spec = cfg.models[name]
    return architectures.build(spec.arch, spec.resolution, spec.images, device, dtype)


def summary_lines(result: dict) -> list[str]:
    lines = [f"device: {result['device']}  torch {result['torch']}  commit {result['commit']}"]
    gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    if "kernels" in result:
        lines.append("kernels (ms; x = vs best dense):")
        for r in result["kernels"]["rows"]:
            lines.append(f"  L={r['seq_len']:6d} {r['kernel']:8s} {r['shape']:4s} {r['backend']:12s} "
                         f"ws={r['window_size']:<7g} {r['ms']:8.3f} ms  {r['vs_dense']:.3f}x "
                         f"(dense {r['dense_backend']} {r['dense_ms']:.3f} ms)")
        for key, t in result["kernels"]["targets"].items():
            lines.append(f"  target {key}: {t}")
    for r in result.get("techniques", []):
        graphed = r.get("graphed_latency_fraction")
        lines.append(f"  table2 {r['model']:22s} L={r['seq_len']:6d} {r['method']:9s} flops {r['flops_fraction']:.2f} "
                     f"latency {r['latency_fraction']:.2f}" + (f" graphed {graphed:.2f}" if graphed is not None else ""))
    for r in result.get("end_to_end", []):
        mem = f"{r['memory_ratio']:.2f}" if r.get("memory_ratio") else "-"
        mode = f"compiled ({r['compile']})" if r.get("compile") else "graphs" if r.get("cuda_graphs") else "eager"
        ideal = (f" a {r['attention_share']:.3f}" if "attention_share" in r else
                 f" ideal {r['ideal_speedup']:.2f}x of ideal {r['of_ideal']:.1%}" if "of_ideal" in r else "")
        lines.append(f"  e2e {r['model']:22s} {mode:17s} {r['plan']:30s} flops {r['flops_fraction']:.3f} loop {r['loop_ms']:9.1f} ms "
                     + (f"attn {r['attention_ms']:8.1f} ms " if r["attention_ms"] is not None else "attn        - ms ")
                     + f"speedup {r['speedup']:.2f}x "
                     + (f"attn {r['attention_speedup']:.2f}x " if r["attention_speedup"] is not None else "attn     - ")
                     + f"mem {mem} (peak {gib(r.get('peak_bytes'))} GiB) dense {r.get('dense_kernel', '-')}{ideal}")
    for r in result.get("pipeline_memory", []):
        ratio = lambda k: "-" if r.get(k) is None else f"{r[k]:.2f}x"  # noqa: E731
        caches = (r["cache_dtype"] or "as computed") + (" host" if r.get("cache_device") else "")
        lines.append(f"  pipeline {r['model']:22s} {r['plan']:12s} caches {caches:19s} "
                     f"GiB: encode {gib(r['encode_peak_bytes'])} denoise {gib(r['denoise_peak_bytes'])} "
                     f"({ratio('denoise_ratio')}) decode {gib(r['decode_peak_bytes'])} "
                     f"pipeline {gib(r['pipeline_peak_bytes'])} ({ratio('pipeline_ratio')})")
    return lines


def rows_per_model(cfg: DictConfig, fractions_by_model, device, dtype, measure) -> list[dict]:
    """``measure(bm, fractions)`` for each model of ``fractions_by_model``, each built once and freed
    after (the next model's weights need the memory)."""
    rows = []
    for name, fractions in fractions_by_model.items():
        bm = build(cfg, name, device, dtype)
        bm.name = name
        rows += measure(bm, list(fractions))
        del bm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_benchmark(cfg: DictConfig) -> dict:
    check_config(cfg)
    use_fa4(cfg)
    device, dtype = torch.device(cfg.device), parse_dtype(cfg.dtype)
    out = Path(cfg.out_dir)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "commit": git_commit(),
              "date": datetime.date.today().isoformat(), "fa4": get_fa4(),
              "config": OmegaConf.to_container(cfg, resolve=True)}
    if "kernels" in cfg.sections:
        sweep = kernels.sweep(cfg.kernels, device, dtype)
        sweep["targets"] = kernels.targets(sweep, cfg.kernels.target_seq_len)
        result["kernels"] = sweep
    if "techniques" in cfg.sections:
        rows = []
        for name in cfg.techniques.models:
            bm = build(cfg, name, device, dtype)
            bm.name = name
            rows += techniques.layer_latencies(bm, device, cfg.techniques.warmup, cfg.techniques.repeats)
            del bm
        result["techniques"] = rows
        for r in rows:
            atomic_write_json(path_inside(out / "records", slug(f"{r['model']}_{r['method'].replace('+', '_')}"),
                                          "metrics.json"),
                              {**r, "device": result["device"], "date": result["date"]})
    if "end_to_end" in cfg.sections:
        e2e = cfg.end_to_end
        rows = rows_per_model(cfg, e2e.fractions, device, dtype, lambda bm, fractions: end_to_end.run_end_to_end(
            bm, fractions, e2e.steps, e2e.guidance, device, e2e.warmup, e2e.repeats,
            dict((e2e.plan_files or {}).get(bm.name, {})), graph_modes=graph_modes(e2e, device),
            raw_cudnn=bool(e2e.get("raw_cudnn", True)), share_from_plan=bool(e2e.get("share_from_plan", False)),
            compile_modes=tuple(e2e.get("compile", [None])), compile_backend=e2e.get("compile_backend", "inductor"),
            compile_mode=e2e.get("compile_mode"), cache_dtypes=tuple(e2e.get("cache_dtypes", [None])),
            cache_devices=tuple(e2e.get("cache_devices", [None]))))
        result["end_to_end"] = rows
    if "pipeline_memory" in cfg.sections:
        spec = cfg.pipeline_memory
        rows = rows_per_model(cfg, spec.fractions, device, dtype,
                              lambda bm, fractions: pipeline_memory.run_pipeline_memory(
                                  bm, fractions, spec.steps, spec.guidance, device, tuple(spec.cache_dtypes),
                                  spec.text_encoder, spec.vae, dtype, tuple(spec.get("cache_devices", [None]))))
        result["pipeline_memory"] = rows
    atomic_write_json(out / "benchmark.json", result)
    print("\n".join(summary_lines(result)))
    return result


main = hydra_app("paper", run_benchmark, conf_dir=CONF_DIR / "benchmark")

if __name__ == "__main__":
    main()
