"""cache-dit's DBCache / DBPrune rows and diffusers' SeaCache / TextKVCache rows in the comparison:
driven on DiT and PixArt, compute counted from the blocks that ran (checked against cache-dit's own
account), removed after the row; the command's verdict on each seed and held out."""

import json

import pytest
import torch

from experiments.compare_caches import comparison_rows, run_compare
from experiments.infra import cache_dit_rows, cache_hooks
from fastattn.models.adapters.base import call_argument
from test_compare_caches import STEPS, compose_compare, counted

# each a setting that skips work within 6 steps on 3 layers (warmup 1: cache-dit's 8 would cover them)
SKIPPING = {
    "F1B0": {"threshold": 10.0, "warmup": 1},
    "F2B0": {"Fn": 2, "threshold": 10.0, "warmup": 1},
    "F1B1": {"Bn": 1, "threshold": 10.0, "warmup": 1},
    "F1B0+TaylorSeer": {"threshold": 10.0, "warmup": 1, "calibrator": "taylorseer"},
    "F1B0+FoCa": {"threshold": 10.0, "warmup": 1, "calibrator": "foca"},
    "F1B0+SCM": {"threshold": 10.0, "warmup": 1, "scm": [[3, 1], [2]], "scm_policy": "static"},
}


def spec_of(settings: dict) -> dict:
    return cache_hooks.check_spec({"kind": "cache_dit", **settings}, "caches[0]")


def assert_removed(pipe, raw_images, make_inputs, submodules):
    t = pipe.transformer
    assert "forward" not in t.__dict__  # the class's forward again
    assert list(t._modules) == submodules  # in their order (cache-dit moves the block list last)
    assert not hasattr(t, "_is_cached") and not hasattr(t, "_is_patched") and not hasattr(t, "_context_manager")
    assert "_norm1_emb" not in dict(t.named_modules())
    assert not hasattr(type(pipe), "_original_call")  # the pipeline class's __call__ is its own again
    _, after = counted(pipe, make_inputs(steps=STEPS))
    assert torch.equal(torch.as_tensor(after), torch.as_tensor(raw_images))


@pytest.mark.parametrize("name", list(SKIPPING))
def test_cache_dit_skips_blocks_counted_as_cache_dit_reports_them(name, pipe_and_inputs):
    pipe, make_inputs = pipe_and_inputs
    submodules = list(pipe.transformer._modules)
    raw_flops, raw = counted(pipe, make_inputs(steps=STEPS))
    spec = spec_of(SKIPPING[name])
    row = cache_hooks.install(pipe, spec, STEPS)
    try:
        flops, images = counted(pipe, make_inputs(steps=STEPS), row)
        layers = len(pipe.transformer.transformer_blocks)
        skipped_blocks = len(row.cached_steps()) * (layers - spec["Fn"] - spec["Bn"])
        again, _ = counted(pipe, make_inputs(steps=STEPS), row)  # a fresh context: the same again
    finally:
        row.remove()
    assert 0 < skipped_blocks and flops.total < raw_flops.total
    # every block costs the same: the blocks counted are those cache-dit says it ran
    assert flops.total / raw_flops.total == pytest.approx(1 - skipped_blocks / (STEPS * layers), rel=1e-9)
    assert again.total == flops.total
    assert not torch.equal(torch.as_tensor(images), torch.as_tensor(raw))
    assert_removed(pipe, raw, make_inputs, submodules)


def test_dbprune_is_refused_in_one_line_while_cache_dit_cannot_run_it_on_these_blocks():
    assert not cache_dit_rows.prune_runs_on_pattern_3()  # cache-dit 1.5.3; a fixed release lets the row run
    with pytest.raises(ValueError, match=r"caches\[0\]: cache-dit's DBPrune fails on blocks that return the image "
                                         r"tokens only \(ForwardPattern.Pattern_3") as error:
        spec_of({"cache": "dbprune"})
    assert "\n" not in str(error.value)


def test_a_cache_dit_setting_that_cannot_skip_runs_everything_exactly(pipe_and_inputs):
    pipe, make_inputs = pipe_and_inputs
    submodules = list(pipe.transformer._modules)
    raw_flops, raw = counted(pipe, make_inputs(steps=STEPS))
    row = cache_hooks.install(pipe, spec_of({"threshold": 0.0, "warmup": 1}), STEPS)  # no diff is below 0
    try:
        flops, images = counted(pipe, make_inputs(steps=STEPS), row)
    finally:
        row.remove()
    assert flops.total == raw_flops.total
    assert torch.equal(torch.as_tensor(images), torch.as_tensor(raw))
    assert_removed(pipe, raw, make_inputs, submodules)


