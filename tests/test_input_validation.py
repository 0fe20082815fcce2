"""Issue 33's inputs: every input file and setting is checked whole before any model is built,
with one line naming the file and the field; non-finite samples are flagged, never scored.

One test per finding: non-finite settings and latency costs (5), plan fields and sizes found late
(6), settings the model ignored (7), corrupt latency tables / plans / plan cache entries (8),
latency-table keys merged at 7 significant digits (9)."""

import json
import logging

import pytest
import torch
from hydra import compose, initialize_config_dir

import experiments.run as run_module
from experiments.infra.app import ConfigError
from experiments.infra.config import MAX_SAMPLES, validate_config
from experiments.run import format_summary, run
from fastattn import CompressionPlan
from fastattn.headwise import LatencyTable
from test_command_line import run_module as run_cli
from test_run import ROOT, compose_cfg


@pytest.fixture
def no_model(monkeypatch):
    """Building a pipeline fails the test: the input must be refused before."""
    def build_pipeline(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was refused")

    monkeypatch.setattr(run_module, "build_pipeline", build_pipeline)


def refused(cfg, *parts):
    """``run(cfg)`` fails with one ConfigError line holding every one of ``parts``."""
    with pytest.raises(ConfigError) as error:
        run(cfg)
    message = str(error.value)
    assert "\n" not in message and all(part in message for part in parts), message
    return message


# -- 5: non-finite inputs ----------------------------------------------------------------------

@pytest.mark.parametrize("setting,key", [("guidance_scale=inf", "guidance_scale"),
                                         ("guidance_scale=nan", "guidance_scale"),
                                         ("threshold.delta=nan", "threshold.delta"),
                                         ("window_size=inf", "window_size")])
def test_a_non_finite_setting_is_refused_before_any_model(tmp_path, no_model, setting, key):
    refused(compose_cfg([setting], tmp_path), f"{key} must be a finite number")


def test_a_non_finite_setting_is_one_line_on_the_command_line(tmp_path):
    proc = run_cli("experiments.run", "guidance_scale=inf", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1 and proc.stderr.strip() == "guidance_scale must be a finite number, got inf"


def latency_table(tmp_path, text):
    path = tmp_path / "latency_table.json"
    path.write_text(text)
    return path


def headwise_cfg(tmp_path, table):
    return compose_cfg(["model=tiny_flux", "search=headwise", "solver=flow_euler_28", "threshold=rse_0.2",
                        "model.tiny.sample_size=16", "model.resolution=16", f"search.latency_table={table}"],
                       tmp_path)


@pytest.mark.parametrize("cost,key", [("1e999", "arrow:0.0625"),  # how an overflow reads back: inf
                                      ("-0.3", "arrow:0.0625"), ('"inf"', "arrow:0.0625"), ("0", "arrow:0.0625"),
                                      ("true", "cache")])
def test_a_latency_table_with_a_bad_cost_is_refused(tmp_path, no_model, cost, key):
    table = latency_table(tmp_path, text=f'{{"relative_latency": {{"full": 1.0, "{key}": {cost}}}}}')
    message = refused(headwise_cfg(tmp_path, table), str(table), f"relative_latency[{key!r}] must be a finite number")
    assert message.endswith(f"got {json.loads(cost)!r}")


def test_a_measured_table_keeps_a_free_cache_and_loads():
    table = LatencyTable({"full": 1.0, "cache": 0.0, "arrow:0.0625": 0.38})
    assert table.measured == {"full": 1.0, "cache": 0.0, "arrow:0.0625": 0.38}


def test_non_finite_samples_are_flagged_not_scored(tmp_path):
    metrics = run(compose_cfg(["guidance_scale=1e30"], tmp_path))  # finite, but the pipeline overflows
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["nonfinite_samples"] == {"fastattn": 3, "raw": 3} == metrics["nonfinite_samples"]
    for key in ("sample_psnr_db", "ssim", "sample_mean_relative_error"):
        assert key not in saved, key  # two black images would have matched at 100 dB
    manifest = json.loads((tmp_path / "samples" / "raw" / "manifest.json").read_text())
    assert all(entry["nonfinite"] for entry in manifest["samples"].values())
    assert "NOT SCORED: NaN / inf samples" in format_summary(saved, tmp_path)


# -- 6: plan fields and sizes, found before any model ------------------------------------------

def searched_plan(tmp_path):
    """A plan as the search writes it for compose_cfg's tiny DiT (5 steps, 2 layers)."""
    plan = CompressionPlan.all_full(5, 2)
    plan.model.update(class_name="DiTTransformer2DModel", num_layers=2, num_heads=4, head_dim=16, seq_len=16)
    return plan.to_dict()


@pytest.mark.parametrize("field,value,message", [
    ("seq_len", None, "plan.model.seq_len is missing"),
    ("seq_len", "abc", "plan.model.seq_len must be an integer >= 1, got 'abc'"),
    ("num_heads", 0.5, "plan.model.num_heads must be an integer >= 1, got 0.5"),
    ("head_dim", 0, "plan.model.head_dim must be an integer >= 1, got 0"),
])
def test_a_plan_with_a_bad_model_field_is_refused_before_any_model(tmp_path, no_model, field, value, message):
    data = searched_plan(tmp_path)
    if value is None:
        del data["model"][field]
    else:
        data["model"][field] = value
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    refused(compose_cfg([f"plan_path={path}"], tmp_path / "run"), "plan_path", str(path), message)


def test_an_oversized_plan_is_refused_unread(tmp_path, no_model, monkeypatch):
    import fastattn.plan

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(searched_plan(tmp_path)))
    monkeypatch.setattr(fastattn.plan, "MAX_PLAN_BYTES", path.stat().st_size - 1)  # 32 MiB: as if larger
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("the oversized plan was parsed"))
    refused(compose_cfg([f"plan_path={path}"], tmp_path / "run"), str(path), "more than a plan file may hold")


