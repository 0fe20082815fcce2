"""The FlashAttention-4 backend's logic on the CPU, without the package.

``fa4._run`` (the one place that calls FA4) is replaced by an emulator with FA4's semantics
(local window, block-sparse lists with per-element masks in the partial blocks, rows with no key
give 0 and lse -inf) computed in float64, and the GPU checks are patched to say SM90. So the
routes, block lists, masks, the log-sum-exp merge and the mode handling are tested here; the
real kernels against a float32 reference in test_fa4_gpu.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastattn.kernels.arrow as arrow
import fastattn.kernels.flex as flex
from fastattn.kernels import (
    dense_attention,
    fa4,
    fa4_mode,
    get_fa4,
    prefer_fast_dense,
    refresh_attention,
    set_fa4,
    set_window_backend,
    tile_attention,
    window_attention,
)
from fastattn.kernels.masks import band_mask_mod, dense_mask, tile_mask_mod
from fastattn.kernels.merge import merge_refresh, merge_refresh_torch
from fastattn.kernels.video_masks import (
    sparse_tile_window_attention,
    tile_neighbourhood_mask_mod,
    tile_shape,
)


def _mask_elements(mask: fa4.Mask, lq: int, lk: int) -> torch.Tensor:
    qi, ki = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    if mask.kind == "offband":
        w = int(mask.aux[0][0])
        return (qi - ki).abs() > w
    if mask.kind == "tile2d":
        r, g = mask.params
        return ((qi // g - ki // g).abs() <= r) & ((qi % g - ki % g).abs() <= r)
    if mask.kind == "video":
        (r,) = mask.params
        ok = torch.ones(lq, lk, dtype=torch.bool)
        for c in mask.aux:
            c = c.long()
            ok &= (c[:lq, None] - c[None, :lk]).abs() <= r
        return ok
    raise AssertionError(mask.kind)


def _block_map(count, index, batch, heads, lq, lk, size) -> torch.Tensor:
    """[batch, heads, lq, lk] bool: the elements of the listed blocks."""
    count = count.expand(batch, heads, count.shape[-1])
    index = index.expand(batch, heads, *index.shape[-2:]).long()
    nm, nn = index.shape[-2:]
    blocks = torch.zeros(batch, heads, nm, nn, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for m in range(nm):
                blocks[b, h, m, index[b, h, m, : int(count[b, h, m])]] = True
    el = blocks.repeat_interleave(size[0], 2).repeat_interleave(size[1], 3)
    return el[..., :lq, :lk]


def emulate(q, k, v, window, blocks, mask, want_lse, tile=None):
    """FA4's forward semantics on [batch, seq, heads, dim] tensors, in float64."""
    batch, lq, heads, dim = q.shape
    lk = k.shape[1]
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(dim)
    keep = torch.ones(batch, heads, lq, lk, dtype=torch.bool)
    if window is not None:
        qi, ki = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
        keep &= (ki >= qi - window[0]) & (ki <= qi + window[1])
    if blocks is not None:
        full = _block_map(blocks.full_count, blocks.full_index, batch, heads, lq, lk, blocks.size)
        part = _block_map(blocks.partial_count, blocks.partial_index, batch, heads, lq, lk, blocks.size)
        if mask is not None:
            part &= _mask_elements(mask, lq, lk)
        keep &= full | part
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(keep.any(-1, keepdim=True), torch.exp(s - lse.unsqueeze(-1).clamp(min=-1e30)), 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v.double())
    return out.to(q.dtype).contiguous(), (lse.float() if want_lse else None)  # FA4 allocates [b, s, h, d]


@pytest.fixture
def fake_fa4(monkeypatch):
    """FA4 'available' on an 'SM90' device, running the emulator; counts the calls."""
    calls = []

    def run(q, k, v, window, blocks, mask, want_lse, tile=None):
        calls.append({"window": window, "blocks": blocks, "mask": mask, "lse": want_lse, "tile": tile})
        return emulate(q, k, v, window, blocks, mask, want_lse)

    monkeypatch.setattr(fa4, "_run", run)
    monkeypatch.setattr(fa4, "fa4_importable", lambda: True)
    monkeypatch.setattr(fa4, "_arch_major", lambda device: 9)
    set_fa4("auto")
    set_window_backend("auto")
    yield calls
    set_fa4("auto")
    set_window_backend("auto")


