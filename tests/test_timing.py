"""The one benchmark timer on a CPU: warm-up, repeats and the median on a scripted clock; spans;
the attention timer of the latency measurement; no CUDA-graph timing without a GPU."""

import pytest
import torch

from conftest import dit_inputs
from experiments.infra import timing
from experiments.stages.latency import measure_latency

CPU = torch.device("cpu")


@pytest.fixture
def clock(monkeypatch):
    """perf_counter advances only when a call of the timed function says so."""
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    return now


class Context:
    """Records when it is entered and left."""

    def __init__(self, calls):
        self.calls = calls

    def __enter__(self):
        self.calls.append("enter")

    def __exit__(self, *exc):
        self.calls.append("exit")


@pytest.mark.parametrize("name", timing.CLOCKS)
def test_median_of_the_timed_runs_after_the_warm_up(clock, name):
    durations = iter([100.0, 100.0, 0.005, 0.001, 0.003])  # two warm-up runs, then three timed ones
    calls = []

    def fn():
        calls.append("fn")
        clock[0] += next(durations)

    ms = timing.time_ms(fn, CPU, warmup=2, repeats=3, clock=name, before=lambda: calls.append("before"),
                        during=lambda: Context(calls))
    assert ms == pytest.approx(3.0)
    assert calls == ["before", "fn"] * 2 + ["before", "enter", "fn", "exit"] * 3  # during: timed runs only


def test_stopwatch_sums_its_spans_and_checks_the_clock(clock):
    watch = timing.Stopwatch(CPU)
    for span in (0.002, 0.005):
        watch.start()
        clock[0] += span
        watch.stop()
        clock[0] += 1.0  # between spans: not counted
    assert watch.ms() == pytest.approx(7.0)
    with pytest.raises(ValueError, match="clock must be one of events, wall"):
        timing.Stopwatch(CPU, "sundial")


def test_graphed_timing_needs_a_gpu():
    assert timing.time_graphed_ms(lambda: None, CPU) is None
    assert timing.timer_name(CPU) == "wall_clock"


def test_latency_times_generations_and_their_attention_per_sample(dit_pipe):
    def generate():
        dit_pipe(**dit_inputs(steps=2, n=2))

    result = measure_latency(dit_pipe, generate, batch_size=2, device=CPU, warmup=1, repeats=2, attention=True)
    assert 0 < result["attn_latency_s"] < result["latency_s"]
    assert result["timer"] == "wall_clock" and result["repeats"] == 2
    layers = [b.attn1 for b in dit_pipe.transformer.transformer_blocks]
    assert not any(a._forward_hooks or a._forward_pre_hooks for a in layers)  # the timing hooks are gone
    assert measure_latency(dit_pipe, generate, batch_size=2, device=CPU, warmup=0, repeats=1,
                           attention=False)["attn_latency_s"] is None
