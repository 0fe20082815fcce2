"""FA4 tile configurations for the band and block shapes for the refresh's off-band pass (GPU).

For each head dim, times the 1/8 band with each candidate (tile_m, tile_n, P·V from registers,
intra-warpgroup overlap) and the merge refresh with each off-band block shape, checks each
against FA4's default configuration (max abs difference), and prints the winners as the
``WINDOW_TILES`` / ``REFRESH_BLOCKS`` entries of :mod:`fastattn.kernels.fa4`. Also the GPU time
(CUDA graph replays) of the band by FA4 and FlexAttention at 4,096 tokens, where launch
overhead hides it in eager timing.

    python -m experiments.bench.fa4_tiles out=tiles.json
"""

from __future__ import annotations

import json

import torch

from fastattn.kernels import fa4, fa4_mode, set_window_backend, window_attention
from fastattn.kernels.masks import window_half_width

from ..infra.app import hydra_app
from ..infra.config import check_int, require_cuda
from ..infra.timing import time_graphed_ms, time_ms
from .kernels import TARGET_WINDOW_SIZE as BAND_1_8  # "the 1/8 band": 1/16 on each side

SHAPES = {72: (2, 16, 16384, 72), 128: (1, 24, 16896, 128)}
WINDOW_CANDIDATES = {
    72: [(128, 128, False, True), (128, 128, True, True), (192, 144, False, True), (192, 112, False, True),
         (128, 176, False, True), (192, 96, False, True)],
    128: [(128, 96, True, True), (128, 160, True, True), (128, 176, True, True), (128, 128, False, True),
          (192, 128, False, True)],
}
BLOCK_CANDIDATES = {72: [(192, 128), (192, 112), (192, 160), (384, 144)], 128: [(128, 96), (256, 128), (128, 160)]}


def qkv(shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3)]


def tune(dim, warmup, repeats) -> dict:
    cuda = torch.device("cuda")
    q, k, v = qkv(SHAPES[dim])
    w = window_half_width(q.shape[-2], BAND_1_8)
    fa4.WINDOW_TILES.pop(dim, None)
    fa4.REFRESH_BLOCKS.pop(dim, None)
    ref = fa4.window(q, k, v, w)
    out = {"window": {"default": time_ms(lambda: fa4.window(q, k, v, w), cuda, warmup, repeats)}}
    for cand in WINDOW_CANDIDATES[dim]:
        fa4.WINDOW_TILES[dim] = cand
        try:
            err = (fa4.window(q, k, v, w).float() - ref.float()).abs().max().item()
            out["window"][str(cand)] = time_ms(lambda: fa4.window(q, k, v, w), cuda, warmup, repeats)
            out["window"][str(cand) + " err"] = err
        except Exception as e:  # noqa: BLE001 - a configuration FA4 cannot build is skipped
            out["window"][str(cand)] = f"{type(e).__name__}: {str(e)[:200]}"
        fa4.WINDOW_TILES.pop(dim, None)
    o_ref, r_ref = fa4.refresh(q, k, v, w, "two_pass")
    out["refresh"] = {"default " + str(fa4.refresh_block_size(dim)): time_ms(
        lambda: fa4.refresh(q, k, v, w, "merge"), cuda, warmup, repeats)}
    for block in BLOCK_CANDIDATES[dim]:
        fa4.REFRESH_BLOCKS[dim] = block
        try:
            o, r = fa4.refresh(q, k, v, w, "merge")
            err = max((o.float() - o_ref.float()).abs().max().item(), (r.float() - r_ref.float()).abs().max().item())
            out["refresh"][str(block)] = time_ms(lambda: fa4.refresh(q, k, v, w, "merge"), cuda, warmup, repeats)
            out["refresh"][str(block) + " err"] = err
        except Exception as e:  # noqa: BLE001
            out["refresh"][str(block)] = f"{type(e).__name__}: {str(e)[:200]}"
        fa4.REFRESH_BLOCKS.pop(dim, None)
    return out


def best(times: dict, default_key: str, max_err: float = 2e-2):
    """The fastest candidate that is within bf16 noise of the default and 2% faster than it."""
    base = times[default_key]
    ok = {k: t for k, t in times.items() if not k.endswith(" err") and k != default_key and isinstance(t, float)
          and times.get(k + " err", 1.0) <= max_err}
    if not ok:
        return None
    key = min(ok, key=ok.get)
    return key if ok[key] < 0.98 * base else None


def small_band(warmup, repeats) -> dict:
    cuda = torch.device("cuda")
    q, k, v = qkv((2, 16, 4096, 72))
    res = {}
    for label, window_size in (("1_8", 0.0625), ("1_16", 0.03125)):  # total band 1/8, 1/16
        w = window_half_width(4096, window_size)
        res[f"fa4_{label}"] = time_graphed_ms(lambda: fa4.window(q, k, v, w), cuda, warmup, repeats)
        with fa4_mode("off"):
            set_window_backend("flex")
            try:
                res[f"flex_{label}"] = time_graphed_ms(lambda: window_attention(q, k, v, w), cuda, warmup, repeats)
            finally:
                set_window_backend("auto")
    return res


def fa4_tiles(args) -> None:
    check_int(args, "repeats")
    check_int(args, "warmup", minimum=0)
    require_cuda("fa4_tiles")
    result = {"device": torch.cuda.get_device_name()}
    for dim in SHAPES:
        result[f"hd{dim}"] = tune(dim, args.warmup, args.repeats)
        json.dump(result, open(args.out, "w"), indent=1)
    result["band_4096_graphed"] = small_band(args.warmup, args.repeats)
    tiles = {d: best(result[f"hd{d}"]["window"], "default") for d in SHAPES}
    blocks = {d: best(result[f"hd{d}"]["refresh"], next(k for k in result[f"hd{d}"]["refresh"]
                                                         if k.startswith("default"))) for d in SHAPES}
    result["chosen"] = {"WINDOW_TILES": {d: t for d, t in tiles.items() if t},
                        "REFRESH_BLOCKS": {d: b for d, b in blocks.items() if b}}
    json.dump(result, open(args.out, "w"), indent=1)
    for d in SHAPES:
        print(f"hd{d}", json.dumps(result[f"hd{d}"]))
    print("band 4096 graphed", result["band_4096_graphed"])
    print("CHOSEN", json.dumps(result["chosen"]))


main = hydra_app("fa4_tiles", fa4_tiles)

if __name__ == "__main__":
    main()
