"""The harness around the main job: presets, sweeps and tables, metrics stage, W&B, early errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from experiments.infra.app import ConfigError
from experiments.run import run
from test_run import ROOT, SMALL, compose_cfg

PRESETS = {
    "table1_dit_512": ("dit_xl_2_512", "dpm_solver_50", 4.0, 50000, "raw,d1,d2,d3,d4,d5,d6"),
    "table1_pixart_1024": ("pixart_sigma_xl_1024", "dpm_solver_50", 4.5, 30000, "raw,d1,d2,d3,d4,d5,d6"),
    "table1_pixart_2k": ("pixart_sigma_xl_2k", "dpm_solver_50", 4.5, 30000, "raw,d1,d2,d3,d4,d5,d6"),
    "table5_dit_iddpm": ("dit_xl_2_512", "iddpm_250", 1.5, 50000, "raw,d1,d2,d3,d4"),
}


def compose_hydra(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_paper_presets_resolve(preset):
    model, solver, guidance, samples, thresholds = PRESETS[preset]
    cfg = compose_hydra([f"experiment={preset}"])
    assert (cfg.model.name, cfg.solver.name, cfg.guidance_scale, cfg.samples.num) == (model, solver, guidance, samples)
    assert cfg.hydra.sweeper.params.threshold == thresholds
    assert cfg.experiment_name == preset and cfg.metrics.name == "paper" and cfg.metrics.fid
    assert cfg.metrics.clip_score == ("pixart" in preset)
    assert cfg.metrics.latency.batch_size == {"table1_dit_512": 8, "table5_dit_iddpm": 12}.get(preset, 1)
    assert cfg.solver.num_steps == (250 if "iddpm" in preset else 50)


@pytest.mark.parametrize("preset,params", [
    ("fig9_techniques", {"technique": "all,ast,wars,asc", "threshold": "d1,d2,d3,d4,d5,d6"}),
    ("fig9_steps", {"solver.num_steps": "20,30,40,50", "threshold": "d1,d2,d3,d4,d5,d6"}),
    ("fig9_residual", {"technique": "wars,wa", "threshold": "d1,d2,d3,d4,d5,d6"}),
])
def test_ablation_presets_sweep_what_the_figure_varies(preset, params):
    cfg = compose_hydra([f"experiment={preset}"])
    assert dict(cfg.hydra.sweeper.params) == params and cfg.model.name == "dit_xl_2_512"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_point_of_every_preset_validates(preset):
    """Every point a preset sweeps composes and validates (thresholds carry their metric, search
    options fit the model)."""
    import itertools

    from experiments.infra.config import validate_config

    params = compose_hydra([f"experiment={preset}"]).hydra.sweeper.params
    axes = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    for point in itertools.product(*axes):
        validate_config(compose_hydra([f"experiment={preset}", *point]))


@pytest.mark.parametrize("preset,model,sweep", [
    ("v2_sd3_1024", "sd3_medium_1024", {"threshold": "rse_0,rse_0.2,rse_0.6"}),
    ("v2_flux_2048", "flux_dev_2048", {"threshold": "rse_0,rse_0.2,rse_1.0"}),
    ("v2_ablation_methods", "sd3_medium_1024",
     {"threshold": "rse_0.6", "search": "headwise_aa,headwise_aa_oc,headwise_aa_oc_cfg,headwise"}),
    ("v2_ablation_constraint", "sd3_medium_1024", {"threshold": "rse_0.6", "search.head_coefficient": "null,1,1.5,2"}),
])
def test_v2_presets_sweep_what_the_paper_varies(preset, model, sweep):
    cfg = compose_hydra([f"experiment={preset}"])
    assert dict(cfg.hydra.sweeper.params) == sweep and cfg.model.name == model and cfg.experiment_name == preset
    assert cfg.metrics.hpsv2 and cfg.metrics.clip_score and cfg.metrics.lpips and cfg.search.algorithm == "headwise"
    methods = {name: compose_hydra([f"experiment={preset}", f"search={name}"]).search
               for name in ("headwise_aa", "headwise_aa_oc", "headwise_aa_oc_cfg", "headwise")}
    assert [(s.cache, s.cfg_sharing, s.residual_sharing) for s in methods.values()] == [
        (False, False, False), (True, False, False), (True, True, False), (True, True, True)]


def test_every_group_option_composes():
    for group in ("model", "solver", "threshold", "technique", "metrics", "data", "logger"):
        for option in sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")):
            cfg = compose_hydra([f"{group}={option}"])
            assert cfg[group].name == option or group == "threshold" and option.startswith("d")


def test_slurm_launcher_option():
    cfg = compose_hydra(["hydra/launcher=slurm_gpu"])
    assert "submitit" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.gpus_per_node == 1


def test_typed_schema_rejects_wrong_types():
    with pytest.raises(Exception, match="threshold.delta"):
        compose_hydra(["threshold.delta=abc"])
    with pytest.raises(Exception, match="model/nope"):
        compose_hydra(["model=nope"])


def test_sweep_then_tables(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "experiments.run", "-m", "model=tiny_dit", *SMALL, "samples.warmup=false",
           "metrics.latency.enabled=false",
           "threshold=d1,d6", "technique=all,ast", f"hydra.sweep.dir={sweep}", f"plan_cache_dir={tmp_path}/cache"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(sweep.glob("*/metrics.json"))
    assert len(runs) == 4
    assert {(json.loads(p.read_text())["threshold_name"], json.loads(p.read_text())["technique"]) for p in runs} == {
        ("d1", "all"), ("d1", "ast"), ("d6", "all"), ("d6", "ast")}
    out = tmp_path / "tables"
    tables = subprocess.run([sys.executable, "-m", "analysis.tables", str(sweep), "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert tables.returncode == 0, tables.stderr
    table1 = (out / "table1.md").read_text()
    assert "tiny_dit" in table1
    d1 = json.loads(next(p for p in runs if '"d1"' in p.read_text() and '"all"' in p.read_text()).read_text())
    row = next(line for line in table1.splitlines() if line.startswith("| D1"))
    assert f"{round(d1['attn_flops_fraction'] * 100)}%" in row


def _png_folder(folder, n, size, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


class MeanColour(torch.nn.Module):
    """A 3-feature stand-in for the Inception: mean colour per channel."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


