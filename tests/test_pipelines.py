"""apply / remove on unmodified DiTPipeline and PixArtSigmaPipeline; step tracking."""

import numpy as np
import pytest
import torch

from conftest import LAYERS, dit_inputs
from fastattn import CompressionPlan, apply_fastattn, get_handle, remove_fastattn

F, W, T, C, WC = "full", "wars", "ast", "asc", "wars+asc"
STEPS = 6


def compressing_plan(pipe, window_size=0.125):
    rows = [[F] * LAYERS, [W, T, C], [WC, T, F], [W, W, T], [T, WC, C], [F, T, W]]
    return CompressionPlan(rows, window_size=window_size)


def snapshot(pipe):
    t = pipe.transformer
    return {
        "processors": [id(b.attn1.processor) for b in t.transformer_blocks],
        "pre_hooks": dict(t._forward_pre_hooks), "hooks": dict(t._forward_hooks),
        "transformer_attrs": set(t.__dict__), "scheduler_attrs": set(pipe.scheduler.__dict__),
        "block_attrs": [set(b.__dict__) for b in t.transformer_blocks],
        "state": {k: v.clone() for k, v in t.state_dict().items()},
    }


def assert_same_snapshot(a, b):
    for key in ("processors", "pre_hooks", "hooks", "transformer_attrs", "scheduler_attrs", "block_attrs"):
        assert a[key] == b[key], key
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])


def test_all_full_plan_is_bit_identical(pipe_and_inputs):
    pipe, inputs = pipe_and_inputs
    raw = pipe(**inputs(STEPS)).images
    apply_fastattn(pipe, CompressionPlan.all_full(STEPS, LAYERS))
    assert np.array_equal(pipe(**inputs(STEPS)).images, raw)
    remove_fastattn(pipe)
    assert np.array_equal(pipe(**inputs(STEPS)).images, raw)


def test_remove_restores_the_model_exactly(pipe_and_inputs):
    pipe, inputs = pipe_and_inputs
    before = snapshot(pipe)
    raw = pipe(**inputs(STEPS)).images
    apply_fastattn(pipe, compressing_plan(pipe))
    compressed = pipe(**inputs(STEPS)).images
    assert not np.array_equal(compressed, raw)  # the plan did something
    remove_fastattn(pipe)
    assert get_handle(pipe) is None
    assert_same_snapshot(before, snapshot(pipe))
    assert np.array_equal(pipe(**inputs(STEPS)).images, raw)
    remove_fastattn(pipe)  # a second remove is a no-op


def test_wars_with_whole_sequence_window_equals_full(pipe_and_inputs):
    pipe, inputs = pipe_and_inputs
    raw = pipe(**inputs(STEPS)).images
    rows = [[F] * LAYERS] + [[W] * LAYERS] * (STEPS - 1)
    apply_fastattn(pipe, CompressionPlan(rows, window_size=1.0))
    np.testing.assert_allclose(pipe(**inputs(STEPS)).images, raw, atol=1e-5)


def test_each_generation_starts_from_step_zero(pipe_and_inputs):
    pipe, inputs = pipe_and_inputs
    handle = apply_fastattn(pipe, compressing_plan(pipe))
    first = pipe(**inputs(STEPS)).images
    assert handle.counter.calls == STEPS and handle.state.step == STEPS - 1
    assert np.array_equal(pipe(**inputs(STEPS)).images, first)


def test_bare_transformer_wraps_after_the_last_step(dit_pipe):
    apply_fastattn(dit_pipe, compressing_plan(dit_pipe))
    expected = dit_pipe(**dit_inputs(STEPS)).images
    remove_fastattn(dit_pipe)
    handle = apply_fastattn(dit_pipe.transformer, compressing_plan(dit_pipe))  # no scheduler hook
    assert handle.scheduler is None
    for _ in range(2):
        assert np.array_equal(dit_pipe(**dit_inputs(STEPS)).images, expected)


def test_step_count_mismatch_fails_before_denoising(dit_pipe):
    handle = apply_fastattn(dit_pipe, compressing_plan(dit_pipe))
    with pytest.raises(ValueError, match="plan has 6 steps .* the scheduler runs 8"):
        dit_pipe(**dit_inputs(8))
    assert handle.counter.calls == 0


def test_apply_checks_the_plan_against_the_model(dit_pipe):
    before = snapshot(dit_pipe)
    with pytest.raises(ValueError, match=f"plan has 5 layers .* has {LAYERS} self-attention layers"):
        apply_fastattn(dit_pipe, CompressionPlan.all_full(STEPS, 5))
    with pytest.raises(ValueError, match="plan.model.num_heads is 16 but the model has 2"):
        apply_fastattn(dit_pipe, CompressionPlan.all_full(STEPS, LAYERS, model={"num_heads": 16}))
    with pytest.raises(TypeError, match="CompressionPlan"):
        apply_fastattn(dit_pipe, [[F] * LAYERS])
    assert_same_snapshot(before, snapshot(dit_pipe))  # nothing was installed


def test_unsupported_model_is_named():
    with pytest.raises(ValueError, match="no adapter for Linear"):
        apply_fastattn(torch.nn.Linear(2, 2), CompressionPlan.all_full(1, 1))


def test_applying_twice_replaces_the_first(dit_pipe):
    raw = dit_pipe(**dit_inputs(STEPS)).images
    apply_fastattn(dit_pipe, compressing_plan(dit_pipe))
    apply_fastattn(dit_pipe, CompressionPlan.all_full(STEPS, LAYERS))
    assert np.array_equal(dit_pipe(**dit_inputs(STEPS)).images, raw)
    assert len(dit_pipe.transformer._forward_pre_hooks) == 1
