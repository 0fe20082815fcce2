"""Kernels against their definitions, with float64 references on fresh random inputs."""

import pytest
import torch

from fastattn.kernels import (band_mask_mod, band_pairs, dense_attention, dense_mask, refresh_attention,
                              window_attention, window_half_width)


def reference_attention(q, k, v, mask=None):
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


# window_size is the fraction of the tokens on each side (flash-attn's window_size): the paper's
# 1/8 at DiT-XL 512's 1024 tokens is a half-width of 128.
@pytest.mark.parametrize("seq_len,fraction,expected", [(1024, 0.125, 128), (4096, 0.125, 512), (64, 0.125, 8),
                                                      (10, 0.125, 2), (64, 0.5, 32), (64, 1.0, 63), (1, 0.5, 0)])
def test_window_half_width(seq_len, fraction, expected):
    assert window_half_width(seq_len, fraction) == expected


@pytest.mark.parametrize("seq_len,fraction,expected", [(100, 0.07, 7), (100, 0.14, 14)])
def test_window_half_width_is_exact_where_floating_point_rounds_up(seq_len, fraction, expected):
    # The cases the rational arithmetic changed: 0.07 * 100 is 7.000000000000001 in floats.
    assert window_half_width(seq_len, fraction) == expected


def test_window_half_width_is_integer_arithmetic_on_the_written_decimal():
    # w = k / 1000 written as a decimal: w = ceil(k * L / 1000), by integer division, capped at L - 1
    for seq_len in range(1, 301):
        for k in range(1, 1001):
            expected = min(seq_len - 1, -(-k * seq_len // 1000))
            assert window_half_width(seq_len, k / 1000) == expected, (seq_len, k)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_window_half_width_rejects_out_of_range(fraction):
    with pytest.raises(ValueError, match="window_size"):
        window_half_width(64, fraction)


def test_band_mask_is_the_band():
    mask = dense_mask(band_mask_mod(2), 7, 7)
    for i in range(7):
        for j in range(7):
            assert bool(mask[i, j]) == (abs(i - j) <= 2)
    for L in (1, 5, 33):
        for w in (0, 1, 3, 40):
            assert band_pairs(L, w) == int(dense_mask(band_mask_mod(min(w, L - 1)), L, L).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_attention_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 37, 8, generator=g) for _ in range(3))
    for w in (0, 3, 10):
        mask = dense_mask(band_mask_mod(w), 37, 37)
        torch.testing.assert_close(window_attention(q, k, v, w).double(), reference_attention(q, k, v, mask),
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_attention(q, k, v).double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_window_covering_everything_is_dense():
    q, k, v = (torch.randn(1, 2, 20, 4) for _ in range(3))
    assert torch.equal(window_attention(q, k, v, 19), dense_attention(q, k, v))
    o, r = refresh_attention(q, k, v, 5)  # the refresh: O and R = O - W
    assert torch.equal(o, dense_attention(q, k, v))
    assert torch.equal(r, o - window_attention(q, k, v, 5))
