"""Multi-process jobs for tests/test_distributed.py.

As a script under torchrun it is the main job (experiments.run) with stub feature networks, so
FID and IS run offline, and it records each rank's plan and metrics. With $CRASH_MARKER set,
rank 1 dies abruptly after its first batch of samples (once: the marker records what it had
finished), so that torchrun's restart shows a killed rank resuming.
Then, in the same process group, it runs the smaller collective checks (``check_collectives``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a script's own folder, not the repository, heads sys.path

CRASH_MARKER = "CRASH_MARKER"


class PoolFeatures(nn.Module):
    """FID features: the mean colour of each image quadrant (12 numbers)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)


class ColourLogits(nn.Module):
    """IS logits: the mean colour, sharpened."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 10 * images.mean((2, 3))


def _die_after_first_batch(marker: Path) -> None:
    import experiments.stages.generate as generate

    write = generate.atomic_write_json

    def write_then_die(path, data):
        write(path, data)
        if Path(path).name.startswith("manifest") and not marker.exists():
            folder = Path(path).parent
            marker.write_text(json.dumps({str(folder / e["file"]): (folder / e["file"]).stat().st_mtime_ns
                                          for e in data["samples"].values()}))
            os._exit(3)  # no cleanup, as a killed process

    generate.atomic_write_json = write_then_die


def _record_plans(out_dir: Path, rank: int) -> None:
    import experiments.run as run_module

    find = run_module.find_or_search_plan

    def find_and_record(*args, **kwargs):
        plan, source = find(*args, **kwargs)
        (out_dir / f"plan.rank{rank}.json").write_text(json.dumps(plan.to_dict()["methods"]))
        return plan, source

    run_module.find_or_search_plan = find_and_record


def main() -> None:
    import hydra

    from experiments.infra import distributed
    from experiments.run import run

    @hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="config")
    def job(cfg) -> None:
        torch.set_num_threads(1)
        rank = int(os.environ.get("RANK", 0))
        out = Path(cfg.output_dir)
        _record_plans(out, rank)
        if os.environ.get(CRASH_MARKER) and rank == 1:
            _die_after_first_batch(Path(os.environ[CRASH_MARKER]))
        with distributed.joined():  # run() stays in this group, and the checks below reuse it
            metrics = run(cfg, feature_extractor=PoolFeatures(), classifier=ColourLogits())
            (out / f"metrics.rank{rank}.json").write_text(json.dumps(metrics, default=str))
            check_collectives(rank, out / "checks", cfg)

    job()


def check_collectives(rank: int, out: Path, cfg) -> None:
    """Bad input across ranks, a search with fewer calibration samples than ranks, sharded means,
    FID statistics and Inception Score; writes what this rank saw to out/rank{rank}.json."""
    import copy

    import numpy as np

    from experiments.infra import distributed
    from experiments.infra.conditions import Conditions
    from experiments.metrics import sharded
    from experiments.infra.pipelines import build_pipeline
    from experiments.stages.search import distributed_search

    seen: dict = {}
    for name, check in (
        ("config", lambda: distributed.check_same_config({"model": "tiny", "samples": {"num": 8 - 4 * rank}})),
        ("private_dir", lambda: distributed.check_shared_dir(out / f"own{rank}")),
        ("shared_dir", lambda: distributed.check_shared_dir(out)),
    ):
        try:
            check()
            seen[name] = None
        except ValueError as e:
            seen[name] = str(e)
    lone = copy.deepcopy(cfg)
    lone.calibration.num_samples = 1  # rank 1 holds no calibration sample and sits the search out
    pipe = build_pipeline(lone.model, lone.solver, torch.device("cpu"))
    plan = distributed_search(pipe, lone, torch.device("cpu"), Conditions(lone.model))
    seen["plan_of_one_sample"] = plan.to_dict()["methods"]
    fast = fast_search_config(cfg)  # the fast search on shares of 2 and 1 calibration samples
    plan = distributed_search(pipe, fast, torch.device("cpu"), Conditions(fast.model))
    seen["fast_plan"], seen["fast_step_losses"] = plan.to_dict()["methods"], plan.search["step_losses"]
    images, other = check_images()
    seen["mean"] = sharded.mean_over_ranks(lambda a, b: float(np.abs(a.astype(int) - b).mean()), images, other)
    seen["stats"] = [x.tolist() for x in sharded.sharded_feature_stats(images, PoolFeatures(), 2, "cpu")]
    seen["is"] = sharded.sharded_inception_score(images, ColourLogits(), 3, 2, "cpu")
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


def fast_search_config(cfg):
    import copy

    fast = copy.deepcopy(cfg)
    fast.search.algorithm = "fast"
    fast.threshold.delta = 0.3  # where this tiny model's steps compress
    return fast


def check_images():
    import numpy as np

    images = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    return images, np.clip(images.astype(int) + 9, 0, 255).astype(np.uint8)


if __name__ == "__main__":
    main()
