"""FlashAttention-4 routes against a float32 reference on fresh random inputs (GPU only).

Band edges, L not a multiple of any block, head dims 64, 72, 88 and 128; the off-band refresh,
the 2-D tile, the head-wise arrow and the video tile; the custom op under torch.compile; a CUDA
graph replay. Tolerance: twice the error of SDPA's own bf16 result against the same reference,
plus bf16 rounding of the output.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastattn.kernels.arrow as arrow
from fastattn.kernels import (
    fa4,
    prefer_fast_dense,
    refresh_attention,
    tile_attention,
    window_attention,
)
from fastattn.kernels.masks import band_mask_mod, dense_mask, tile_mask_mod
from fastattn.kernels.video_masks import (
    sparse_tile_window_attention,
    tile_neighbourhood_mask_mod,
    tile_shape,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or fa4.fa4_problem() is not None,
    reason=f"needs flash-attn-4 on an SM90/SM100 GPU ({fa4.fa4_problem() if torch.cuda.is_available() else 'no GPU'})")


def qkv(batch, heads, seq, dim, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3)]


def ref(q, k, v, keep=None):
    s = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v.float()


def close(got, want, baseline):
    """Within twice SDPA-bf16's own error (``baseline``) plus the output's bf16 rounding."""
    err = (got.float() - want).abs().max().item()
    bound = 2 * baseline + 2 ** -8 * want.abs().max().item()
    assert err <= bound, f"max error {err:.2e} > {bound:.2e}"


def sdpa_error(q, k, v, keep, want):
    return (F.scaled_dot_product_attention(q, k, v, attn_mask=keep).float() - want).abs().max().item()


@pytest.mark.parametrize("seq", [1000, 4133])
@pytest.mark.parametrize("dim", [64, 72, 88, 128])
@pytest.mark.parametrize("w_of", ["edge", "eighth", "wide"])
def test_dense_window_refresh_against_float32(seq, dim, w_of):
    w = {"edge": 3, "eighth": math.ceil(seq / 16), "wide": seq - 2}[w_of]
    q, k, v = qkv(2, 3, seq, dim, seed=seq + dim + w)
    band = dense_mask(band_mask_mod(w), seq, seq, device="cuda")
    full, win = ref(q, k, v), ref(q, k, v, band)
    e_full, e_win = sdpa_error(q, k, v, None, full), sdpa_error(q, k, v, band, win)
    close(fa4.dense(q, k, v), full, e_full)
    close(fa4.window(q, k, v, w), win, e_win)
    for route in fa4.REFRESH_ROUTES:
        o, r = fa4.refresh(q, k, v, w, route)
        close(o, full, e_full)
        close(r, full - win, e_full + e_win)


def test_entry_points_take_fa4_by_default():
    q, k, v = qkv(1, 2, 2000, 72, seed=1)
    band = dense_mask(band_mask_mod(100), 2000, 2000, device="cuda")
    res = torch.randn_like(q)
    close(window_attention(q, k, v, 100, res), ref(q, k, v, band) + res.float(), sdpa_error(q, k, v, band, ref(q, k, v, band)))
    _, r = refresh_attention(q, k, v, 100)
    close(r, ref(q, k, v) - ref(q, k, v, band), 2 * sdpa_error(q, k, v, None, ref(q, k, v)))


@pytest.mark.parametrize("side,radius,dim", [(64, 4, 72), (45, 2, 128)])
def test_tile_window_against_float32(side, radius, dim):
    n = side * side
    q, k, v = qkv(1, 2, n, dim, seed=side)
    keep = dense_mask(tile_mask_mod(radius, side), n, n, device="cuda")
    want = ref(q, k, v, keep)
    close(tile_attention(q, k, v, radius, side), want, sdpa_error(q, k, v, keep, want))


def test_video_tile_against_float32():
    grid = (5, 12, 20)
    tile = tile_shape(grid, 0.3)
    n = math.prod(grid)
    q, k, v = qkv(1, 2, n, 128, seed=2)
    keep = dense_mask(tile_neighbourhood_mask_mod(grid, tile, 1), n, n, device="cuda")
    want = ref(q, k, v, keep)
    got = sparse_tile_window_attention(q, k, v, grid, tile, 1, use_fa4=True)
    close(got, want, sdpa_error(q, k, v, keep, want))


@pytest.mark.parametrize("text_first,text,dim", [(True, 128, 128), (False, 333, 64)])  # FLUX-, SD3-like
def test_arrow_block_sparse_against_float32(text_first, text, dim):
    image = 4096
    start = text if text_first else 0
    seq = image + text
    widths = [200, arrow.SKIP, image, 600, 0, 200]
    q, k, v = qkv(1, len(widths), seq, dim, seed=text)
    assert arrow.fa4_aligned(seq, start, image, arrow.arrow_tile(image))
    cache = torch.randn_like(q)
    kept = cache[:, 1].clone()
    got = arrow.arrow_attention(q, k, v, widths, start, image, out=cache)
    assert torch.equal(got[:, 1], kept)
    radii = [arrow.tile_radius_of(w, image) for w in widths]
    for h, r in enumerate(radii):
        if r == arrow.SKIP:
            continue
        keep = dense_mask(arrow.arrow_mask_mod(start, image, r, arrow.arrow_tile(image)), seq, seq, device="cuda")
        qh, kh, vh = (t[:, h:h + 1] for t in (q, k, v))
        want = ref(qh, kh, vh, keep)
        close(got[:, h:h + 1], want, sdpa_error(qh, kh, vh, keep, want))


def test_custom_op_under_torch_compile_and_a_cuda_graph():
    q, k, v = qkv(2, 4, 3000, 72, seed=3)

    def layer(q, k, v):
        o, r = fa4.refresh(q, k, v, 200)
        return fa4.window(q, k, v, 200) + r + fa4.dense(q, k, v) + o

    def model_attention(q, k, v):  # what a compiled raw model traces inside prefer_fast_dense()
        return F.scaled_dot_product_attention(q, k, v) + window_attention(q, k, v, 200)

    eager = layer(q, k, v)
    with prefer_fast_dense():
        want = model_attention(q, k, v)
        torch._dynamo.reset()
        got = torch.compile(model_attention, fullgraph=True)(q, k, v)  # fullgraph: no graph break
    assert (got.float() - want.float()).abs().max().item() < 2e-2
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        captured = layer(q, k, v)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


def test_the_models_own_sdpa_calls_run_on_fa4():
    q, k, v = qkv(2, 4, 1024, 72, seed=4)
    with prefer_fast_dense():
        routed = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(routed, fa4.dense(q, k, v))
