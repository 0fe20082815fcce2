"""fastattn stacked with diffusers' FirstBlockCache inside diffusers' context parallelism (Ulysses,
2 gloo ranks, tiny FLUX): the same outputs as the same stack in one process.

diffusers 0.42's FirstBlockCache decides from the first block's residual on each rank's own sequence
shard, with no collective: the ranks' ratios differ from each other and from the whole sequence's
(recorded below). Where they straddle the threshold the ranks disagree, one skips the remaining
blocks while the other waits in their all-to-all. The threshold here sits clear of every rank's
ratios, so all ranks and the single process decide alike (compute steps 0-2, skip step 3).
"""

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastattn import CompressionPlan, LayerPlan, apply_fastattn, remove_fastattn
from test_context_parallel import ROWS, TIMESTEPS, flux
from test_distributed import free_port

THRESHOLD = 0.26  # the tiny model's ratios: about 0.28, 0.30, 0.24 at steps 1-3, on either shard and whole


def decisions_recorded():
    """The FirstBlockCache head hook's (ratio, compute) at each call, appended to the returned list."""
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    seen, decide = [], FBCHeadBlockHook._should_compute_remaining_blocks

    def recorded(self, residual):
        previous = self.state_manager.get_state().head_block_residual
        ratio = None if previous is None else float((residual - previous).abs().mean() / previous.abs().mean())
        seen.append((ratio, decide(self, residual)))
        return seen[-1][1]

    FBCHeadBlockHook._should_compute_remaining_blocks = recorded
    return seen


def cached_loop(transformer, inputs, seen: list, plan=None) -> tuple[list[torch.Tensor], list]:
    """The outputs over TIMESTEPS with the block cache on, and its decisions (a fresh cache each time)."""
    seen.clear()
    if plan is not None:
        apply_fastattn(transformer, plan)
    try:
        with torch.no_grad(), transformer.cache_context("cond"):
            outputs = [transformer(**inputs, timestep=torch.tensor([t]))[0] for t in TIMESTEPS]
    finally:
        transformer._reset_stateful_cache()
        if plan is not None:
            remove_fastattn(transformer)
    return outputs, list(seen)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.accelerator.device_count = lambda: 1  # diffusers' mesh on the CPU (tests/test_context_parallel.py)
    torch._C._get_accelerator = lambda: torch.device("cpu")
    try:
        from diffusers import ContextParallelConfig
        from diffusers.hooks import FirstBlockCacheConfig

        seen = decisions_recorded()
        transformer, inputs = flux(heads=world)
        transformer.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))
        plan = LayerPlan(ROWS, window_size=0.25)
        alone, alone_seen = cached_loop(transformer, inputs, seen, plan)
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        raw, raw_seen = cached_loop(transformer, inputs, seen)
        full, _ = cached_loop(transformer, inputs, seen, CompressionPlan.all_full(len(TIMESTEPS), 3))
        split, split_seen = cached_loop(transformer, inputs, seen, plan)
        result = {"all_full_equal": all(torch.equal(a, b) for a, b in zip(full, raw, strict=True)),
                  "max_diff": max(float((a - b).abs().max()) for a, b in zip(split, alone, strict=True)),
                  "alone": alone_seen, "raw": raw_seen, "split": split_seen}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_layerwise_plan_with_first_block_cache_under_ulysses_equals_one_process(tmp_path):
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    computes = [True, True, True, False]  # step 3 skipped by the block cache
    for r in results:
        assert r["all_full_equal"]  # all-full plan + cache: bit-identical to the split model + cache
        assert r["max_diff"] < 1e-4, r  # the plan + cache as in one process (float32)
        for run in ("alone", "raw", "split"):
            assert [c for _, c in r[run]] == computes, (run, r[run])
    # each rank decided on its own shard: its ratios are not the whole sequence's, nor the other rank's
    assert results[0]["split"][1][0] != results[1]["split"][1][0] != results[0]["alone"][1][0]
