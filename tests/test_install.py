"""``pip install <checkout>`` (not editable) into a fresh venv, then the ``fastattn`` script runs
the main job from another folder and writes what the checkout's ``python -m experiments.run`` writes.

Offline and quick: the wheel is built with this environment's setuptools (no build isolation)
from a copy of the checkout's files, and installed without dependencies into a new venv that
sees this environment's packages (torch, diffusers, ...) through a .pth file, after its own. The
venv imports fastattn, its harness and its configs from the wheel only.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from test_run import ROOT, SMALL

RUN = ["model=tiny_dit", *SMALL, "plan_cache_dir=null"]


def _run(cmd, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's bin folder, the wheel) after a non-editable install of the checkout."""
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the files to build from are the ones git knows)")
    tmp = tmp_path_factory.mktemp("install")
    files = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT).stdout
    for name in filter(None, files.split("\0")):  # the checkout's files, not its build folders or outputs
        if (ROOT / name).is_file():
            (tmp / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp / "src" / name)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", str(tmp / "wheels"), str(tmp / "src")], tmp)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = (tmp / "wheels").glob("fastattn-*.whl")
    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], tmp)
    assert made.returncode == 0, made.stderr[-3000:]
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")  # after the venv's own packages
    done = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return bin_dir, wheel


def test_the_wheel_holds_the_harness_inside_fastattn(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"fastattn"}
    for shipped in ("fastattn/conf/config.yaml", "fastattn/conf/model/small_dit.yaml",
                    "fastattn/conf/hydra/launcher/slurm_gpu.yaml", "fastattn/experiments/run.py",
                    "fastattn/experiments/latency_tables/h100_sd3_medium_1024.json", "fastattn/analysis/tables.py",
                    "fastattn/models/default/transformer/diffusion_pytorch_model.safetensors", "fastattn/__main__.py"):
        assert shipped in names, shipped


def test_console_script_runs_the_main_job_from_another_folder_as_the_checkout_does(installed, tmp_path):
    bin_dir, _ = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(bin_dir / "python"), "-c", "import fastattn, fastattn.experiments.infra.app as app; "
                  "print(fastattn.__file__); print(app.CONF_DIR)"], elsewhere)
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(Path(line).is_relative_to(bin_dir.parent) for line in where.stdout.split()), where.stdout
    assert _run([str(bin_dir / "python"), "-c", "import experiments"], elsewhere).returncode != 0  # no top-level name

    installed_run = _run([str(bin_dir / "fastattn"), "run", *RUN, "hydra.run.dir=out"], elsewhere)
    assert installed_run.returncode == 0, installed_run.stderr[-3000:]
    checkout_run = _run([sys.executable, "-m", "experiments.run", *RUN, f"hydra.run.dir={tmp_path / 'checkout'}"], ROOT)
    assert checkout_run.returncode == 0, checkout_run.stderr[-3000:]

    ours, theirs = elsewhere / "out", tmp_path / "checkout"
    assert {p.name for p in ours.iterdir()} == {p.name for p in theirs.iterdir()}
    plan, expected = (json.loads((d / "plan.json").read_text()) for d in (ours, theirs))
    assert plan["methods"] == expected["methods"] and plan["model"] == expected["model"]
    for kind in ("raw", "fastattn"):
        for png in sorted((theirs / "samples" / kind).glob("*.png")):
            assert (ours / "samples" / kind / png.name).read_bytes() == png.read_bytes(), png
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (ours, theirs))
    for key in ("attn_flops_fraction", "sample_psnr_db", "ssim", "sample_mean_relative_error", "num_samples"):
        assert metrics[key] == expected[key], key

    tables = _run([str(bin_dir / "python"), "-m", "fastattn", "tables", "out"], elsewhere)
    assert tables.returncode == 0 and (ours / "tables").is_dir(), tables.stderr[-2000:]
    bad = _run([str(bin_dir / "fastattn"), "run", "model=tiny_latte"], elsewhere)
    assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1 and "model.family" in bad.stderr, bad.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == ["out"]  # the failed run left no folder behind
