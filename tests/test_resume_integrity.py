"""Runs that cannot lie (issue 33): a resumed run proves it resumes the same work, one run at a
time holds a run folder, default folder names never collide, and an interrupted run's leftovers
(truncated PNGs, orphaned temporaries) are found and replaced. CPU, offline, tiny models."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_app
from omegaconf import OmegaConf
from test_run import ROOT, SMALL, compose_cfg

from experiments.infra.app import ConfigError
from experiments.infra.conditions import Conditions
from experiments.stages.generate import generate
from experiments.run import run
from experiments.infra.run_folder import LOCK_NAME, acquire, release
from experiments.video_sample import run_video
from experiments.stages.search import plan_key
from fastattn import CompressionPlan

FAST = ["stages=[search,generate]", "metrics.latency.enabled=false"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One finished search + generate run (3 raw and 3 compressed samples); tests resume copies of it."""
    out = tmp_path_factory.mktemp("first") / "run"
    run(compose_cfg(FAST, out))
    return out


@pytest.fixture
def resumable(first_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    return out


def png_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def other_plan_file(out: Path) -> Path:
    """A plan for the same model that applies something else than the run's own plan."""
    data = CompressionPlan.load(out / "plan.json").to_dict()
    data["methods"] = [["full"] * len(row) for row in data["methods"]]
    data["window_size"] = 0.25 if data["window_size"] != 0.25 else 0.5
    path = out.parent / "other_plan.json"
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------- 1: the fingerprint

def test_resume_with_a_given_other_plan_is_refused_before_the_model_is_built(resumable, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the fingerprint check")

    monkeypatch.setattr("experiments.run.build_pipeline", no_model)
    with pytest.raises(ConfigError, match=r"samples/fastattn: 3 samples made with other settings \(plan: ") as error:
        run(compose_cfg([*FAST, f"plan_path={other_plan_file(resumable)}"], resumable))
    assert "samples.on_mismatch=regenerate" in str(error.value) and "\n" not in str(error.value)


def test_resume_with_a_searched_other_plan_is_refused_before_plan_json_is_replaced(resumable):
    cfg = compose_cfg(FAST, resumable)
    cache = Path(cfg.plan_cache_dir) / f"{cfg.model.name}-{plan_key(cfg)}.json"
    shutil.copy(other_plan_file(resumable), cache)  # the plan cache now answers another plan
    plan_before = (resumable / "plan.json").read_bytes()
    with pytest.raises(ConfigError, match=r"made with other settings \(plan: "):
        run(cfg)
    assert (resumable / "plan.json").read_bytes() == plan_before


@pytest.mark.parametrize("override,field", [
    ("samples.seed=5", "seed: 0 then, 5 now"),
    ("solver.num_steps=4", "num_steps: 5 then, 4 now"),
    ("guidance_scale=2.0", "guidance_scale: 4.0 then, 2.0 now"),
    ("data.class_labels=[1,2,3]", "condition of sample 0"),
    ("model.tiny.num_layers=3", "model.tiny"),
])
def test_resume_with_other_settings_is_refused_naming_them(resumable, override, field):
    with pytest.raises(ConfigError, match=re.escape(field)) as error:
        run(compose_cfg([*FAST, override], resumable))
    assert "samples/raw" in str(error.value)  # the raw folder: checked first, before the model is built


def test_evaluating_samples_made_with_other_settings_is_refused(resumable):
    with pytest.raises(ConfigError, match=re.escape("seed: 0 then, 5 now")):
        run(compose_cfg(["stages=[evaluate]", "samples.seed=5", "samples.on_mismatch=regenerate"], resumable))


def test_evaluating_a_corrupt_sample_or_record_is_one_line_naming_the_file(resumable):
    # The evaluate stage alone reads what earlier stages wrote: a truncated PNG (made after the
    # fingerprint check, so only decoding finds it) or a truncated record names the file.
    cfg = ["stages=[evaluate]", "metrics=basic"]
    png = resumable / "samples" / "fastattn" / "000001.png"
    png.write_bytes(png.read_bytes()[:60])
    with pytest.raises(ConfigError, match=re.escape(f"{png}: not a readable image")) as error:
        run(compose_cfg(cfg, resumable))
    assert "run the generate stage" in str(error.value) and "\n" not in str(error.value)
    record = resumable / "generation.json"
    record.write_text(record.read_text()[:40])
    with pytest.raises(ConfigError, match=re.escape(f"{record}: not a valid generation record JSON file")):
        run(compose_cfg(cfg, resumable))


def test_regenerate_discards_the_old_samples_and_makes_them_anew(resumable, tmp_path):
    run(compose_cfg([*FAST, "samples.seed=5", "samples.on_mismatch=regenerate"], resumable))
    fresh = tmp_path / "fresh"
    run(compose_cfg([*FAST, "samples.seed=5"], fresh))
    for kind in ("raw", "fastattn"):
        assert png_bytes(resumable / "samples" / kind) == png_bytes(fresh / "samples" / kind)
    generation = json.loads((resumable / "generation.json").read_text())
    assert generation["fingerprint"]["raw"]["seed"] == 5 and generation["generated"]["raw"]["generated"] == 3


def test_bad_on_mismatch_value_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="samples.on_mismatch must be one of refuse, regenerate, got 'keep'"):
        run(compose_cfg([*FAST, "samples.on_mismatch=keep"], tmp_path))


def test_fingerprint_in_every_manifest_and_record(first_run):
    generation = json.loads((first_run / "generation.json").read_text())
    for kind in ("raw", "fastattn"):
        manifest = json.loads((first_run / "samples" / kind / "manifest.json").read_text())
        assert manifest["fingerprint"] == generation["fingerprint"][kind]
    assert generation["fingerprint"]["raw"]["plan"] == "none (raw)"
    assert len(generation["fingerprint"]["fastattn"]["plan"]) == 16
    assert generation["fingerprint"]["fastattn"]["model.resolution"] == 8


def test_manifests_from_before_fingerprints_are_refused(resumable):
    manifest_file = resumable / "samples" / "raw" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["fingerprint"]
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="3 samples made before fingerprints were recorded"):
        run(compose_cfg(FAST, resumable))


