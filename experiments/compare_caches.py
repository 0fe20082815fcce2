"""fastattn against diffusers' cache hooks on the same model, seeds and labels, at counted compute.

Rows: raw; DiTFastAttn (Algorithm 1, ``technique=all``) at each of ``fastattn``'s thresholds, or
another technique preset as ``technique:threshold`` (``forecast:d2``: forecast and AST) (plans
from the plan cache or searched, as the main job does); each of ``caches`` (a diffusers hook at one
setting, driven as :mod:`experiments.infra.cache_hooks` says, or a cache-dit setting,
:mod:`experiments.infra.cache_dit_rows`); each of ``stacked`` (a fastattn plan with a block cache:
FirstBlockCache, MagCache or cache-dit's DBCache, its calibrator beside the plan's forecast).
Compute is the transformer-block FLOPs actually executed over raw's, both CFG halves
counted (:mod:`experiments.infra.block_flops`); the attention layers' fraction apart. Quality: PSNR / SSIM
against the raw samples; FID-small / IS-small on the built-in model; seconds per sample.

Every row runs on each sample seed of ``seeds`` (``samples.seed`` when unset), into ``seed<n>/`` of the
run directory: ``compare.json``, ``compare.csv``, ``compare.md`` and ``compare.png`` (PSNR against
compute) after every row, and ``samples/<row>/`` (PNGs, ``compute.json``, ``trace.json``). ``trace.json``
is what ran at each transformer call of the row's first generated batch (which blocks, each attention
layer's method or "skipped"; :mod:`experiments.infra.decision_trace`), with ``batch_index`` and
``batch_size``, for replaying the row's decisions on other models; a compare.json row names it
(``trace``, relative to the seed's folder), and a resumed row keeps the one it has. Then ``seeds.json`` and
``seeds.md``: the matched-compute verdict on each seed, and the settings each seed picks judged on
the others (:mod:`analysis.compare_seeds`), so no setting is judged on the seed it was chosen on.
Plans searched under a cache and MagCache's ratios come from the calibration set and are shared by
the seeds. A re-run into the same directory skips finished rows and finished samples.

``shard: i/n`` runs the i-th of n interleaved parts of the rows, so that several processes fill one
GPU (the built-in model leaves most of it idle) or several: raw's samples first (one run with no
rows but raw), then the shards side by side, then one run without ``shard`` gathers what they
measured into each seed's tables and the verdict.

    python -m experiments.compare_caches                                   # conf/compare_caches.yaml
    python -m experiments.compare_caches samples.num=32 device=cpu cpu_threads=2
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fastattn import CompressionPlan, apply_fastattn, remove_fastattn, search_plan
from fastattn.models import get_adapter
from fastattn.utils.io import atomic_write_json
from fastattn.utils.paths import path_inside, slug

from .evidence import group_option, threshold_option
from .infra import cache_hooks
from .infra.app import ConfigError, hydra_app
from .infra.block_flops import BlockFlopCounter
from .infra.conditions import Conditions, to_device
from .infra.config import check_threshold_metric, validate_config
from .infra.decision_trace import DecisionTrace
from .infra.opening import open_job
from .stages.fingerprint import sample_fingerprint
from .stages.generate import finished, generate, sample_array
from .stages.search import find_or_search_plan

COMPUTE_FILE = "compute.json"
TRACE_FILE = "trace.json"


# fastattn rows other than DiTFastAttn's (technique=all): "<technique>:<threshold>", e.g. forecast:d2
TECHNIQUE_LABELS = {"all": "DiTFastAttn", "forecast": "fastattn forecast + AST", "all_forecast": "DiTFastAttn + forecast"}


def parse_point(text: str) -> tuple[str, str]:
    """(technique, threshold) of a fastattn row: ``d2`` is DiTFastAttn's (technique all) at D2,
    ``forecast:d2`` Algorithm 1 with another technique preset (conf/technique); a threshold may
    be a delta (``forecast:0.0125``)."""
    technique, _, threshold = str(text).rpartition(":")
    return technique or "all", threshold


def point_label(text: str) -> str:
    technique, _ = parse_point(text)
    return TECHNIQUE_LABELS.get(technique, f"fastattn ({technique})")


def plan_config(cfg: DictConfig, point: str) -> DictConfig:
    technique, threshold = parse_point(point)
    point = OmegaConf.merge(cfg, {"technique": group_option("technique", technique),
                                  "threshold": threshold_option(threshold), "plan_path": None})
    check_threshold_metric(point, "greedy")
    return point


def comparison_rows(cfg: DictConfig) -> list[dict]:
    """Every row with its key (its sample folder), method, setting, plan threshold and hook setting;
    a bad setting is a ConfigError naming it, before any model is built."""
    rows = [{"key": "raw", "method": "raw", "setting": "", "fastattn": None, "cache": None}]
    try:
        for t in cfg.get("fastattn") or []:
            plan_config(cfg, str(t))
            rows.append({"key": slug(f"fastattn_{t}"), "method": point_label(t),
                         "setting": parse_point(t)[1], "fastattn": str(t), "cache": None})
        specs = []
        for i, spec in enumerate(cfg.get("caches") or []):
            spec = cache_hooks.check_spec(OmegaConf.to_container(spec), f"caches[{i}]")
            specs.append(spec)
            rows.append({"key": cache_hooks.spec_key(spec), "method": cache_hooks.spec_label(spec),
                         "setting": cache_hooks.spec_setting(spec), "fastattn": None, "cache": spec})
        for i, stack in enumerate(cfg.get("stacked") or []):
            stack = OmegaConf.to_container(stack)
            under = stack.pop("search_under_cache", False)
            if set(stack) != {"fastattn", "cache"} or not isinstance(under, bool):
                raise ValueError(f"stacked[{i}] must have the keys fastattn (a threshold, or technique:threshold) "
                                 "and cache (a block cache), and may have search_under_cache (true/false)")
            spec = cache_hooks.check_spec(stack["cache"], f"stacked[{i}].cache")
            if spec["kind"] not in cache_hooks.STACKABLE:
                raise ValueError(f"stacked[{i}].cache.kind must be one of {', '.join(cache_hooks.STACKABLE)} "
                                 f"(block caches), got {spec['kind']!r}")
            plan_config(cfg, str(stack["fastattn"]))
            specs.append(spec)
            point = str(stack["fastattn"])
            rows.append({"key": slug(f"fastattn_{point}+{cache_hooks.spec_key(spec)}" + ("+under_cache" if under else "")),
                         "method": f"{point_label(point)} + {cache_hooks.spec_label(spec)}"
                                   + (", searched under it" if under else ""),
                         "setting": f"{parse_point(point)[1]} + {cache_hooks.spec_setting(spec)}",
                         "fastattn": str(stack["fastattn"]), "cache": spec, "search_under_cache": under})
        cache_hooks.check_family(cfg.model.family, float(cfg.guidance_scale), specs)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    keys = [r["key"] for r in rows]
    duplicate = next((k for k in keys if keys.count(k) > 1), None)
    if duplicate:
        raise ConfigError(f"the row {duplicate!r} is listed twice")
    return rows


def check_compare_config(cfg: DictConfig) -> None:
    if int(cfg.samples.num) < 2:
        raise ConfigError(f"compare_caches: samples.num must be >= 2, got {cfg.samples.num}")
    if cfg.model.family not in cache_hooks.FAMILIES:
        raise ConfigError(f"model.family: compare_caches drives the hooks on {', '.join(cache_hooks.FAMILIES)} "
                          f"models, got {cfg.model.family!r}")


def mag_ratios(pipe, cfg: DictConfig, conditions: Conditions, device, out_dir: Path) -> list[float]:
    """MagCache's ratios for this run, calibrated once on the calibration set and kept in the run dir."""
    path = out_dir / "mag_ratios.json"
    if path.is_file():
        return json.loads(path.read_text())["ratios"]
    steps = int(cfg.solver.num_steps)
    inputs = conditions.inputs(range(int(cfg.calibration.num_samples)), int(cfg.calibration.seed), steps,
                               float(cfg.guidance_scale))
    ratios = cache_hooks.calibrate_mag_ratios(pipe, to_device(inputs, device))
    atomic_write_json(path, {"ratios": ratios, "calibration_samples": int(cfg.calibration.num_samples),
                             "calibration_seed": int(cfg.calibration.seed)})
    return ratios


