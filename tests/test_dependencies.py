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


def test_library_imports_without_hydra():
    import subprocess
    import sys

    code = "import sys, fastattn; assert not any(m.split('.')[0] in ('hydra', 'omegaconf') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