def ref(q, k, v, keep=None):
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v.double()


def qkv(batch, heads, seq, dim, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=g).to(dtype) for _ in range(3)]


BF16 = 2e-2  # bf16 outputs against a float64 reference


# -- mode and availability -------------------------------------------------------------------------

def test_mode_errors_are_one_line():
    with pytest.raises(ValueError, match=r"^fa4 must be auto, on or off"):
        set_fa4("sometimes")
    if fa4.fa4_problem() is not None:  # this machine has no FA4: asking for it is refused
        with pytest.raises(RuntimeError, match=r"^fa4=on but FlashAttention-4 cannot run: "):
            set_fa4(True)
    assert get_fa4() == "auto"
    with fa4_mode(False):
        assert get_fa4() == "off"
    assert get_fa4() == "auto"


def test_mode_on_when_available(fake_fa4, monkeypatch):
    monkeypatch.setattr(fa4, "fa4_problem", lambda: None)
    set_fa4(True)
    assert get_fa4() == "on"


def test_missing_package_keeps_todays_routes(monkeypatch):
    monkeypatch.setattr(fa4, "fa4_importable", lambda: False)
    monkeypatch.setattr(fa4, "_arch_major", lambda device: 9)
    q = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    assert not fa4.enabled_for(q)


@pytest.mark.parametrize("major,dim,dtype,expected", [
    (9, 72, torch.bfloat16, True), (10, 128, torch.float16, True), (8, 72, torch.bfloat16, False),
    (9, 72, torch.float32, False), (9, 260, torch.bfloat16, False), (10, 256, torch.bfloat16, False),
    (9, 256, torch.bfloat16, True), (9, 36, torch.bfloat16, False), (None, 72, torch.bfloat16, False)])
def test_chosen_on_sm90_and_sm100_only(monkeypatch, major, dim, dtype, expected):
    monkeypatch.setattr(fa4, "fa4_importable", lambda: True)
    monkeypatch.setattr(fa4, "_arch_major", lambda device: major)
    q = torch.zeros(1, 2, 8, dim, dtype=dtype)
    assert fa4.enabled_for(q) is expected
    assert fa4.sparse_enabled_for(q) is (expected and major == 9)
    with fa4_mode("off"):
        assert not fa4.enabled_for(q)


def test_cpu_tensors_never_take_fa4():
    q = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    assert not fa4.enabled_for(q)  # the real checks: no CUDA device
    set_window_backend("fa4")
    try:
        with pytest.raises(RuntimeError, match="^window backend 'fa4' needs flash-attn-4"):
            window_attention(q, q, q, 2)
    finally:
        set_window_backend("auto")


# -- routes ----------------------------------------------------------------------------------------

def test_dense_and_window_route_to_fa4(fake_fa4):
    q, k, v = qkv(2, 3, 50, 72)
    assert (dense_attention(q, k, v).double() - ref(q, k, v)).abs().max() < BF16
    band = dense_mask(band_mask_mod(6), 50, 50)
    res = torch.randn(2, 3, 50, 72).to(torch.bfloat16)
    got = window_attention(q, k, v, 6, res)
    assert (got.double() - ref(q, k, v, band) - res.double()).abs().max() < BF16
    assert [c["window"] for c in fake_fa4] == [None, (6, 6)]
    assert got.shape == q.shape and got.transpose(1, 2).is_contiguous()  # a view of FA4's layout


def test_fa4_off_keeps_sdpa(fake_fa4):
    q, k, v = qkv(1, 2, 20, 64)
    with fa4_mode("off"):
        dense_attention(q, k, v)
    assert fake_fa4 == []


