"""Head-wise arrow attention and head-wise caching against their definitions (DiTFastAttnV2)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastattn.headwise import CACHE, FULL, HeadMethod, arrow
from fastattn.headwise.processor import headwise_attention
from fastattn.kernels.arrow import arrow_attention, arrow_mask_mod, arrow_pairs, arrow_tile, tile_radius_of
from fastattn.kernels.masks import dense_mask


def qkv(heads=3, seq=40, batch=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=g) for _ in range(3)]


def reference_arrow(q, k, v, width, image_start, image_len):
    """Softmax over the keys the arrow keeps, written out from the definition: text rows and
    columns, and image pairs whose tiles (counted from the image start) are within the radius."""
    seq = q.shape[-2]
    pos = torch.arange(seq, device=q.device)
    is_text = (pos < image_start) | (pos >= image_start + image_len)
    tile_of = torch.div(pos - image_start, arrow_tile(image_len), rounding_mode="floor")
    radius = tile_radius_of(width, image_len)
    keep = is_text[:, None] | is_text[None, :] | ((tile_of[:, None] - tile_of[None, :]).abs() <= radius)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("text_len", [0, 1, 7])
def test_mask_keeps_text_rows_and_columns_and_the_image_band(text_first, text_len):
    image_len, width = 20, 2
    start = text_len if text_first else 0
    mask = dense_mask(arrow_mask_mod(start, image_len, width), image_len + text_len, image_len + text_len)
    text = [i for i in range(image_len + text_len) if not start <= i < start + image_len]
    assert mask[text].all() and mask[:, text].all()
    img = mask[start:start + image_len, start:start + image_len]
    i = torch.arange(image_len)
    assert torch.equal(img, (i[:, None] - i[None, :]).abs() <= width)
    assert int(mask.sum()) == arrow_pairs(image_len, text_len, width)


@pytest.mark.parametrize("heads,text_len,text_first", [(1, 0, False), (3, 5, False), (5, 9, True), (2, 1, True)])
def test_window_covering_all_image_tokens_is_full_attention(heads, text_len, text_first):
    image_len = 32
    q, k, v = qkv(heads, image_len + text_len)
    start = text_len if text_first else 0
    full = F.scaled_dot_product_attention(q, k, v)
    for width in (image_len - 1, image_len + 10):
        assert torch.equal(arrow_attention(q, k, v, [width] * heads, start, image_len), full)
    # and through the head methods: arrow with a window fraction of 1 (each side) covers every image token
    assert torch.equal(headwise_attention(q, k, v, [arrow(1.0)] * heads, start, image_len, None), full)


@pytest.mark.parametrize("text_first", [True, False])
def test_full_head_in_a_mixed_layer_is_exactly_full_attention(text_first):
    heads, image_len, text_len = 4, 48, 6
    q, k, v = qkv(heads, image_len + text_len, seed=3)
    start = text_len if text_first else 0
    methods = [arrow(0.0625), FULL, arrow(0.125), FULL]
    out = headwise_attention(q, k, v, methods, start, image_len, None)
    full = F.scaled_dot_product_attention(q, k, v)
    for h in (1, 3):
        assert torch.equal(out[:, h], full[:, h])
    for h, frac in ((0, 0.0625), (2, 0.125)):
        w = HeadMethod.parse(f"arrow:{frac}").half_width(image_len)
        want = reference_arrow(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], w, start, image_len)
        torch.testing.assert_close(out[:, h:h + 1], want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[:, h], full[:, h], atol=1e-3)


def test_cached_heads_return_the_previous_output_and_cost_no_attention(monkeypatch):
    heads, image_len, text_len = 3, 24, 4
    q, k, v = qkv(heads, image_len + text_len, seed=5)
    previous = torch.randn_like(q)
    computed = []  # heads that went through an attention kernel
    import fastattn.kernels.arrow as kernels

    real = F.scaled_dot_product_attention
    monkeypatch.setattr(kernels.F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: computed.append(q.shape[1]) or real(q, *a, **kw))
    out = headwise_attention(q, k, v, [CACHE, FULL, CACHE], 0, image_len, previous)
    assert torch.equal(out[:, 0], previous[:, 0]) and torch.equal(out[:, 2], previous[:, 2])
    assert torch.equal(out[:, 1], real(q, k, v)[:, 1])
    assert computed == [1]  # one head computed; the cached ones cost nothing
    computed.clear()
    out = headwise_attention(q, k, v, [CACHE, arrow(0.125), FULL], 0, image_len, previous)
    assert sorted(computed) == [1, 1] and torch.equal(out[:, 0], previous[:, 0])
    computed.clear()
    assert torch.equal(headwise_attention(q, k, v, [CACHE] * 3, 0, image_len, previous), previous)
    assert computed == []
    with pytest.raises(RuntimeError, match="previous step"):
        headwise_attention(q, k, v, [CACHE, FULL, FULL], 0, image_len, None)


def test_skipped_heads_attend_nothing():
    q, k, v = qkv(2, 30)
    out = arrow_attention(q, k, v, [-1, 29], 0, 25)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    assert torch.equal(out[:, 1], F.scaled_dot_product_attention(q, k, v)[:, 1])
    mask = dense_mask(arrow_mask_mod(0, 25, -1), 30, 30)
    assert not mask.any()


@pytest.mark.parametrize("cond_first", [True, False])
def test_cfg_heads_copy_the_conditional_half(cond_first):
    from fastattn.family import COND_FIRST, UNCOND_FIRST, CallInfo
    from fastattn.headwise import CFG

    q, k, v = qkv(3, 30, batch=4, seed=7)
    cond = CallInfo(0, 0, COND_FIRST if cond_first else UNCOND_FIRST).cond_half(4)
    out = headwise_attention(q, k, v, [CFG, FULL, CFG], 0, 25, None, cond)
    full = F.scaled_dot_product_attention(q, k, v)
    for h in (0, 2):
        assert torch.equal(out[:2, h], out[2:, h])
        torch.testing.assert_close(out[cond, h], full[cond, h])
    assert torch.equal(out[:, 1], full[:, 1])
    with pytest.raises(ValueError, match="'cfg' heads need a CFG batch"):
        headwise_attention(q, k, v, [CFG, FULL, FULL], 0, 25, None, None)
    assert CallInfo(0, 0, None).cond_half(4) is None
    with pytest.raises(ValueError, match="must be even"):
        CallInfo(0, 0, COND_FIRST).cond_half(3)


def test_bad_kernel_inputs_are_one_line_errors():
    q, k, v = qkv(2, 30)
    with pytest.raises(ValueError, match="2 heads"):
        arrow_attention(q, k, v, [3], 0, 20)
    with pytest.raises(ValueError, match="does not fit"):
        arrow_attention(q, k, v, [3, 3], 15, 20)
    with pytest.raises(ValueError, match=">= 0"):
        arrow_attention(q, k, v, [-2, 3], 0, 20)


@pytest.mark.parametrize("value,match", [("arrow:0", "window fraction"), ("arrow:1.5", r"must be in \(0, 1\]"),
                                         ("arrow", "needs a window fraction"), ("window", "unknown head method"),
                                         (3, "expected a string")])
def test_head_method_parse_errors(value, match):
    with pytest.raises(ValueError, match=match):
        HeadMethod.parse(value, "here")


def test_head_method_round_trip_and_cost():
    for s in ("full", "cache", "cfg", "arrow:0.0625", "arrow:0.015625"):
        assert str(HeadMethod.parse(s)) == s
    assert CACHE.pairs(64, 8) == 0 and FULL.pairs(64, 8) == 72 * 72
    assert arrow(0.0625).pairs(64, 8) < FULL.pairs(64, 8)


@pytest.mark.parametrize("image_len,text_len,text_first", [(256, 0, False), (320, 9, True), (1000, 77, False)])
def test_band_is_whole_tiles_holding_about_the_windows_keys(image_len, text_len, text_first):
    tile = arrow_tile(image_len)
    assert tile == 2 ** int(math.log2(min(128, image_len // 32)))
    start = text_len if text_first else 0
    seq = image_len + text_len
    for fraction in (0.0625, 0.03125, 0.015625):
        w = arrow(fraction).half_width(image_len)
        r = tile_radius_of(w, image_len)
        assert abs((2 * r + 1) * tile - (2 * w + 1)) <= tile  # about the token band's keys per query
        mask = dense_mask(arrow_mask_mod(start, image_len, r, tile), seq, seq)
        img = mask[start:start + image_len, start:start + image_len]
        t = torch.arange(image_len) // tile
        assert torch.equal(img, (t[:, None] - t[None, :]).abs() <= r)
        assert int(mask.sum()) == arrow_pairs(image_len, text_len, w) == arrow(fraction).pairs(image_len, text_len)
    assert tile_radius_of(image_len - 1, image_len) == -(-image_len // tile) - 1  # the whole image: full
    assert arrow_tile(48) == 1 and arrow_tile(100_000) == 128


@pytest.mark.parametrize("seq,start,image_len,radii,tile", [(300, 0, 290, (5, -1, 289, 130), 1),
                                                            (700, 77, 600, (0, 50, 599, -1, 200), 1),
                                                            (256, 128, 128, (10, 127), 1),
                                                            (700, 77, 600, (0, 3, 74, -1, 1), 8),
                                                            (1100, 128, 960, (0, 1, 2, 7, -1), 128)])
def test_block_mask_from_ranges_equals_create_block_mask(seq, start, image_len, radii, tile):
    from torch.nn.attention.flex_attention import create_block_mask

    from fastattn.kernels.arrow import arrow_block_mask

    mod = arrow_mask_mod(start, image_len, torch.tensor(radii), tile)
    ref = create_block_mask(mod, None, len(radii), seq, seq, device="cpu")
    mine = arrow_block_mask(seq, start, image_len, radii, tile, "cpu")

    def tiles(num, idx):
        return [[set(idx[0, h, i, :num[0, h, i]].tolist()) for i in range(num.shape[2])] for h in range(num.shape[1])]

    assert tiles(mine.kv_num_blocks, mine.kv_indices) == tiles(ref.kv_num_blocks, ref.kv_indices)
    assert tiles(mine.full_kv_num_blocks, mine.full_kv_indices) == tiles(ref.full_kv_num_blocks, ref.full_kv_indices)
    if tile == 128 and start % 128 == 0:  # tiles on block boundaries: only blocks cut by the sequence end are partial
        last = -(-seq // 128) - 1
        partial = tiles(mine.kv_num_blocks, mine.kv_indices)
        assert all(blocks <= {last} for head in partial for blocks in head[:-1])


def _flex_case(device):
    from torch.nn.attention.flex_attention import flex_attention

    from fastattn.kernels.arrow import _grouped, arrow_block_mask

    seq, start, image_len, widths = 300, 10, 290, (5, -1, 289, 130)
    radii = tuple(tile_radius_of(w, image_len) for w in widths)
    q, k, v = (t.to(device) for t in qkv(len(widths), seq, batch=1, dim=16))
    out = flex_attention(q, k, v, block_mask=arrow_block_mask(seq, start, image_len, radii, arrow_tile(image_len),
                                                                device))
    return out, _grouped(q, k, v, list(radii), start, image_len)


def test_flex_with_the_tile_mask_matches_the_cpu_fallback(monkeypatch):
    out, ref = _flex_case("cpu")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the CUDA code path (shared widths buffer, cached block masks), run with eager FlexAttention
    import fastattn.kernels.arrow as kernels
    import fastattn.kernels.flex as flex
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(flex, "flex_available", lambda q: True)  # the dispatcher asks flex
    monkeypatch.setattr(flex, "compiled_flex", lambda: flex_attention)
    q, k, v = qkv(4, 300, batch=2, dim=16, seed=9)
    for widths in ((5, -1, 289, 130), (40, 40, -1, 7), (289, 20, 289, -1)):
        radii = [tile_radius_of(w, 290) for w in widths]
        for split in (True, False):
            monkeypatch.setattr(kernels, "SPLIT_FULL_HEADS_FROM_TOKENS", 0 if split else 10**9)
            want = kernels._grouped(q, k, v, radii, 10, 290)
            torch.testing.assert_close(arrow_attention(q, k, v, widths, 10, 290), want, atol=1e-5, rtol=1e-5)
            # into a buffer: computing heads written, skipped heads keep the buffer's values
            previous = torch.randn_like(q)
            got = arrow_attention(q, k, v, widths, 10, 290, out=previous.clone())
            for h, w in enumerate(widths):
                torch.testing.assert_close(got[:, h], previous[:, h] if w == -1 else want[:, h], atol=1e-5, rtol=1e-5)


def test_arrow_into_a_buffer_on_the_cpu_path():
    q, k, v = qkv(4, 300, batch=2, dim=16, seed=4)
    previous = torch.randn_like(q)
    for widths in ((5, -1, 289, -1), (289, -1, 289, 289), (-1, -1, -1, -1), (289, 289, 289, 289)):
        buf = previous.clone()
        got = arrow_attention(q, k, v, widths, 10, 290, out=buf)
        assert got is buf
        want = arrow_attention(q, k, v, widths, 10, 290)
        for h, w in enumerate(widths):
            assert torch.equal(got[:, h], previous[:, h] if w == -1 else want[:, h])
    with pytest.raises(ValueError, match="out must be"):
        arrow_attention(q, k, v, (5, 5, 5, 5), 10, 290, out=previous.double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_arrow_attention_matches_the_definition():
    out, ref = _flex_case("cuda")
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    q, k, v = qkv(4, 300, batch=1, dim=64)
    q, k, v = (t.cuda().half() for t in (q, k, v))
    mixed = headwise_attention(q, k, v, [arrow(0.0625), FULL, CACHE, arrow(0.125)], 10, 290, torch.zeros_like(q))
    for h, m in ((0, arrow(0.0625)), (3, arrow(0.125))):
        want = reference_arrow(*(t[:, h:h + 1].float() for t in (q, k, v)), m.half_width(290), 10, 290)
        torch.testing.assert_close(mixed[:, h:h + 1].float(), want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(mixed[:, 1].float(), F.scaled_dot_product_attention(q, k, v)[:, 1].float(),
                               atol=2e-3, rtol=2e-3)
    assert torch.equal(mixed[:, 2], torch.zeros_like(mixed[:, 2]))


def test_cached_heads_updated_in_place_give_the_same_layer_output():
    heads, image_len, text_len = 4, 300, 12
    q, k, v = qkv(heads, image_len + text_len, seed=11)
    previous = torch.randn_like(q)
    for methods in ([CACHE, FULL, CACHE, arrow(0.0625)], [CACHE, FULL, FULL, CACHE]):
        want = headwise_attention(q, k, v, methods, text_len, image_len, previous)
        buf = previous.clone()
        got = headwise_attention(q, k, v, methods, text_len, image_len, buf, update_cache=True)
        assert got is buf and torch.equal(got, want)


def test_residual_sharing_is_arrow_plus_the_refresh_steps_residual_in_float64():
    # Refresh at step r: head 0 full, its residual R = O_r - A_f(q_r). At step k: head 0 is
    # 'arrow+rs:f', so its output is A_f(q_k) + R; head 1 computes, head 2 is cached.
    from fastattn.headwise import arrow_rs
    from fastattn.headwise.processor import arrow_residuals

    f, start, image_len = 0.125, 0, 36
    width = arrow(f).half_width(image_len)
    step_r = [t.double() for t in qkv(3, 40, seed=11)]
    step_k = [t.double() for t in qkv(3, 40, seed=12)]
    o_r = headwise_attention(*step_r, [FULL, FULL, FULL], start, image_len, None)
    residual = arrow_residuals(*step_r, o_r, (f, None, None), start, image_len, None)
    want_r = reference_arrow(*step_r, image_len, start, image_len) - reference_arrow(*step_r, width, start, image_len)
    torch.testing.assert_close(residual[:, 0], want_r[:, 0])
    assert not residual[:, 1:].any()  # heads that refresh nothing keep the buffer's values (zeros)
    o_k = headwise_attention(*step_k, [arrow_rs(f), arrow(f), CACHE], start, image_len, o_r, residual=residual)
    torch.testing.assert_close(o_k[:, 0], reference_arrow(*step_k, width, start, image_len)[:, 0] + want_r[:, 0])
    torch.testing.assert_close(o_k[:, 1], reference_arrow(*step_k, width, start, image_len)[:, 1])
    assert torch.equal(o_k[:, 2], o_r[:, 2])
    with pytest.raises(RuntimeError, match="'arrow\\+rs' heads need the residuals"):
        headwise_attention(*step_k, [arrow_rs(f), FULL, FULL], start, image_len, None)