def test_every_rank_manifest_must_agree(dit_pipe, tmp_path):
    conditions = Conditions(OmegaConf.create({"family": "dit", "num_classes": 1000}))
    args = dict(seed=0, num_steps=3, guidance_scale=4.0, batch_size=2, device=torch.device("cpu"))
    for rank in (0, 1):
        generate(dit_pipe, conditions, range(4), tmp_path, **args, rank=rank, world_size=2)
    rank1 = tmp_path / "manifest.rank1.json"
    rank1.write_text(rank1.read_text().replace('"num_steps": 3', '"num_steps": 7'))
    with pytest.raises(ConfigError, match=re.escape("num_steps: 7 then, 3 now")):
        generate(dit_pipe, conditions, range(4), tmp_path, **args, rank=0, world_size=2)


# ---------------------------------------------------------------- 2: the lock, unique names

def test_a_second_run_into_a_held_folder_stops_with_one_line(resumable):
    fd = acquire(resumable)  # as another run would
    try:
        with pytest.raises(ConfigError, match=r"another run \(pid \d+ on .*\) holds this folder"):
            run(compose_cfg(FAST, resumable))
        cmd = [sys.executable, "-m", "experiments.run", "model=tiny_dit", *SMALL, *FAST, f"hydra.run.dir={resumable}",
               f"plan_cache_dir={resumable}/plan_cache"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        release(fd, resumable)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "holds this folder" in line] == [proc.stderr.strip()]
    run(compose_cfg(FAST, resumable))  # released: the run goes on
    assert not (resumable / LOCK_NAME).exists()


def test_the_video_job_holds_its_folder_too(tmp_path):
    cfg = compose_app("video", ["device=cpu", "samples.num=1", "num_steps=2"])
    cfg.output_dir = str(tmp_path)
    fd = acquire(tmp_path)
    try:
        with pytest.raises(ConfigError, match="holds this folder"):
            run_video(cfg)
    finally:
        release(fd, tmp_path)


