"""experiments.benchmark_context: its one-line config errors before any model is built, and its
whole loop on 2 gloo ranks with the tiny Wan and FLUX (size=tiny device=cpu), Ulysses 2 and ring 2.

The ranks point diffusers' mesh at the CPU and, for ring, give the native backend the
log-sum-exp (tests/test_context_parallel.py's shims)."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

from conftest import CONF
from experiments.benchmark_context import benchmark_context
from experiments.infra.app import ConfigError
from test_context_parallel import native_with_lse
from test_distributed import free_port

# target 0.5: the recipe gives the tiny shapes WA-RS layers, so the ring window runs
TINY = ["size=tiny", "device=cpu", "steps=4", "target=0.5", "warmup=0", "repeats=1", "loop_warmup=0", "loop_repeats=1"]


def config(out, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("benchmark_context", overrides=[f"out={out}", *overrides])


def _rank(rank: int, world: int, port: int, out: str, overrides: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda: 1  # diffusers' mesh on the CPU
    torch._C._get_accelerator = lambda: torch.device("cpu")
    native_with_lse()  # diffusers' ring for the full layers
    benchmark_context(config(out, overrides))


def test_the_tiny_run_on_two_ranks_reports_every_split(tmp_path):
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path), [*TINY, "splits=[{ulysses: 2}, {ring: 2}]"]), nprocs=2)
    results = json.loads((tmp_path / "benchmark_context.json").read_text())["results"]
    assert [r["model"] for r in results] == ["wan_14b_720p", "flux_dev_2k"]
    for r in results:
        assert 0 < r["attn_core_flops_fraction"] < 1 and r["one_gpu_forward_s"] > 0
        assert [(s["ulysses"], s["ring"]) for s in r["splits"]] == [(2, 1), (1, 2)]
        for s in r["splits"]:
            assert s["all_full_equal"], (r["model"], s)  # all-full is the split raw model, bit for bit
            assert s["max_abs_diff"] > 0 and s["speedup"] > 0 and s["ideal_speedup"] >= 1
        ring = r["splits"][1]["ring_traffic"]
        assert [x["rank"] for x in ring["ranks"]] == [0, 1] and ring["dense_steps"] == 2
        assert all(x["window_calls"] > 0 and 1 <= x["steps_max"] <= 2 for x in ring["ranks"]), ring
        assert ring["steps_match_model"], ring
    table = (tmp_path / "benchmark_context.md").read_text()
    assert table.count("| wan_14b_720p |") == table.count("| flux_dev_2k |") == 2


def refused(tmp_path, monkeypatch, world: int, overrides: list[str], *parts: str) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    built = []
    monkeypatch.setattr("experiments.benchmark_context.build", lambda *a, **k: built.append(a))
    with pytest.raises(ConfigError) as error:
        benchmark_context(config(tmp_path, overrides))
    message = str(error.value)
    assert "\n" not in message and all(p in message for p in parts), message
    assert not built


@pytest.mark.parametrize("world,overrides,parts", [
    (1, TINY, ["this is one process", "torchrun --nproc_per_node"]),
    (3, TINY, ["splits[0]: ulysses=3 does not divide wan_14b_720p's 2 attention heads"]),
    (4, [*TINY, "splits=[{ring: 3}]"], ["splits[0]: ulysses 1 x ring 3 = 3 does not divide the 4 ranks"]),
    (16, ["splits=[{ulysses: 16}]"], ["ulysses=16 does not divide wan_14b_720p's 40 attention heads"]),
    (8, ["models=[flux_dev_2k]", "splits=[{ring: 8}, {ulysses: 2, ring: 3}]"],
     ["splits[1]: ulysses 2 x ring 3 = 6 does not divide the 8 ranks"]),
    (6, [*TINY, "models=[flux_dev_2k]", "splits=[{ring: 6}]"],
     ["splits[0]: ulysses 1 x ring 6 = 6 does not divide flux_dev_2k's 16 image tokens"]),
    (2, [*TINY, "splits=[{ulysses: 0}]"], ["splits[0].ulysses must be an integer >= 1, got 0"]),
    (2, [*TINY, "splits=[{tensor: 2}]"], ["splits[0]: unknown key 'tensor'"]),
])
def test_bad_splits_are_one_line_before_a_model_is_built(tmp_path, monkeypatch, world, overrides, parts):
    refused(tmp_path, monkeypatch, world, overrides, *parts)


def test_full_size_on_a_cpu_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused(tmp_path, monkeypatch, 8, ["device=auto"], "benchmark_context times full-size models on GPUs and torch sees none",
            "size=tiny device=cpu")
    refused(tmp_path, monkeypatch, 8, ["device=cuda"], "device=cuda but torch sees no CUDA device")
