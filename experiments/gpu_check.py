"""GPU check of the core: kernels against a float64 reference on CUDA, and one denoising step of
a PixArt-Sigma-XL-shaped transformer (random weights, bf16) under each method.

    python -m experiments.gpu_check out=results.json

Prints a short table. The per-method step times are a first look; the kernels issue adds the
benchmark proper (experiments/benchmark.py).
"""

from __future__ import annotations

import json

import torch
from omegaconf import DictConfig

from fastattn import CompressionPlan, apply_fastattn, remove_fastattn
from fastattn.kernels import band_mask_mod, dense_attention, dense_mask, window_attention, window_half_width

from .infra.app import hydra_app
from .infra.config import require_cuda
from .infra.timing import time_ms


def kernel_errors(device) -> list[dict]:
    rows = []
    for seq_len, head_dim, dtype in ((1024, 72, torch.bfloat16), (4096, 72, torch.bfloat16), (1000, 64, torch.float32)):
        g = torch.Generator(device=device).manual_seed(seq_len)
        q, k, v = (torch.randn(2, 4, seq_len, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
        w = window_half_width(seq_len, 0.125)
        mask = dense_mask(band_mask_mod(w), seq_len, seq_len, device=device)
        qd, kd, vd = q.double(), k.double(), v.double()
        scores = qd @ kd.transpose(-1, -2) / head_dim**0.5
        ref_full = scores.softmax(-1) @ vd
        ref_win = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vd
        rows.append({
            "seq_len": seq_len, "head_dim": head_dim, "dtype": str(dtype),
            "dense_max_err": (dense_attention(q, k, v).double() - ref_full).abs().max().item(),
            "window_max_err": (window_attention(q, k, v, w).double() - ref_win).abs().max().item(),
        })
    return rows


@torch.no_grad()
def pixart_step_times(device, sample_size=128, repeats=5) -> list[dict]:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(sample_size=sample_size, caption_channels=4096,
                                     use_additional_conditions=False).to(device, torch.bfloat16).eval()
    n_layers = len(model.transformer_blocks)
    # a CFG batch: equal latent halves (what fastattn reads as one), so asc and wars+asc run
    x = torch.randn(1, 4, sample_size, sample_size, device=device, dtype=torch.bfloat16).repeat(2, 1, 1, 1)
    text = torch.randn(2, 300, 4096, device=device, dtype=torch.bfloat16)
    kwargs = dict(encoder_hidden_states=text, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                  return_dict=False)
    timesteps = iter(range(999, 0, -1))  # fastattn counts a step per new timestep value

    def step():
        model(x, timestep=torch.full((2,), float(next(timesteps)), device=device), **kwargs)

    rows = [{"method": "unmodified", "step_ms": time_ms(step, device, 1, repeats, clock="wall")}]
    for method in ("full", "wars", "ast", "asc", "wars+asc"):
        # step 0 is full (and refreshes); every later call runs `method` on all layers
        plan = CompressionPlan([["full"] * n_layers] + [[method] * n_layers] * (repeats + 1))
        handle = apply_fastattn(model, plan)
        step()
        rows.append({"method": method, "step_ms": time_ms(step, device, 1, repeats, clock="wall")})
        if handle.counter.step != repeats + 1:  # else the timed calls did not run the plan's later steps
            raise RuntimeError(f"gpu_check: the timed calls ran up to step {handle.counter.step}, not {repeats + 1}")
        remove_fastattn(model)
    return rows


def gpu_check(cfg: DictConfig) -> dict:
    require_cuda("gpu_check")
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "kernels": kernel_errors(device), "pixart_1024_step": pixart_step_times(device)}
    with open(cfg.out, "w") as f:
        json.dump(result, f, indent=2)
    print(result["device"], result["torch"])
    for r in result["kernels"]:
        print(f"L={r['seq_len']:5d} d={r['head_dim']} {r['dtype']:15s} dense err {r['dense_max_err']:.2e} "
              f"window err {r['window_max_err']:.2e}")
    for r in result["pixart_1024_step"]:
        print(f"{r['method']:10s} {r['step_ms']:8.2f} ms/step")
    return result


main = hydra_app("gpu_check", gpu_check)

if __name__ == "__main__":
    main()
