"""A communication model of context parallelism from the shapes alone: what one attention layer
moves per rank under Ulysses and under ring attention, dense against fastattn's window, and how
many of a ring's steps a band-aware ring can skip (the context-parallel issue, item 5).

    python -m experiments.bench.context_model                      # Wan 2.1 14B 720p and FLUX.1-dev 2K
    python -m experiments.bench.context_model ranks=[2,4,8,16] window_size=0.0625

Ulysses: each rank sends (n-1)/n of its q, k, v shards before the attention call and of its
output after (four all-to-alls), whatever the window. Ring: the sequence is cut into n
contiguous shards; dense attention passes every K/V shard round the ring (n steps, n-1
transfers); with the window a rank needs only the key shards that hold a key some query of its
shard keeps: the image keys within the band (w = window_size of the image tokens on each side),
the text keys (every query keeps them), and every shard where its shard holds a text query (a text
row is full). Text sits before the image tokens, as FLUX orders them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

from fastattn.kernels.masks import window_half_width

from ..infra.app import ConfigError, hydra_app
from ..infra.config import check_fraction


@dataclass(frozen=True)
class AttentionShape:
    name: str
    image_tokens: int
    text_tokens: int  # in the self-attention sequence (0 where the text comes through cross-attention)
    heads: int
    head_dim: int
    layers: int
    batch: int = 1
    bytes_per_value: int = 2  # bf16

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens


SHAPES = {
    # Wan 2.1 T2V 14B, 720 x 1280 x 81 frames: 21 x 45 x 80 latent patches; its text is cross-attention
    "wan_14b_720p": AttentionShape("Wan 2.1 14B 720p x 81", 21 * 45 * 80, 0, 40, 128, 40),
    # FLUX.1-dev 2048²: 128 x 128 patches and 512 T5 tokens, 19 joint + 38 single-stream layers
    "flux_dev_2k": AttentionShape("FLUX.1-dev 2048²", 128 * 128, 512, 24, 128, 57),
}


def shard_bytes(shape: AttentionShape, ranks: int) -> float:
    """Bytes of one rank's share of one [batch, tokens, heads, head_dim] tensor."""
    return shape.batch * shape.tokens / ranks * shape.heads * shape.head_dim * shape.bytes_per_value


def ulysses_bytes(shape: AttentionShape, ranks: int) -> float:
    """Bytes one rank sends per layer: q, k, v and the output, (n-1)/n of each shard."""
    return 4 * shard_bytes(shape, ranks) * (ranks - 1) / ranks


def needed_shards(shape: AttentionShape, ranks: int, window_size: float | None) -> list[int]:
    """Per rank, how many of the ring's ``ranks`` K/V shards its queries need (its own included):
    all of them for dense attention (``window_size`` None)."""
    if window_size is None:
        return [ranks] * ranks
    size, text = shape.tokens / ranks, shape.text_tokens
    half = window_half_width(shape.image_tokens, window_size)

    def shard_of(token: float) -> int:
        return min(ranks - 1, max(0, int(token // size)))

    counts = []
    for r in range(ranks):
        start, end = r * size, (r + 1) * size  # this rank's query tokens [start, end)
        if start < text:  # it holds a text query: a full row
            counts.append(ranks)
            continue
        lo, hi = max(text, start - half), min(shape.tokens, end + half)  # image keys within the band
        needed = set(range(shard_of(lo), shard_of(math.ceil(hi) - 1) + 1))
        needed |= set(range(shard_of(0), shard_of(text - 1) + 1)) if text else set()  # the text keys
        counts.append(len(needed))
    return counts


def ring_bytes(shape: AttentionShape, ranks: int, steps: int) -> float:
    """Bytes one rank receives per layer over ``steps`` ring steps (its own shard is not moved)."""
    return (steps - 1) * 2 * shard_bytes(shape, ranks)


def model_rows(shapes: list[str], ranks: list[int], window_size: float) -> list[dict]:
    rows = []
    for key in shapes:
        shape = SHAPES[key]
        for n in ranks:
            dense, band = needed_shards(shape, n, None), needed_shards(shape, n, window_size)
            rows.append({"shape": shape.name, "ranks": n, "tokens": shape.tokens,
                         "ulysses_mb_per_layer": ulysses_bytes(shape, n) / 1e6,
                         "ring_steps_dense": n, "ring_steps_band_max": max(band),
                         "ring_steps_band_mean": sum(band) / n,
                         "ring_mb_per_layer_dense": ring_bytes(shape, n, max(dense)) / 1e6,
                         "ring_mb_per_layer_band_mean": sum(ring_bytes(shape, n, s) for s in band) / n / 1e6,
                         "layers": shape.layers})
    return rows


def print_table(rows: list[dict]) -> None:
    print("| shape | ranks | Ulysses MB/layer/rank | ring steps dense | band: max / mean | "
          "ring MB/layer/rank dense | band mean |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['shape']} | {r['ranks']} | {r['ulysses_mb_per_layer']:.1f} | {r['ring_steps_dense']} | "
              f"{r['ring_steps_band_max']} / {r['ring_steps_band_mean']:.2f} | {r['ring_mb_per_layer_dense']:.1f} | "
              f"{r['ring_mb_per_layer_band_mean']:.1f} |")


def context_model(cfg: DictConfig) -> list[dict]:
    unknown = [s for s in cfg.shapes if s not in SHAPES]
    if not cfg.shapes or unknown:
        raise ConfigError(f"shapes must be a non-empty list of {', '.join(SHAPES)}, got {list(cfg.shapes)}")
    if not cfg.ranks or any(not isinstance(n, int) or n < 2 for n in cfg.ranks):
        raise ConfigError(f"ranks must be a non-empty list of integers >= 2, got {list(cfg.ranks)}")
    check_fraction(cfg, "window_size", upper=1)
    rows = model_rows(list(cfg.shapes), list(cfg.ranks), float(cfg.window_size))
    print_table(rows)
    return rows


main = hydra_app("context_model", context_model)

if __name__ == "__main__":
    main()

__all__ = ["SHAPES", "AttentionShape", "model_rows", "needed_shards", "ring_bytes", "ulysses_bytes"]
