"""What a user's GPU has to hold: the whole pipeline's peak memory (text encoder, denoising loop,
VAE decode), raw and under plans, with the caches as computed or in FP8, on the GPU or in host
memory, on random weights.

Every model of the pipeline sits on the device (no offloading), as a user without memory trouble
runs it. Each stage's peak is ``torch.cuda.max_memory_allocated`` after a reset at the stage's
start (the resident weights of all models count in every stage); the pipeline's peak is the
largest. The transformer-alone peak is the end-to-end section's (``peak_bytes`` there). On a CPU
the stages run and the memory fields are None.
"""

from __future__ import annotations

import torch

from fastattn import apply_fastattn, remove_fastattn

from ..models.solvers import make_scheduler
from .architectures import TEXT_TOKENS, BenchModel
from .end_to_end import plans_for

# The text encoder and VAE of PixArt-Sigma (T5 v1.1 XXL's encoder, SDXL's VAE), and tiny stand-ins.
TEXT_ENCODERS = {
    "t5_v1_1_xxl": dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                        relative_attention_max_distance=128),
    "tiny_t5": dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=128,
                    feed_forward_proj="gated-gelu"),
}
VAES = {
    "sdxl": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, scaling_factor=0.13025),
    "tiny": dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.13025),
}
STAGES = ("encode", "denoise", "decode")


def build_pipeline(bm: BenchModel, text_encoder: str, vae: str, device, dtype):
    """A PixArt-Sigma pipeline around ``bm``'s transformer, with a random text encoder and VAE
    built from their configs on ``device`` (no tokenizer: the benchmark feeds token ids)."""
    from diffusers import AutoencoderKL, PixArtSigmaPipeline
    from transformers import T5Config, T5EncoderModel

    if bm.family != "pixart":
        raise ValueError(f"pipeline memory: PixArt-Sigma pipelines only, got a {bm.family} model")
    torch.manual_seed(0)
    with torch.device(device):
        encoder = T5EncoderModel(T5Config(**TEXT_ENCODERS[text_encoder]))
        spec = dict(VAES[vae])
        blocks = len(spec["block_out_channels"])
        autoencoder = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("DownEncoderBlock2D",) * blocks,
                                    up_block_types=("UpDecoderBlock2D",) * blocks, **spec)
    encoder, autoencoder = (m.to(dtype).eval().requires_grad_(False) for m in (encoder, autoencoder))
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=encoder, vae=autoencoder, transformer=bm.transformer,
                               scheduler=make_scheduler("dpm_solver"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stage_peak(device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    if device.type != "cuda":
        return out, None
    torch.cuda.synchronize(device)
    return out, torch.cuda.max_memory_allocated(device)


@torch.no_grad()
def generation_peaks(pipe, bm: BenchModel, steps: int, guidance: float, device) -> dict:
    """One generation of ``bm.images`` images, stage by stage: peak bytes of each (None on a CPU)."""
    encoder = pipe.text_encoder
    vocab = encoder.config.vocab_size
    ids = torch.randint(1, vocab, (2 * bm.images, TEXT_TOKENS), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    text, encode = _stage_peak(device, lambda: encoder(ids, attention_mask=mask)[0])
    cond, uncond = text.chunk(2)
    size = bm.latent_size * pipe.vae_scale_factor
    latents, denoise = _stage_peak(device, lambda cond=cond, uncond=uncond: pipe(  # bound now: deleted below
        prompt_embeds=cond, prompt_attention_mask=mask[: bm.images], negative_prompt=None,
        negative_prompt_embeds=uncond, negative_prompt_attention_mask=mask[bm.images:], num_inference_steps=steps,
        guidance_scale=guidance, height=size, width=size, use_resolution_binning=False, output_type="latent",
        generator=torch.Generator(device).manual_seed(0)).images)
    del text, cond, uncond
    _, decode = _stage_peak(device, lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample)
    peaks = {"encode": encode, "denoise": denoise, "decode": decode}
    return {**{f"{k}_peak_bytes": v for k, v in peaks.items()},
            "pipeline_peak_bytes": None if device.type != "cuda" else max(peaks.values())}


def run_pipeline_memory(bm: BenchModel, fractions, steps: int, guidance: float, device, cache_dtypes=(None,),
                        text_encoder: str = "t5_v1_1_xxl", vae: str = "sdxl", dtype=torch.bfloat16,
                        cache_devices=(None,)) -> list[dict]:
    """Rows: raw, then every recipe plan at ``fractions`` with each cache dtype in each cache
    device (None: beside the model, "cpu": host memory); ratios against raw."""
    pipe = build_pipeline(bm, text_encoder, vae, device, dtype)
    rows = [{"model": bm.name, "plan": "raw", "cache_dtype": None, "cache_device": None, "flops_fraction": 1.0,
             **generation_peaks(pipe, bm, steps, guidance, device)}]
    raw = rows[0]
    for name, plan in plans_for(bm, steps, fractions).items():
        for cache_dtype, cache_device in ((c, d) for c in cache_dtypes for d in cache_devices):
            apply_fastattn(pipe, plan, cache_dtype=cache_dtype, cache_device=cache_device)
            try:
                row = {"model": bm.name, "plan": name, "cache_dtype": cache_dtype, "cache_device": cache_device,
                       "flops_fraction": plan.attention_flops(bm.seq_len)["fraction"],
                       **generation_peaks(pipe, bm, steps, guidance, device)}
            finally:
                remove_fastattn(pipe)
            rows.append(row)
    for row in rows:
        for key in ("denoise", "pipeline"):
            peak, base = row[f"{key}_peak_bytes"], raw[f"{key}_peak_bytes"]
            row[f"{key}_ratio"] = peak / base if peak and base else None
    del pipe
    return rows


__all__ = ["STAGES", "TEXT_ENCODERS", "VAES", "build_pipeline", "generation_peaks", "run_pipeline_memory"]
