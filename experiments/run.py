"""The main job: search a plan, generate raw and compressed samples with the same seeds, measure.

Writes into the Hydra run directory: ``plan.json`` and ``plan_heatmap.png``,
``samples/{raw,fastattn}/`` (PNGs and a manifest; re-running into the same directory resumes),
``samples_grid.png`` (raw row above the compressed row) and ``metrics.json``; logs to W&B when
it is on; prints a short table.

One run at a time holds a run directory (experiments/infra/run_folder.py). A resumed run keeps only
samples made with the same plan, seeds, conditions, steps, guidance, solver, model and fastattn
version (experiments/stages/fingerprint.py; ``samples.on_mismatch``), re-makes finished samples that do
not decode and removes temporaries an interrupted run left.

    python -m experiments.run                                   # tiny DiT on the CPU
    python -m experiments.run model=pixart_sigma_xl_1024 threshold=d4
    python -m experiments.run -m experiment=table1_dit_512      # a paper preset, as a sweep
    torchrun --nproc_per_node 2 -m experiments.run hydra.run.dir=outputs/run/two_gpus   # ranks share the work

Under torchrun or an srun step (experiments/infra/distributed.py) every rank searches on its share of the
calibration samples, generates and measures its share of the samples; rank 0 alone writes the
run's files, logs and prints.
"""

from __future__ import annotations

import json
import platform
from contextlib import nullcontext
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import fastattn
from fastattn import CompressionPlan, LayerPlan, apply_fastattn, remove_fastattn
from fastattn.family import OtherResolutionError
from fastattn.models import get_adapter
from fastattn.utils.io import atomic_save_image, atomic_write_json, read_json, remove_orphaned_temporaries

from . import harness_module
from .infra import distributed
from .infra.app import ConfigError, discard_run_dir, hydra_app
from .infra.conditions import Conditions, load_prompts, to_device
from .infra.config import FAMILIES, input_errors, use_fa4, validate_config
from .infra.context_config import context_degrees
from .infra.context_groups import context_groups
from .infra.logger import started_logger
from .infra.opening import job_device
from .infra.pipelines import build_pipeline
from .infra.progress import step_progress
from .infra.run_folder import exclusive
from .metrics.folder import UnreadableImage
from .stages.evaluate import check_metric_inputs, comparison_grid, evaluate_samples, nonfinite_samples
from .stages.fingerprint import check_before_build, check_samples, sample_fingerprint
from .stages.generate import generate, recorded_totals, sample_array
from .stages.latency import measure_latency
from .stages.search import find_or_search_plan


def run(cfg: DictConfig, *, feature_extractor=None, classifier=None) -> dict:
    """The configured stages of one run; each reads only what the previous one wrote in the run
    directory, so ``stages=[evaluate]`` re-runs the metrics alone. ``feature_extractor`` /
    ``classifier`` replace the Inception for FID / IS. Returns the metrics (empty without evaluate).
    """
    validate_config(cfg)
    use_fa4(cfg)
    threads = torch.get_num_threads()
    try:
        with distributed.joined():
            return _run_stages(cfg, feature_extractor, classifier)
    finally:
        torch.set_num_threads(threads)  # cpu_threads holds for this run only


def check_ranks(cfg: DictConfig) -> None:
    """All ranks run rank 0's config into rank 0's output directory, which they must all see.
    (Under torchrun each rank composes its own config: a run directory named by the clock can differ.)"""
    own_dir, cfg.output_dir = cfg.output_dir, distributed.broadcast(cfg.output_dir)
    if own_dir != cfg.output_dir:  # the folder Hydra named for this rank stays unused: not left behind
        discard_run_dir()
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("output_dir")
    distributed.check_same_config(config)
    distributed.check_shared_dir(Path(cfg.output_dir))


