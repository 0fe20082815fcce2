"""fastattn's band-aware ring (fastattn.layerwise.ring) against the single-process window, on 8 gloo ranks.

Each rank holds one shard of a float64 sequence (image-only, or text shards before image shards
as diffusers splits a joint model's two streams); the ring's W, O and R must equal the
single-process window and full attention on the whole sequence, and the window must move image
K/V between band neighbours only: at most 3 of the 8 ring steps per rank with a band of 1/8 of
the tokens on each side (the rank's own shard counts as a step), counted from the point-to-point
transfers the ring makes.
"""

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastattn.core_call import Core
from fastattn.kernels import arrow_attention, window_attention
from fastattn.kernels.masks import window_half_width
from fastattn.context_parallel import Group
from fastattn.kernels.video_masks import tile_window_attention
from fastattn.layerwise.ring import Band, VideoTiles, band_sources, ring_full, ring_refresh, ring_window
from test_distributed import free_port

WORLD, SHARD, TEXT, HEADS, DIM = 8, 32, 2, 2, 8  # 256 image tokens, 16 text tokens in all
DECIMAL = "0.125"
GRID = (8, 4, 8)  # a video of 8 frames of 4 x 8 tokens: one frame a rank


def test_a_band_of_one_eighth_on_eight_ranks_needs_three_ring_steps():
    image = WORLD * SHARD
    for band in (Band.of(image, DECIMAL, text=False), Band.of(image, DECIMAL, text=True)):
        steps = [band_sources(r, WORLD, SHARD, band) for r in range(WORLD)]
        assert max(map(len, steps)) == 3, steps
        assert steps[0] == [0, 1] and steps[3] == [2, 3, 4] and steps[7] == [6, 7]
    assert band_sources(3, WORLD, SHARD, Band(1, image)) == list(range(WORLD))  # a full band: every step


def whole_sequence(text: bool):
    torch.manual_seed(0)
    tokens = WORLD * (SHARD + (TEXT if text else 0))
    return [torch.randn(1, HEADS, tokens, DIM, dtype=torch.float64) for _ in range(3)]


def local(t: torch.Tensor, rank: int, text: bool) -> torch.Tensor:
    """The rank's tokens of a whole sequence laid out text first: its text shard, then its image shard."""
    if not text:
        return t[..., rank * SHARD:(rank + 1) * SHARD, :]
    texts, images = t[..., :WORLD * TEXT, :], t[..., WORLD * TEXT:, :]
    return torch.cat([texts[..., rank * TEXT:(rank + 1) * TEXT, :], images[..., rank * SHARD:(rank + 1) * SHARD, :]],
                     dim=-2)


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {name: _compare(rank, text) for name, text in (("image_only", False), ("joint", True))}
        results["video_tiles"] = _compare(rank, False, GRID)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _compare(rank: int, text: bool, grid=None) -> dict:
    """W, O, R and full attention of the rank against one process, and the ring steps the window took."""
    q, k, v = whole_sequence(text)
    image = WORLD * SHARD
    half_width = window_half_width(image, DECIMAL)
    if grid is not None:
        w_ref = tile_window_attention(q, k, v, grid, float(DECIMAL))
    elif text:
        w_ref = arrow_attention(q, k, v, [half_width] * HEADS, WORLD * TEXT, image)
    else:
        w_ref = window_attention(q, k, v, half_width)
    o_ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    core = Core(*(local(t, rank, text) for t in (q, k, v)), None)
    spans = ((TEXT, SHARD), (TEXT, SHARD)) if text else None
    ring = Group(dist.group.WORLD, rank, WORLD)

    sent = []
    batch = dist.batch_isend_irecv
    dist.batch_isend_irecv = lambda ops: sent.append(len(ops) // 2) or batch(ops)  # one send, one receive a peer
    try:
        w = ring_window(core, spans, DECIMAL, ring, layer=0, grid=grid)
    finally:
        dist.batch_isend_irecv = batch
    o, r = ring_refresh(core, spans, DECIMAL, ring, layer=0, grid=grid)
    full = ring_full(core, ring)
    return {"w": float((w - local(w_ref, rank, text)).abs().max()),
            "o": float((o - local(o_ref, rank, text)).abs().max()),
            "r": float((r - local(o_ref - w_ref, rank, text)).abs().max()),
            "full": float((full - local(o_ref, rank, text)).abs().max()),
            "steps": 1 + sum(sent)}


def test_the_ring_window_equals_one_process_and_skips_the_far_ranks(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for sequence in ("image_only", "joint", "video_tiles"):
        results = [rank[sequence] for rank in ranks]
        for r in results:
            assert max(r["w"], r["o"], r["r"], r["full"]) < 1e-12, (sequence, r)
        if sequence != "video_tiles":
            assert [r["steps"] for r in results] == [2, 3, 3, 3, 3, 3, 3, 2], sequence
    # frame tiles of 2 frames, a neighbourhood of one tile each side: the frames of 2 or 3 tiles
    tiles = VideoTiles.of(GRID, float(DECIMAL))
    assert tiles.tile[0] == 2
    assert [r["video_tiles"]["steps"] for r in ranks] == [len(band_sources(q, WORLD, SHARD, tiles)) for q in range(WORLD)]
    assert [r["video_tiles"]["steps"] for r in ranks] == [4, 4, 6, 6, 6, 6, 4, 4]
