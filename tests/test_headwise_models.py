"""Head-wise plans on tiny SD3 and FLUX pipelines: exactness, caching, the search, bad input."""

import dataclasses

import pytest
import torch

from fastattn import CompressionPlan, apply_fastattn, remove_fastattn
from fastattn import HeadPlan, search_headwise_plan
from experiments.models.tiny import TINY_MMDIT_BUILDERS, tiny_text_inputs
from experiments.models.tiny import tiny_dit_pipeline

STEPS, SIDE = 3, 16
# (family, heads, text length): any head count and text length
CASES = [("sd3", 3, 5), ("flux", 2, 7)]


def build(family, heads):
    kwargs = dict(num_heads=heads, head_dim=8 if family == "sd3" else 16, num_layers=2)
    if family == "flux":
        kwargs.update(num_layers=1, num_single_layers=1)
    pipe = TINY_MMDIT_BUILDERS[family](sample_size=SIDE, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(family, text_len, seed=0):
    return dict(tiny_text_inputs(family, [seed, seed + 1], text_len=text_len, guidance_scale=4.0),
                height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=4.0, output_type="pt",
                generator=torch.Generator().manual_seed(seed))


def grid(heads, layers, fill="full", first="full"):
    return [[[first if s == 0 else fill] * heads for _ in range(layers)] for s in range(STEPS)]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    family, heads, text_len = request.param
    return family, build(family, heads), heads, text_len


def model_info(pipe, text_len):
    from fastattn.models import get_adapter

    info = get_adapter(pipe.transformer).describe(pipe.transformer)
    return dict(info, seq_len=(SIDE // 2) ** 2 + text_len, text_len=text_len)


def test_all_full_plan_is_bit_identical_and_removal_restores(case):
    family, pipe, heads, text_len = case
    originals = [b.attn.processor for b in pipe.transformer.transformer_blocks]
    raw = pipe(**inputs(family, text_len)).images
    plan = CompressionPlan.from_heads(grid(heads, 2), model=model_info(pipe, text_len))
    apply_fastattn(pipe, plan)
    assert torch.equal(pipe(**inputs(family, text_len)).images, raw)
    remove_fastattn(pipe)
    assert [b.attn.processor for b in pipe.transformer.transformer_blocks] == originals
    assert torch.equal(pipe(**inputs(family, text_len)).images, raw)


def test_replicated_projections_match_the_model_exactly(case):
    """Step 0 all full but keeping outputs (a head is cached at step 1) runs fastattn's own
    projections and kernel instead of the model's processor: still bit-identical at step 0."""
    family, pipe, heads, text_len = case
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, out: calls.append(out[0].clone()))
    pipe(**inputs(family, text_len))
    raw_first = calls[0]
    calls.clear()
    apply_fastattn(pipe, CompressionPlan.from_heads(grid(heads, 2, fill="cache")))
    pipe(**inputs(family, text_len))
    remove_fastattn(pipe)
    hook.remove()
    assert torch.equal(calls[0], raw_first)


def test_cached_heads_return_the_previous_steps_output(case):
    family, pipe, heads, text_len = case
    g = grid(heads, 2)
    for s in (1, 2):
        g[s][1][0] = "cache"  # head 0 of layer 1 cached at steps 1 and 2
    handle = apply_fastattn(pipe, CompressionPlan.from_heads(g))
    proc = handle.processors[1]
    seen = []
    original = proc.io.out

    def spy(attn, o, *rest):
        seen.append(o.clone())
        return original(attn, o, *rest)

    proc.io = dataclasses.replace(proc.io, out=spy)
    pipe(**inputs(family, text_len))
    remove_fastattn(pipe)
    assert len(seen) == STEPS
    assert torch.equal(seen[1][:, 0], seen[0][:, 0]) and torch.equal(seen[2][:, 0], seen[0][:, 0])
    assert not torch.equal(seen[1][:, 1], seen[0][:, 1])  # the computing head moved on


def test_search_respects_the_budget_and_its_plan_reproduces_the_calibration(case):
    family, pipe, heads, text_len = case
    delta, c = 0.6, 1.5
    outputs = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, o: outputs.append(o[0].clone()))
    plan = search_headwise_plan(pipe, inputs(family, text_len, seed=3), threshold=delta, head_coefficient=c,
                                windows=(0.125, 0.0625), progress=False)
    searched = outputs[:]
    outputs.clear()
    assert isinstance(plan, HeadPlan) and plan.num_steps == STEPS and len(plan.heads[0][0]) == heads
    assert plan.model["text_len"] == text_len and plan.model["seq_len"] == (SIDE // 2) ** 2 + text_len
    assert all(e <= delta + 1e-6 for row in plan.search["layer_rse"] for e in row)
    assert {m.kind for row in plan.heads for layer in row for m in layer} - {"full"}, "nothing compressed"
    assert 0 < plan.attention_flops()["sparsity"] < 1
    # The search decided on the compressed trajectory: its plan applied to the same inputs reproduces it.
    apply_fastattn(pipe, plan)
    pipe(**inputs(family, text_len, seed=3))
    remove_fastattn(pipe)
    hook.remove()
    assert len(searched) == len(outputs) == STEPS
    for a, b in zip(searched, outputs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cfg_sharing_only_where_the_pipeline_runs_a_cfg_batch(case):
    family, pipe, heads, text_len = case
    outputs = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, o: outputs.append(o[0].clone()))
    plan = search_headwise_plan(pipe, inputs(family, text_len, seed=4), threshold=100.0, windows=(),
                                use_cache=False, progress=False)
    kinds = {m.kind for row in plan.heads for layer in row for m in layer}
    assert kinds == ({"cfg"} if family == "sd3" else {"full"})
    searched = outputs[:]
    outputs.clear()
    apply_fastattn(pipe, plan)
    pipe(**inputs(family, text_len, seed=4))
    remove_fastattn(pipe)
    hook.remove()
    for a, b in zip(searched, outputs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if family == "flux":  # FLUX.1-dev has no CFG batch: a plan with cfg heads is refused
        with pytest.raises(ValueError, match="plan.heads uses 'cfg'"):
            apply_fastattn(pipe, CompressionPlan.from_heads(grid(heads, 2, fill="cfg")))


def test_zero_budget_searches_an_all_full_plan(case):
    family, pipe, heads, text_len = case
    plan = search_headwise_plan(pipe, inputs(family, text_len), threshold=0.0, progress=False)
    assert {str(m) for row in plan.heads for layer in row for m in layer} == {"full"}


def test_bad_input_is_a_one_line_error(case):
    family, pipe, heads, text_len = case
    wrong_heads = CompressionPlan.from_heads([[["full"] * (heads + 1)] * 2] * STEPS)
    with pytest.raises(ValueError, match=f"plan.heads has {heads + 1} heads per layer"):
        apply_fastattn(pipe, wrong_heads)
    with pytest.raises(ValueError, match="plan has 3 layers"):
        apply_fastattn(pipe, CompressionPlan.from_heads([[["full"] * heads] * 3] * STEPS))
    with pytest.raises(ValueError, match="window fraction"):
        search_headwise_plan(pipe, inputs(family, text_len), windows=(0.0625, 4.0), progress=False)
    with pytest.raises(ValueError, match="threshold"):
        search_headwise_plan(pipe, inputs(family, text_len), threshold=-1, progress=False)
    assert not hasattr(pipe.transformer, "_fastattn_handle")


def test_headwise_plan_needs_a_joint_attention_model():
    pipe = tiny_dit_pipeline(sample_size=8, num_layers=2, num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="joint-attention model"):
        apply_fastattn(pipe, CompressionPlan.from_heads([[["full"] * 2] * 2]))


def test_residual_sharing_is_searched_and_its_plan_reproduces_the_calibration(case):
    family, pipe, heads, text_len = case
    outputs = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, o: outputs.append(o[0].clone()))
    # arrow alone is too coarse for this budget at every window; with the residual it fits
    plan = search_headwise_plan(pipe, inputs(family, text_len, seed=5), threshold=0.3, windows=(0.0625,),
                                use_cache=False, share_cfg=False, progress=False)
    searched = outputs[:]
    outputs.clear()
    kinds = {m.kind for row in plan.heads for layer in row for m in layer}
    assert "arrow+rs" in kinds and plan.search["residual_sharing"] is True
    assert any(r is not None for row in plan.refresh_rows() for r in row)
    apply_fastattn(pipe, plan)
    pipe(**inputs(family, text_len, seed=5))
    remove_fastattn(pipe)
    hook.remove()
    for a, b in zip(searched, outputs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    off = search_headwise_plan(pipe, inputs(family, text_len, seed=5), threshold=0.3, windows=(0.0625,),
                               use_cache=False, share_cfg=False, residual_sharing=False, progress=False)
    assert "arrow+rs" not in {m.kind for row in off.heads for layer in row for m in layer}
