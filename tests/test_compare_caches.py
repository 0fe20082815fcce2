"""The cache-hook comparison: hooks driven on DiT and PixArt, compute counted from what runs, the
command's table and its resume."""

import json

import pytest
import torch

from conftest import dit_inputs
from experiments.infra import cache_hooks
from experiments.infra.block_flops import BlockFlopCounter
from experiments.compare_caches import comparison_rows, run_compare
from experiments.infra.app import ConfigError
from fastattn import CompressionPlan, LayerPlan, Method, apply_fastattn, remove_fastattn
from test_run import ROOT

STEPS = 6
SETTINGS = {  # each one a caching setting that must skip work within 6 steps
    "first_block_cache": {"threshold": 10.0},
    "mag_cache": {"max_skip_steps": 2, "retention_ratio": 0.2},
    "taylorseer": {"cache_interval": 2, "disable_cache_before_step": 1},
    "pab": {"skip": 2, "timestep_range": [-1, 1001]},
    "faster_cache": {"preset": "wide"},
}


def counted(pipe, inputs, hooks=None):
    counter = BlockFlopCounter(pipe.transformer)
    try:
        with torch.no_grad(), (hooks.generation() if hooks else torch.no_grad()):
            images = pipe(**inputs).images
    finally:
        counter.remove()
    return counter.flops, images


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_each_hook_skips_work_and_changes_the_samples(kind, pipe_and_inputs):
    pipe, make_inputs = pipe_and_inputs
    raw_flops, raw = counted(pipe, make_inputs(steps=STEPS))
    spec = cache_hooks.check_spec({"kind": kind, **SETTINGS[kind]}, "caches[0]")
    ratios = cache_hooks.calibrate_mag_ratios(pipe, make_inputs(steps=STEPS)) if kind == "mag_cache" else None
    hooks = cache_hooks.CacheHooks(pipe, spec, STEPS, ratios)
    flops, images = counted(pipe, make_inputs(steps=STEPS), hooks)
    again, _ = counted(pipe, make_inputs(steps=STEPS), hooks)
    hooks.remove()
    assert flops.total < raw_flops.total and flops.attention < raw_flops.attention
    assert again.total == flops.total  # each generation starts from a reset state
    assert not torch.equal(torch.as_tensor(images), torch.as_tensor(raw))
    _, after = counted(pipe, make_inputs(steps=STEPS))
    assert torch.equal(torch.as_tensor(after), torch.as_tensor(raw))  # removed: the model is exact again


