"""The generic adapter's step benchmark (experiments.benchmark_zoo): its FLOPs accounting and a
CPU smoke run on the tiny stand-ins (timings there are not asserted)."""

import json
import weakref

import pytest

from conftest import compose_app
from experiments.bench.per_model import run_models
from experiments.benchmark_zoo import benchmark_zoo, core_fraction, window_pairs
from experiments.infra.app import ConfigError
from fastattn import LayerPlan, Method
from fastattn.kernels.arrow import arrow_pairs
from fastattn.kernels.masks import band_pairs

F, W, T = Method.FULL, Method.WARS, Method.AST


def test_a_calls_window_follows_the_processors_rules():
    assert window_pairs(64, 64, 64, 0.125) == band_pairs(64, 8)  # image only: the band
    assert window_pairs(64, 64, None, 0.125) == band_pairs(64, 8)  # no image count: the band
    assert window_pairs(80, 80, 64, 0.125) == arrow_pairs(64, 16, 8)  # text joined in: the arrow
    # image queries over text and image keys: the arrow's image rows
    assert window_pairs(64, 80, 64, 0.125) == arrow_pairs(64, 16, 8) - 16 * 80
    assert window_pairs(16, 80, 64, 0.125) == 16 * 80  # text queries: whole


def test_the_core_fraction_counts_refreshes_and_reuse():
    calls = [[(64, 64)], [(64, 64)]]
    plan = LayerPlan([[F, F], [W, T]])  # step 0 refreshes layer 0's residual
    window = band_pairs(64, 8)
    expected = (64 * 64 + window + 64 * 64 + window) / (2 * 2 * 64 * 64)
    assert core_fraction(plan, calls, 64, 0.125) == pytest.approx(expected)


def test_the_tiny_run_writes_every_models_row(tmp_path):
    results = benchmark_zoo(compose_app("benchmark_zoo", ["size=tiny", "device=cpu", f"out={tmp_path}", "repeats=1",
                                                          "loop_warmup=0", "warmup=0"]))
    assert [r["model"] for r in results] == ["hunyuan_video", "cogvideox_5b", "qwen_image"]
    for r in results:
        assert [p["plan"] for p in r["plans"]] == ["recipe", "window"]
        for p in r["plans"]:
            assert 0 < p["attn_core_flops_fraction"] < 1 and p["ideal_speedup"] >= 1 and p["counts"]["full"]
    saved = json.loads((tmp_path / "benchmark_zoo.json").read_text())
    assert not saved["errors"] and len(saved["results"]) == 3


def test_a_model_in_a_reference_cycle_is_freed_before_the_next_one_is_built(tmp_path):
    # FLUX's hooks held it in a cycle: on the GPU its weights stayed beside Wan's until Wan ran out of memory
    class Model:
        def __init__(self):
            self.me = self

    built = []

    def benchmark(model, cfg, device, dtype):
        assert all(r() is None for r in built), "the previous model is still alive"
        m = Model()
        built.append(weakref.ref(m))
        return {"model": model}

    cfg = compose_app("benchmark_zoo", ["size=tiny", "device=cpu", f"out={tmp_path}", "fa4=false"])
    assert [r["model"] for r in run_models(cfg, "z.json", benchmark, lambda results: None)] == list(cfg.models)


@pytest.mark.parametrize("override,message", [("models=[sora]", "models must be a non-empty list"),
                                              ("steps=1", "steps"), ("target=1.5", "target"),
                                              ("plans=[best]", "plans must be"), ("cache_dtype=int4", "cache_dtype")])
def test_bad_settings_are_refused_in_one_line(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        benchmark_zoo(compose_app("benchmark_zoo", [override, f"out={tmp_path}"]))
