"""The metric stack imports with the torch this project installs (torchvision must match it)."""

import importlib

import pytest
import torch


def test_torchvision_matches_torch_and_its_ops_run():
    import torchvision
    from torchvision.ops import nms

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    assert torchvision.__version__


@pytest.mark.parametrize("module", ["torchmetrics.image.fid", "torch_fidelity", "cleanfid", "open_clip", "scipy"])
def test_metric_libraries_import(module):
    importlib.import_module(module)


def test_cache_dit_of_the_peers_extra_imports_with_this_torch_and_diffusers():
    """cache-dit (the [peers] extra, in dev) drives the comparison's cache-dit rows: its pinned
    release imports beside the installed torch and diffusers and has the API the rows use."""
    import cache_dit

    assert cache_dit.__version__ == "1.5.3"
    for name in ("enable_cache", "disable_cache", "summary", "steps_mask", "BlockAdapter", "ForwardPattern",
                 "DBCacheConfig", "TaylorSeerCalibratorConfig", "FoCaCalibratorConfig"):
        assert hasattr(cache_dit, name), name


def test_library_imports_without_hydra():
    import subprocess
    import sys

    code = "import sys, fastattn; assert not any(m.split('.')[0] in ('hydra', 'omegaconf') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