def test_faster_cache_sees_the_unconditional_half_first(dit_pipe):
    seen = []
    hooks = cache_hooks.CacheHooks(dit_pipe, cache_hooks.check_spec({"kind": "faster_cache"}, "c"), STEPS)
    # FasterCache's own forward sits under this hook: it records the labels as FasterCache gets them
    dit_pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["class_labels"].clone()),
                                                   with_kwargs=True)
    with torch.no_grad(), hooks.generation():
        dit_pipe(**dit_inputs(steps=2))
    null = dit_pipe.transformer.config.num_embeds_ada_norm
    assert all((labels[: len(labels) // 2] == null).all() for labels in seen)


def dit_analytic_flops(transformer, samples: int, steps: int) -> tuple[float, float]:
    """DiT block FLOPs of a raw generation from the architecture: per sample, CFG half and block,
    attention 4 projections (2*L*D*D each) + products (4*L*L*D); feed-forward 2*L*D*4D twice;
    adaLN-Zero's embedding (256 -> D -> D) and modulation (D -> 6D) once per sample."""
    c = transformer.config
    d = c.num_attention_heads * c.attention_head_dim
    tokens = (c.sample_size // c.patch_size) ** 2
    attention = 8 * tokens * d * d + 4 * tokens * tokens * d
    other = 2 * 2 * tokens * d * 4 * d + 2 * (256 * d + d * d + d * 6 * d)
    calls = samples * 2 * steps * c.num_layers
    return calls * (attention + other), calls * attention


def test_counted_flops_equal_the_analytic_count_raw_and_under_a_plan(dit_pipe):
    flops, _ = counted(dit_pipe, dit_inputs(steps=STEPS, n=2))
    total, attention = dit_analytic_flops(dit_pipe.transformer, samples=2, steps=STEPS)
    assert flops.total == pytest.approx(total, rel=1e-12) and flops.attention == pytest.approx(attention, rel=1e-12)

    c = dit_pipe.transformer.config
    grid = [["full"] * 3, ["wars", "ast", "asc"], ["wars+asc", "ast", "full"], ["full", "wars", "asc"],
            ["ast", "wars", "wars+asc"], ["wars", "full", "ast"]]
    plan = LayerPlan([[Method(m) for m in row] for row in grid], window_size=0.25,
                     model={"seq_len": (c.sample_size // c.patch_size) ** 2, "num_heads": c.num_attention_heads,
                            "head_dim": c.attention_head_dim})
    apply_fastattn(dit_pipe, plan)
    planned, _ = counted(dit_pipe, dit_inputs(steps=STEPS, n=2))
    remove_fastattn(dit_pipe)
    per_pair = plan.attention_flops()["flops_per_pair"]  # fastattn.flops: per CFG pair of samples
    assert planned.attention == pytest.approx(2 * per_pair, rel=1e-12)
    assert planned.total - planned.attention == pytest.approx(total - attention, rel=1e-12)


def compose_compare(overrides, out_dir):
    from hydra import compose, initialize_config_dir

    tiny = ["model=tiny_dit", "model.tiny.sample_size=8", "model.tiny.num_layers=3", "solver.num_steps=4",
            "samples.num=2", "samples.batch_size=2", "calibration.num_samples=1", "logger=disabled", "seeds=[0]",
            "fastattn=[d4]", "caches=[{kind:pab,skip:2,timestep_range:[-1,1001]},{kind:mag_cache,max_skip_steps:2}]",
            "stacked=[{fastattn:d4,cache:{kind:first_block_cache,threshold:10.0}}]"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("compare_caches", overrides=[*tiny, f"plan_cache_dir={out_dir}/plan_cache", *overrides])
    cfg.output_dir = str(out_dir)
    return cfg


def test_the_command_writes_the_table_and_resumes(tmp_path, monkeypatch):
    record = run_compare(compose_compare([], tmp_path))["records"][0]
    rows = {r["key"]: r for r in record["rows"]}
    assert list(rows) == ["raw", "fastattn_d4", "pab_skip2_timestep_range-11001", "mag_cache_max_skip_steps2",
                          "fastattn_d4+first_block_cache_threshold10.0"]
    assert rows["raw"]["compute"] == 1 and rows["raw"]["attn_fraction"] == 1
    for key in list(rows)[1:]:
        assert rows[key]["compute"] < 1 and rows[key]["psnr_db"] > 0
    assert rows["fastattn_d4+first_block_cache_threshold10.0"]["compute"] < rows["fastattn_d4"]["compute"]
    for name in ("compare.json", "compare.csv", "compare.md", "compare.png"):
        assert (tmp_path / "seed0" / name).stat().st_size > 0
    assert "| DiTFastAttn + FirstBlockCache | d4 + t=10.0 |" in (tmp_path / "seed0" / "compare.md").read_text()
    assert json.loads((tmp_path / "seed0" / "compare.json").read_text())["complete"]

    import experiments.compare_caches as job

    monkeypatch.setattr(job, "generate_row", lambda *a, **k: pytest.fail("a finished row was generated again"))
    again = run_compare(compose_compare([], tmp_path))["records"][0]
    assert again["rows"] == record["rows"]


def test_shards_measure_their_rows_side_by_side_and_a_run_without_shard_gathers_them(tmp_path, monkeypatch):
    import experiments.compare_caches as job

    with pytest.raises(ConfigError, match="raw samples are not all in"):  # raw first, before any model is built
        run_compare(compose_compare(["shard=0/2"], tmp_path))
    run_compare(compose_compare(["fastattn=[]", "caches=[]", "stacked=[]"], tmp_path))
    (tmp_path / "seeds.md").unlink()  # the raw run's verdict; a shard writes none
    measured = {}
    for shard in ("0/2", "1/2"):
        out = run_compare(compose_compare([f"shard={shard}"], tmp_path))
        assert out["held_out"] is None and not (tmp_path / "seeds.md").exists()
        measured[shard] = [r["key"] for r in out["records"][0]["rows"]]
    assert measured == {"0/2": ["raw", "fastattn_d4", "mag_cache_max_skip_steps2"],
                        "1/2": ["raw", "pab_skip2_timestep_range-11001", "fastattn_d4+first_block_cache_threshold10.0"]}
    assert sorted(p.name for p in (tmp_path / "seed0" / "shards").iterdir()) == ["0of2.json", "1of2.json"]

    monkeypatch.setattr(job, "generate_row", lambda *a, **k: pytest.fail("a row a shard measured was generated again"))
    record = run_compare(compose_compare([], tmp_path))["records"][0]
    assert [r["key"] for r in record["rows"]] == ["raw", "fastattn_d4", "pab_skip2_timestep_range-11001",
                                                  "mag_cache_max_skip_steps2", "fastattn_d4+first_block_cache_threshold10.0"]
    assert all(r["psnr_db"] > 0 and r["compute"] < 1 for r in record["rows"][1:]) and (tmp_path / "seeds.md").exists()


def test_a_corrupt_shard_record_is_one_line_naming_it(tmp_path):
    overrides = ["fastattn=[]", "caches=[]", "stacked=[]"]
    run_compare(compose_compare(overrides, tmp_path))
    (tmp_path / "seed0" / "shards").mkdir()
    (tmp_path / "seed0" / "shards" / "0of2.json").write_text('{"rows": [')
    with pytest.raises(ConfigError, match=r"0of2.json: not a shard's record \(JSONDecodeError") as error:
        run_compare(compose_compare(overrides, tmp_path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text", ["2/2", "1", "a/3", "-1/2"])
def test_a_shard_outside_its_count_is_refused_in_one_line(tmp_path, text):
    with pytest.raises(ConfigError, match=r"shard must be 'i/n' with 0 <= i < n"):
        run_compare(compose_compare([f"shard='{text}'"], tmp_path))


def test_rows_measured_on_fewer_samples_are_measured_again(tmp_path):
    """A run dir made with samples.num=2 and re-run with 3: every row gets its third sample and is
    measured on all three (not kept from the earlier record, whose raw set had two)."""
    overrides = ["fastattn=[]", "stacked=[]", "caches=[{kind:pab,skip:2,timestep_range:[-1,1001]}]"]
    run_compare(compose_compare(overrides, tmp_path))
    record = run_compare(compose_compare([*overrides, "samples.num=3"], tmp_path))["records"][0]
    assert record["num_samples"] == 3
    assert len(list((tmp_path / "seed0" / "samples" / "raw").glob("*.png"))) == 3
    pab = next(r for r in record["rows"] if r["key"].startswith("pab"))
    assert pab["psnr_db"] > 0 and len(list((tmp_path / "seed0" / "samples" / pab["key"]).glob("*.png"))) == 3


def test_fastattn_rows_name_another_technique_as_technique_colon_threshold(tmp_path):
    rows = comparison_rows(compose_compare(["fastattn=[d2,forecast:d2,'forecast:0.0125']",
                                            "stacked=[{fastattn: 'forecast:d1', cache: {kind: mag_cache}}]"], tmp_path))
    by_key = {r["key"]: r for r in rows}
    assert by_key["fastattn_d2"]["method"] == "DiTFastAttn"
    assert by_key["fastattn_forecast_d2"]["method"] == "fastattn forecast + AST"
    assert by_key["fastattn_forecast_d2"]["setting"] == "d2" and by_key["fastattn_forecast_d2"]["fastattn"] == "forecast:d2"
    assert by_key["fastattn_forecast_0.0125"]["setting"] == "0.0125"
    stacked = next(r for r in rows if r["key"].startswith("fastattn_forecast_d1+"))
    assert stacked["method"] == "fastattn forecast + AST + MagCache"


def test_every_default_stack_runs_on_a_cache_setting_the_peers_show_alone(tmp_path):
    """A stack is credited against its own base: a cache setting only fastattn's rows ran on would
    hide the peer row a user could pick instead."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("compare_caches", overrides=[f"plan_cache_dir={tmp_path}/plan_cache"])
    rows = comparison_rows(cfg)
    peers = {r["key"] for r in rows if r["fastattn"] is None and r["cache"] is not None}
    bases = {r["key"]: cache_hooks.spec_key(r["cache"]) for r in rows if r["fastattn"] and r["cache"]}
    assert bases and not {k: b for k, b in bases.items() if b not in peers}


def test_a_stacked_plan_searched_under_its_block_cache_skips_what_the_cache_skips(tmp_path):
    cfg = compose_compare(["caches=[]", "fastattn=[]", "stacked=[{fastattn: d4, search_under_cache: true, "
                           "cache: {kind: mag_cache, max_skip_steps: 1, threshold: 10.0}}]"], tmp_path)
    record = run_compare(cfg)["records"][0]
    key = "fastattn_d4+mag_cache_max_skip_steps1_threshold10.0+under_cache"
    row = {r["key"]: r for r in record["rows"]}[key]
    assert row["method"] == "DiTFastAttn + MagCache, searched under it" and row["psnr_db"] > 0
    plan = CompressionPlan.load(tmp_path / "plans" / f"{key}.json")
    skipped = plan.search["skipped_steps"]  # MagCache with K=1 and a loose threshold: 1, 3
    assert skipped == [1, 3] and all(plan.methods[s] == [Method.FULL] * 3 for s in skipped)


def test_a_plan_stacks_with_seacache_under_which_it_was_searched(tmp_path):
    """SeaCache skips whole steps like MagCache: a plan searched under it keeps them full and
    the stack costs less than SeaCache alone."""
    cfg = compose_compare(["fastattn=[]", "caches=[{kind: sea_cache, threshold: 10.0}]",
                           "stacked=[{fastattn: d4, search_under_cache: true, cache: {kind: sea_cache, "
                           "threshold: 10.0}}]"], tmp_path)
    rows = {r["key"]: r for r in run_compare(cfg)["records"][0]["rows"]}
    key = "fastattn_d4+sea_cache_threshold10.0+under_cache"
    plan = CompressionPlan.load(tmp_path / "plans" / f"{key}.json")
    skipped = plan.search["skipped_steps"]
    assert skipped and all(plan.methods[s] == [Method.FULL] * 3 for s in skipped)
    assert rows[key]["compute"] < rows["sea_cache_threshold10.0"]["compute"] and rows[key]["psnr_db"] > 0


def test_a_setting_changing_another_key_is_a_row_of_its_own():
    plain = cache_hooks.check_spec({"kind": "mag_cache", "max_skip_steps": 1}, "c")
    later = cache_hooks.check_spec({"kind": "mag_cache", "max_skip_steps": 1, "retention_ratio": 0.4}, "c")
    assert cache_hooks.spec_key(plain) == "mag_cache_max_skip_steps1"  # unchanged: earlier runs resume
    assert cache_hooks.spec_key(later) == "mag_cache_max_skip_steps1_retention_ratio0.4"
    assert cache_hooks.spec_setting(later) == "K=1, retention_ratio=0.4"


def _row(key, compute, psnr, fid=30.0):
    return {"key": key, "method": key.split("_")[0], "setting": key, "compute": compute, "psnr_db": psnr,
            "fid_small": fid}


def test_matched_compute_picks_the_best_row_within_each_budget_per_side():
    from analysis.compare_caches import interpolated, markdown, matched_compute

    record = {"model": "m", "solver": "s", "num_steps": 50, "guidance_scale": 4.0, "num_samples": 4,
              "batch_size": 4, "seed": 0, "device": "cpu", "complete": True, "rows": [
                  {"key": "raw", "method": "raw", "setting": "", "compute": 1.0, "fid_small": 30.0},
                  _row("mag_cache_a", 0.40, 30.0, fid=31.0), _row("mag_cache_b", 0.60, 38.0, fid=50.0),
                  _row("fastattn_x", 0.30, 28.0, fid=31.5), _row("fastattn_y", 0.50, 36.0),
                  _row("fastattn_z", 0.70, 37.0)]}
    summary = matched_compute(record)
    at = {p["compute"]: p for p in summary["points"]}
    assert at[0.35]["hook_psnr_db"] is None and at[0.35]["fastattn_psnr_db"] == 28.0  # only fastattn fits
    assert at[0.45]["hook_psnr_db"] == 30.0 and at[0.45]["fastattn_psnr_db"] == 28.0
    assert at[0.65]["hook_psnr_db"] == 38.0 and at[0.65]["fastattn_psnr_db"] == 36.0
    assert at[0.75]["fastattn_psnr_db"] == 37.0  # the best within, not the last
    # joined: 30 dB at 0.4 to 38 dB at 0.6 by a straight line
    assert interpolated([r for r in record["rows"][1:3]], 0.5) == pytest.approx(34.0)
    # fastattn leads on 0.30-0.39 and 0.50-0.59 (20 of 51 points), trails elsewhere
    assert summary["matches"] == pytest.approx(20 / 51) and summary["ahead"] == pytest.approx(20 / 51)
    assert summary["matches_interpolated"] < summary["matches"]
    fid = summary["lowest_compute_keeping_fid"]
    assert fid["fastattn"]["compute"] == 0.30 and fid["hook"]["compute"] == 0.40
    text = markdown(record)
    assert "### Matched compute (0.30–0.80)" in text and "matches or beats the hooks on 39% of the range" in text


@pytest.mark.parametrize("overrides, message", [
    (["caches=[{kind:nope}]"], r"caches\[0\].kind must be one of first_block_cache"),
    (["caches=[{kind:pab,skips:2}]"], r"caches\[0\]: pab has no setting 'skips'"),
    (["caches=[{kind:mag_cache,max_skip_steps:0}]"], r"caches\[0\].max_skip_steps must be an integer >= 1"),
    (["stacked=[{fastattn:d2,cache:{kind:pab}}]"], r"stacked\[0\].cache.kind must be one of first_block_cache"),
    (["fastattn=[d9]"], "threshold: unknown option 'd9'"),
    (["fastattn=[fourcast:d2]"], "technique: unknown option 'fourcast'"),
    (["fastattn=['forecast:1.5']"], r"threshold: a delta must be in \[0, 1\), got 1.5"),
    (["guidance_scale=1.0", "caches=[{kind:faster_cache}]"], "needs guidance_scale > 1"),
    (["caches=[{kind:text_kv_cache}]"], "TextKVCache caches the text keys and values of NucleusMoE-Image blocks only"),
    (["caches=[{kind:sea_cache,residual_order:2}]"], r"caches\[0\].residual_order must be 0 or 1"),
])
def test_bad_settings_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        comparison_rows(compose_compare(overrides, tmp_path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("model", ["flux_dev_2k", "wan_1_3b_480p"])
def test_attention_products_are_counted_for_joint_cross_and_projection_free_attention(model):
    """FLUX's double blocks attend over text and image together (its text has its own projections),
    its single blocks have no output projection, Wan's cross-attention takes the text as keys: the
    counted products equal 4 * batch * inner * pairs per layer with those pairs."""
    from experiments.bench.zoo_shapes import build
    from fastattn.flops import core_flops

    transformer, inputs = build(model, "tiny", torch.device("cpu"), torch.float32)
    attention_linears = []
    modules = [m for b in transformer.modules() if b.__class__.__name__.endswith("Block")
               for m in b.modules() if isinstance(getattr(m, "to_q", None), torch.nn.Linear)]
    seen = {}

    def lengths(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)  # Wan passes it by position
        seen[id(module)] = (hidden.shape[1], None if context is None else context.shape[1], hidden.shape[0])

    def linear(module, args, output):
        attention_linears.append(2.0 * (args[0].numel() // module.in_features) * module.in_features * module.out_features)

    hooks = [m.register_forward_pre_hook(lengths, with_kwargs=True) for m in modules]
    hooks += [l.register_forward_hook(linear) for m in modules for l in m.modules() if isinstance(l, torch.nn.Linear)]
    counter = BlockFlopCounter(transformer)
    with torch.no_grad():
        transformer(**inputs)
    counter.remove()
    for h in hooks:
        h.remove()
    expected = 0.0
    for m in modules:
        queries, text, batch = seen[id(m)]
        joint = isinstance(getattr(m, "add_q_proj", None), torch.nn.Linear)
        pairs = (queries + text) ** 2 if text and joint else queries * text if text else queries ** 2
        expected += core_flops(batch, m.heads, m.to_q.out_features // m.heads, pairs)
    assert any(not hasattr(m, "to_out") or m.to_out is None for m in modules) == (model == "flux_dev_2k")
    assert counter.flops.attention - sum(attention_linears) == pytest.approx(expected, rel=1e-12)