def add_compute(folder: Path, counted: dict) -> dict:
    """The row's counts so far (a resumed row adds what this run generated)."""
    path = folder / COMPUTE_FILE
    total = json.loads(path.read_text()) if path.is_file() else {}
    total = {k: total.get(k, 0) + v for k, v in counted.items()}
    atomic_write_json(path, total)
    return total


def skipped_steps(pipe, spec: dict, calibration: dict, steps: int, ratios) -> list[int]:
    """The steps at which the block cache ``spec`` skips blocks on ``calibration`` (one generation
    with the cache and an all-full plan, whose step counter names the steps): those at which some
    layer did not run. FirstBlockCache skips every block but the first, MagCache every block,
    cache-dit the middle ones (after Fn, before the last Bn): each skips them together, so these
    are the steps the skipped layers miss; the layers cache-dit always runs are searched full there
    too."""
    layers = get_adapter(pipe.transformer).attention_layers(pipe.transformer)
    handle = apply_fastattn(pipe, CompressionPlan.all_full(steps, len(layers)))
    ran = [set() for _ in layers]  # per layer, the steps its attention ran
    watches = [layer.register_forward_pre_hook(lambda module, args, _ran=seen: _ran.add(handle.state.step))
               for layer, seen in zip(layers, ran)]
    hooks = cache_hooks.install(pipe, spec, steps, ratios)
    try:
        with torch.no_grad(), hooks.generation():
            pipe(**calibration)
    finally:
        hooks.remove()
        for watch in watches:
            watch.remove()
        remove_fastattn(pipe)
    return sorted(set(range(steps)) - set.intersection(*ran))


