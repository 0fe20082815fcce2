"""The evidence table of the built-in model: DiTFastAttn at each threshold, each single technique
over its threshold sweep, and the budget search (search=budget) at each FLOPs budget, measured on
the same seeds against one shared set of raw samples.

Writes ``evidence.json``, ``evidence.md`` and ``evidence.png`` (from ``analysis.evidence``) into the
run directory, plus ``samples/<name>/`` PNG folders that a re-run resumes from.

    python -m experiments.evidence                                     # conf/evidence.yaml
    python -m experiments.evidence solver.num_steps=10 samples.num=64
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig, OmegaConf

from fastattn import apply_fastattn, remove_fastattn
from fastattn.models import get_adapter
from fastattn.utils.paths import path_inside, slug

from .infra.app import CONF_DIR, ConfigError, hydra_app
from .infra.config import check_threshold_metric, validate_config
from .infra.opening import open_job
from .stages.fingerprint import sample_fingerprint
from .stages.generate import generate, sample_array
from .stages.search import find_or_search_plan

COMBINED = "all"
FAST = "fast"  # the combined technique's rows searched with search=fast
# budget_techniques -> the rows' technique: V1's methods, and with forecast; AST and forecast alone
BUDGET_ROWS = {"all": "budget", "all_forecast": "budget_forecast", "forecast": "budget_reuse"}


def group_option(group: str, name: str) -> dict:
    """conf/<group>/<name>.yaml without its defaults list (threshold and technique options)."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"{group}: unknown option {name!r} (choose from {', '.join(options)})")
    option = OmegaConf.to_container(OmegaConf.load(path))
    option.pop("defaults", None)
    return option


def threshold_option(text: str) -> dict:
    """A threshold preset (``d2``), or a number: Algorithm 1's delta itself (``0.175``, past D6)."""
    try:
        delta = float(text)
    except ValueError:
        return group_option("threshold", text)
    if not 0 <= delta < 1:
        raise ConfigError(f"threshold: a delta must be in [0, 1), got {text}")
    return {"name": f"delta{delta:g}", "delta": delta, "metric": "mrae"}


def evidence_points(cfg: DictConfig) -> list[tuple[str, str]]:
    """(technique, threshold) pairs: the combined method at every threshold, then the single techniques
    threshold by threshold (an interrupted run has every technique at its first thresholds)."""
    points = [(COMBINED, str(t)) for t in cfg.thresholds]  # a preset name, or a delta (0.175: past D6)
    points += [(FAST, str(t)) for t in cfg.get("fast_thresholds") or []]
    points += [(tech, str(t)) for t in cfg.single_thresholds for tech in cfg.single_techniques]
    for tech, t in points:  # every name resolves, and every threshold fits the greedy search, before hours of work
        check_threshold_metric(point_config(cfg, tech, t), FAST if tech == FAST else "greedy")
    return points


def budget_points(cfg: DictConfig) -> list[tuple[str, str, float]]:
    """(row name, technique, budget): the budget search (search=budget) at each of ``budgets`` with
    each candidate set of ``budget_techniques`` (all: V1's methods; all_forecast: and forecast;
    forecast: forecast and AST alone)."""
    points = []
    for technique in cfg.get("budget_techniques") or []:
        name = BUDGET_ROWS.get(technique)
        if name is None:
            raise ConfigError(f"budget_techniques: {technique!r} is not one of {', '.join(BUDGET_ROWS)}")
        for budget in cfg.get("budgets") or []:
            points.append((name, technique, budget))
    for name, technique, budget in points:  # every budget is reachable, before hours of work
        validate_config(budget_config(cfg, technique, budget))
    return points


def budget_config(cfg: DictConfig, technique: str, budget) -> DictConfig:
    return OmegaConf.merge(cfg, {"technique": group_option("technique", technique),
                                 "search": {**group_option("search", "budget"), "budget": budget},
                                 "plan_path": None})


def check_evidence_config(cfg: DictConfig) -> None:
    if cfg.model.get("builtin") != "default":
        raise ConfigError(f"evidence: FID-small / IS-small need the built-in model (model=small_dit), got {cfg.model.name}")
    if not (cfg.metrics.fid_small and cfg.metrics.is_small):
        raise ConfigError("evidence: needs metrics.fid_small=true and metrics.is_small=true (metrics=small)")
    if int(cfg.samples.num) < 2:
        raise ConfigError(f"evidence: samples.num must be >= 2 for FID-small, got {cfg.samples.num}")
    if not cfg.thresholds:
        raise ConfigError("evidence: thresholds is empty")


