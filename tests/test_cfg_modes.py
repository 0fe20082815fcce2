"""Every plan family in every CFG mode a diffusers pipeline uses: the CFG branches in one batch
(DiT, PixArt, SD3), one call per branch (FLUX true CFG, Wan), and no CFG (guidance 1).

- An all-full plan is bit-identical to the unmodified pipeline in each mode.
- With one call per branch, each branch keeps its own caches: the compressed pipeline equals an
  independent reference in which each branch's calls go to a copy of the transformer of its own
  (so nothing can leak from one branch to the other).
- A plan that shares attention across the CFG halves is refused, in one line, where a call has
  no CFG batch.
"""

import copy

import pytest
import torch

from fastattn import CompressionPlan, Method, apply_fastattn, get_handle, remove_fastattn
from fastattn.family import COND_FIRST, UNCOND_FIRST
from experiments.models.tiny import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_text_inputs
from experiments.models.tiny import tiny_wan_pipeline
from experiments.models.tiny import tiny_null_embedding, tiny_prompt_embeddings

from conftest import dit_inputs, pixart_inputs

F, W, T, C = Method.FULL, Method.WARS, Method.AST, Method.ASC
STEPS = 4


# ------------------------------------------------------------------------------ pipelines
def flux(heads=2):
    pipe = tiny_flux_pipeline(sample_size=16, num_layers=1, num_single_layers=1, num_heads=heads, head_dim=16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_inputs(true_cfg: float = 1.0):
    inputs = tiny_text_inputs("flux", [0, 1], text_len=7)
    if true_cfg > 1:  # FluxPipeline then runs a conditional and an unconditional call per step
        negative = tiny_text_inputs("flux", [50, 51], text_len=7)
        inputs.update(negative_prompt_embeds=negative["prompt_embeds"],
                      negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"])
    return dict(inputs, true_cfg_scale=true_cfg, height=16, width=16, num_inference_steps=STEPS, output_type="pt",
                generator=torch.Generator().manual_seed(0))


def sd3(heads=2):
    pipe = tiny_sd3_pipeline(sample_size=16, num_layers=2, num_heads=heads, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_inputs(guidance: float):
    return dict(tiny_text_inputs("sd3", [0, 1], text_len=5, guidance_scale=guidance), guidance_scale=guidance,
                height=16, width=16, num_inference_steps=STEPS, output_type="pt",
                generator=torch.Generator().manual_seed(0))


def wan():
    pipe = tiny_wan_pipeline(num_layers=2, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_inputs(guidance: float = 5.0):
    return dict(prompt_embeds=tiny_prompt_embeddings([0], 6, 32), negative_prompt=None,
                negative_prompt_embeds=tiny_null_embedding(1, 6, 32), num_inference_steps=STEPS,
                guidance_scale=guidance, num_frames=5, height=16, width=16, output_type="latent",
                generator=torch.Generator().manual_seed(0))


def output(pipe, inputs):
    with torch.no_grad():
        out = pipe(**inputs)
    return out.frames if hasattr(out, "frames") else out.images


def per_branch_reference(pipe, inputs, plan, branches=2):
    """The pipeline with call i of every step going to copy (i mod ``branches``) of the
    transformer, each copy compressed by ``plan`` on its own: per-branch caches by construction."""
    copies = [copy.deepcopy(pipe.transformer) for _ in range(branches)]
    for c in copies:
        apply_fastattn(c, plan)  # bare transformers: each counts only its own branch's calls
    calls = iter(range(10**9))
    pipe.transformer.forward = lambda *a, **k: copies[next(calls) % branches](*a, **k)
    try:
        return output(pipe, inputs)
    finally:
        del pipe.transformer.forward


def head_grid(layers, heads, pattern):
    """A head-wise grid: step 0 full, later steps cycle through ``pattern`` per head."""
    return [[["full"] * heads for _ in range(layers)]] + [
        [[pattern[(s + l + h) % len(pattern)] for h in range(heads)] for l in range(layers)] for s in range(1, STEPS)]


# ------------------------------------------------------------------------------ all-full plans
@pytest.mark.parametrize("guidance", [4.0, 1.0], ids=["cfg_batch", "no_cfg"])
def test_layerwise_all_full_is_bit_identical_batched_and_without_cfg(pipe_and_inputs, guidance):
    pipe, inputs = pipe_and_inputs
    raw = pipe(**inputs(STEPS, guidance=guidance)).images
    handle = apply_fastattn(pipe, CompressionPlan.all_full(STEPS, 3))
    assert (pipe(**inputs(STEPS, guidance=guidance)).images == raw).all()
    assert handle.state.call.cfg == (None if guidance == 1 else COND_FIRST if "DiT" in type(pipe).__name__
                                     else UNCOND_FIRST)


def test_layerwise_all_full_is_bit_identical_with_separate_branch_calls():
    pipe = wan()
    raw = output(pipe, wan_inputs())
    handle = apply_fastattn(pipe, CompressionPlan.all_full(STEPS, 2))
    assert torch.equal(output(pipe, wan_inputs()), raw)
    assert handle.counter.calls == 2 * STEPS and handle.branch == 1


@pytest.mark.parametrize("mode", ["batched", "none", "flux_none", "flux_separate"])
def test_headwise_all_full_is_bit_identical_in_every_cfg_mode(mode):
    if mode.startswith("flux"):
        pipe, inputs = flux(), lambda: flux_inputs(4.0 if mode == "flux_separate" else 1.0)
    else:
        pipe, inputs = sd3(), lambda: sd3_inputs(4.0 if mode == "batched" else 1.0)
    raw = output(pipe, inputs())
    handle = apply_fastattn(pipe, CompressionPlan.from_heads(head_grid(2, 2, ["full"])))
    assert torch.equal(output(pipe, inputs()), raw)
    assert handle.counter.step == STEPS - 1
    assert handle.counter.calls == (2 * STEPS if mode == "flux_separate" else STEPS)


# ------------------------------------------------------------------------------ separate calls per branch
@pytest.mark.parametrize("pattern", [["cache", "full", "arrow:0.125"], ["full", "arrow+rs:0.125", "cache"]],
                         ids=["cache_arrow", "residual_sharing"])
def test_flux_true_cfg_headwise_caches_are_kept_per_branch(pattern):
    pipe = flux()
    plan = CompressionPlan.from_heads(head_grid(2, 2, pattern))
    reference = per_branch_reference(pipe, flux_inputs(4.0), plan)
    handle = apply_fastattn(pipe, plan)
    got = output(pipe, flux_inputs(4.0))
    assert handle.counter.step == STEPS - 1 and handle.counter.calls == 2 * STEPS  # not walked twice
    assert torch.equal(got, reference)
    remove_fastattn(pipe)
    assert not torch.equal(got, output(pipe, flux_inputs(4.0)))  # the plan did compress


@pytest.mark.parametrize("rows", [
    [[F, F], [T, W], [W, T], [T, F]],  # AST and WA-RS
    [[F, F], [T, T], [T, T], [F, T]],  # runs of AST across steps
], ids=["ast_wars", "ast_runs"])
def test_separate_branch_calls_layerwise_caches_are_kept_per_branch(rows):
    pipe = wan()
    plan = CompressionPlan(rows, window_size=0.3)
    reference = per_branch_reference(pipe, wan_inputs(), plan)
    apply_fastattn(pipe, plan)
    assert torch.equal(output(pipe, wan_inputs()), reference)


def test_dit_in_a_separate_call_loop_matches_the_per_branch_reference():
    # A DiT sampler that runs the conditional and unconditional passes as two calls per step.
    from experiments.models.tiny import tiny_dit_pipeline

    pipe = tiny_dit_pipeline(sample_size=8, num_layers=3, num_heads=2, head_dim=8, seed=0)
    plan = CompressionPlan([[F] * 3, [T, W, F], [W, T, W], [T, W, T]], window_size=0.25)

    @torch.no_grad()
    def denoise(model):
        pipe.scheduler.set_timesteps(STEPS)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        for t in pipe.scheduler.timesteps:
            cond = model(x, timestep=t.reshape(1), class_labels=torch.tensor([3])).sample
            uncond = model(x, timestep=t.reshape(1), class_labels=torch.tensor([1000])).sample
            x = pipe.scheduler.step((uncond + 4.0 * (cond - uncond))[:, :4], t, x).prev_sample
        return x

    copies = [copy.deepcopy(pipe.transformer) for _ in range(2)]
    for c in copies:
        apply_fastattn(c, plan)
    calls = iter(range(10**9))
    reference = denoise(lambda *a, **k: copies[next(calls) % 2](*a, **k))
    apply_fastattn(pipe, plan)
    assert torch.equal(denoise(pipe.transformer), reference)


# ------------------------------------------------------------------------------ CFG sharing needs a CFG batch
@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_asc_without_a_cfg_batch_is_refused_in_one_line(request, family):
    pipe = request.getfixturevalue(f"{family}_pipe")
    inputs = dit_inputs if family == "dit" else pixart_inputs
    apply_fastattn(pipe, CompressionPlan([[F] * 3] + [[C, F, F]] * (STEPS - 1)))
    with pytest.raises(ValueError, match=r"^plan uses 'asc' or 'wars\+asc' but this transformer call has no CFG batch"):
        pipe(**inputs(STEPS, guidance=1.0))
    pipe(**inputs(STEPS, guidance=4.0))  # the same plan on a CFG batch runs


def test_cfg_heads_without_a_cfg_batch_are_refused_in_one_line():
    pipe = sd3()
    apply_fastattn(pipe, CompressionPlan.from_heads(head_grid(2, 2, ["cfg", "full"])))
    output(pipe, sd3_inputs(4.0))
    with pytest.raises(ValueError, match=r"^plan.heads uses 'cfg' \(CFG sharing\) but this transformer call has no CFG"):
        output(pipe, sd3_inputs(1.0))
    with pytest.raises(ValueError, match="FluxTransformer2DModel pipelines run no CFG batch"):
        apply_fastattn(flux(), CompressionPlan.from_heads(head_grid(2, 2, ["cfg", "full"])))
    assert get_handle(flux()) is None


def test_the_cfg_order_comes_from_the_batch_not_the_model():
    # DiT's null class marks the unconditional half; a sampler that batches it first gets ASC
    # computed on the conditional half all the same.
    from experiments.models.tiny import tiny_dit_pipeline

    pipe = tiny_dit_pipeline(sample_size=8, num_layers=2, num_heads=2, head_dim=8, seed=0)
    plan = CompressionPlan([[F, F], [C, C]])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    labels = {COND_FIRST: torch.tensor([3, 1000]), UNCOND_FIRST: torch.tensor([1000, 3])}
    for order, lab in labels.items():
        handle = apply_fastattn(pipe.transformer, plan)
        with torch.no_grad():
            pipe.transformer(torch.cat([x, x]), timestep=t.expand(2), class_labels=lab)  # step 0: full
            out = pipe.transformer(torch.cat([x, x]), timestep=(t - 100).expand(2), class_labels=lab).sample
        assert handle.state.call.cfg == order
        remove_fastattn(pipe)
        with torch.no_grad():
            full = pipe.transformer(torch.cat([x, x]), timestep=(t - 100).expand(2), class_labels=lab).sample
        cond = 0 if order == COND_FIRST else 1
        # ASC computed the conditional sample's attention (its output is the full model's) and
        # gave it to the unconditional one
        torch.testing.assert_close(out[cond], full[cond], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[1 - cond], full[1 - cond], atol=1e-4, rtol=1e-4)
