"""Step counting cannot be bypassed: a wrapper that calls the model twice per step still counts
each denoising step once, and its conditional and unconditional passes keep separate caches."""

import torch

from fastattn import CompressionPlan, Method, apply_fastattn, get_handle
from fastattn.features.steps import count_steps
from experiments.models.tiny import tiny_dit_pipeline

STEPS, LAYERS = 5, 3
F, T, W = Method.FULL, Method.AST, Method.WARS
NULL_CLASS = 1000


def pipe():
    p = tiny_dit_pipeline(sample_size=8, num_layers=LAYERS, num_heads=2, head_dim=8, seed=0)
    p.scheduler.set_timesteps(STEPS)
    return p


def plan():
    rows = [[F] * LAYERS] + [[T, W, F], [W, T, W], [T, W, T], [W, T, F]]
    return CompressionPlan(rows, window_size=0.25)


def forward_with_cfg(model, x, t, label, scale=4.0):
    """The Open-Sora / DiT-repo pattern, but as two separate calls: conditional, then unconditional."""
    cond = model(x, timestep=t, class_labels=label).sample
    uncond = model(x, t, torch.full_like(label, NULL_CLASS)).sample  # positional timestep too
    return uncond + scale * (cond - uncond)


def forward_batched(model, x, t, label, scale=4.0):
    """The same guidance from one call on a CFG batch."""
    both = model(torch.cat([x, x]), timestep=t.expand(2), class_labels=torch.cat([label, torch.full_like(label, NULL_CLASS)])).sample
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def denoise(p, guided):
    p.scheduler.set_timesteps(STEPS)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    label = torch.tensor([3])
    for t in p.scheduler.timesteps:
        eps = guided(p.transformer, x, t.reshape(1), label)[:, :4]
        x = p.scheduler.step(eps, t, x).prev_sample
    return x


def test_wrapper_calling_twice_per_step_counts_each_step_once():
    p = pipe()
    handle = apply_fastattn(p, plan())
    denoise(p, forward_with_cfg)
    assert handle.state.step == STEPS - 1 and handle.counter.calls == 2 * STEPS
    assert handle.branch == 1  # the last call was the unconditional pass of the last step


def test_wrapper_passes_keep_their_own_caches():
    # The conditional and unconditional passes of a separate-call wrapper must each reuse their
    # own AST outputs and WA-RS residuals: the result equals the CFG-batch run of the same plan.
    p = pipe()
    apply_fastattn(p, plan())
    batched = denoise(p, forward_batched)
    separate = denoise(p, forward_with_cfg)
    torch.testing.assert_close(separate, batched, atol=1e-3, rtol=1e-3)  # batch-size rounding only


def test_compressed_wrapper_run_differs_from_raw_and_repeats():
    p = pipe()
    raw = denoise(p, forward_with_cfg)
    apply_fastattn(p, plan())
    first = denoise(p, forward_with_cfg)
    assert not torch.allclose(first, raw)
    assert torch.equal(denoise(p, forward_with_cfg), first)  # set_timesteps restarts at step 0


def test_bare_transformer_with_wrapper_wraps_after_the_last_step():
    p = pipe()
    apply_fastattn(p, plan())
    expected = denoise(p, forward_with_cfg)
    handle = apply_fastattn(p.transformer, plan())  # no scheduler hook: wraps by the plan's length
    assert handle.scheduler is None
    for _ in range(2):
        assert torch.equal(denoise(p, forward_with_cfg), expected)
        assert get_handle(p).state.step == STEPS - 1


@torch.no_grad()
def test_bare_transformer_restarts_when_the_timestep_falls_back_to_step_0s():
    # A generation interrupted after two steps, then run anew without a scheduler to say so:
    # the first timestep seen again opens a new generation, so the plan's steps are not shifted.
    p = pipe()
    apply_fastattn(p, plan())
    expected = denoise(p, forward_with_cfg)
    handle = apply_fastattn(p.transformer, plan())
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in p.scheduler.timesteps[:2]:
        forward_with_cfg(p.transformer, x, t.reshape(1), torch.tensor([3]))
    assert handle.state.step == 1
    assert torch.equal(denoise(p, forward_with_cfg), expected)
    assert handle.state.step == STEPS - 1 and handle.counter.calls == 2 * STEPS


def test_schedule_step_count_merges_repeated_timesteps():
    assert count_steps(torch.tensor([999, 800, 800, 600, 600])) == 3
    assert count_steps([5, 4, 3]) == 3


def test_wrapper_calling_forward_directly_is_counted():
    # Open-Sora's IDDPM calls model.forward(...) inside forward_with_cfg: no __call__, no hooks.
    def direct(model, x, t, label, scale=4.0):
        both = model.forward(torch.cat([x, x]), t.expand(2), torch.cat([label, torch.full_like(label, NULL_CLASS)]))
        cond, uncond = both.sample.chunk(2)
        return uncond + scale * (cond - uncond)

    p = pipe()
    handle = apply_fastattn(p, plan())
    batched = denoise(p, forward_batched)
    assert torch.equal(denoise(p, direct), batched)
    assert handle.state.step == STEPS - 1 and handle.counter.calls == STEPS


def test_remove_restores_the_forward_attribute():
    p = pipe()
    before = set(p.transformer.__dict__)
    apply_fastattn(p, plan())
    assert "forward" in p.transformer.__dict__
    from fastattn import remove_fastattn

    remove_fastattn(p)
    assert set(p.transformer.__dict__) == before