def _run_stages(cfg: DictConfig, feature_extractor, classifier) -> dict:
    if distributed.world_size() > 1:
        check_ranks(cfg)
    stages = list(cfg.stages)
    out_dir = Path(cfg.output_dir)
    check_stage_inputs(stages, out_dir)
    if "evaluate" in stages:
        with input_errors():
            check_metric_inputs(cfg, custom_features=feature_extractor is not None)
    with input_errors("data.captions_file"):
        conditions = Conditions(cfg.model, load_prompts(cfg.data.captions_file), cfg.data.class_labels)
    with exclusive(out_dir):  # makes the folder: only once the config holds
        return _locked_stages(cfg, stages, out_dir, conditions, feature_extractor, classifier)


def _locked_stages(cfg: DictConfig, stages: list[str], out_dir: Path, conditions: Conditions,
                   feature_extractor, classifier) -> dict:
    remove_orphans(out_dir)
    check_before_build(cfg, stages, out_dir, conditions)
    device = job_device(cfg)
    started = time.perf_counter()
    pipe = build_pipeline(cfg.model, cfg.solver, device) if {"search", "generate"} & set(stages) else None
    if "search" in stages:
        search_stage(cfg, pipe, device, conditions, out_dir)
    if "generate" in stages:
        generate_stage(cfg, pipe, device, conditions, out_dir)
    del pipe  # free the accelerator for the metric backbones
    if "evaluate" not in stages:
        return {}
    with started_logger(cfg, out_dir, enabled=distributed.is_main()) as logger:
        metrics = evaluate_stage(cfg, device, conditions, out_dir, started, feature_extractor, classifier)
        logger.log(loggable(metrics), images={"samples_grid": out_dir / "samples_grid.png",
                                              "plan_heatmap": out_dir / "plan_heatmap.png"})
    if distributed.is_main():
        print(format_summary(metrics, out_dir))
    return metrics


RECORD_BYTES = 16 * 2**20  # generation.json / search.json: a few kB; far larger is not a record of ours
# What each stage reads from the run directory, and the stage that writes it.
STAGE_INPUTS = {"generate": {"plan.json": "search"},
                "evaluate": {"plan.json": "search", "search.json": "search", "generation.json": "generate"}}


def check_stage_inputs(stages, out_dir: Path) -> None:
    """Before any model is built: every file a stage reads is there, or an earlier stage of this run writes it."""
    for stage in stages:
        for name, writer in STAGE_INPUTS.get(stage, {}).items():
            if writer not in stages and not (out_dir / name).is_file():
                raise ConfigError(f"stages: {stage} reads {name}, which is not in {out_dir}: "
                                  f"run the {writer} stage into it first (hydra.run.dir={out_dir})")


def remove_orphans(out_dir: Path) -> None:
    """Temporaries an interrupted run left in the run and sample folders; rank 0 removes them
    before any rank writes there."""
    if distributed.is_main():
        for folder in (out_dir, *(p for p in (out_dir / "samples").glob("*") if p.is_dir())):
            remove_orphaned_temporaries(folder)
    distributed.barrier()


def _read_stage_output(out_dir: Path, name: str) -> Path:
    return out_dir / name  # there: check_stage_inputs, or the stage before wrote it


def search_stage(cfg, pipe, device, conditions, out_dir: Path) -> None:
    """plan.json, plan_heatmap.png and search.json (where the plan came from)."""
    plan_heatmap = harness_module("analysis.heatmaps").plan_heatmap
    plan, source = find_or_search_plan(pipe, cfg, device, conditions)
    with input_errors("plan_path" if source == "file" else None):  # a given plan that does not fit the model
        plan.check_model(get_adapter(pipe.transformer).describe(pipe.transformer), num_steps=int(cfg.solver.num_steps))
    if {"generate", "evaluate"} & set(cfg.stages):  # before plan.json is replaced: samples of another plan stop here
        check_samples(cfg, out_dir / "samples" / "fastattn", plan, conditions, can_regenerate="generate" in cfg.stages)
    if distributed.is_main():
        plan.save(out_dir / "plan.json")
        title = f"{cfg.model.name} {cfg.threshold.name}"
        plan_heatmap(plan, out_dir / "plan_heatmap.png", title=title)
        atomic_write_json(out_dir / "search.json", {"source": source, **search_record(plan)})
    distributed.barrier()  # the generate stage of every rank reads plan.json