@pytest.mark.parametrize("seq,dim,w", [(333, 72, 20), (333, 64, 1), (257, 88, 100), (300, 128, 0), (200, 72, 197)])
@pytest.mark.parametrize("route", ["merge", "two_pass"])
def test_refresh_routes_give_o_and_r(fake_fa4, seq, dim, w, route, monkeypatch):
    """O and R = O - W at band edges, L not a multiple of any block, head dims 64/72/88/128."""
    monkeypatch.setattr(fa4, "MERGE_FROM_TOKENS", 0 if route == "merge" else 10**9)
    q, k, v = qkv(1, 2, seq, dim, seed=seq + dim)
    o, r = refresh_attention(q, k, v, w)
    full, win = ref(q, k, v), ref(q, k, v, dense_mask(band_mask_mod(w), seq, seq))
    assert (o.double() - full).abs().max() < BF16
    assert (r.double() - (full - win)).abs().max() < BF16
    if route == "merge":
        assert [bool(c["lse"]) for c in fake_fa4] == [True, True]
        assert fake_fa4[1]["mask"].kind == "offband" and fake_fa4[1]["blocks"].size == fa4.refresh_block_size(dim)


@pytest.mark.parametrize("seq,w,size", [(333, 20, (192, 144)), (1000, 62, (128, 128)), (100, 0, (16, 8)),
                                        (64, 70, (16, 16))])
def test_offband_blocks_cover_exactly_the_offband_pairs(seq, w, size):
    b = fa4.offband_blocks(seq, w, size, torch.device("cpu"))
    full = _block_map(b.full_count, b.full_index, 1, 1, seq, seq, size)[0, 0]
    part = _block_map(b.partial_count, b.partial_index, 1, 1, seq, seq, size)[0, 0]
    off = ~dense_mask(band_mask_mod(w), seq, seq)
    assert not (full & part).any()
    assert torch.equal(full | (part & off), off)  # every off-band pair once, nothing in the band
    assert not (full & ~off).any()  # full blocks need no mask
    for idx, cnt in ((b.full_index, b.full_count), (b.partial_index, b.partial_count)):
        for m in range(idx.shape[2]):  # ascending lists: the sequence-end block comes last
            kept = idx[0, 0, m, : int(cnt[0, 0, m])]
            assert torch.equal(kept, kept.sort().values)


def test_merge_of_two_partial_attentions_is_full_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 40, 16, generator=g, dtype=torch.float64) for _ in range(3))
    band = dense_mask(band_mask_mod(5), 40, 40)
    s = q @ k.transpose(-1, -2) / 4

    def part(keep):
        t = s.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(t, -1)
        return (torch.nan_to_num(t.softmax(-1)) @ v).transpose(1, 2).contiguous(), lse

    w, lse_w = part(band)
    x, lse_x = part(~band)
    o, r = merge_refresh_torch(w, lse_w, x, lse_x)
    full = (s.softmax(-1) @ v).transpose(1, 2)
    assert torch.allclose(o, full, atol=1e-6) and torch.allclose(r, full - w, atol=1e-6)  # float32 inside
    # a row with no off-band key: R = 0, O = W, whatever X holds
    lse_x[:, :, 0] = float("-inf")
    x[:, 0] = float("nan")
    o, r = merge_refresh(w, lse_w, x, lse_x)
    assert torch.equal(r[:, 0], torch.zeros_like(r[:, 0])) and torch.allclose(o[:, 0], w[:, 0], atol=1e-6)


def test_tile_window_routes_to_block_sparse_fa4(fake_fa4):
    side, r = 12, 2
    q, k, v = qkv(1, 2, side * side, 64)
    got = tile_attention(q, k, v, r, side)
    keep = dense_mask(tile_mask_mod(r, side), side * side, side * side)
    assert (got.double() - ref(q, k, v, keep)).abs().max() < BF16
    assert fake_fa4[0]["mask"].kind == "tile2d" and fake_fa4[0]["mask"].params == (r, side)


