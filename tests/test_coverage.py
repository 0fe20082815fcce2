"""The coverage command (issue 31): every DiT transformer class of the installed diffusers is listed
with a tiny config or a recorded reason, and the job runs on a CPU over a subset, writing its table."""

import json

import pytest

from conftest import compose_app
from experiments.coverage import job
from experiments.infra.app import ConfigError
from experiments.infra.coverage import CHECKS, check_class, dit_classes
from experiments.models.tiny.zoo import TINY, UNBUILT

# hand-written adapters (layer-wise; SD3 and FLUX head-wise too), and one read generically whose
# processor joins the text in
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
    for name in SUBSET:  # each technique equal to its definition, and Algorithm 1 runs (SD3, FLUX: layer-wise
        # through their own processors beside their head-wise family)
        assert by_class[name]["techniques"] == by_class[name]["search"] == "pass", (name, by_class[name]["reason"])
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


# every class but these passes every check: built tiny, described, all-full bit-identical to raw
# over a short loop (every keyword kept), exact removal, each layer-wise technique equal to its
# float64 definition on that model's layers (float32 where the model runs no float64), Algorithm 1
UNSERVED = {"SanaWMTransformer3DModel": "no self-, joint or single attention layer"}


def test_every_listed_class_but_the_unserved_passes_every_check(tmp_path):
    rows = job(compose_app("coverage", [f"out={tmp_path / 'coverage.md'}"]))
    failed = {r["class"]: r["reason"] for r in rows if not r["passed"]}
    assert failed.keys() == UNSERVED.keys(), failed
    assert all(UNSERVED[name] in reason for name, reason in failed.items())
    assert len(rows) - len(failed) >= 0.9 * len(rows)
    for r in rows:
        if r["passed"]:
            assert all(r[c] in ("pass", "-") for c in CHECKS) and r["techniques"] == r["search"] == "pass", r


def test_a_class_whose_attention_holds_no_processor_stops_at_the_adapter_in_one_line():
    """SANA-WM's self-attention modules hold no processor (only its cross-attention does)."""
    row = check_class("SanaWMTransformer3DModel", [], [900.0, 500.0])
    assert row["built"] == "pass" and row["adapter"] == "fail", row["reason"]
    assert "no self-, joint or single attention layer" in row["reason"]



def test_a_single_stream_window_before_any_joint_one_places_the_text_as_the_model_does():
    """FLUX's single-stream layers hold the text in their sequence; their window must cover the
    image tokens even where no joint layer has computed a window yet (a full joint layer shows
    where the text goes), as the definition run places them (float64)."""
    import copy

    import torch

    from experiments.infra.coverage import build, definition_difference, technique_calls
    from fastattn import LayerPlan, Method, describe

    model = copy.deepcopy(build("FluxTransformer2DModel")).to(torch.float64)
    calls = technique_calls(model, "FluxTransformer2DModel", torch.float64)[:3]
    kinds = [layer.kind for layer in describe(model).layers]
    windowed = [Method.FULL if kind == "joint" else Method.WARS for kind in kinds]  # joint layers full throughout
    plan = LayerPlan([[Method.FULL] * len(kinds), windowed, windowed], window_size=0.125)
    assert definition_difference(model, calls, plan, tolerance=1e-9) is None
