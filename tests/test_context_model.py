"""The context-parallel communication model (experiments.bench.context_model), counted from shapes."""

import pytest

from conftest import compose_app
from experiments.bench.context_model import (SHAPES, band_ring_bytes, band_steps, context_model, dense_ring_bytes,
                                             shard_bytes, ulysses_bytes)
from experiments.infra.app import ConfigError


def test_a_band_of_an_eighth_each_side_needs_three_of_eight_ring_steps():
    wan = SHAPES["wan_14b_720p"]
    band = band_steps(wan, 8, 0.125)
    assert max(band) <= 3 and band[0] == band[-1] == 2  # an end rank has one neighbour
    assert band_steps(wan, 8, None) == [8] * 8  # dense attention: the whole ring
    assert band_ring_bytes(wan, 8, 3) == 2 * 2 * shard_bytes(wan, 8)  # two K/V shards come in
    assert dense_ring_bytes(wan, 8) == 7 * 2 * shard_bytes(wan, 8)


def test_text_rows_move_the_text_not_the_image_shards():
    flux = SHAPES["flux_dev_2k"]
    band = band_steps(flux, 8, 0.125)
    assert max(band) <= 3  # the text's rows come from every rank's parts, not the ring
    image_only = 2 * 2 * shard_bytes(flux, 8, flux.image_tokens)
    assert image_only < band_ring_bytes(flux, 8, 3) < image_only + 20e6  # the text adds about 14 MB
    assert band_ring_bytes(flux, 8, 3) < dense_ring_bytes(flux, 8) / 2


def test_ulysses_moves_four_tensors_whatever_the_window():
    wan = SHAPES["wan_14b_720p"]
    assert ulysses_bytes(wan, 4) == pytest.approx(4 * shard_bytes(wan, 4) * 3 / 4)


def test_the_job_prints_every_row_and_refuses_bad_ranks(capsys):
    rows = context_model(compose_app("context_model", []))
    assert len(rows) == 6 and "| Wan 2.1 14B 720p x 81 | 8 |" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="ranks must be"):
        context_model(compose_app("context_model", ["ranks=[1]"]))