class Logits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3, 5)

    def forward(self, x):
        return self.proj(x.mean(dim=(2, 3)))


def test_fid_and_is_against_a_reference_folder(tmp_path):
    _png_folder(tmp_path / "ref", 6, 12, 0)
    cfg = compose_cfg(["metrics.fid=true", "metrics.inception_score=true", f"data.reference_dir={tmp_path}/ref",
                       "metrics.latency.enabled=false"], tmp_path / "run")
    metrics = run(cfg, feature_extractor=MeanColour(), classifier=Logits())
    assert metrics["fid"] >= 0 and 1 - 1e-6 <= metrics["is"] <= 5  # IS >= 1 up to rounding
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["fid"] == metrics["fid"]


@pytest.mark.parametrize("overrides,match", [
    (["metrics.fid=true"], "metrics.fid needs data.reference_dir"),
    (["metrics.fid=true", "data.reference_dir=/no/such/folder"], "image folder not found: /no/such/folder"),
    (["metrics.fid=true", "data.reference_stats=/no/stats.npz"], "data.reference_stats: file not found"),
    (["metrics.clip_score=true"], "metrics.clip_score needs text prompts"),
    (["metrics.hpsv2=true"], "metrics.hpsv2 needs text prompts"),
    (["data.captions_file=/no/captions.txt"], "data.captions_file: file not found"),
])
def test_metric_inputs_fail_before_generation(tmp_path, overrides, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run(compose_cfg(overrides, tmp_path))
    assert not (tmp_path / "samples").exists()


def test_missing_inception_weights_fail_early_with_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("FASTATTN_INCEPTION_WEIGHTS", raising=False)
    _png_folder(tmp_path / "ref", 2, 8, 0)
    with pytest.raises(ConfigError, match="weights-inception") as info:  # one line at the command line
        run(compose_cfg(["metrics.fid=true", f"data.reference_dir={tmp_path}/ref"], tmp_path / "run"))
    assert "\n" not in str(info.value) and not (tmp_path / "run" / "samples").exists()


def test_wandb_offline_writes_a_run_directory(tmp_path):
    run(compose_cfg(["logger=offline", "metrics.latency.enabled=false"], tmp_path))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].iterdir())


def test_a_logger_that_cannot_start_never_stops_the_run(tmp_path, monkeypatch):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("no service")

    monkeypatch.setattr(wandb, "init", broken)
    metrics = run(compose_cfg(["logger=online", "metrics.latency.enabled=false"], tmp_path))
    assert (tmp_path / "metrics.json").exists() and metrics["attn_flops_fraction"] > 0


def test_without_raw_comparison_only_compressed_samples_are_made(tmp_path):
    metrics = run(compose_cfg(["samples.compare_raw=false", "metrics.latency.enabled=false"], tmp_path))
    assert not (tmp_path / "samples" / "raw").exists() and len(list((tmp_path / "samples" / "fastattn").glob("*.png"))) == 3
    assert "sample_psnr_db" not in metrics and metrics["generated"].keys() == {"fastattn"}


def test_stages_rerun_alone_from_what_the_previous_wrote(tmp_path):
    first = run(compose_cfg(["metrics.latency.enabled=false"], tmp_path))
    again = run(compose_cfg(["metrics.latency.enabled=false", "stages=[evaluate]"], tmp_path))
    for key in ("attn_flops_fraction", "sample_psnr_db", "ssim", "sample_mean_relative_error", "plan"):
        assert again[key] == first[key]
    assert run(compose_cfg(["stages=[search]"], tmp_path / "s")) == {}
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"plan.json", "plan_heatmap.png", "search.json", "plan_cache"}
    with pytest.raises(ConfigError, match="generate reads plan.json, which is not in .*: run the search stage"):
        run(compose_cfg(["stages=[generate]"], tmp_path / "empty"))  # before any model is built
    with pytest.raises(ValueError, match="stages must be a non-empty subset"):
        run(compose_cfg(["stages=[sample]"], tmp_path / "bad"))


def test_missing_clip_weights_fail_before_the_model_loads(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub reads the constant
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=pixart_sigma_xl_1024", "metrics.clip_score=true", "logger=disabled"])
    cfg.output_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="CLIP weights ViT-L-14/openai not cached") as info:
        run(cfg)
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()
