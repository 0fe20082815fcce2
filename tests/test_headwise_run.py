"""The main job with the head-wise search on tiny SD3 / FLUX, and the configs that go with it."""

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_run import ROOT, compose_cfg

from experiments.infra.app import ConfigError
from experiments.infra.config import validate_config
from experiments.run import run
from fastattn import CompressionPlan, HeadPlan

V2 = ["search=headwise", "solver=flow_euler_28", "threshold=rse_0.6", "metrics.latency.enabled=false"]


@pytest.mark.parametrize("model", ["tiny_sd3", "tiny_flux"])
def test_main_job_with_the_headwise_search(tmp_path, model):
    metrics = run(compose_cfg([f"model={model}", *V2], tmp_path))
    plan = CompressionPlan.load(tmp_path / "plan.json")
    assert isinstance(plan, HeadPlan) and plan.num_steps == 5 and plan.search["algorithm"] == "headwise"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["technique"] == "headwise" and saved["search"] == "headwise"
    assert saved["attn_sparsity"] == pytest.approx(plan.attention_flops()["sparsity"]) and saved["ssim"] is not None
    windows = ("0.0625", "0.03125", "0.015625")
    assert set(saved["plan"]["counts"]) <= {"full", "cache", "cfg", *(f"arrow{rs}:{f}" for f in windows for rs in ("", "+rs"))}
    assert (tmp_path / "plan_heatmap.png").exists() and metrics["plan"]["source"] == "search"


@pytest.mark.parametrize("overrides,match", [
    (["model=tiny_sd3", "search=headwise"], "flow_euler goes with sd3 and flux"),
    (["model=tiny_flux", "solver=flow_euler_28"], "search=headwise for sd3 and flux"),
    (["model=tiny_dit", "search=headwise"], "search=headwise for sd3 and flux"),
    (["model=tiny_dit", "solver=flow_euler_28"], "flow_euler goes with sd3 and flux"),
    (["model=tiny_sd3", "search=headwise", "solver=flow_euler_28"],  # the default threshold, d2
     r"^threshold.metric: 'mrae' \(threshold d2\) is a DiTFastAttn threshold; search=headwise needs an rse "
     r"threshold \(rse_0, rse_0.2, rse_0.6, rse_1.0\)$"),
    (["model=tiny_dit", "threshold=rse_0.2"],
     r"^threshold.metric: 'rse' \(threshold rse_0.2\) is a DiTFastAttnV2 budget; search=greedy needs an mrae "
     r"threshold \(d0, d1, d2, d3, d4, d5, d6, raw\)$"),
    (["model=tiny_dit", "threshold.metric=mse"], "threshold.metric must be one of mrae, rse, got 'mse'"),
])
def test_mismatched_model_solver_search_and_threshold_are_named(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(compose_cfg(overrides, tmp_path))


def test_every_threshold_names_the_error_it_bounds():
    metrics = {path.stem: OmegaConf.load(path).metric for path in (ROOT / "conf" / "threshold").glob("*.yaml")}
    assert metrics == {**{f"d{k}": "mrae" for k in range(7)}, "raw": "mrae",
                       **{name: "rse" for name in ("rse_0", "rse_0.2", "rse_0.6", "rse_1.0")}}


@pytest.mark.parametrize("model,pipeline_id", [("sd3_medium_1024", "stabilityai/stable-diffusion-3-medium-diffusers"),
                                               ("flux_dev_1024", "black-forest-labs/FLUX.1-dev"),
                                               ("flux_dev_2048", "black-forest-labs/FLUX.1-dev")])
def test_real_model_configs_validate(tmp_path, model, pipeline_id):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", "search=headwise", "solver=flow_euler_28",
                                            "threshold=rse_0.2", "output_dir=unused"])
    validate_config(cfg)
    assert cfg.model.pipeline_id == pipeline_id


def test_the_search_takes_the_models_measured_latency_table(tmp_path, monkeypatch):
    from experiments.infra.config import latency_table_path
    from fastattn.headwise import LatencyTable, arrow
    from fastattn.headwise.methods import FULL

    monkeypatch.chdir(tmp_path)  # the shipped tables are found from any working directory
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        sd3 = compose("config", overrides=["model=sd3_medium_1024", "search=headwise", "solver=flow_euler_28",
                                           "output_dir=unused"])
        mine = compose("config", overrides=["model=flux_dev_2048", "search=headwise", "solver=flow_euler_28",
                                            "threshold=rse_0.2", "output_dir=unused",
                                            f"search.latency_table={tmp_path / 'mine.json'}"])
        none = compose("config", overrides=["model=flux_dev_1024", "search=headwise", "solver=flow_euler_28",
                                            "output_dir=unused"])
    table = LatencyTable.load(latency_table_path(sd3))
    assert table.cost(FULL, 4096, 333) == 1 and table.cost(arrow(0.0625), 4096, 333) > 0.5  # measured, not FLOPs
    assert latency_table_path(none) is None
    with pytest.raises(ValueError, match="latency table not found: .*mine.json"):
        validate_config(mine)


@pytest.mark.parametrize("preset,table", [("v2_ablation_methods", "table_v2_methods"),
                                          ("v2_ablation_constraint", "table_v2_constraint")])
def test_a_tiny_sweep_of_each_v2_ablation_produces_its_table(tmp_path, preset, table):
    import itertools

    from analysis.tables import load_records
    from analysis.tables_v2 import build_tables

    tiny = ["model=tiny_sd3", "device=cpu", "metrics=basic", "metrics.latency.enabled=false", "solver.num_steps=3",
            "calibration.num_samples=1", "samples.num=2"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        params = compose("config", overrides=[f"experiment={preset}"], return_hydra_config=True).hydra.sweeper.params
    axes = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    points = list(itertools.product(*axes))
    for i, point in enumerate(points):  # what `python -m experiments.run -m experiment=...` runs, in-process
        run(compose_cfg([f"experiment={preset}", *tiny, *point], tmp_path / str(i)))
    rows = build_tables(load_records(tmp_path))[table].rows
    assert len(rows) == len(points) + (table == "table_v2_methods")  # + the Original row (no delta = 0 run here)
    compressed = [row for row in rows if row[1] != "Original"]
    assert all(row[2] != "–" and row[4] != "–" for row in compressed)  # sparsity and SSIM of every point
