"""The coverage command (issue 31): every DiT transformer class of the installed diffusers is listed
with a tiny config or a recorded reason, and the job runs on a CPU over a subset, writing its table."""

import json

import pytest

from conftest import compose_app
from experiments.coverage import job
from experiments.infra.app import ConfigError
from experiments.infra.coverage import check_class, dit_classes
from experiments.models.tiny.zoo import TINY, UNBUILT

# served today (layer-wise, head-wise), and one that is not (no adapter before the generic one)
SERVED = ["DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel"]
SUBSET = [*SERVED, "CogVideoXTransformer3DModel"]


def test_every_listed_class_has_a_tiny_config_or_a_reason():
    listed = dit_classes()
    assert set(SUBSET) <= set(listed) and len(listed) >= 40
    assert "StableDiffusion3Pipeline" in listed["SD3Transformer2DModel"]
    assert not {"Transformer2DModel", "UVit2DModel", "StableAudioDiTModel", "PriorTransformer"} & set(listed)
    missing = [name for name in listed if name not in TINY and name not in UNBUILT]
    assert not missing, f"classes with neither a tiny config nor a reason: {missing}"


def test_the_job_checks_a_subset_on_the_cpu(tmp_path):
    out = tmp_path / "coverage.md"
    rows = job(compose_app("coverage", [f"classes=[{','.join(SUBSET)}]", f"out={out}"]))
    by_class = {r["class"]: r for r in rows}
    assert list(by_class) == SUBSET
    for name in SERVED:
        assert by_class[name]["passed"] and by_class[name]["all_full"] == by_class[name]["removal"] == "pass", name
    assert by_class["DiTTransformer2DModel"]["layerwise"] == "pass"  # self-attention: WA-RS / AST run
    cog = by_class["CogVideoXTransformer3DModel"]
    assert cog["built"] == "pass" and (cog["passed"] or cog["reason"])  # its tiny config runs raw
    table = out.read_text()
    summary = f"{sum(r['passed'] for r in rows)} of {len(SUBSET)} classes pass"
    assert summary in table and all(f"| {name} |" in table for name in SUBSET)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["summary"] == summary and [r["class"] for r in saved["rows"]] == SUBSET


@pytest.mark.parametrize("override,message", [("classes=[NotADiT]", "classes: NotADiT not among the listed"),
                                              ("timesteps=[5]", "timesteps must be two or more distinct")])
def test_bad_settings_are_refused_before_any_model_is_built(override, message):
    with pytest.raises(ConfigError, match=message):
        job(compose_app("coverage", [override]))


# read by the generic adapter's fallbacks (heads under another name, a fused qkv Linear, a module
# named self-attention though flagged cross, added k/v alone) or given a tiny config from their
# constructors: each described and bit-identical under an all-full plan, and restored on removal
READ = ["Ideogram4Transformer2DModel", "Krea2Transformer2DModel", "PRXTransformer2DModel", "OmniGenTransformer2DModel",
        "NucleusMoEImageTransformer2DModel", "Kandinsky5Transformer3DModel", "BriaFibo2Transformer2DModel",
        "QwenImage21Transformer2DModel"]


@pytest.mark.parametrize("name", READ)
def test_generically_read_classes_pass_all_full_and_removal(name):
    row = check_class(name, [], [900.0, 500.0])
    assert [row[c] for c in ("built", "adapter", "all_full", "removal")] == ["pass"] * 4, row["reason"]
    assert row["families"] == "layerwise"


# built tiny and described; no family takes their joint layers, and SANA-WM's self-attention
# modules hold no processor (only its cross-attention does)
@pytest.mark.parametrize("name,reason", [
    ("MochiTransformer3DModel", "layer kinds ['joint', 'joint']"),
    ("Cosmos3OmniTransformer", "layer kinds ['joint', 'joint']"),
    ("HunyuanImageTransformer2DModel", "layer kinds ['single', 'joint', 'single']"),
    ("SanaWMTransformer3DModel", "no self-, joint or single attention layer"),
])
def test_classes_built_tiny_stop_at_the_adapter_in_one_line(name, reason):
    row = check_class(name, [], [900.0, 500.0])
    assert row["built"] == "pass" and row["adapter"] == "fail" and reason in row["reason"], row["reason"]
