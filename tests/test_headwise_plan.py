"""Head-wise (step, layer, head) plans: JSON, validation, FLOPs; V1 plans keep loading."""

import json

import pytest

from fastattn import CompressionPlan, HeadPlan
from fastattn.headwise import arrow
from fastattn.flops import core_flops, projection_flops
from fastattn.kernels.arrow import arrow_pairs
from fastattn.kernels.masks import window_half_width

MODEL = {"class_name": "SD3Transformer2DModel", "num_layers": 2, "num_heads": 2, "head_dim": 8, "model_dim": 16,
         "seq_len": 72, "text_len": 8}
GRID = [[["full", "arrow:0.0625"], ["full", "full"]],
        [["cache", "arrow:0.03125"], ["cache", "cache"]]]


def test_round_trip_and_schema(tmp_path):
    plan = CompressionPlan.from_heads(GRID, model=MODEL, search={"threshold": 0.2})
    assert isinstance(plan, HeadPlan) and plan.num_steps == 2 and plan.num_layers == 2
    path = plan.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == 4 and data["heads"] == GRID
    assert CompressionPlan.load(path) == plan
    assert "c" in plan.render() and "a" in plan.render()
    cfg_plan = CompressionPlan.from_heads([[["full", "full"]], [["cfg", "cache"]]])
    assert cfg_plan.render().splitlines()[-1] == "   1 | gc"  # CFG-sharing heads render too


def test_v1_plans_keep_loading(tmp_path):
    # schema 1 stored the band's total width: window_fraction 0.125 is window_size 0.0625, the same band
    v1 = {"schema_version": 1, "num_steps": 2, "num_layers": 2, "window_fraction": 0.125, "model": {}, "search": {},
          "methods": [["full", "full"], ["wars", "ast"]]}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    plan = CompressionPlan.load(tmp_path / "v1.json")
    assert not isinstance(plan, HeadPlan) and plan.window_size == 0.0625
    v3 = {**v1, "schema_version": 3, "window_size": 0.0625}
    del v3["window_fraction"]
    assert plan.to_dict() == v3


@pytest.mark.parametrize("grid,match", [
    ([[["cache", "full"]]], r"plan.heads\[0\]\[0\]\[0\]: 'cache' needs an earlier step"),
    ([[["full"], ["full", "full"]]], r"plan.heads\[0\]\[1\] has 2 heads, expected 1"),
    ([[["full", "arrow:5"]]], r"plan.heads\[0\]\[0\]\[1\]: window fraction"),
    ([[["full", "sparse"]]], r"plan.heads\[0\]\[0\]\[1\]: unknown head method 'sparse'"),
    ([[[]]], r"plan.heads\[0\]\[0\] must be a non-empty list"),
    ([], "plan.heads must be a non-empty"),
])
def test_invalid_head_grids_name_the_field(grid, match):
    with pytest.raises(ValueError, match=match):
        CompressionPlan.from_heads(grid)



def test_schema_2_plans_keep_their_bands(tmp_path):
    # schema 2 stored an arrow's whole band: arrow:0.125 is 0.0625 on each side, the same band
    v2_heads = [[["full", "full", "full"], ["full", "full", "full"]],
                [["arrow:0.125", "arrow+rs:0.999999", "cache"], ["arrow:2", "full", "cfg"]],
                [["cache", "arrow+rs:0.999999", "arrow:0.3"], ["full", "arrow:0.0625", "full"]]]
    model = {**MODEL, "num_heads": 3, "seq_len": 264, "text_len": 8}
    v2 = {"schema_version": 2, "num_steps": 3, "num_layers": 2, "model": model, "search": {},
          "methods": [["full", "full"]] * 3, "heads": v2_heads}
    (tmp_path / "v2.json").write_text(json.dumps(v2))
    plan = CompressionPlan.load(tmp_path / "v2.json")
    image = 256
    old_widths = [[[window_half_width(image, float(h.partition(":")[2]) / 2) if ":" in h else None for h in layer]
                   for layer in row] for row in v2_heads]  # what schema 2 computed: f / 2 on each side
    assert [[[m.half_width(image) if m.fraction else None for m in layer] for layer in row]
            for row in plan.heads] == old_widths
    assert plan.refresh_rows()[0][0] == (None, 0.999999 / 2, None)
    saved = CompressionPlan.load(plan.save(tmp_path / "v4.json"))
    data = json.loads((tmp_path / "v4.json").read_text())
    assert data["schema_version"] == 4 and data["heads"][1][0] == ["arrow:0.0625", "arrow+rs:0.4999995", "cache"]
    assert data["heads"][1][1][0] == "arrow:1"
    assert saved == plan and saved.heads == plan.heads  # the same fractions, exactly
    assert saved.attention_flops() == plan.attention_flops()
    # FLOPs count each head's pairs at its band: the same as the plan written with the halved fractions
    halved = [[[f"{h.partition(':')[0]}:{float(h.partition(':')[2]) / 2:.7g}" if ":" in h else h for h in layer]
               for layer in row] for row in v2_heads]
    assert plan.attention_flops() == CompressionPlan.from_heads(halved, model=model).attention_flops()
    with pytest.raises(ValueError, match=r"must be in \(0, 2\]"):
        CompressionPlan.from_dict({**v2, "heads": [[["arrow:2.5"] * 3] * 2]})
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        CompressionPlan.from_dict({**v2, "schema_version": 4, "heads": [[["arrow:1.5"] * 3] * 2]})

