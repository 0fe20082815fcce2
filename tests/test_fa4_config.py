"""The ``fa4`` config key of the benchmarks and the main job: selectable, refusable, one-line errors."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fastattn.kernels import fa4, get_fa4, set_fa4

CONF = Path(__file__).resolve().parents[1] / "conf"


def tiny_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF / "benchmark"), version_base="1.3"):
        return compose("tiny", overrides=[f"out_dir={tmp_path}", *overrides])


@pytest.fixture(autouse=True)
def restore_mode():
    yield
    set_fa4("auto")


def test_benchmark_fa4_key_errors_are_one_line(tmp_path):
    from experiments.benchmark import run_benchmark

    with pytest.raises(ValueError, match=r"^fa4 must be auto, on or off \(or true / false\), got 'maybe'$"):
        run_benchmark(tiny_cfg(tmp_path, "fa4=maybe"))
    if fa4.fa4_problem() is not None:
        with pytest.raises(ValueError, match=r"^fa4=on but FlashAttention-4 cannot run: [^\n]+$"):
            run_benchmark(tiny_cfg(tmp_path, "fa4=true"))


def test_fa4_false_is_today_routes(tmp_path):
    from experiments.benchmark import run_benchmark

    result = run_benchmark(tiny_cfg(tmp_path, "fa4=false", "sections=[kernels]", "kernels.repeats=1"))
    assert result["fa4"] == "off" and get_fa4() == "off"
    assert {r["backend"] for r in result["kernels"]["rows"]} <= {"sdpa", "dense+window"}


def test_every_entry_point_config_has_the_key():
    for path in ("config.yaml", "benchmark/paper.yaml", "benchmark/tiny.yaml", "benchmark_headwise.yaml"):
        text = (CONF / path).read_text()
        assert "\nfa4: auto" in text, path


def test_attention_share_from_a_no_attention_plan(tmp_path):
    from experiments.benchmark import run_benchmark

    result = run_benchmark(tiny_cfg(tmp_path, "sections=[end_to_end]", "+end_to_end.share_from_plan=true",
                                    "end_to_end.fractions={tiny_dit_64: [0.6]}"))
    raw = next(r for r in result["end_to_end"] if r["plan"] == "raw")
    assert raw["attention_share_source"] == "no_attention_plan" and 0 <= raw["attention_share"] <= 1
    plan = next(r for r in result["end_to_end"] if r["plan"] != "raw")
    assert plan["ideal_speedup"] == pytest.approx(1 / ((1 - raw["attention_share"]) + raw["attention_share"]
                                                       * plan["flops_fraction"]))