def generate_stage(cfg, pipe, device, conditions, out_dir: Path) -> None:
    """samples/{raw,fastattn}/ and generation.json (counts and latency).

    Under parallel.context each context group makes one share of the samples on its split
    transformer, its member 0 writing them; the search before ran on the whole model (a plan
    depends on the model and settings, not on the ranks' layout: the plan cache holds across layouts)."""
    plan = CompressionPlan.load(_read_stage_output(out_dir, "plan.json"))
    plan.check_model(get_adapter(pipe.transformer).describe(pipe.transformer), num_steps=int(cfg.solver.num_steps))
    groups = context_groups(context_degrees(cfg))
    groups.split(pipe.transformer)
    sample_args = dict(seed=int(cfg.samples.seed), num_steps=int(cfg.solver.num_steps),
                       guidance_scale=float(cfg.guidance_scale))
    indices = list(range(cfg.samples.num))
    generated, latency, fingerprints = {}, {}, {}
    graphs = bool(cfg.get("cuda_graphs", False))
    # compressed first: a plan that cannot run here (its CFG layout, other_resolution=refuse) stops
    # the run at its first attention call, before any sample is made
    for name in ("fastattn", "raw") if cfg.samples.compare_raw else ("fastattn",):
        if name == "fastattn":
            # under context parallelism fastattn refuses what it cannot split (a head-wise plan): one line
            with input_errors("parallel.context") if groups.degrees.on else nullcontext():
                apply_fastattn(pipe, plan, cuda_graphs=graphs, other_resolution=str(cfg.other_resolution),
                               cache_dtype=cfg.get("cache_dtype"), cache_device=cfg.get("cache_device"))
        elif graphs:  # raw replays graphs too (each layer calls the model's own processor): same footing
            apply_fastattn(pipe, CompressionPlan.all_full(plan.num_steps, plan.num_layers), cuda_graphs=True)
        fingerprints[name] = sample_fingerprint(cfg, plan if name == "fastattn" else None)
        try:
            if cfg.samples.warmup:
                warm_up(pipe, conditions, indices[: cfg.samples.batch_size], device, **sample_args)
            generated[name] = generate(pipe, conditions, indices, out_dir / "samples" / name, desc=name,
                                       device=device, batch_size=int(cfg.samples.batch_size), **sample_args,
                                       rank=groups.index, world_size=groups.count,
                                       fingerprint=fingerprints[name], writes=groups.writes)
            # one GPU's latency, or one context group's (its members run each timed generation together)
            if cfg.metrics.latency.enabled and groups.in_first_group:
                latency[name] = time_generation(pipe, conditions, cfg, device, desc=f"latency {name}", **sample_args)
        except OtherResolutionError as error:  # at the first attention call: before any sample is made
            raise ConfigError(f"other_resolution: {error}") from None
        finally:
            remove_fastattn(pipe)
    # also waits for every share: evaluation needs them all; a context group's share counted once
    shares = [share for share in distributed.all_gather(generated if groups.writes else None) if share is not None]
    if distributed.is_main():
        if len(shares) > 1:
            generated = {name: {key: sum(share[name][key] for share in shares) for key in generated[name]}
                         | {"ranks": len(shares)} for name in generated}
        for name in generated:  # this invocation's counts beside those over every run that made the samples
            generated[name] |= recorded_totals(out_dir / "samples" / name, indices)
        atomic_write_json(out_dir / "generation.json",
                          {"generated": generated, "latency": latency, "fingerprint": fingerprints})
    distributed.barrier()