def test_layer_methods_must_be_full_and_files_must_agree(tmp_path):
    data = CompressionPlan.from_heads(GRID, model=MODEL).to_dict()
    data["methods"][0][0] = "wa"
    (tmp_path / "methods.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="field 'methods' of a head-wise plan must be 'full'"):
        CompressionPlan.load(tmp_path / "methods.json")
    data = CompressionPlan.from_heads(GRID, model=MODEL).to_dict()
    data["schema_version"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'heads' goes with the head-wise plans' schema_version"):
        CompressionPlan.load(tmp_path / "bad.json")


def test_check_model_names_the_head_count():
    plan = CompressionPlan.from_heads(GRID, model=MODEL)
    with pytest.raises(ValueError, match="plan.heads has 2 heads per layer but SD3Transformer2DModel has 3"):
        plan.check_model(dict(MODEL, num_heads=3, class_name="SD3Transformer2DModel"))
    with pytest.raises(ValueError, match="plan has 2 layers"):
        plan.check_model(dict(MODEL, num_layers=3))


def test_flops_count_each_head_by_its_pairs():
    plan = CompressionPlan.from_heads(GRID, model=MODEL)
    f = plan.attention_flops()
    image, text, seq, hd = 64, 8, 72, 8
    pair = {"full": seq * seq, "cache": 0,
            "arrow:0.0625": arrow_pairs(image, text, arrow(0.0625).half_width(image)),
            "arrow:0.03125": arrow_pairs(image, text, arrow(0.03125).half_width(image))}
    core = sum(core_flops(2, 1, hd, pair[m]) for row in GRID for layer in row for m in layer)
    raw_core = 4 * core_flops(2, 2, hd, seq * seq)
    assert f["core_fraction"] == pytest.approx(core / raw_core)
    assert f["sparsity"] == pytest.approx(1 - core / raw_core)
    proj = projection_flops(2, seq, 16, 16)
    assert f["fraction"] == pytest.approx((4 * proj + core) / (4 * proj + raw_core))
    full = CompressionPlan.from_heads([[["full"] * 2] * 2], model=MODEL).attention_flops()
    assert full["sparsity"] == 0 and full["fraction"] == 1
    with pytest.raises(ValueError, match="text_len"):
        CompressionPlan.from_heads(GRID, model={k: v for k, v in MODEL.items() if k != "text_len"}).attention_flops()


def test_residual_sharing_rules_refreshes_and_flops():
    grid = [[["full", "full"], ["full", "full"]],
            [["arrow+rs:0.0625", "cache"], ["full", "arrow:0.0625"]],
            [["arrow+rs:0.0625", "full"], ["full", "full"]],
            [["full", "arrow+rs:0.125"], ["full", "full"]]]
    plan = CompressionPlan.from_heads(grid, model=MODEL)
    refresh = plan.refresh_rows()
    # head 0 of layer 0 refreshes at step 0 for its arrow+rs at steps 1-2; head 1 at step 2 for step 3
    assert refresh[0][0] == (0.0625, None) and refresh[2][0] == (None, 0.125)
    assert refresh[1][0] is None and all(refresh[s][1] is None for s in range(4))
    assert [row[0] for row in plan.residual_keep_mask()] == [True, True, True, False]
    assert not any(row[1] for row in plan.residual_keep_mask())
    assert plan.render().splitlines()[2].startswith("   1 | rc")
    image, text = 64, 8
    no_rs = CompressionPlan.from_heads([[[m.replace("+rs", "") for m in layer] for layer in row] for row in grid],
                                       model=MODEL)
    extra = core_flops(2, 1, 8, arrow_pairs(image, text, arrow(0.0625).half_width(image))
                       + arrow_pairs(image, text, arrow(0.125).half_width(image)))
    raw = (projection_flops(2, 72, 16, 16) + core_flops(2, 2, 8, 72 * 72)) * 8
    assert plan.attention_flops()["fraction"] == pytest.approx(no_rs.attention_flops()["fraction"] + extra / raw)


@pytest.mark.parametrize("grid,match", [
    ([[["arrow+rs:0.0625"]]], r"plan.heads\[0\]\[0\]\[0\]: 'arrow\+rs:0.0625' needs an earlier 'full' step"),
    ([[["full"]], [["cache"]], [["arrow+rs:0.0625"]]], None),
    ([[["full"]], [["arrow+rs:0.0625"]], [["arrow+rs:0.125"]]], r"plan.heads\[2\]\[0\]\[0\]: .*one window per refresh"),
    ([[["full"]], [["arrow+rs:0.0625"]], [["full"]], [["arrow+rs:0.125"]]], None),
])
def test_residual_sharing_needs_a_refresh_and_one_window_per_refresh(grid, match):
    if match is None:
        CompressionPlan.from_heads(grid)
    else:
        with pytest.raises(ValueError, match=match):
            CompressionPlan.from_heads(grid)
