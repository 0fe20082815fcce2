"""fastattn stacked with cache-dit's DBCache (and its TaylorSeer calibrator), against the float64
reference of test_block_cache_stacking: cache-dit computes the first Fn and last Bn blocks at every
step and skips the middle ones at the steps it caches, so the middle layers see skipped steps as
under diffusers' block caches (AST reuses the last computed output, WA-RS keeps its last refresh's
residual or refreshes where it never did, forecast extrapolates from the computed steps)."""

import pytest
import torch

from fastattn import CompressionPlan, LayerPlan, Method, apply_fastattn, remove_fastattn
from fastattn.features.block_caches import block_cache_installed, cache_dit_installed
from test_block_cache_stacking import GRID_FORECAST, LAYERS, NO_CFG, STEPS, WINDOW, Reference, pipe64

pytest.importorskip("cache_dit")
from experiments.infra import cache_hooks  # noqa: E402  (cache-dit's rows need it installed)

# F1B1 on 4 layers: layers 0 and 3 run at every step; layers 1 and 2 at 0, 2, 4 (a loose threshold
# caches every step after warmup, at most one in a row)
SETTING = {"kind": "cache_dit", "Fn": 1, "Bn": 1, "threshold": 10.0, "warmup": 1, "max_continuous_cached_steps": 1}
MIDDLE_COMPUTED = {0, 2, 4}
GRID = [
    ["full", "full", "full", "full"],
    ["wars", "full", "asc", "full"],          # L1's planned refresh and L2 skipped
    ["wars", "wars", "ast", "wars"],          # L1 never refreshed: runs as a refresh; L2 reuses step 0
    ["full", "ast", "full", "wars+asc"],      # L1, L2 skipped: L2's planned refresh does not run
    ["wars", "wars+asc", "wars+asc", "ast"],  # L1 keeps step 2's residual; L2 never refreshed: refreshes
    ["ast", "asc", "full", "ast"],            # L1, L2 skipped
]


def plan_of(grid, cfg: bool) -> LayerPlan:
    return LayerPlan([[Method(m if cfg else NO_CFG.get(m, m)) for m in row] for row in grid], window_size=WINDOW)


def install(pipe, **changes):
    spec = cache_hooks.check_spec({**SETTING, **changes}, "cache")
    return cache_hooks.install(pipe, spec, STEPS)


def images(pipe, guidance):
    return pipe(class_labels=[3, 5], num_inference_steps=STEPS, guidance_scale=guidance, output_type="pt",
                generator=[torch.Generator().manual_seed(i) for i in range(2)]).images


def reference_images(pipe, plan, guidance):
    """The stacked semantics from their definition, under the cache-dit installed on ``pipe``, and
    the steps each layer computed."""
    reference = Reference(plan, pipe.transformer)
    try:
        out = images(pipe, guidance)
    finally:
        reference.remove()
    computed = [{s for s, l in reference.calls if l == layer} for layer in range(LAYERS)]
    return out, computed


@pytest.mark.parametrize("guidance", [4.0, 1.0], ids=["batched_cfg", "no_cfg"])
@torch.no_grad()
def test_a_plan_under_cache_dit_equals_the_reference(guidance):
    pipe = pipe64()
    raw = images(pipe, guidance)
    row = install(pipe)
    plan = plan_of(GRID, cfg=guidance > 1)
    expected, computed = reference_images(pipe, plan, guidance)
    assert computed == [set(range(STEPS)), MIDDLE_COMPUTED, MIDDLE_COMPUTED, set(range(STEPS))]

    handle = apply_fastattn(pipe, plan)
    got = images(pipe, guidance)
    assert handle.state.blocks_may_skip and cache_dit_installed(pipe.transformer)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert handle.counter.step == STEPS - 1  # every step counted, skipped blocks or not
    assert torch.equal(images(pipe, guidance), got)  # a second generation: both caches start afresh

    row.remove()
    assert not block_cache_installed(pipe.transformer)
    images(pipe, guidance)
    assert not handle.state.blocks_may_skip  # told at the next generation
    remove_fastattn(pipe)
    assert torch.equal(images(pipe, guidance), raw)


@pytest.mark.parametrize("calibrator", ["none", "taylorseer"])
@torch.no_grad()
def test_an_all_full_plan_under_cache_dit_is_cache_dit_alone_bit_for_bit(calibrator):
    pipe = pipe64()
    row = install(pipe, calibrator=calibrator)
    alone = images(pipe, 4.0)
    apply_fastattn(pipe, CompressionPlan.all_full(STEPS, LAYERS))
    assert torch.equal(images(pipe, 4.0), alone)
    row.remove()
    remove_fastattn(pipe)


@pytest.mark.parametrize("calibrator", ["none", "taylorseer"])
@torch.no_grad()
def test_forecast_beside_cache_dit_and_its_calibrator_equals_the_reference(calibrator):
    pipe = pipe64()
    install(pipe, calibrator=calibrator)
    plan = plan_of(GRID_FORECAST, cfg=True)
    expected, computed = reference_images(pipe, plan, 4.0)
    assert computed[1] == MIDDLE_COMPUTED
    apply_fastattn(pipe, plan)
    got = images(pipe, 4.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert torch.equal(images(pipe, 4.0), got)


@pytest.mark.parametrize("remove_fastattn_first", [True, False])
@torch.no_grad()
def test_cache_dit_on_top_of_fastattn_and_removal_in_either_order_leave_the_model_exact(remove_fastattn_first):
    pipe = pipe64()
    raw = images(pipe, 4.0)
    apply_fastattn(pipe, plan_of(GRID, cfg=True))
    row = install(pipe)
    assert block_cache_installed(pipe.transformer)
    assert not torch.equal(images(pipe, 4.0), raw)
    removals = [lambda: remove_fastattn(pipe), row.remove]
    for remove in removals if remove_fastattn_first else removals[::-1]:
        remove()
    assert not block_cache_installed(pipe.transformer)
    # fastattn removed under cache-dit's wrapper leaves its forward there, passing calls on (as under
    # diffusers' offloading); removed in reverse order, the class's forward is back
    assert ("forward" in pipe.transformer.__dict__) == remove_fastattn_first
    assert torch.equal(images(pipe, 4.0), raw)