def test_video_tile_window_through_fa4_matches_the_neighbourhood(fake_fa4):
    grid = (3, 6, 8)
    tile = tile_shape(grid, 0.3)
    n = math.prod(grid)
    q, k, v = qkv(1, 2, n, 64, seed=5)
    got = sparse_tile_window_attention(q, k, v, grid, tile, 1, compiled=False, use_fa4=True)
    keep = dense_mask(tile_neighbourhood_mask_mod(grid, tile, 1), n, n)
    assert (got.double() - ref(q, k, v, keep)).abs().max() < BF16
    assert fake_fa4[0]["mask"].kind == "video"


@pytest.mark.parametrize("text_first", [True, False])
def test_arrow_through_fa4_whole_blocks_with_cached_heads_in_place(fake_fa4, monkeypatch, text_first):
    monkeypatch.setattr(arrow, "ARROW_TILE", 8)  # real sizes use 128-token tiles; small ones here
    arrow.arrow_tile.cache_clear()
    monkeypatch.setattr(flex, "flex_available", lambda q: True)
    try:
        image, text = 256, 24
        start = text if text_first else 0
        seq = image + text
        radii_widths = [3, arrow.SKIP, image, 20, 0, 3]  # arrow, cached, full, arrow, arrow, arrow
        q, k, v = qkv(1, 6, seq, 16, seed=7)
        assert arrow.arrow_tile(image) == 8 and arrow.fa4_aligned(seq, start, image, 8)
        cache = torch.randn(1, 6, seq, 16).to(torch.bfloat16)
        expected = cache.clone()
        got = arrow.arrow_attention(q, k, v, radii_widths, start, image, out=cache)
        assert got is cache and torch.equal(got[:, 1], expected[:, 1])  # the cached head is untouched
        assert len(fake_fa4) == 1 and fake_fa4[0]["mask"] is None  # one call, no element masked
        with fa4_mode("off"):
            monkeypatch.setattr(flex, "flex_available", lambda q: False)
            want = arrow.arrow_attention(q, k, v, radii_widths, start, image)  # the CPU definition
        for h in (0, 2, 3, 4, 5):
            assert (got[:, h].double() - want[:, h].double()).abs().max() < BF16
        plain = arrow.arrow_attention(q, k, v, radii_widths, start, image)  # no buffer: skipped heads are 0
        assert torch.equal(plain[:, 1], torch.zeros_like(plain[:, 1]))
    finally:
        arrow.arrow_tile.cache_clear()


def test_unaligned_arrow_keeps_flex(monkeypatch):
    assert not arrow.fa4_aligned(4429, 5, 4096, 128)  # image not starting on a block boundary
    assert arrow.fa4_aligned(4429, 0, 4096, 128)  # SD3 1024^2: image first, text after
    assert arrow.fa4_aligned(16896, 512, 16384, 128)  # FLUX 2048^2: text first


def test_route_sdpa_sends_the_models_own_calls_to_fa4(fake_fa4):
    q, k, v = qkv(1, 2, 30, 64)
    original = F.scaled_dot_product_attention
    with prefer_fast_dense():
        assert F.scaled_dot_product_attention is not original
        o = F.scaled_dot_product_attention(q, k, v)
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(30, 30, dtype=torch.bool))
    assert F.scaled_dot_product_attention is original
    assert len(fake_fa4) == 1  # the masked call stayed on SDPA
    assert (o.double() - ref(q, k, v)).abs().max() < BF16 and masked.shape == q.shape
    with fa4_mode("off"), prefer_fast_dense():
        assert F.scaled_dot_product_attention is original


def test_custom_op_keeps_the_compiled_graph_whole(fake_fa4):
    q, k, v = qkv(1, 2, 40, 64)

    def fn(q, k, v):
        return window_attention(q, k, v, 5) + dense_attention(q, k, v)

    want = fn(q, k, v)
    torch._dynamo.reset()
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v)  # fullgraph: no graph break
    assert torch.equal(got, want)


def test_a_measured_band_tile_reaches_the_kernel(fake_fa4, monkeypatch):
    monkeypatch.setitem(fa4.WINDOW_TILES, 72, (128, 128, False, True))
    q, k, v = qkv(1, 2, 40, 72)
    window_attention(q, k, v, 4)
    dense_attention(q, k, v)
    assert [c["tile"] for c in fake_fa4] == [(128, 128, False, True), None]
