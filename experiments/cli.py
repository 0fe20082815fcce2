"""The ``fastattn`` command (also ``python -m fastattn``): one name for each job of the harness.

    fastattn run model=tiny_pixart threshold=d4     # in a checkout: python -m experiments.run ...
    fastattn tables outputs/sweeps/default/<date>   # python -m analysis.tables ...
    fastattn bench headwise arch=flux_dev resolution=2048
    fastattn --verbose run ...                      # a failure shows its traceback (HYDRA_FULL_ERROR=1)

Everything after the command's name goes to the job unchanged (``fastattn run --help``: its options).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from fastattn.utils.cli import VERBOSE_ENV, fail

from . import harness_module

# command -> (module by its checkout name, what it does)
COMMANDS = {
    "run": ("experiments.run", "the main job: search a plan, generate raw and compressed samples, measure"),
    "video": ("experiments.video_sample", "the video job (Latte, Wan)"),
    "redundancy": ("experiments.redundancy", "attention locality and step / CFG similarity (paper Figs. 3-4)"),
    "evidence": ("experiments.evidence", "the built-in model's evidence table (thresholds, single techniques)"),
    "cache-quality": ("experiments.cache_quality", "one plan's samples with FP8 / host caches against exact caches"),
    "compare-caches": ("experiments.compare_caches", "fastattn against cache hooks and cache-dit, per seed"),
    "coverage": ("experiments.coverage", "which DiT classes of the installed diffusers fastattn serves (tiny, CPU)"),
    "tables": ("analysis.tables", "the paper's Tables 1-6 from runs' metrics.json"),
    "tables-v2": ("analysis.tables_v2", "DiTFastAttnV2's table from runs' metrics.json"),
    "bench": ("experiments.benchmark", "GPU: kernel sweep, Table 2, Tables 3-4 (random weights)"),
    "bench headwise": ("experiments.benchmark_headwise", "GPU: head-wise (V2) kernels and steps, latency table"),
    "bench video": ("experiments.benchmark_video", "GPU: video DiT latency under fastattn"),
    "bench zoo": ("experiments.benchmark_zoo", "GPU: HunyuanVideo, CogVideoX, Qwen-Image at full size"),
    "bench equal-quality": ("experiments.benchmark_equal_quality",
                            "GPU: compare_caches rows at equal PSNR replayed and timed at full size"),
    "bench context": ("experiments.benchmark_context", "GPUs (torchrun): fastattn on diffusers' Ulysses / ring"),
    "bench context-model": ("experiments.bench.context_model", "context parallelism: bytes and ring steps"),
    "bench scaleout": ("experiments.benchmark_scaleout", "generation throughput on one and on n GPUs"),
    "bench arrow-probe": ("experiments.bench.arrow_probe", "GPU: one head-wise arrow layer, kernel by kernel"),
    "bench window-probe": ("experiments.bench.window_probe", "GPU: what bounds a window kernel at one shape"),
    "bench search-time": ("experiments.bench.search_time", "GPU: Table 6, Algorithm 1's search time (random weights)"),
    "bench fa4-probe": ("experiments.bench.fa4_probe", "GPU: FlashAttention-4 against the other kernels"),
    "bench fa4-tiles": ("experiments.bench.fa4_tiles", "GPU: FA4 tile configurations"),
    "bench profile-loop": ("experiments.profile_loop", "GPU: where a denoising loop's time goes"),
    "gpu-check": ("experiments.gpu_check", "GPU: kernels against a float64 reference"),
    "train-default-model": ("experiments.train_default_model", "retrain the built-in small DiT"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(["usage: fastattn [--verbose] COMMAND [ARGS ...]   (fastattn COMMAND --help: its options)",
                      "", "commands:", *rows])


def find_command(argv: Sequence[str]) -> tuple[str, list[str]]:
    """(command, its arguments): the longest command name ``argv`` starts with."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            return name, list(argv[words:])
    fail(f"fastattn: unknown command {argv[0]!r} (commands: {', '.join(COMMANDS)}; see fastattn --help)", status=2)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--verbose"]:
        os.environ[VERBOSE_ENV] = "1"
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name, args = find_command(argv)
    module = harness_module(COMMANDS[name][0])
    sys.argv = [f"fastattn {name}", *args]  # the job's parser reads the rest; its --help names the command
    sys.exit(module.main() or 0)