def point_config(cfg: DictConfig, technique: str, threshold: str) -> DictConfig:
    """The main job's config of one row: a fast row is DiTFastAttn's methods under search=fast."""
    if technique == FAST:
        return OmegaConf.merge(cfg, {"technique": group_option("technique", COMBINED),
                                     "search": group_option("search", FAST),
                                     "threshold": threshold_option(threshold), "plan_path": None})
    return OmegaConf.merge(cfg, {"technique": group_option("technique", technique),
                                 "threshold": threshold_option(threshold), "plan_path": None})


def measure(cfg: DictConfig, images, raw, classifier, reference) -> dict:
    from . import metrics as m

    batch = int(cfg.metrics.feature_batch_size)
    out = m.compute_small_metrics(images, classifier, reference, batch_size=batch)
    if raw is not None:
        out["psnr_db"] = m.compute_psnr(raw, images, batch_size=batch)
        out["ssim"] = m.compute_ssim(raw, images, batch_size=batch)
    return out


def run_evidence(cfg: DictConfig) -> dict:
    """Generate and measure every point; write the report. Returns the evidence record."""
    from . import harness_module
    from . import metrics as m

    write_report = harness_module("analysis.evidence").write_report

    validate_config(cfg)
    check_evidence_config(cfg)
    points = evidence_points(cfg)
    budgets = budget_points(cfg)
    out_dir, device, started, conditions, pipe = open_job(cfg)
    sample_args = dict(seed=int(cfg.samples.seed), num_steps=int(cfg.solver.num_steps),
                       guidance_scale=float(cfg.guidance_scale), batch_size=int(cfg.samples.batch_size),
                       device=device)
    indices = list(range(int(cfg.samples.num)))
    classifier = m.default_classifier()
    reference = m.small_reference_stats(classifier, int(cfg.metrics.small_reference_num),
                                        int(cfg.metrics.small_reference_seed), int(cfg.model.resolution))

    generate(pipe, conditions, indices, out_dir / "samples" / "raw", desc="raw", **sample_args,
             fingerprint=sample_fingerprint(cfg, None))
    raw = sample_array(out_dir / "samples" / "raw", indices)
    rows = [{"technique": "raw", "threshold": "raw", "delta": None, "attn_flops_fraction": 1.0,
             **measure(cfg, raw, None, classifier, reference)}]
    describe = get_adapter(pipe.transformer).describe(pipe.transformer)
    record = {"kind": "evidence", "model": cfg.model.name, "solver": cfg.solver.name,
              "num_steps": int(cfg.solver.num_steps), "guidance_scale": float(cfg.guidance_scale),
              "num_samples": len(indices), "reference_crops": int(cfg.metrics.small_reference_num),
              "calibration_samples": int(cfg.calibration.num_samples),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch_threads": torch.get_num_threads(), "rows": rows}
    runs = [(technique, threshold, point_config(cfg, technique, threshold), None) for technique, threshold in points]
    runs += [(name, f"b{budget:g}", budget_config(cfg, technique, budget), float(budget))
             for name, technique, budget in budgets]
    for technique, threshold, point, budget in runs:
        began = time.perf_counter()
        plan, source = find_or_search_plan(pipe, point, device, conditions)
        plan.check_model(describe, num_steps=int(cfg.solver.num_steps))
        folder = path_inside(out_dir / "samples", slug(f"{technique}_{threshold}"))
        apply_fastattn(pipe, plan)
        try:
            generate(pipe, conditions, indices, folder, desc=f"{technique} {threshold}", **sample_args,
                     fingerprint=sample_fingerprint(cfg, plan))
        finally:
            remove_fastattn(pipe)
        rows.append({"technique": technique, "threshold": threshold,
                     "delta": None if budget is not None else float(point.threshold.delta), "budget": budget,
                     "attn_flops_fraction": plan.attention_flops()["fraction"], "plan_source": source,
                     "counts": plan.counts(), "seconds": time.perf_counter() - began,
                     "search_raw_generations": (plan.search.get("cost") or {}).get("raw_generations"),
                     **measure(cfg, sample_array(folder, indices), raw, classifier, reference)})
        write_report(dict(record, wall_seconds=time.perf_counter() - started, complete=False), out_dir)
    record.update(wall_seconds=time.perf_counter() - started, complete=True)
    write_report(record, out_dir)
    print((out_dir / "evidence.md").read_text())
    return record


# --help lists these options: the built-in model, its solvers, the greedy search and its thresholds
ACCEPTS = {"model": {"builtin": ["default"]}, "solver": {"scheduler": ["dpm_solver", "ddim", "iddpm"]},
           "threshold": {"metric": ["mrae"]}, "search": {"algorithm": ["greedy"]}}  # budget rows: budgets=[...], fast: fast_thresholds=[...]
main = hydra_app("evidence", run_evidence, accepts=ACCEPTS)

if __name__ == "__main__":
    main()
