"""The diagnostic tools run on a CPU: the loop profiler on a tiny model, the window probe's
block-mask helper and the arrow probe's rows (the probes' commands time CUDA kernels only)."""

import pytest
import torch

from conftest import compose_app
from experiments.infra.app import ConfigError
from experiments.bench.window_probe import all_full
from experiments.profile_loop import profile_loop

TINY_LOOP = ["arch=tiny_dit", "resolution=64", "images=1", "steps=4", "device=cpu", "dtype=float32", "rows=5"]


def test_profile_loop_writes_a_kernel_table(tmp_path):
    out = tmp_path / "table.txt"
    summary = profile_loop(compose_app("profile_loop", [*TINY_LOOP, "fraction=0.5", f"out={out}"]))
    assert summary["wall_s"] > 0 and summary["plan"]["full"] >= 2
    assert "Self CPU" in out.read_text()


@pytest.mark.parametrize("override,message", [
    ("fraction=1.5", r"fraction must be a number in \(0, 1\] or null, got 1.5"),
    ("cuda_graphs=true", r"cuda_graphs=true needs a CUDA device \(device=cuda\)"),
    ("arch=dit_xxl", "arch must be one of .*, got 'dit_xxl'"),
    ("steps=0", "steps must be an integer >= 1, got 0"),
])
def test_profile_loop_config_errors_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        profile_loop(compose_app("profile_loop", [*TINY_LOOP, override]))


def test_all_full_keeps_the_blocks_and_drops_the_element_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    mask = create_block_mask(lambda b, h, q, k: (q - k).abs() <= 100, None, None, 512, 512, device="cpu",
                             BLOCK_SIZE=128)
    full = all_full(mask)
    assert torch.equal(full.to_dense(), mask.to_dense())
    assert int(full.kv_num_blocks.sum()) == 0  # no partial block left
    assert int(full.full_kv_num_blocks.sum()) == int(mask.to_dense().sum())


def test_arrow_probe_times_every_kernel_on_a_small_shape():
    from experiments.bench.arrow_probe import probe

    shape = {"batch": 1, "heads": 4, "head_dim": 16, "image_len": 1024, "text_len": 40, "image_start": 40}
    rows = probe(shape, [0.0625, 0.03125], torch.device("cpu"), torch.float32, repeats=1, configs=(),
                 compile_flex=False)
    names = [r["kernel"] for r in rows]
    assert names[0].startswith("dense cuDNN") and rows[0]["of_dense"] == 1.0
    assert sum("tiles" in n for n in names) == 2 and sum("token band" in n for n in names) == 2
    tiled = next(r for r in rows if "tiles" in r["kernel"])
    token = next(r for r in rows if "token band" in r["kernel"])
    assert 0 < tiled["block_density"] <= token["block_density"] + 0.1
    assert sum(n.startswith("75%") for n in names) == 5  # cached once, arrow and mixed with and without the split
    assert sum(n.startswith("step row") for n in names) == 4