def test_a_given_plan_is_parsed_once(tmp_path, monkeypatch):
    import fastattn.plan

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(searched_plan(tmp_path)))
    reads = []
    read_json = fastattn.plan.read_json
    monkeypatch.setattr(fastattn.plan, "read_json", lambda file, *a: reads.append(file) or read_json(file, *a))
    run(compose_cfg([f"plan_path={path}", "stages=[search]"], tmp_path / "run"))
    assert len(reads) == 1, reads  # the config check's read, reused by the search stage


def test_a_sample_count_past_the_file_names_is_refused_before_any_model(tmp_path, no_model):
    refused(compose_cfg([f"samples.num={10 ** 9}"], tmp_path), f"samples.num must be at most {MAX_SAMPLES}")


# -- 7: settings the model cannot honour -------------------------------------------------------

def test_a_resolution_the_model_cannot_make_is_refused(tmp_path, no_model):
    refused(compose_cfg(["model.resolution=16"], tmp_path), "model.resolution=16: model tiny_dit generates 8x8 images only")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=small_dit", "model.resolution=64", "logger=disabled"])
    cfg.output_dir = str(tmp_path)
    refused(cfg, "model.resolution=64: model small_dit generates 32x32 images only (set model.resolution=32)")


def test_the_built_in_model_runs_in_the_dtype_set():
    from omegaconf import OmegaConf

    from experiments.infra.pipelines import build_pipeline

    model = OmegaConf.create({"family": "dit", "builtin": "default", "dtype": "bfloat16"})
    pipe = build_pipeline(model, OmegaConf.create({"scheduler": "dpm_solver"}), torch.device("cpu"))
    assert pipe.transformer.dtype == torch.bfloat16


# -- 8: corrupt files --------------------------------------------------------------------------

@pytest.mark.parametrize("text", ['{"relative_latency": {"full": 1.0, "arr', '{"relative_latency": {"full": NaN}}',
                                  "[1, 2]", "\xff\xfe"])
def test_a_truncated_or_corrupt_latency_table_is_one_line(tmp_path, no_model, text):
    table = latency_table(tmp_path, text=text)
    refused(headwise_cfg(tmp_path, table), str(table))


@pytest.mark.parametrize("text", ['{"schema_version": 3, "methods": [["full"', '{"schema_version": 3, "window_size": NaN}'])
def test_a_truncated_or_corrupt_plan_file_is_one_line(tmp_path, no_model, text):
    path = tmp_path / "plan.json"
    path.write_text(text)
    refused(compose_cfg([f"plan_path={path}"], tmp_path / "run"), f"plan_path: {path}: not a valid plan JSON file")


def test_a_corrupt_plan_cache_entry_is_searched_again_and_replaced(tmp_path, caplog):
    cfg = compose_cfg(["stages=[search]"], tmp_path / "a")
    run(cfg)
    (entry,) = (tmp_path / "a" / "plan_cache").glob("*.json")
    entry.write_text(entry.read_text()[:40])  # truncated, as by a full disk
    with caplog.at_level(logging.WARNING, logger="experiments.stages.search"):
        run(compose_cfg(["stages=[search]", f"plan_cache_dir={entry.parent}"], tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "search.json").read_text())["source"] == "search"
    assert [r.getMessage() for r in caplog.records if str(entry) in r.getMessage()], caplog.text
    CompressionPlan.load(entry)  # overwritten by the new search


# -- 9: latency-table keys ---------------------------------------------------------------------

def test_two_latency_keys_for_one_method_are_refused():
    with pytest.raises(ValueError, match=r"keys 'arrow:0.12345671' and 'arrow:0.12345672' are both 'arrow:0.1234567'"):
        LatencyTable({"arrow:0.12345671": 0.3, "arrow:0.12345672": 0.4})


def test_validate_config_alone_refuses_non_finite_settings(tmp_path):
    """Notebooks call the checks directly: they refuse a NaN too."""
    with pytest.raises(ConfigError, match="guidance_scale must be a finite number, got nan"):
        validate_config(compose_cfg(["guidance_scale=nan"], tmp_path))
