"""Both layer-wise searches with the calibration batch shared over 4 CPU processes (gloo), against
one process searching the whole batch: the same plan, the same summed losses."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from experiments.infra.conditions import Conditions
from experiments.infra.pipelines import build_pipeline
from experiments.stages.search import distributed_search
from test_distributed import compose_job, free_port

RANKS = 4


def searched(cfg, algorithm: str):
    cfg.search.algorithm = algorithm
    cfg.calibration.num_samples = RANKS
    pipe = build_pipeline(cfg.model, cfg.solver, torch.device("cpu"))
    return distributed_search(pipe, cfg, torch.device("cpu"), Conditions(cfg.model))


def _rank(rank: int, port: int, out: str, algorithm: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        plan = searched(compose_job(Path(out) / f"rank{rank}"), algorithm)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(plan.to_dict()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("algorithm", ["greedy", "fast"])
def test_four_ranks_search_the_plan_one_process_does(tmp_path, algorithm):
    mp.spawn(_rank, args=(free_port(), str(tmp_path), algorithm), nprocs=RANKS)
    plans = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(RANKS)]
    alone = searched(compose_job(tmp_path / "one"), algorithm).to_dict()
    assert all(p["methods"] == alone["methods"] for p in plans)  # every rank returns the same plan
    assert plans[0]["search"]["calibration_ranks"] == RANKS
    key = "losses" if algorithm == "greedy" else "step_losses"
    flat = [(a, b) for a, b in zip(_flat(plans[0]["search"][key]), _flat(alone["search"][key]), strict=True)]
    assert any(a is not None for a, _ in flat)
    # each rank holds one sample: the summed loss is the whole batch's (float32 sums of other batch shapes)
    assert all(a == b or a == pytest.approx(b, rel=1e-4) for a, b in flat), flat


def _flat(values):
    if isinstance(values, list):
        return [x for v in values for x in _flat(v)]
    return [values]