def evaluate_stage(cfg, device, conditions, out_dir: Path, started, feature_extractor, classifier) -> dict:
    """metrics.json and samples_grid.png from the plan and samples in ``out_dir``."""
    indices = list(range(cfg.samples.num))
    with input_errors():  # a truncated record or a missing sample: one line naming the file
        plan = CompressionPlan.load(_read_stage_output(out_dir, "plan.json"))
        generation = read_json(_read_stage_output(out_dir, "generation.json"), "generation record", RECORD_BYTES)
        search = read_json(_read_stage_output(out_dir, "search.json"), "search record", RECORD_BYTES)
        samples = {k: sample_array(out_dir / "samples" / k, indices) for k in generation["generated"]}
    nonfinite = nonfinite_samples({k: out_dir / "samples" / k for k in samples}, indices)
    try:
        quality = {"nonfinite_samples": nonfinite} if nonfinite else evaluate_samples(  # NaN images are not scored
            cfg, samples.get("raw"), samples["fastattn"], [conditions.prompt(i) for i in indices],
            device, feature_extractor=feature_extractor, classifier=classifier)
    except UnreadableImage as error:
        raise ConfigError(f"{error}; run the generate stage into {out_dir} again: it remakes samples "
                          "that do not decode") from None
    if not distributed.is_main():
        return distributed.broadcast(None)
    atomic_save_image(out_dir / "samples_grid.png", comparison_grid(samples))
    metrics = summarise(cfg, plan, search["source"], quality, generation["generated"], generation["latency"],
                        device, started) | {"fingerprint": generation.get("fingerprint")}
    atomic_write_json(out_dir / "metrics.json", metrics)
    return distributed.broadcast(metrics)


def warm_up(pipe, conditions: Conditions, indices, device, *, seed, num_steps, guidance_scale) -> None:
    """One untimed, unsaved generation: kernel compilation and allocator warm-up."""
    with torch.no_grad():
        pipe(**to_device(conditions.inputs(indices, seed, num_steps, guidance_scale), device))


def time_generation(pipe, conditions: Conditions, cfg: DictConfig, device, *, seed, num_steps, guidance_scale,
                    desc: str = "latency"):
    """Seconds per sample (end to end and in attention) over ``metrics.latency``'s warm-up and repeats,
    with a bar in timed runs."""
    settings = cfg.metrics.latency
    inputs = conditions.inputs(range(settings.batch_size), seed, num_steps, guidance_scale)
    with step_progress(pipe, settings.warmup + settings.repeats, desc, "runs") as progress:

        def run_once():
            progress.generation(1)
            with torch.no_grad():
                pipe(**to_device(dict(inputs, generator=[torch.Generator().manual_seed(seed + i)
                                                          for i in range(settings.batch_size)]), device))

        return measure_latency(pipe, run_once, batch_size=settings.batch_size, device=device,
                               warmup=settings.warmup, repeats=settings.repeats, attention=settings.attention)


