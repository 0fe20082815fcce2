"""fastattn inside diffusers' own context parallelism (Ulysses), on 2 and 4 CPU processes (gloo).

diffusers 0.42 builds its device mesh from ``torch.accelerator`` (``rank % device_count()``, zero
on a CPU); each test process points that at the CPU before ``enable_parallelism``, the one change
to diffusers' code path. Each rank computes the single-process outputs first, then splits the
model: an all-full plan must equal the split raw model bit for bit, and each technique must equal
its single-process run within float32 tolerance (the split model's own raw output differs from the
unsplit one by float32 rounding).
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastattn import CompressionPlan, LayerPlan, Method, apply_fastattn, remove_fastattn
from test_distributed import free_port

F, W, T, WA = Method.FULL, Method.WARS, Method.AST, Method.WA
TIMESTEPS = (0.9, 0.7, 0.5, 0.3)
ROWS = [[F, F, F], [W, W, T], [T, W, W], [W, T, WA]]  # FLUX: one joint and two single-stream layers


def flux(heads: int):
    from experiments.models.tiny.mmdit import tiny_flux_pipeline

    transformer = tiny_flux_pipeline(num_layers=1, num_single_layers=2, num_heads=heads, head_dim=16).transformer
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 64, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), img_ids=torch.randn(64, 3), txt_ids=torch.randn(8, 3),
                  guidance=torch.tensor([3.5]), return_dict=False)
    return transformer, inputs


def wan(heads: int):
    from experiments.models.tiny import tiny_wan_pipeline

    transformer = tiny_wan_pipeline(num_layers=3, num_heads=heads, seed=0).transformer
    torch.manual_seed(0)
    return transformer, dict(hidden_states=torch.randn(1, 4, 2, 16, 16), encoder_hidden_states=torch.randn(1, 6, 32),
                             return_dict=False)


MODELS = {"flux": flux, "wan": wan}


def loop(transformer, inputs, plan=None) -> list[torch.Tensor]:
    wan_like = type(transformer).__name__.startswith("Wan")
    if plan is not None:
        apply_fastattn(transformer, plan)
    try:
        with torch.no_grad():
            return [transformer(**inputs, timestep=torch.tensor([t * 1000 if wan_like else t]))[0] for t in TIMESTEPS]
    finally:
        if plan is not None:
            remove_fastattn(transformer)


def _rank(rank: int, world: int, port: int, out: str, model: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.accelerator.device_count = lambda: 1  # diffusers' mesh on the CPU (see the module docstring)
    torch._C._get_accelerator = lambda: torch.device("cpu")
    try:
        from diffusers import ContextParallelConfig

        transformer, inputs = MODELS[model](heads=world)
        plan = LayerPlan(ROWS, window_size=0.25)
        alone = loop(transformer, inputs, plan)
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        raw = loop(transformer, inputs)
        full = loop(transformer, inputs, CompressionPlan.all_full(len(TIMESTEPS), 3))
        split = loop(transformer, inputs, plan)
        try:
            apply_fastattn(transformer, CompressionPlan.from_heads([[["full"] * world] * 3] * len(TIMESTEPS)))
            headwise = "applied"
        except ValueError as error:
            headwise = str(error)
        result = {"all_full_equal": all(torch.equal(a, b) for a, b in zip(full, raw, strict=True)),
                  "max_diff": max(float((a - b).abs().max()) for a, b in zip(split, alone, strict=True)),
                  "compressed": max(float((a - b).abs().max()) for a, b in zip(split, raw, strict=True)),
                  "headwise": headwise}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("model,world", [("flux", 2), ("flux", 4), ("wan", 2)])
def test_layerwise_plans_under_ulysses_equal_one_process(tmp_path, model, world):
    mp.spawn(_rank, args=(world, free_port(), str(tmp_path), model), nprocs=world)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r in results:
        assert r["all_full_equal"]  # bit-identical to the split raw model
        assert r["max_diff"] < 1e-4, r  # each technique as in one process (float32)
        assert r["compressed"] > 1e-3  # and the plan did compress
        assert "context parallelism: head-wise plans" in r["headwise"] or model == "wan"  # Wan: self-attention
