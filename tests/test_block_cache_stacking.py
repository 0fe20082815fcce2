"""fastattn stacked with a block cache (diffusers' FirstBlockCache, MagCache), against an independent
float64 reference of the documented semantics: a layer whose block is skipped runs nothing; AST
returns the layer's last computed output; WA-RS adds its last refresh's residual (a planned refresh
at a skipped step leaves the older residual); a WA-RS step whose layer never refreshed runs as a
refresh; forecast extrapolates from the layer's last two computed outputs, whatever steps computed
them, and reuses the last one (as AST) where the block cache left only one."""

import pytest
import torch
from diffusers.hooks import (FirstBlockCacheConfig, HookRegistry, MagCacheConfig, apply_first_block_cache,
                             apply_mag_cache)
from diffusers.hooks.hooks import CacheContext, _set_cache_context

from fastattn import LayerPlan, Method, apply_fastattn, remove_fastattn
from fastattn.kernels import window_half_width
from experiments.models.tiny import tiny_dit_pipeline

STEPS, LAYERS, WINDOW = 6, 4, 0.25
GRID = [  # layers 0..3; MagCache below computes steps 0, 2, 4 and skips 1, 3, 5
    ["full", "full", "full", "full"],
    ["wars", "ast", "asc", "full"],       # skipped
    ["wars", "ast", "full", "wars"],      # L3: its refresh (step 1) was skipped: runs as a refresh
    ["full", "full", "wars+asc", "wars"],  # skipped: L0's planned refresh does not run
    ["wars", "ast", "wars+asc", "wars"],  # L0 keeps step 0's residual; L2 step 2's
    ["ast", "asc", "full", "ast"],        # skipped
]
NO_CFG = {"asc": "full", "wars+asc": "wars"}


def plan(cfg: bool) -> LayerPlan:
    grid = [[Method(m if cfg else NO_CFG.get(m, m)) for m in row] for row in GRID]
    return LayerPlan(grid, window_size=WINDOW)


def pipe64():
    pipe = tiny_dit_pipeline(sample_size=8, num_layers=LAYERS, num_heads=2, head_dim=8, seed=0).to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, guidance):
    # DiTTransformer2DModel has no CacheMixin and the DiT pipeline sets no cache context: set one
    # around the generation (FirstBlockCache needs it), and reset the hooks' state after it
    _set_cache_context(pipe.transformer, CacheContext("cond"))
    out = pipe(class_labels=[3, 5], num_inference_steps=STEPS, guidance_scale=guidance, output_type="pt",
               generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    _set_cache_context(pipe.transformer, None)
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).reset_stateful_hooks()
    return out


def enable_block_cache(pipe, kind: str):
    if kind == "mag_cache":  # flat ratios: skips decided by max_skip_steps alone (compute 0, 2, 4)
        apply_mag_cache(pipe.transformer, MagCacheConfig(threshold=10.0, max_skip_steps=1, retention_ratio=0.2,
                                                         num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS))
    else:
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.3))
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).invalidate_child_registries_cache()


def disable_block_cache(pipe):
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    for name in ("mag_cache_leader_block_hook", "mag_cache_block_hook", "fbc_leader_block_hook", "fbc_block_hook"):
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


GRID_FORECAST = [  # MagCache computes steps 0, 2, 4
    ["full", "full", "full", "full"],
    ["full", "full", "ast", "full"],              # skipped
    ["forecast", "full", "full", "ast"],          # L0: of the plan's steps 0 and 1 only 0 ran: AST
    ["ast", "ast", "ast", "ast"],                 # skipped
    ["full", "forecast", "forecast", "forecast"],  # L1, L2 from steps 0 and 2; L3 has only step 0: AST
    ["ast", "ast", "ast", "ast"],                 # skipped
]