def test_a_killed_holder_leaves_the_folder_free(tmp_path):
    code = f"from experiments.infra.run_folder import acquire; acquire(__import__('pathlib').Path({str(tmp_path)!r})); print('held', flush=True); __import__('time').sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match="holds this folder"):
            acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    release(acquire(tmp_path), tmp_path)  # the kernel dropped the dead holder's lock


@pytest.mark.parametrize("config,key", [("config", "run"), ("config", "sweep"), ("video", "run")])
def test_default_folder_names_differ_in_the_same_second_and_sort_by_time(config, key):
    first, second = (compose_app(config, return_hydra_config=True).hydra[key].dir for _ in range(2))
    assert first != second
    assert re.search(r"/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}-\d+$", first)
    assert first < second  # same process: the microseconds order them


# ---------------------------------------------------------------- 8, 9: leftovers of an interrupted run

def test_truncated_png_is_made_again_and_orphans_are_removed(resumable, caplog):
    raw = resumable / "samples" / "raw"
    original = png_bytes(raw)
    damaged = raw / "000001.png"
    damaged.write_bytes(original["000001.png"][: len(original["000001.png"]) // 2])
    orphans = [raw / ".000002.png.abc123.tmp", resumable / ".generation.json.xyz.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        run(compose_cfg(FAST, resumable))
    assert png_bytes(raw) == original
    assert not any(orphan.exists() for orphan in orphans)
    assert "1 finished sample(s) do not decode (first: 000001.png): making them again" in caplog.text
    assert "orphaned temporary" in caplog.text
    generated = json.loads((resumable / "generation.json").read_text())["generated"]
    assert generated["raw"]["generated"] == 1 and generated["fastattn"]["generated"] == 0


def test_generation_json_keeps_the_earlier_parts_totals(first_run, resumable):
    before = json.loads((first_run / "generation.json").read_text())["generated"]
    run(compose_cfg(FAST, resumable))  # nothing left to make
    after = json.loads((resumable / "generation.json").read_text())["generated"]
    for kind in ("raw", "fastattn"):
        assert after[kind]["generated"] == 0 and after[kind]["skipped"] == 3
        assert after[kind]["total_generated"] == 3
        assert after[kind]["total_seconds"] == pytest.approx(before[kind]["total_seconds"])
        assert before[kind]["total_seconds"] > 0


GENERATE_SLOWLY = """
import sys, time
import torch
from contextlib import contextmanager
from omegaconf import OmegaConf
from experiments.infra.conditions import Conditions
from experiments.stages.generate import generate
from experiments.models.tiny import tiny_dit_pipeline

@contextmanager
def slowly():
    yield
    time.sleep(0.2)  # room for the kill between batches and writes

pipe = tiny_dit_pipeline(sample_size=16, num_layers=3, num_heads=2, head_dim=8, seed=0)
pipe.set_progress_bar_config(disable=True)
conditions = Conditions(OmegaConf.create({"family": "dit", "num_classes": 1000}))
generate(pipe, conditions, range(8), sys.argv[1], seed=0, num_steps=4, guidance_scale=4.0, batch_size=1,
         device=torch.device("cpu"), call_context=slowly if len(sys.argv) > 2 else None)
"""


def test_killed_generation_resumes_bit_identically(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([sys.executable, "-c", GENERATE_SLOWLY, str(whole)], cwd=ROOT, check=True, timeout=300)
    proc = subprocess.Popen([sys.executable, "-c", GENERATE_SLOWLY, str(killed), "slowly"], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "manifest.json").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.25)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 0 < len(json.loads((killed / "manifest.json").read_text())["samples"]) < 8  # killed part way
    (killed / ".000007.png.left.tmp").write_bytes(b"as a kill during its write leaves it")
    subprocess.run([sys.executable, "-c", GENERATE_SLOWLY, str(killed)], cwd=ROOT, check=True, timeout=300)
    assert png_bytes(killed) == png_bytes(whole) and len(png_bytes(whole)) == 8
    assert not list(killed.glob(".*.tmp"))
