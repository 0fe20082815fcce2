"""The video latency benchmark runs end to end at a tiny shape on the CPU (timings not asserted)."""

import json

import pytest

from conftest import compose_app
from experiments import benchmark_video
from experiments.infra.app import ConfigError
from fastattn import Method
from fastattn.layerwise.video_flops import VideoShape, video_attention_flops


def test_tiny_benchmark_writes_every_measure(tmp_path):
    benchmark_video.benchmark_video(compose_app("benchmark_video", [
        "shape=tiny", "device=cpu", f"out={tmp_path}", "steps=2", "warmup=0", "repeats=1", "loop_warmup=0",
        "loop_repeats=1", "profile=true"]))
    data = json.loads((tmp_path / "benchmark_video.json").read_text())
    assert [r["model"] for r in data["results"]] == ["wan", "latte"]
    wan = data["results"][0]
    assert wan["tokens"] == 3 * 4 * 4 and wan["calls_per_step"] == 2
    for r in data["results"]:
        assert 0 <= r["attention_share"] < 1
        # Wan times the band and the 3-D tile recipes; Latte (no full 3-D attention) the band only
        assert [p["plan"] for p in r["plans"]] == (["recipe", "recipe_tile"] if r["model"] == "wan" else ["recipe"])
        for plan in r["plans"]:
            assert 0 < plan["attn_flops_fraction"] < 1 and plan["speedup"] > 0 and plan["ideal_speedup"] >= 1
        for label in ("raw", "recipe"):  # --profile: a kernel time table per loop
            assert "Self CPU" in (tmp_path / f"profile_{r['model']}_{label}.txt").read_text()


def test_recipe_is_deterministic_and_near_the_target_at_the_real_wan_shape():
    video = VideoShape(21, 30, 52, heads=12, head_dim=128, model_dim=1536)
    kinds = ["full3d"] * 30
    plan = benchmark_video.pick_recipe(50, kinds, video, 0.3, 0.125)
    assert plan == benchmark_video.pick_recipe(50, kinds, video, 0.3, 0.125)
    assert abs(video_attention_flops(plan, kinds, video)["fraction"] - 0.3) < 0.05
    assert plan.methods[0] == [Method.FULL] * 30


@pytest.mark.parametrize("overrides,message", [
    (["steps=1"], "steps must be an integer >= 2, got 1"),
    (["device=cpu", "cuda_graphs=true"], r"cuda_graphs=true needs a CUDA device \(device=cuda\)"),
    (["models=[wan,sora]"], r"models must be a non-empty list of wan, latte, got \['wan', 'sora'\]"),
    (["plan=[/no/plan.json]"], "plan: file not found: /no/plan.json"),
    (["window_shapes=[cube]"], r"window_shapes must be a non-empty list of band, tile, got \['cube'\]"),
    ([], r"out is not set: give out=<folder of benchmark_video.json>"),
])
def test_bad_settings_are_named_before_any_model_is_built(tmp_path, overrides, message):
    out = [] if not overrides else [f"out={tmp_path}"]
    with pytest.raises(ConfigError, match=message):
        benchmark_video.benchmark_video(compose_app("benchmark_video", [*out, *overrides]))
