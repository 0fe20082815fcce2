"""The memory benchmark (``python -m experiments.benchmark --config-name memory``, a GPU job) on the
CPU: its preset with the models swapped for tiny ones runs the same code path (transformer loop
with FP8 and host caches, the whole pipeline stage by stage); memory fields are None without CUDA."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.infra.app import CONF_DIR, ConfigError
from experiments.benchmark import run_benchmark

TINY = {"tiny_pixart_64": {"arch": "tiny_pixart", "resolution": 64, "images": 1}}


def memory_cfg(tmp_path, **replace):
    with initialize_config_dir(config_dir=str(CONF_DIR / "benchmark"), version_base="1.3"):
        cfg = compose("memory", overrides=[f"out_dir={tmp_path}", "device=cpu", "dtype=float32"])
    for key, value in {"models": TINY, "end_to_end.fractions": {"tiny_pixart_64": [0.6]}, "end_to_end.steps": 4,
                       "pipeline_memory.fractions": {"tiny_pixart_64": [0.6]}, "pipeline_memory.steps": 4,
                       "pipeline_memory.text_encoder": "tiny_t5", "pipeline_memory.vae": "tiny", **replace}.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def test_the_memory_preset_runs_raw_compressed_fp8_and_host_caches_on_tiny_models(tmp_path):
    result = run_benchmark(memory_cfg(tmp_path))
    e2e = {r["plan"]: r for r in result["end_to_end"]}
    assert set(e2e) == {"raw", "recipe_0.6", "recipe_0.6+float8_e4m3fn", "recipe_0.6+host",
                        "recipe_0.6+float8_e4m3fn+host"}
    row = e2e["recipe_0.6+float8_e4m3fn+host"]
    assert (row["cache_dtype"], row["cache_device"]) == ("float8_e4m3fn", "cpu") and row["loop_ms"] > 0
    assert e2e["raw"]["peak_bytes"] is None
    rows = result["pipeline_memory"]
    assert [(r["plan"], r["cache_dtype"], r["cache_device"]) for r in rows] == [
        ("raw", None, None), ("recipe_0.6", None, None), ("recipe_0.6", None, "cpu"),
        ("recipe_0.6", "float8_e4m3fn", None), ("recipe_0.6", "float8_e4m3fn", "cpu")]
    for r in rows:  # every stage ran; no CUDA, no memory numbers
        assert all(r[f"{stage}_peak_bytes"] is None for stage in ("encode", "denoise", "decode", "pipeline"))
        assert r["pipeline_ratio"] is None
    assert (tmp_path / "benchmark.json").is_file()


@pytest.mark.parametrize("replace, match", [
    ({"pipeline_memory.cache_dtypes": ["float16"]}, "cache_dtypes: 'float16'"),
    ({"pipeline_memory.vae": "big"}, "vae one of"),
    ({"end_to_end.cache_dtypes": ["int8"]}, "end_to_end.cache_dtypes"),
    ({"end_to_end.cache_devices": ["cuda"]}, "end_to_end.cache_devices: 'cuda' is not null or one of cpu"),
    ({"pipeline_memory.cache_devices": ["disk"]}, "pipeline_memory.cache_devices"),
])
def test_memory_config_errors_are_one_line(tmp_path, replace, match):
    with pytest.raises(ConfigError, match=match) as info:
        run_benchmark(memory_cfg(tmp_path, **replace))
    assert "\n" not in str(info.value)