def test_sea_cache_skips_with_a_loose_threshold_and_is_exact_with_none(pipe_and_inputs):
    pipe, make_inputs = pipe_and_inputs
    raw_flops, raw = counted(pipe, make_inputs(steps=STEPS))
    results = {}
    for threshold in (10.0, 0.0):
        spec = cache_hooks.check_spec({"kind": "sea_cache", "threshold": threshold}, "caches[0]")
        hooks = cache_hooks.install(pipe, spec, STEPS)
        try:
            results[threshold] = counted(pipe, make_inputs(steps=STEPS), hooks)
        finally:
            hooks.remove()
    assert results[10.0][0].total < raw_flops.total
    assert results[0.0][0].total == raw_flops.total
    assert torch.equal(torch.as_tensor(results[0.0][1]), torch.as_tensor(raw))
    assert "forward" not in pipe.transformer.__dict__
    _, after = counted(pipe, make_inputs(steps=STEPS))
    assert torch.equal(torch.as_tensor(after), torch.as_tensor(raw))


def test_sea_cache_reads_one_half_of_a_cfg_batch_and_decides_as_with_both(pipe_and_inputs, monkeypatch):
    """The CFG halves' latents are equal: SeaCache's gate gets the first half's frames and skips the
    same steps, with the same samples, as with every frame of the batch."""
    pipe, make_inputs = pipe_and_inputs
    # 12 steps, a threshold its distances cross at some steps and not others (0.5-0.9 of raw's compute)
    spec = cache_hooks.check_spec({"kind": "sea_cache", "threshold": 0.4, "max_consecutive_cached": 3}, "caches[0]")
    steps = 12
    frames = []
    every_frame = cache_hooks._sample_frames

    def run(callback):
        def recorded(module, args, kwargs):
            out = callback(module, args, kwargs)
            frames.append(len(out))
            return out

        monkeypatch.setattr(cache_hooks, "_sample_frames", recorded)
        hooks = cache_hooks.install(pipe, spec, steps)
        try:
            return counted(pipe, make_inputs(steps=steps, n=2), hooks)
        finally:
            hooks.remove()

    halved = run(every_frame)
    assert set(frames) == {2}  # 2 samples, a CFG batch of 4
    frames.clear()

    def both_halves(module, args, kwargs):
        hidden = call_argument(module, args, kwargs, "hidden_states")
        return [sample.unsqueeze(1) for sample in hidden]

    whole = run(both_halves)
    assert set(frames) == {4}
    raw_flops, _ = counted(pipe, make_inputs(steps=steps, n=2))
    assert 0.5 * raw_flops.total < halved[0].total == whole[0].total < raw_flops.total
    assert torch.equal(torch.as_tensor(halved[1]), torch.as_tensor(whole[1]))


def test_flow_sigma_of_a_vp_step_has_its_signal_to_noise_ratio(dit_pipe):
    scheduler = dit_pipe.scheduler
    alpha_bar = float(scheduler.alphas_cumprod[500])
    sigma = cache_hooks.flow_sigma(scheduler, 500.0)
    assert ((1 - sigma) / sigma) ** 2 == pytest.approx(alpha_bar / (1 - alpha_bar), rel=1e-6)
    assert 0 < cache_hooks.flow_sigma(scheduler, 0.0) < sigma < cache_hooks.flow_sigma(scheduler, 999.0) < 1


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_text_kv_cache_is_refused_in_one_line_naming_why(family):
    with pytest.raises(ValueError, match="TextKVCache caches the text keys and values of NucleusMoE-Image "
                                         "blocks only") as error:
        cache_hooks.check_family(family, 4.0, [cache_hooks.check_spec({"kind": "text_kv_cache"}, "caches[0]")])
    assert "\n" not in str(error.value) and family in str(error.value)


