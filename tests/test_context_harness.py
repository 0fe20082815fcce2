"""The main job under parallel.context (diffusers' context parallelism inside data-parallel groups):
its one-line config errors, checked before any model is built, and the job on 2 and 4 gloo
ranks (Ulysses 2; 4 ranks: two data-parallel groups of two) against one process.

diffusers 0.42 places each rank on ``torch.accelerator``'s devices; the ranks point that at the
CPU (as tests/test_context_parallel.py does) and the config check is told one device is there.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from experiments.infra.app import ConfigError
from experiments.infra.config import validate_config
from experiments.infra.context_config import ContextDegrees, check_context, context_degrees
from experiments.run import run
from fastattn import CompressionPlan
from test_distributed import free_port
from test_run import ROOT, compose_cfg

FLUX = ["model=tiny_flux", "solver=flow_euler_28", "search=greedy", "model.tiny.text_len=8", "threshold=d6",
        "metrics.latency.enabled=false"]


@pytest.fixture
def one_accelerator(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)


def refused(cfg, world: int, *parts):
    with pytest.raises(ConfigError) as error:
        check_context(cfg, world)
    message = str(error.value)
    assert "\n" not in message and all(part in message for part in parts), message


@pytest.mark.parametrize("override,part", [
    ("parallel.context.ulysses=0", "parallel.context.ulysses must be an integer >= 1, got 0"),
    ("parallel.context.ring=1.5", "parallel.context.ring must be an integer >= 1, got 1.5"),
    ("parallel.context.ulysses=true", "parallel.context.ulysses must be an integer >= 1, got True"),
    ("+parallel.context.tensor=2", "unknown key 'tensor'"),
])
def test_degrees_that_are_not_positive_integers_are_refused(tmp_path, override, part):
    refused(compose_cfg([*FLUX, override], tmp_path), 2, part)


def test_off_by_default_and_without_the_key(tmp_path):
    cfg = compose_cfg(FLUX, tmp_path)
    assert context_degrees(cfg) == ContextDegrees(1, 1) and not check_context(cfg, 1).on
    assert context_degrees(OmegaConf.create({"model": {"name": "x"}})) == ContextDegrees(1, 1)


def test_the_ranks_must_hold_whole_context_groups(tmp_path, one_accelerator):
    cfg = compose_cfg([*FLUX, "parallel.context.ulysses=2"], tmp_path)
    refused(cfg, 1, "ulysses 2 x ring 1 = 2 splits each sample over 2 ranks, but this is one process",
            "torchrun --nproc_per_node")
    refused(cfg, 3, "does not divide the 3 ranks")
    assert check_context(cfg, 4) == ContextDegrees(2, 1)  # two data-parallel groups of two
    ring = compose_cfg([*FLUX, "parallel.context.ulysses=2", "parallel.context.ring=2"], tmp_path)
    refused(ring, 2, "ulysses 2 x ring 2 = 4 does not divide the 2 ranks")
    if torch.cuda.is_available():  # ring is accepted where diffusers' ring has an lse-returning backend (cuDNN)
        assert check_context(ring, 8).degree == 4
    else:
        refused(ring, 8, "needs each attention call's log-sum-exp")


def test_models_without_a_context_parallel_plan_are_refused(tmp_path):
    for model in ("tiny_dit", "tiny_pixart", "tiny_sd3"):  # the built-in small DiT: a DiTTransformer2DModel too
        solver = ["solver=flow_euler_28", "search=headwise", "threshold=rse_0.6"] if model == "tiny_sd3" else []
        cfg = compose_cfg([f"model={model}", *solver, "parallel.context.ulysses=2"], tmp_path)
        refused(cfg, 2, f"model {model} (", "has no context-parallel plan (diffusers `_cp_plan`)", "flux")


def test_heads_and_sequences_must_split(tmp_path, one_accelerator):
    refused(compose_cfg([*FLUX, "parallel.context.ulysses=4"], tmp_path), 4,
            "parallel.context: ulysses=4 does not divide model tiny_flux's 2 attention heads")
    refused(compose_cfg([*FLUX, "parallel.context.ulysses=2", "model.tiny.text_len=7"], tmp_path), 2,
            "ulysses 2 x ring 1 = 2 does not divide model tiny_flux's 7 text tokens")
    refused(compose_cfg([*FLUX, "parallel.context.ring=3", "model.tiny.text_len=9"], tmp_path), 3,
            "does not divide model tiny_flux's 16 image tokens")  # 8 px: 4 x 4 packed latents
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):  # no tiny overrides
        flux_dev = compose("config", overrides=["model=flux_dev_1024", "solver=flow_euler_28", "search=greedy",
                                                "parallel.context.ulysses=16"])
    refused(flux_dev, 16, "parallel.context: ulysses=16 does not divide model flux_dev_1024's 24 attention heads")
    flux_dev.parallel.context.ulysses = 4
    assert check_context(flux_dev, 8).degree == 4  # 4096 image and 512 text tokens split four ways


def test_settings_the_split_model_cannot_run_are_refused(tmp_path, one_accelerator):
    if not torch.cuda.is_available():
        refused(compose_cfg([*FLUX, "parallel.context.ring=2"], tmp_path), 2, "needs each attention call's log-sum-exp")
    with pytest.raises(ConfigError, match="cuda_graphs=true"):  # validate_config refuses it first on a CPU
        cfg = compose_cfg([*FLUX, "parallel.context.ulysses=2", "cuda_graphs=true"], tmp_path)
        check_context(cfg, 2)


def test_head_wise_plans_run_under_ulysses_and_are_refused_under_ring(tmp_path, one_accelerator, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # ring's own check (cuDNN) passed
    headwise = ["model=tiny_flux", "solver=flow_euler_28", "search=headwise", "threshold=rse_0.6", "model.tiny.text_len=8"]
    assert check_context(compose_cfg([*headwise, "parallel.context.ulysses=2"], tmp_path), 2).degree == 2
    refused(compose_cfg([*headwise, "parallel.context.ring=2"], tmp_path), 2,
            "search=headwise makes head-wise plans, which fastattn runs under Ulysses alone (ring=1); use "
            "search=greedy | fast | budget")
    plan = tmp_path / "heads.json"
    CompressionPlan.from_heads([[["full"] * 2] * 2] * 5).save(plan)
    assert check_context(compose_cfg([*FLUX, "parallel.context.ulysses=2", f"plan_path={plan}"], tmp_path), 2)
    refused(compose_cfg([*FLUX, "parallel.context.ring=2", f"plan_path={plan}"], tmp_path), 2,
            f"plan_path {plan} is a head-wise plan")


def test_validate_config_lets_flux_search_layer_wise_only_under_context_parallelism(tmp_path, monkeypatch,
                                                                                   one_accelerator):
    with pytest.raises(ConfigError, match="search=headwise for sd3 and flux"):
        validate_config(compose_cfg(FLUX, tmp_path))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    validate_config(compose_cfg([*FLUX, "parallel.context.ulysses=2"], tmp_path))


def test_the_job_refuses_in_one_line_before_building_a_model(tmp_path, monkeypatch):
    import experiments.run as run_module

    def build_pipeline(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was refused")

    monkeypatch.setattr(run_module, "build_pipeline", build_pipeline)
    with pytest.raises(ConfigError, match="but this is one process"):
        run(compose_cfg([*FLUX, "parallel.context.ulysses=2"], tmp_path))


# ---------------------------------------------------------------- the job on gloo ranks

JOB = [*FLUX, "samples.num=3", "stages=[search,generate]"]


def _rank(rank: int, world: int, port: int, out: str, overrides: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda: 1  # diffusers' mesh on the CPU (see the module docstring)
    torch._C._get_accelerator = lambda: torch.device("cpu")
    run(compose_cfg(overrides, Path(out)))


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=int) for p in sorted(folder.glob("*.png"))}


_ALONE: dict[str, Path] = {}  # plan -> the one-process run of it, shared by both worlds


def one_process_run(plan: Path, tmp_path_factory) -> Path:
    """One process runs the plan the split job searched (FLUX searches head-wise alone: the plan is given)."""
    key = plan.read_text()
    if key not in _ALONE:
        _ALONE[key] = tmp_path_factory.mktemp("alone")
        run(compose_cfg([*JOB, "search=headwise", "threshold=rse_0.6", f"plan_path={plan}"], _ALONE[key]))
    return _ALONE[key]


@pytest.mark.parametrize("world", [2, 4])
def test_job_under_ulysses_writes_each_sample_once_as_one_process_makes_it(tmp_path, tmp_path_factory, world):
    split = tmp_path / "split"
    mp.spawn(_rank, args=(world, free_port(), str(split), [*JOB, "parallel.context.ulysses=2"]), nprocs=world)
    plan = CompressionPlan.load(split / "plan.json")
    assert any(m.value != "full" for row in plan.methods for m in row)  # the samples are compressed ones
    alone = one_process_run(split / "plan.json", tmp_path_factory)
    for kind in ("fastattn", "raw"):
        made, reference = pixels(split / "samples" / kind), pixels(alone / "samples" / kind)
        assert sorted(made) == sorted(reference) == [f"{i:06d}.png" for i in range(3)]
        assert max(int(np.abs(made[n] - reference[n]).max()) for n in made) <= 1, kind  # float32 rounding
        manifests = sorted(p.name for p in (split / "samples" / kind).glob("manifest*.json"))
        assert manifests == ([f"manifest.rank{g}.json" for g in range(world // 2)] if world > 2 else ["manifest.json"])
        listed = [i for m in manifests for i in json.loads((split / "samples" / kind / m).read_text())["samples"]]
        assert sorted(listed) == ["0", "1", "2"]  # each sample written once, by its group's first rank
    generation = json.loads((split / "generation.json").read_text())["generated"]["fastattn"]
    assert generation["generated"] == 3
