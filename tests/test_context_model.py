"""The context-parallel communication model (experiments.bench.context_model), counted from shapes."""

import pytest

from conftest import compose_app
from experiments.bench.context_model import SHAPES, context_model, needed_shards, ring_bytes, shard_bytes, ulysses_bytes
from experiments.infra.app import ConfigError


def test_a_band_of_an_eighth_each_side_needs_three_of_eight_ring_steps():
    wan = SHAPES["wan_14b_720p"]
    band = needed_shards(wan, 8, 0.125)
    assert max(band) <= 3 and band[0] == band[-1] == 2  # an end rank has one neighbour
    assert needed_shards(wan, 8, None) == [8] * 8  # dense attention: the whole ring
    assert ring_bytes(wan, 8, 3) == 2 * 2 * shard_bytes(wan, 8)  # two K/V shards come in


def test_text_keys_join_every_rank_and_text_rows_need_the_whole_ring():
    flux = SHAPES["flux_dev_2k"]
    band = needed_shards(flux, 8, 0.125)
    assert band[0] == 8  # rank 0 holds the text queries: full rows
    assert all(n <= 4 for n in band[1:])  # its band and the text's shard


def test_ulysses_moves_four_tensors_whatever_the_window():
    wan = SHAPES["wan_14b_720p"]
    assert ulysses_bytes(wan, 4) == pytest.approx(4 * shard_bytes(wan, 4) * 3 / 4)


def test_the_job_prints_every_row_and_refuses_bad_ranks(capsys):
    rows = context_model(compose_app("context_model", []))
    assert len(rows) == 6 and "| Wan 2.1 14B 720p x 81 | 8 |" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="ranks must be"):
        context_model(compose_app("context_model", ["ranks=[1]"]))
