"""The band kernels behind the window backends, the 2-D tile window, and torch.compile.

The Triton kernels run on CPU through Triton's interpreter (a subprocess, since the
interpreter is chosen when triton is imported) and for real on CUDA when a GPU is present;
both against a float64 reference on fresh random inputs.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import LAYERS, dit_inputs
from test_kernels import reference_attention as reference  # float64 softmax attention
from fastattn import CompressionPlan, apply_fastattn, remove_fastattn
from fastattn.kernels import (band_mask_mod, dense_attention, dense_mask, refresh_attention, set_window_backend,
                              tile_attention, tile_mask_mod, tile_radius, window_attention, window_half_width)
from fastattn.kernels.masks import tile_pairs
from fastattn.kernels.triton_band import head_dim_split

triton = pytest.importorskip("triton")




@pytest.mark.parametrize("head_dim,expected", [(72, (64, 16)), (64, (64, 0)), (40, (32, 16)), (96, (64, 32)),
                                               (16, (16, 0)), (80, (64, 16))])
def test_head_dim_split_covers_the_head(head_dim, expected):
    assert head_dim_split(head_dim) == expected


INTERPRETER_CHECK = textwrap.dedent("""
    import torch
    from fastattn.kernels import triton_band as tb
    from fastattn.kernels.masks import band_mask_mod, dense_mask

    def ref(q, k, v, mask=None):
        s = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return s.softmax(-1) @ v.double()

    worst = 0.0
    # L not a multiple of the block, band edges inside blocks, a window covering all, head dims 72 and 32.
    for L, D, w, bm, bn in [(75, 72, 9, 32, 16), (64, 32, 20, 16, 32), (40, 40, 39, 16, 16)]:
        for mode in (0, 1, 2):
            tb.set_kernel_config(mode, BLOCK_M=bm, BLOCK_N=bn)
        g = torch.Generator().manual_seed(L)
        q, k, v, res = (torch.randn(2, 2, L, D, generator=g) for _ in range(4))
        full, win = ref(q, k, v), ref(q, k, v, dense_mask(band_mask_mod(w), L, L))
        o, r = tb.triton_refresh(q, k, v, w)
        for got, want in ((tb.triton_window(q, k, v, w), win), (tb.triton_window(q, k, v, w, res), win + res.double()),
                          (o, full), (r, full - win)):
            worst = max(worst, (got.double() - want).abs().max().item())
    print(worst)
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernels are tested instead")
def test_triton_kernels_match_reference_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "flex"])
@pytest.mark.parametrize("seq_len,head_dim", [(1024, 72), (4133, 72), (1000, 64), (300, 40)])
def test_gpu_window_kernels_match_float_reference(backend, seq_len, head_dim):
    g = torch.Generator(device="cuda").manual_seed(seq_len + head_dim)
    q, k, v, res = (torch.randn(2, 3, seq_len, head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
                    for _ in range(4))
    set_window_backend(backend)
    try:
        for fraction in (0.125, 0.5):
            w = window_half_width(seq_len, fraction)
            mask = dense_mask(band_mask_mod(w), seq_len, seq_len, device="cuda")
            full, win = reference(q, k, v), reference(q, k, v, mask)
            torch.testing.assert_close(window_attention(q, k, v, w).double(), win, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(window_attention(q, k, v, w, res).double(), win + res.double(),
                                       atol=3e-2, rtol=2e-2)
            o, r = refresh_attention(q, k, v, w)
            torch.testing.assert_close(o.double(), full, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(r.double(), full - win, atol=3e-2, rtol=2e-2)
    finally:
        set_window_backend("auto")


def test_window_backend_name_is_checked():
    with pytest.raises(ValueError, match="window backend must be one of"):
        set_window_backend("cudnn-band")


def test_tile_mask_is_a_square_neighbourhood():
    mask = dense_mask(tile_mask_mod(1, 5), 25, 25)
    assert mask[12].reshape(5, 5).int().tolist() == [[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0],
                                                     [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert mask.sum().item() == tile_pairs(5, 5, 1)
    # about as many keys per query as the band of the same fraction
    assert (2 * tile_radius(16384, 0.125) + 1) ** 2 == pytest.approx(2 * window_half_width(16384, 0.125) + 1, rel=0.05)


def test_tile_attention_matches_reference_and_covers_all_when_large():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 48, 16, generator=g) for _ in range(3))  # a 6 x 8 grid
    mask = dense_mask(tile_mask_mod(2, 8), 48, 48)
    torch.testing.assert_close(tile_attention(q, k, v, 2, 8).double(), reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tile_attention(q, k, v, 8, 8), dense_attention(q, k, v), atol=1e-6, rtol=1e-6)


def test_tile_plan_runs_and_counts_its_window(dit_pipe):
    rows = [["full"] * LAYERS] + [["wars"] * LAYERS] * 5
    band = CompressionPlan(rows, window_size=0.25)
    tile = CompressionPlan(rows, window_size=0.25, window_shape="tile")
    assert CompressionPlan.from_dict(tile.to_dict()) == tile and "window_shape" not in band.to_dict()
    raw = dit_pipe(**dit_inputs(6)).images
    outs = {}
    for plan in (band, tile):
        apply_fastattn(dit_pipe, plan)
        outs[plan.window_shape] = dit_pipe(**dit_inputs(6)).images
        remove_fastattn(dit_pipe)
    assert np.isfinite(outs["tile"]).all() and not np.array_equal(outs["tile"], outs["band"])
    assert np.abs(outs["tile"] - raw).mean() < 0.1
    with pytest.raises(ValueError, match="window_shape must be one of"):
        CompressionPlan(rows, window_shape="disc")


@torch.no_grad()
def test_compiled_transformer_follows_plan_changes(dit_pipe):
    """torch.compile graph-breaks around the processors, so a new plan needs no recompile
    and compiled outputs equal eager ones."""
    plans = [CompressionPlan([["full"] * LAYERS] + [["wars", "ast", "asc"]] * 5),
             CompressionPlan([["full"] * LAYERS] + [["ast", "wars+asc", "full"]] * 5)]
    eager = []
    for plan in plans:
        apply_fastattn(dit_pipe, plan)
        eager.append(dit_pipe(**dit_inputs(6)).images)
    original = dit_pipe.transformer
    dit_pipe.transformer = torch.compile(original, backend="eager")
    try:
        for plan, expected in zip(plans, eager):
            apply_fastattn(original, plan)
            got = dit_pipe(**dit_inputs(6)).images
            np.testing.assert_allclose(got, expected, atol=1e-5)
    finally:
        dit_pipe.transformer = original
        remove_fastattn(original)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention block masks run on CUDA")
@pytest.mark.parametrize("tile,radius,text", [(1, 300, 0), (128, 2, 64)])
def test_the_shard_band_on_flex_equals_its_dense_mask(tile, radius, text):
    """A ring shard's window (fastattn.layerwise.ring): 1024 image queries at image position 2048
    against text keys and the image keys from position 1024, block-sparse against the same mask dense."""
    from fastattn.kernels.attention import shard_window_attention
    from fastattn.kernels.masks import shard_band_mask_mod

    torch.manual_seed(0)
    q = torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 4, text + 3 * 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = shard_window_attention(q, k, v, ("band", text, 2048, 1024, tile, radius))
    keep = dense_mask(shard_band_mask_mod(text, 2048, 1024, tile, radius), 1024, text + 3 * 1024, device="cuda")
    expected = reference(q.double(), k.double(), v.double(), keep)
    assert float((out.double() - expected).abs().max()) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention block masks run on CUDA")
def test_the_shard_video_tiles_on_flex_equal_their_dense_mask():
    """A ring shard's tile neighbourhood over a (8, 16, 16) video: 512 queries at raster position 1024
    against the keys from position 512."""
    from fastattn.kernels.attention import shard_window_attention
    from fastattn.kernels.video_masks import shard_tile_mask_mod

    torch.manual_seed(0)
    grid, tile = (8, 16, 16), (2, 6, 6)
    q = torch.randn(1, 4, 512, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 4, 1536, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = shard_window_attention(q, k, v, ("tiles", 1024, 512, grid, tile, 1))
    keep = dense_mask(shard_tile_mask_mod(1024, 512, grid, tile, 1), 512, 1536, device="cuda")
    expected = reference(q.double(), k.double(), v.double(), keep)
    assert float((out.double() - expected).abs().max()) < 2e-2
