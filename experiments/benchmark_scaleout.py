"""Sample-generation throughput on one GPU and on all the GPUs of a torchrun job.

    torchrun --nproc_per_node 2 -m experiments.benchmark_scaleout out=outputs/scaleout [samples_dir=/scratch/x]

PixArt-Sigma-XL at 1024² with random weights (built from its diffusers config, nothing to
download) and seeded stand-in text embeddings, through the harness's own sharded generation
(``experiments/stages/generate.py``: batches, PNG writes, manifests). Two timed phases in one job, after
a warm-up on every rank: rank 0 alone makes ``samples_per_gpu`` samples while the others wait,
then every rank makes its share of ``samples_per_gpu`` x world size. Same work per GPU, so the
speed-up is the scaling efficiency times the number of GPUs. Rank 0 prints the images/s and writes
``scaleout.json`` into ``out``. ``shape=tiny`` runs the same protocol on a CPU in seconds.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from .infra import distributed
from .infra.app import hydra_app
from .infra.conditions import Conditions
from .infra.config import DTYPES, check_choice, check_int, check_set
from .infra.timing import synchronize, time_ms
from .models.solvers import make_scheduler
from .stages.generate import generate, sample_name

# PixArt-Sigma-XL-2-1024-MS: the transformer's config is diffusers' PixArtTransformer2DModel default
# (28 layers, 16 heads of 72) at a 128² latent; the VAE is SDXL's; T5 embeddings are 300 x 4096.
SHAPES = {
    "xl": {"resolution": 1024, "text_len": 300, "caption_channels": 4096},
    "tiny": {"resolution": 8, "text_len": 4, "caption_channels": 16},
}


def sdxl_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, sample_size=1024, scaling_factor=0.13025)


def build_pipeline(shape: str, device: torch.device, dtype: torch.dtype):
    """The same random weights on every rank (seeded), built on ``device``."""
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    if shape == "tiny":
        from .models.tiny import tiny_pixart_pipeline

        pipe = tiny_pixart_pipeline(sample_size=8, num_layers=2, num_heads=2, head_dim=8,
                                    caption_channels=SHAPES["tiny"]["caption_channels"])
    else:
        with torch.device(device):  # initialise on the GPU: 600M parameters are slow to fill on a CPU
            transformer = PixArtTransformer2DModel(sample_size=128, caption_channels=4096,
                                                   use_additional_conditions=False).eval()
            vae = sdxl_vae().eval()
        pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                   scheduler=make_scheduler("dpm_solver"))
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed_phase(run, device: torch.device) -> float:
    """Wall seconds from the moment every rank is ready until the last rank is done."""
    distributed.barrier()

    def run_on_every_rank():
        run()
        synchronize(device)
        distributed.barrier()

    return time_ms(run_on_every_rank, device, 0, 1, clock="wall") / 1e3


def identical_fraction(a: Path, b: Path, indices) -> float:
    """Share of samples whose PNGs match pixel for pixel (batch composition differs between phases)."""
    same = [np.array_equal(np.asarray(Image.open(a / sample_name(i))), np.asarray(Image.open(b / sample_name(i))))
            for i in indices]
    return sum(same) / len(same)


def check_config(cfg: DictConfig) -> None:
    check_set(cfg, "out", "folder of scaleout.json")
    check_choice(cfg, "shape", sorted(SHAPES))
    check_int(cfg, "samples_per_gpu", "batch_size", "steps")
    check_choice(cfg, "dtype", DTYPES)


def benchmark_scaleout(cfg: DictConfig) -> dict | None:
    """Rank 0's result (None on the other ranks)."""
    check_config(cfg)
    out = Path(cfg.out)
    with distributed.joined():
        rank, world = distributed.rank(), distributed.world_size()
        device = distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        samples = Path(cfg.samples_dir or out)
        distributed.check_shared_dir(samples)
        shape = SHAPES[cfg.shape]
        pipe = build_pipeline(cfg.shape, device, getattr(torch, cfg.dtype))
        conditions = Conditions(OmegaConf.create({"family": "pixart", "resolution": shape["resolution"],
                                                  "tiny": {"text_len": shape["text_len"],
                                                           "caption_channels": shape["caption_channels"]}}))
        common = dict(seed=0, num_steps=cfg.steps, guidance_scale=float(cfg.guidance_scale), batch_size=cfg.batch_size,
                      device=device)
        n, one, all_ = cfg.samples_per_gpu, samples / "one_gpu", samples / f"{world}_gpus"
        if distributed.is_main():  # generate() resumes: samples left from an earlier run would not be timed
            for folder in (samples / "warmup", one, all_):
                shutil.rmtree(folder, ignore_errors=True)
        distributed.barrier()
        # Warm-up on every rank (kernel selection, allocator), into a folder of its own.
        generate(pipe, conditions, range(world * cfg.batch_size), samples / "warmup", **common, rank=rank,
                 world_size=world, desc="warm-up")

        def rank0_alone():
            if rank == 0:
                generate(pipe, conditions, range(n), one, **common, desc="1 GPU")

        one_seconds = timed_phase(rank0_alone, device)
        all_seconds = timed_phase(lambda: generate(pipe, conditions, range(n * world), all_, **common, rank=rank,
                                                   world_size=world, desc=f"{world} GPUs"), device)
        if not distributed.is_main():
            return None
        result = {
            "kind": "benchmark_scaleout",
            "shape": cfg.shape, "resolution": shape["resolution"], "steps": cfg.steps,
            "batch_size": cfg.batch_size, "dtype": cfg.dtype, "samples_per_gpu": n, "gpus": world,
            "one_gpu_images_per_s": n / one_seconds,
            "all_gpus_images_per_s": n * world / all_seconds,
            "speedup": one_seconds * world / all_seconds,
            "one_gpu_seconds": one_seconds, "all_gpus_seconds": all_seconds,
            "identical_png_fraction": identical_fraction(one, all_, range(n)),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "versions": {"torch": torch.__version__},
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaleout.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"{result['device']}: 1 GPU {result['one_gpu_images_per_s']:.3f} images/s, {world} GPUs "
              f"{result['all_gpus_images_per_s']:.3f} images/s, speed-up {result['speedup']:.2f}x "
              f"({cfg.shape}, {cfg.steps} steps, batch {cfg.batch_size}, {n} samples per GPU)")
        return result


main = hydra_app("benchmark_scaleout", benchmark_scaleout)

if __name__ == "__main__":
    main()
