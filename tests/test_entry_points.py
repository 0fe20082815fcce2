"""Every command of experiments/ is a Hydra app made by the one scaffold (experiments/infra/app.py): no
argparse left, every app's config composes, and a bad value on the command line stops it with
its one-line message before any model is built."""

import re
import subprocess
import sys

import pytest
import torch

from conftest import CONF
from test_run import ROOT

ENTRY = re.compile(r'^main = hydra_app\("(\w+)", \w+(?:, conf_dir=CONF_DIR / "(\w+)")?(?:, accepts=\w+|, accepts=\{.+\})?\)$', re.M)


def commands() -> dict[str, tuple[str, str]]:
    """module -> (config name, folder below conf/) of every module that runs as a command."""
    found = {}
    for path in sorted((ROOT / "experiments").rglob("*.py")):
        source = path.read_text()
        if 'if __name__ == "__main__":' in source:
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            (name, folder), = ENTRY.findall(source) or [(None, None)]
            found[module] = (name, folder)
    return found


def test_every_command_is_a_hydra_app_without_argparse():
    found = commands()
    assert len(found) >= 13 and {"experiments.redundancy", "experiments.bench.arrow_probe"} <= set(found)
    assert not [m for m, (name, _) in found.items() if name is None], "commands not made by hydra_app"
    assert not [p.name for p in (ROOT / "experiments").rglob("*.py") if "argparse" in p.read_text()]


@pytest.mark.parametrize("module", sorted(commands()))
def test_every_commands_config_composes(module):
    from hydra import compose, initialize_config_dir

    name, folder = commands()[module]
    with initialize_config_dir(config_dir=str(CONF / (folder or "")), version_base="1.3"):
        assert compose(name) is not None


@pytest.mark.parametrize("module,overrides,message", [
    ("experiments.profile_loop", ["fraction=1.5"], "fraction must be a number in (0, 1] or null, got 1.5"),
    ("experiments.benchmark_scaleout", ["out=unused", "shape=huge"], "shape must be one of tiny, xl, got 'huge'"),
    ("experiments.benchmark_scaleout", [], "out is not set: give out=<folder of scaleout.json>"),
    ("experiments.benchmark_video", ["out=unused", "steps=1"], "steps must be an integer >= 2, got 1"),
    ("experiments.bench.arrow_probe", ["repeats=0"], "repeats must be an integer >= 1, got 0"),
    ("experiments.compare_caches", ["caches=[{kind:nope}]"],
     "caches[0].kind must be one of first_block_cache, mag_cache, taylorseer, pab, faster_cache, sea_cache, "
     "text_kv_cache, cache_dit, got 'nope'"),
    ("experiments.bench.window_probe", ["grid=[21,30]"],
     "grid must be three integers >= 1 (frames, rows, columns), got [21, 30]"),
])
def test_bad_values_on_the_command_line_are_one_line(tmp_path, module, overrides, message):
    cmd = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and message in proc.stderr.splitlines(), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize("module,what", [("experiments.gpu_check", "gpu_check"),
                                         ("experiments.bench.arrow_probe", "arrow_probe (FlexAttention kernels)"),
                                         ("experiments.bench.window_probe", "window_probe (FlexAttention kernels)")])
def test_gpu_only_commands_say_so_on_a_cpu(tmp_path, module, what):
    proc = subprocess.run([sys.executable, "-m", module, f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and f"{what} needs a CUDA device; torch sees none" in proc.stderr.splitlines()