def test_a_missing_cache_dit_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_dit_rows, "installed", lambda: False)
    line = r"caches\[0\]: cache_dit rows need cache-dit: pip install 'fastattn\[peers\]'"
    with pytest.raises(ValueError, match=line) as e:
        comparison_rows(compose_compare(["caches=[{kind:cache_dit}]", "stacked=[]"], tmp_path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("settings, message", [
    ({"Fm": 1}, "cache_dit has no setting 'Fm'"),
    ({"calibrator": "taylor"}, r"calibrator must be one of none, taylorseer, foca"),
    ({"scm": "quick"}, r"scm must be one of slow, medium, fast, ultra or \[compute_bins, cache_bins\]"),
    ({"non_prune_blocks": [0]}, "are DBPrune's settings"),
    ({"scm": [[2], []]}, r"scm must be one of"),
    ({"Fn": -1}, r"Fn must be an integer >= 0"),
])
def test_bad_cache_dit_settings_are_one_line_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        spec_of(settings)


def test_each_setting_is_named_in_its_label_and_key():
    spec = spec_of({"Fn": 2, "Bn": 1, "threshold": 0.12, "calibrator": "taylorseer", "scm": "medium",
                    "max_continuous_cached_steps": 3})
    assert cache_hooks.spec_label(spec) == "cache-dit DBCache F2B1 + TaylorSeer + SCM"
    assert cache_hooks.spec_setting(spec) == "R=0.12, W=8, SCM=medium, MC=3"
    assert (cache_hooks.spec_key(spec)
            == "cache_dit_dbcache_F2B1_R0.12_W8_taylorseer_scmmedium_max_continuous_cached_steps3")
    plain = spec_of({})
    assert cache_hooks.spec_label(plain) == "cache-dit DBCache F1B0"
    assert cache_hooks.spec_setting(plain) == "R=0.08, W=8"


def test_the_command_runs_each_seed_and_judges_the_picks_held_out(tmp_path, monkeypatch):
    overrides = ["seeds=[0,1]", "stacked=[]", "fastattn=[d4]",
                 "caches=[{kind:cache_dit,threshold:10.0,warmup:1},{kind:sea_cache,threshold:10.0}]"]
    out = run_compare(compose_compare(overrides, tmp_path))
    assert out["seeds"] == [0, 1]
    for seed in (0, 1):
        rows = {r["key"]: r for r in out["records"][seed]["rows"]}
        assert rows["raw"]["compute"] == 1
        assert rows["cache_dit_dbcache_F1B0_R10.0_W1"]["compute"] < 1
        assert rows["sea_cache_threshold10.0"]["compute"] < 1
        table = (tmp_path / f"seed{seed}" / "compare.md").read_text()
        assert "| cache-dit DBCache F1B0 | R=10.0, W=1 |" in table and "| SeaCache | t=10.0 |" in table
    # other seeds, other samples
    assert out["records"][0]["rows"][1]["psnr_db"] != out["records"][1]["rows"][1]["psnr_db"]
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert [v["seed"] for v in summary["per_seed"]] == [0, 1]
    assert [(p["chosen_on"], p["judged_on"]) for p in summary["held_out"]] == [(0, 1), (1, 0)]
    assert "| seed 0 | seed 1 |" in (tmp_path / "seeds.md").read_text()

    import experiments.compare_caches as job

    monkeypatch.setattr(job, "generate_row", lambda *a, **k: pytest.fail("a finished row was generated again"))
    again = run_compare(compose_compare(overrides, tmp_path))
    assert again["records"][1]["rows"] == out["records"][1]["rows"]


def _record(psnr: dict) -> dict:
    rows = [{"key": "raw", "method": "raw", "setting": "", "compute": 1.0, "psnr_db": None}]
    rows += [{"key": k, "method": k, "setting": "", "compute": c, "psnr_db": p} for k, (c, p) in psnr.items()]
    return {"rows": rows}


def test_held_out_judges_one_seeds_picks_on_the_other():
    from analysis.compare_seeds import held_out

    # seed 0 picks fastattn_a (0.5) and hook_b (0.5); on seed 1 fastattn_a falls below hook_b
    seed0 = _record({"fastattn_a": (0.5, 30.0), "fastattn_c": (0.5, 29.0), "hook_b": (0.5, 28.0)})
    seed1 = _record({"fastattn_a": (0.5, 27.0), "fastattn_c": (0.5, 31.0), "hook_b": (0.5, 28.0)})
    summary = held_out({0: seed0, 1: seed1})
    own = {v["seed"]: v["matches"] for v in summary["per_seed"]}
    assert own[0] == own[1] == pytest.approx(31 / 51)  # from 0.50 on, each seed's own best leads
    pairs = {(p["chosen_on"], p["judged_on"]): p for p in summary["held_out"]}
    assert pairs[(0, 1)]["matches"] == 0.0  # fastattn_a, picked on seed 0, trails hook_b on seed 1
    assert pairs[(1, 0)]["matches"] == pytest.approx(31 / 51)  # fastattn_c: 29 dB on seed 0, above 28
    assert pairs[(0, 1)]["points"][-1]["fastattn"] == "fastattn_a"