class Reference:
    """The stacked semantics from their definition: dense softmax attention and an explicit band."""

    def __init__(self, plan: LayerPlan, transformer):
        self.plan, self.refresh = plan, plan.refresh_mask()
        self.step, self.outputs, self.residuals, self.calls = -1, {}, {}, []
        self.computed = {}  # layer -> [(step, output)] of its last two computed steps
        self.timesteps = {}
        self.hook = transformer.register_forward_pre_hook(self.count_step, with_kwargs=True)
        self.layers = [b.attn1 for b in transformer.transformer_blocks]
        self.originals = [a.processor for a in self.layers]
        for l, attn in enumerate(self.layers):
            attn.set_processor(lambda a, x, *args, _l=l, **kw: self.run(_l, a, x))

    def count_step(self, module, args, kwargs):
        self.step += 1
        self.timesteps[self.step] = float(kwargs["timestep"].reshape(-1)[0])

    def remove(self):
        self.hook.remove()
        for attn, proc in zip(self.layers, self.originals):
            attn.set_processor(proc)

    def run(self, l, attn, x):
        s, method = self.step, self.plan.methods[self.step][l]
        self.calls.append((s, l))
        history = self.computed.get(l, [])
        if method is Method.AST or (method is Method.FORECAST and len(history) < 2):
            return self.outputs[l]
        if method is Method.FORECAST:
            (a, out_a), (b, out_b) = history
            t = self.timesteps
            return out_b + (t[s] - t[b]) / (t[b] - t[a]) * (out_b - out_a)
        batch, tokens, _ = x.shape
        half = slice(0, batch // 2) if method.shares_cfg else slice(None)  # DiT: conditional half first
        xs = x[half]
        q, k, v = (p(xs).view(xs.shape[0], tokens, attn.heads, -1).transpose(1, 2)
                   for p in (attn.to_q, attn.to_k, attn.to_v))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        i = torch.arange(tokens)
        band = (i[:, None] - i[None, :]).abs() <= window_half_width(tokens, WINDOW)
        full = scores.softmax(-1) @ v
        window = scores.masked_fill(~band, float("-inf")).softmax(-1) @ v
        refresh = (method is Method.FULL and self.refresh[s][l]) or (method.needs_residual and l not in self.residuals)
        if refresh:
            self.residuals[l] = (full - window).repeat(batch // xs.shape[0], 1, 1, 1)
        o = full if refresh or not method.needs_residual else window + self.residuals[l][half]
        out = attn.to_out[0](o.transpose(1, 2).reshape(xs.shape[0], tokens, -1))
        out = out.repeat(2, 1, 1) if method.shares_cfg else out
        self.outputs[l] = out
        self.computed[l] = (history + [(s, out)])[-2:]
        return out


@pytest.mark.parametrize("guidance", [4.0, 1.0], ids=["batched_cfg", "no_cfg"])
@pytest.mark.parametrize("kind", ["mag_cache", "first_block_cache"])
@torch.no_grad()
def test_stacked_equals_the_reference(kind, guidance):
    p = plan(cfg=guidance > 1)
    pipe = pipe64()
    enable_block_cache(pipe, kind)
    reference = Reference(p, pipe.transformer)
    expected = images(pipe, guidance)
    reference.remove()
    computed_steps = {s for s, l in reference.calls if l == LAYERS - 1}
    assert 0 < len(computed_steps) < STEPS  # the block cache skipped some steps, not all
    if kind == "mag_cache":
        assert computed_steps == {0, 2, 4}

    handle = apply_fastattn(pipe, p)
    got = images(pipe, guidance)
    assert handle.state.blocks_may_skip
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert handle.counter.step == STEPS - 1  # every step counted, skipped blocks or not
    assert torch.equal(images(pipe, guidance), got)  # a second generation: caches reset


@pytest.mark.parametrize("guidance", [4.0, 1.0], ids=["batched_cfg", "no_cfg"])
@torch.no_grad()
def test_forecast_stacked_with_a_block_cache_equals_the_reference(guidance):
    p = LayerPlan([[Method(m) for m in row] for row in GRID_FORECAST])
    pipe = pipe64()
    enable_block_cache(pipe, "mag_cache")
    reference = Reference(p, pipe.transformer)
    expected = images(pipe, guidance)
    reference.remove()
    assert {s for s, l in reference.calls if l == 0} == {0, 2, 4}
    apply_fastattn(pipe, p)
    got = images(pipe, guidance)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert torch.equal(images(pipe, guidance), got)  # a second generation: history reset


@pytest.mark.parametrize("fastattn_first", [True, False])
@pytest.mark.parametrize("remove_fastattn_first", [True, False])
@torch.no_grad()
def test_apply_and_remove_in_either_order_leave_the_model_exact(fastattn_first, remove_fastattn_first):
    pipe = pipe64()
    raw = images(pipe, 4.0)
    steps = [lambda: apply_fastattn(pipe, plan(cfg=True)), lambda: enable_block_cache(pipe, "mag_cache")]
    for apply in steps if fastattn_first else steps[::-1]:
        apply()
    stacked = images(pipe, 4.0)
    assert not torch.equal(stacked, raw)
    removals = [lambda: remove_fastattn(pipe), lambda: disable_block_cache(pipe)]
    for remove in removals if remove_fastattn_first else removals[::-1]:
        remove()
    assert torch.equal(images(pipe, 4.0), raw)


@torch.no_grad()
def test_without_a_block_cache_plans_free_their_caches_as_before():
    pipe = pipe64()
    handle = apply_fastattn(pipe, plan(cfg=True))
    images(pipe, 4.0)
    assert not handle.state.blocks_may_skip
