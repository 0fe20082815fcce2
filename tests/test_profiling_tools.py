"""The diagnostic tools run on a CPU: the loop profiler on a tiny model, the window probe's
block-mask helper (the probe itself times CUDA kernels)."""

import torch

from experiments import profile_loop
from experiments.bench.window_probe import all_full


def test_profile_loop_writes_a_kernel_table(tmp_path):
    out = tmp_path / "table.txt"
    summary = profile_loop.main(["--arch", "tiny_dit", "--resolution", "64", "--images", "1", "--steps", "4",
                                 "--fraction", "0.5", "--device", "cpu", "--dtype", "float32", "--rows", "5",
                                 "--out", str(out)])
    assert summary["wall_s"] > 0 and summary["plan"]["full"] >= 2
    assert "Self CPU" in out.read_text()


def test_all_full_keeps_the_blocks_and_drops_the_element_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    mask = create_block_mask(lambda b, h, q, k: (q - k).abs() <= 100, None, None, 512, 512, device="cpu",
                             BLOCK_SIZE=128)
    full = all_full(mask)
    assert torch.equal(full.to_dense(), mask.to_dense())
    assert int(full.kv_num_blocks.sum()) == 0  # no partial block left
    assert int(full.full_kv_num_blocks.sum()) == int(mask.to_dense().sum())