def plan_under_cache(pipe, row: dict, cfg: DictConfig, device, conditions: Conditions, plans_dir: Path, ratios):
    """A stacked row's plan searched for the steps its block cache runs: the cache's skipped steps
    on the calibration set, then Algorithm 1 with them (``search_plan(skipped_steps=...)``); kept
    in the run directory."""
    path = path_inside(plans_dir, f"{row['key']}.json")
    if path.is_file():
        return CompressionPlan.load(path)
    point = plan_config(cfg, row["fastattn"])
    steps = int(cfg.solver.num_steps)
    calibration = to_device(conditions.inputs(range(int(cfg.calibration.num_samples)), int(cfg.calibration.seed),
                                              steps, float(cfg.guidance_scale)), device)
    skipped = skipped_steps(pipe, row["cache"], calibration, steps, ratios)
    plan = search_plan(pipe, calibration, threshold=float(point.threshold.delta),
                       strategies=list(point.technique.strategies), window_size=float(point.window_size),
                       refresh_on=str(point.refresh_on), forecast_in=str(point.get("forecast_in", "timestep")),
                       progress=False, skipped_steps=skipped,
                       metadata={"model_name": cfg.model.name, "technique": point.technique.name,
                                 "block_cache": row["cache"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    plan.save(path)
    return plan


def generate_row(pipe, row: dict, cfg: DictConfig, device, conditions, indices, out_dir: Path, ratios,
                 plans_dir: Path | None = None) -> dict:
    """Generate one row's samples (into ``out_dir``, with ``cfg.samples.seed``) with its plan and hook
    installed and its FLOPs counted; a plan searched under a cache is kept in ``plans_dir``. The first
    batch generated is traced into ``trace.json`` where the folder has none yet."""
    folder = path_inside(out_dir / "samples", row["key"])
    steps = int(cfg.solver.num_steps)
    batch_size = int(cfg.samples.batch_size)
    plan = None
    if row.get("search_under_cache"):
        plan = plan_under_cache(pipe, row, cfg, device, conditions, plans_dir or out_dir / "plans", ratios)
    elif row["fastattn"]:
        plan, _ = find_or_search_plan(pipe, plan_config(cfg, row["fastattn"]), device, conditions)
    if plan is not None:
        plan.check_model(get_adapter(pipe.transformer).describe(pipe.transformer), num_steps=steps)
        apply_fastattn(pipe, plan)
    hooks = None
    try:
        if row["cache"]:
            hooks = cache_hooks.install(pipe, row["cache"], steps, ratios)
        counter = BlockFlopCounter(pipe.transformer)
        call_context = hooks.generation if hooks else None
        trace = None
        if not (folder / TRACE_FILE).is_file():
            trace = DecisionTrace(pipe.transformer)
            call_context = partial(trace.generation, call_context)
            # the batch traced: the first of those not finished yet (batch 0 unless samples predate the trace)
            traced_batch = len(finished(folder) & set(indices)) // batch_size
        try:
            made = generate(pipe, conditions, indices, folder, seed=int(cfg.samples.seed), num_steps=steps,
                            guidance_scale=float(cfg.guidance_scale), batch_size=batch_size,
                            device=device, desc=row["key"], call_context=call_context,
                            fingerprint=sample_fingerprint(cfg, plan) | {"cache": row["cache"]})
        finally:
            counter.remove()
            if trace is not None:
                trace.remove()
    finally:
        if hooks is not None:
            hooks.remove()
        remove_fastattn(pipe)
    compute = add_compute(folder, {**counter.flops.to_dict(), "samples": made["generated"], "seconds": made["seconds"]})
    if trace is not None and trace.done and trace.calls:
        atomic_write_json(folder / TRACE_FILE, trace.to_dict() | {"batch_index": traced_batch, "batch_size": batch_size})
    return {"compute": compute, "plan_attn_flops_fraction": plan.attention_flops()["fraction"] if plan else None}


def measure(cfg: DictConfig, images, raw, small) -> dict:
    from . import metrics as m

    batch = int(cfg.metrics.feature_batch_size)
    out = {}
    if small is not None:
        classifier, reference = small
        out.update(m.compute_small_metrics(images, classifier, reference, batch_size=batch))
    if raw is not None:
        out["psnr_db"] = m.compute_psnr(raw, images, batch_size=batch)
        out["ssim"] = m.compute_ssim(raw, images, batch_size=batch)
    return out


def per_sample(compute: dict, key: str) -> float | None:
    return compute[key] / compute["samples"] if compute.get("samples") else None


SHARDS_DIR = "shards"  # in a seed's folder: the rows each shard measured, gathered by a run without shard


def parse_shard(cfg: DictConfig) -> tuple[int, int] | None:
    """``shard: "i/n"``: this process runs the i-th of n interleaved parts of the rows (0 <= i < n),
    so that one comparison fills a GPU (or several) from several processes; null: every row."""
    text = cfg.get("shard")
    if text is None:
        return None
    index, slash, count = str(text).partition("/")
    if not (slash and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise ConfigError(f"shard must be 'i/n' with 0 <= i < n (this process's part of the rows), got {text!r}")
    return int(index), int(count)


def shard_rows(rows: list[dict], shard: tuple[int, int] | None) -> list[dict]:
    """raw (every row is measured against it; it must be finished first) and the shard's part of the others."""
    if shard is None:
        return rows
    index, count = shard
    return [rows[0], *rows[1:][index::count]]


def check_raw_finished(out_dir: Path, seeds: list[int], num_samples: int) -> None:
    """A shard measures its rows against raw's samples: they are made by one run first, not by every shard."""
    for seed in seeds:
        folder = out_dir / f"seed{seed}" / "samples" / "raw"
        if len(finished(folder) & set(range(num_samples))) < num_samples:
            raise ConfigError(f"shard: seed {seed}'s raw samples are not all in {folder}; generate them first "
                              "with one run of the same command without shard and with 'fastattn=[]' 'caches=[]' "
                              "'stacked=[]'")


def shard_rows_measured(seed_dir: Path, num_samples: int) -> dict[str, dict]:
    """The rows the shards of this seed measured on ``num_samples`` samples, by key."""
    done = {}
    for path in sorted((seed_dir / SHARDS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            rows = {r["key"]: r for r in record["rows"] if r["key"] != "raw"}
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{path}: not a shard's record ({type(error).__name__}: {error}); remove it and "
                              "its shard measures its rows again") from None
        if record.get("num_samples") == num_samples:
            done.update(rows)
    return done


def sample_seeds(cfg: DictConfig) -> list[int]:
    """The seeds every row runs on: ``seeds``, or ``samples.seed`` alone when it is unset."""
    seeds = cfg.get("seeds")
    if seeds is None:
        return [int(cfg.samples.seed)]
    seeds = list(seeds)
    if not seeds or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be a list of distinct integers >= 0 (or null: samples.seed), got {seeds}")
    return seeds


def run_seed(pipe, cfg: DictConfig, rows: list[dict], device, conditions, out_dir: Path, seed_dir: Path,
             ratios, small, started: float, write_report, shard: tuple[int, int] | None = None,
             shard_measured: dict[str, dict] | None = None) -> dict:
    """Every row on one sample seed (``cfg.samples.seed``), into ``seed_dir``; the table after each row
    (a shard writes only its own record, ``shards/<i>of<n>.json``, and a run without shard gathers them)."""
    previous = json.loads((seed_dir / "compare.json").read_text()) if (seed_dir / "compare.json").is_file() else {}
    indices = list(range(int(cfg.samples.num)))
    # a row measured on another number of samples is measured again (its finished samples are kept)
    done = {r["key"]: r for r in previous.get("rows", [])} if previous.get("num_samples") == len(indices) else {}
    done = (shard_measured or {}) | done
    if shard is not None:
        shard_file = seed_dir / SHARDS_DIR / f"{shard[0]}of{shard[1]}.json"
        write_report = partial(_write_shard, shard_file)
    record = {"kind": "compare_caches", "model": cfg.model.name, "solver": cfg.solver.name,
              "num_steps": int(cfg.solver.num_steps), "guidance_scale": float(cfg.guidance_scale),
              "num_samples": len(indices), "batch_size": int(cfg.samples.batch_size), "seed": int(cfg.samples.seed),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch_threads": torch.get_num_threads(), "rows": []}
    raw_compute = None
    for number, row in enumerate(rows, 1):
        if row["key"] in done:
            print(f"seed {cfg.samples.seed}, row {number}/{len(rows)} {row['key']}: finished in an earlier run, kept")
            result = done[row["key"]]
        else:
            print(f"seed {cfg.samples.seed}, row {number}/{len(rows)} {row['key']}: {len(indices)} samples")
            made = generate_row(pipe, row, cfg, device, conditions, indices, seed_dir, ratios, out_dir / "plans")
            compute = made["compute"]
            images = sample_array(path_inside(seed_dir / "samples", row["key"]), indices)
            raw = None if row["key"] == "raw" else sample_array(seed_dir / "samples" / "raw", indices)
            result = {**{k: row[k] for k in ("key", "method", "setting")},
                      "flops_per_sample": per_sample(compute, "flops"),
                      "attention_flops_per_sample": per_sample(compute, "attention_flops"),
                      "seconds_per_sample": compute["seconds"] / compute["samples"] if compute.get("samples") else None,
                      "plan_attn_flops_fraction": made["plan_attn_flops_fraction"],
                      **({"cache": row["cache"]} if row["cache"] else {}),
                      **measure(cfg, images, raw, small)}
        if (seed_dir / "samples" / row["key"] / TRACE_FILE).is_file():
            result["trace"] = f"samples/{row['key']}/{TRACE_FILE}"
        if row["key"] == "raw":
            raw_compute = result
        if raw_compute and result.get("flops_per_sample") and raw_compute.get("flops_per_sample"):
            result["compute"] = result["flops_per_sample"] / raw_compute["flops_per_sample"]
            result["attn_fraction"] = result["attention_flops_per_sample"] / raw_compute["attention_flops_per_sample"]
        record["rows"].append(result)
        write_report(dict(record, wall_seconds=time.perf_counter() - started, complete=False), seed_dir)
    record.update(wall_seconds=time.perf_counter() - started, complete=True)
    write_report(record, seed_dir)
    return record


def _write_shard(path: Path, record: dict, seed_dir: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)


def run_compare(cfg: DictConfig) -> dict:
    """Generate and measure every row not finished yet on each seed; write each seed's table after each
    row, then the verdict per seed and held out. Returns ``{"seeds", "records" (per seed), "held_out"}``."""
    from . import harness_module
    from . import metrics as m

    write_report = harness_module("analysis.compare_caches").write_report
    seeds_report = harness_module("analysis.compare_seeds")
    validate_config(cfg)
    check_compare_config(cfg)
    seeds = sample_seeds(cfg)
    shard = parse_shard(cfg)
    rows = shard_rows(comparison_rows(cfg), shard)
    # before the model is built: raw's samples for a shard, and the shards' records (read once)
    if shard is not None:
        check_raw_finished(Path(cfg.output_dir), seeds, int(cfg.samples.num))
    shard_measured = {seed: shard_rows_measured(Path(cfg.output_dir) / f"seed{seed}", int(cfg.samples.num))
                      for seed in seeds}
    out_dir, device, started, conditions, pipe = open_job(cfg)
    small = None
    if cfg.model.get("builtin") == "default" and cfg.metrics.fid_small:
        classifier = m.default_classifier()
        small = (classifier, m.small_reference_stats(classifier, int(cfg.metrics.small_reference_num),
                                                     int(cfg.metrics.small_reference_seed), int(cfg.model.resolution)))
    ratios = (mag_ratios(pipe, cfg, conditions, device, out_dir)
              if any(r["cache"] and r["cache"]["kind"] == "mag_cache" for r in rows) else None)
    records = {}
    for seed in seeds:
        seed_cfg = OmegaConf.merge(cfg, {"samples": {"seed": seed}})
        records[seed] = run_seed(pipe, seed_cfg, rows, device, conditions, out_dir, out_dir / f"seed{seed}",
                                 ratios, small, started, write_report, shard, shard_measured[seed])
        if shard is None:
            print((out_dir / f"seed{seed}" / "compare.md").read_text())
    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]}: its rows are measured; run the command without shard to gather "
              "every row into the tables and the verdict")
        return {"seeds": seeds, "records": records, "held_out": None}
    summary = seeds_report.write_seeds_report(records, out_dir)
    print((out_dir / "seeds.md").read_text())
    return {"seeds": seeds, "records": records, "held_out": summary}


# --help lists the image models the hooks are driven on
ACCEPTS = {"model": {"family": list(cache_hooks.FAMILIES)}, "threshold": {"metric": ["mrae"]},
           "search": {"algorithm": ["greedy"]}}
main = hydra_app("compare_caches", run_compare, accepts=ACCEPTS)

if __name__ == "__main__":
    main()
