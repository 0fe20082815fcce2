"""A communication model of context parallelism from the shapes alone: what one attention layer
moves per rank under Ulysses and under ring attention, dense against fastattn's window, and how
many of a ring's steps a band-aware ring can skip (the context-parallel issue, item 5).

    python -m experiments.bench.context_model                      # Wan 2.1 14B 720p and FLUX.1-dev 2K
    python -m experiments.bench.context_model ranks=[2,4,8,16] window_size=0.0625

Ulysses: each rank sends (n-1)/n of its q, k, v shards before the attention call and of its
output after (four all-to-alls), whatever the window. Ring: diffusers cuts the image tokens and
the text each into n contiguous shards; its dense ring passes every K/V shard to every rank (n
steps, n-1 transfers). fastattn's window ring (``fastattn.layerwise.ring``, whose
``band_sources`` counts the steps here) takes image K/V only from the ranks whose shard meets its
queries' band; the text's K/V is gathered from every rank, and the text queries' rows, which are
full, come from every rank's part over its own keys: the text queries gathered, the parts (with
their log-sum-exps, in float32) sent back by one all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from fastattn.layerwise.ring import Band, band_sources

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


def shard_bytes(shape: AttentionShape, ranks: int, tokens: int | None = None, bytes_per_value: int | None = None,
                values: int | None = None) -> float:
    """Bytes of one rank's share of ``tokens`` (all of the sequence's by default) of one
    [batch, tokens, heads, ``values``] tensor (head_dim values by default)."""
    tokens = shape.tokens if tokens is None else tokens
    values = shape.head_dim if values is None else values
    return shape.batch * tokens / ranks * shape.heads * values * (bytes_per_value or shape.bytes_per_value)


def ulysses_bytes(shape: AttentionShape, ranks: int) -> float:
    """Bytes one rank sends per layer: q, k, v and the output, (n-1)/n of each shard."""
    return 4 * shard_bytes(shape, ranks) * (ranks - 1) / ranks


def band_steps(shape: AttentionShape, ranks: int, window_size: float | None) -> list[int]:
    """Per rank, the ring steps its window takes (the image shards it needs, its own included),
    as fastattn's ring takes them; all ``ranks`` for dense attention (``window_size`` None)."""
    if window_size is None:
        return [ranks] * ranks
    if shape.image_tokens % ranks:
        raise ConfigError(f"{shape.name}: {shape.image_tokens} image tokens do not split into {ranks} shards")
    band = Band.of(shape.image_tokens, repr(float(window_size)), text=shape.text_tokens > 0)
    return [len(band_sources(r, ranks, shape.image_tokens // ranks, band)) for r in range(ranks)]


def dense_ring_bytes(shape: AttentionShape, ranks: int) -> float:
    """Bytes one rank receives per layer in diffusers' ring: every other rank's K and V shards."""
    return (ranks - 1) * 2 * shard_bytes(shape, ranks)


def band_ring_bytes(shape: AttentionShape, ranks: int, steps: int) -> float:
    """Bytes one rank receives per layer in fastattn's window ring over ``steps`` image shards:
    their K and V, and with text every rank's text K, V and queries and its parts of this rank's
    text rows (output and log-sum-exp, float32)."""
    image = (steps - 1) * 2 * shard_bytes(shape, ranks, shape.image_tokens)
    if not shape.text_tokens:
        return image
    text = (ranks - 1) * 3 * shard_bytes(shape, ranks, shape.text_tokens)
    parts = (ranks - 1) * shard_bytes(shape, ranks, shape.text_tokens, bytes_per_value=4, values=shape.head_dim + 1)
    return image + text + parts


def model_rows(shapes: list[str], ranks: list[int], window_size: float) -> list[dict]:
    rows = []
    for key in shapes:
        shape = SHAPES[key]
        for n in ranks:
            band = band_steps(shape, n, window_size)
            rows.append({"shape": shape.name, "ranks": n, "tokens": shape.tokens,
                         "ulysses_mb_per_layer": ulysses_bytes(shape, n) / 1e6,
                         "ring_steps_dense": n, "ring_steps_band_max": max(band),
                         "ring_steps_band_mean": sum(band) / n,
                         "ring_mb_per_layer_dense": dense_ring_bytes(shape, n) / 1e6,
                         "ring_mb_per_layer_band_mean": sum(band_ring_bytes(shape, n, s) for s in band) / n / 1e6,
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

__all__ = ["SHAPES", "AttentionShape", "band_ring_bytes", "band_steps", "dense_ring_bytes", "model_rows",
           "ulysses_bytes"]