def summarise(cfg, plan, plan_source, quality, generated, latency, device, started) -> dict:
    flops = plan.attention_flops()
    raw_lat, comp_lat = latency.get("raw", {}), latency.get("fastattn", {})
    return {
        "kind": "run",
        "model": cfg.model.name,
        "solver": cfg.solver.name,
        "scheduler": cfg.solver.scheduler,
        "num_steps": int(cfg.solver.num_steps),  # the steps run (the solver's name gives its default)
        "threshold": float(cfg.threshold.delta),
        "threshold_name": cfg.threshold.name,
        "technique": cfg.technique.name if isinstance(plan, LayerPlan) else "headwise",
        "experiment": cfg.experiment_name,
        "num_samples": int(cfg.samples.num),
        "seq_len": flops["seq_len"],
        "attn_flops_fraction": flops["fraction"],
        "attn_core_flops_fraction": flops["core_fraction"],
        "attn_sparsity": 1 - flops["core_fraction"],  # the V2 paper's "attention sparsity"
        "search": cfg.search.name if cfg.get("search") else "greedy",
        **quality,
        "latency_s": comp_lat.get("latency_s"),
        "attn_latency_s": comp_lat.get("attn_latency_s"),
        "raw_latency_s": raw_lat.get("latency_s"),
        "raw_attn_latency_s": raw_lat.get("attn_latency_s"),
        "latency_timer": comp_lat.get("timer"),
        "plan": {"source": plan_source, "counts": plan.counts(), "num_steps": plan.num_steps,
                 "num_layers": plan.num_layers, **search_record(plan)},
        "generated": generated,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "versions": {"fastattn": fastattn.__version__, "torch": torch.__version__,
                     "diffusers": _version("diffusers"), "python": platform.python_version()},
        "wall_seconds": time.perf_counter() - started,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def search_record(plan) -> dict:
    """What the plan's search cost, as metrics.json and search.json record it (None where the plan
    does not say: a plan searched before costs were counted, or one never searched)."""
    return {"search_algorithm": plan.search.get("algorithm"), "search_seconds": plan.search.get("seconds"),
            "search_raw_generations": (plan.search.get("cost") or {}).get("raw_generations")}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def loggable(metrics: dict) -> dict:
    """The flat numbers and labels of metrics.json (nested config and counts stay in the file)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def format_summary(m: dict, out_dir: Path) -> str:
    def num(key, fmt="{:.4f}", unit=""):
        return "–" if m.get(key) is None else fmt.format(m[key]) + unit

    def sample_note(*keys):  # FID / IS on fewer samples than they need: evaluate.MIN_SAMPLES
        flagged = set(keys) & set(m.get("indicative_only", []))
        return f"  (n = {m['num_samples']}: indicative only)" if flagged else ""

    rows = [
        ("attention FLOPs fraction", f"{m['attn_flops_fraction']:.3f}  (core {m['attn_core_flops_fraction']:.3f})"),
        ("methods (step x layer[ x head])", json.dumps(m["plan"]["counts"])),
        ("sample rel. error vs raw", num("sample_mean_relative_error")),
        ("PSNR / SSIM vs raw", f"{num('sample_psnr_db', '{:.2f}', ' dB')} / {num('ssim')}"),
        ("FID-small / IS-small (own classifier)", f"{num('fid_small', '{:.2f}')} / {num('is_small', '{:.2f}')}"
                                                  + sample_note("fid_small", "is_small")),
        ("FID / IS / CLIP", f"{num('fid', '{:.2f}')} / {num('is', '{:.2f}')} / {num('clip_score', '{:.2f}')}"
                            + sample_note("fid", "is")),
        (f"s/sample raw / fastattn ({m['latency_timer'] or 'off'})", f"{num('raw_latency_s')} / {num('latency_s')}"),
        ("attention s/sample raw / fastattn", f"{num('raw_attn_latency_s')} / {num('attn_latency_s')}"),
        ("plan", m["plan"]["source"] + (search_note(m["plan"]) if m["plan"]["source"] == "search" else "")),
        ("outputs", str(out_dir)),
    ]
    if m.get("nonfinite_samples"):  # every quality metric above is absent: say why
        rows.insert(0, ("NOT SCORED: NaN / inf samples", ", ".join(f"{k} {n} of {m['num_samples']}"
                                                                   for k, n in m["nonfinite_samples"].items())))
    head = f"fastattn | {m['model']} | {m['scheduler']}, {m['num_steps']} steps | " \
           f"{m['threshold_name']} (delta={m['threshold']}) | {m['technique']} | {m['num_samples']} samples | {m['device']}"
    width = max(len(k) for k, _ in rows)
    return "\n".join([head, "-" * len(head)] + [f"{k:<{width}}  {v}" for k, v in rows])


def search_note(plan: dict) -> str:
    """", search 21.0 s, 14.6 raw generations" (the second where the plan counted its cost)."""
    generations = plan.get("search_raw_generations")
    return f", search {plan['search_seconds']:.1f} s" + ("" if generations is None else f", {generations:.1f} raw generations")


ACCEPTS = {"model": {"family": FAMILIES}}  # --help lists the image models (the video job runs the others)
main = hydra_app("config", run, accepts=ACCEPTS)

if __name__ == "__main__":
    main()
