"""The layer-wise family's old import paths (before fastattn/layerwise/) still resolve, warning once."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import fastattn.layerwise as layerwise

MOVED = {  # old module -> (a name it forwards, the module now holding it)
    "fastattn.plan": [("LayerPlan", "fastattn.layerwise.plan"), ("WINDOW_SHAPES", "fastattn.layerwise.plan"),
                      ("check_window_shape", "fastattn.layerwise.plan")],
    "fastattn.methods": [("Method", "fastattn.layerwise.methods"), ("REFRESH_RULES", "fastattn.layerwise.methods")],
    "fastattn.processor": [("StepState", "fastattn.layerwise.processor"), ("project_qkv", "fastattn.attention_io")],
    "fastattn.flops": [("method_cost", "fastattn.layerwise.flops"), ("window_pair_count", "fastattn.layerwise.flops")],
    "fastattn.video_flops": [("video_attention_flops", "fastattn.layerwise.video_flops")],
}

# In a fresh interpreter: forwarders warn once per name per process.
_PROBE = """
import importlib, json, sys, warnings
out = []
for old, names in json.loads(sys.argv[1]).items():
    for name, home in names:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = getattr(importlib.import_module(old), name)
            again = getattr(importlib.import_module(old), name)
        new = getattr(importlib.import_module(home), name)
        out.append([old, name, home, value is new and again is new, [str(w.message) for w in caught
                    if issubclass(w.category, DeprecationWarning)]])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def forwarded():
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(MOVED)], cwd=root, capture_output=True,
                         text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_old_paths_resolve_and_warn_once(forwarded):
    assert len(forwarded) == sum(map(len, MOVED.values()))
    for old, name, home, same, messages in forwarded:
        assert same, f"{old}.{name}"
        assert len(messages) == 1 and messages[0].startswith(f"{old}.{name} moved to {home}."), messages


def test_layerwise_package_exports_the_family():
    assert layerwise.apply_layerwise.__module__ == "fastattn.layerwise.apply"
    assert all(hasattr(layerwise, name) for name in layerwise.__all__)


def test_unknown_name_at_an_old_path_is_an_attribute_error():
    import fastattn.plan

    with pytest.raises(AttributeError):
        fastattn.plan.not_a_name  # noqa: B018
