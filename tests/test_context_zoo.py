"""Every diffusers class of the tiny zoo with a context-parallel plan (`_cp_plan`), split over 2
gloo ranks by Ulysses and by ring: an all-full plan equals the split raw model bit for bit and
the five-step technique plan of the coverage check (full, WA-RS, AST, ...) its single-process run.
Where diffusers' own split fails on a tiny config (its plan names a checkpoint's 40 blocks, or its
split raw model fails on the tiny shapes), that is recorded as diffusers', never fastattn's."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_context_parallel import native_with_lse
from test_distributed import free_port


def context_classes() -> list[str]:
    import diffusers

    from experiments.models.tiny.zoo import TINY

    return [name for name in TINY if getattr(getattr(diffusers, name, None), "_cp_plan", None) is not None]


def _outputs(model, calls, plan=None):
    from experiments.infra.coverage import tensors
    from fastattn import apply_fastattn, remove_fastattn

    if plan is not None:
        apply_fastattn(model, plan)
    try:
        with torch.no_grad():
            return [tensors(model(**call)) for call in calls]
    finally:
        if plan is not None:
            remove_fastattn(model)


def _difference(a, b) -> float:
    return max(float((x - y).abs().max()) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True))


def _check(name: str, split: str, world: int) -> dict:
    from diffusers import ContextParallelConfig

    from experiments.infra.coverage import build, technique_calls, techniques_plan
    from fastattn import CompressionPlan, describe

    model = copy.deepcopy(build(name))
    calls = [{**call, "return_dict": False} for call in technique_calls(model, name, torch.float32)]
    layers = describe(model).layers
    plan = techniques_plan({"cfg_batched": False, "cores": [layer.core for layer in layers]}, window_size=0.25)
    alone = _outputs(model, calls, plan)
    try:  # diffusers' own split of the tiny model
        model.enable_parallelism(config=ContextParallelConfig(**{f"{split}_degree": world}))
        raw = _outputs(model, calls)
    except Exception as error:  # noqa: BLE001 - recorded, and the test says whose it is
        return {"diffusers": f"{type(error).__name__}: {error}"[:200]}
    full = _outputs(model, calls, CompressionPlan.all_full(len(calls), len(layers)))
    split_out = _outputs(model, calls, plan)
    return {"all_full_equal": _difference(full, raw) == 0.0, "max_diff": _difference(split_out, alone),
            "compressed": _difference(split_out, raw)}


def _rank(rank: int, world: int, port: int, out: str, split: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.accelerator.device_count = lambda: 1  # diffusers' mesh on the CPU (test_context_parallel.py)
    torch._C._get_accelerator = lambda: torch.device("cpu")
    try:
        if split == "ring":
            native_with_lse()
        results = {name: _check(name, split, world) for name in context_classes()}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("split", ["ulysses", "ring"])
def test_every_class_with_a_context_plan_runs_fastattn_split(tmp_path, split):
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path), split), nprocs=2)
    results = json.loads((tmp_path / "rank0.json").read_text())
    served = {name for name, r in results.items() if "diffusers" not in r}
    assert {"FluxTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel",
            "WanTransformer3DModel"} <= served, results
    for name in served:
        r = results[name]
        assert r["all_full_equal"] and r["max_diff"] < 1e-4 and r["compressed"] > 1e-4, (name, r)
