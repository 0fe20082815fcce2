"""Each technique against its definition (DiTFastAttn sections 3.2-3.4), on one attention layer."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from fastattn import Method
from fastattn.family import COND_FIRST, UNCOND_FIRST, CallInfo
from fastattn.kernels import dense_attention, dense_mask, band_mask_mod, window_attention, window_half_width
from fastattn.attention_io import project_out, project_qkv
from fastattn.layerwise.processor import FastAttnProcessor, StepState

DIM, HEADS, L, FRACTION = 32, 4, 40, 0.25


def layer(cond_first=True, seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS, bias=True, out_bias=True)
    attn.set_processor(AttnProcessor2_0())
    state = StepState(1, window_size=FRACTION)
    state.on_call(CallInfo(0, 0, COND_FIRST if cond_first else UNCOND_FIRST))  # a CFG batch
    proc = FastAttnProcessor(0, state, attn.processor)
    attn.set_processor(proc)
    return attn, state, proc


def step(state, method, refresh=False, keep=False):
    state.set_step([Method(method)], [refresh], [keep])


def x(batch=2, seed=1):
    return torch.randn(batch, L, DIM, generator=torch.Generator().manual_seed(seed))


def reference_output(attn, inp, half_width=None, residual=None):
    """float64 attention from the definition, then the layer's output projection."""
    q, k, v = (t.double() for t in project_qkv(attn, inp))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if half_width is not None:
        scores = scores.masked_fill(~dense_mask(band_mask_mod(half_width), L, L), float("-inf"))
    o = scores.softmax(-1) @ v
    if residual is not None:
        o = o + residual.double()
    return project_out(attn, o.float(), inp, torch.float32)


@torch.no_grad()
def test_full_is_the_models_own_processor():
    attn, state, proc = layer()
    inp = x()
    step(state, "full")
    assert torch.equal(attn(inp), AttnProcessor2_0()(attn, inp))


@torch.no_grad()
def test_wars_refresh_returns_full_attention_then_window_plus_residual():
    attn, state, proc = layer()
    x0, x1, x2 = x(seed=1), x(seed=2), x(seed=3)
    w = window_half_width(L, FRACTION)

    step(state, "full", refresh=True)
    out0 = attn(x0)
    assert torch.equal(out0, AttnProcessor2_0()(attn, x0))  # a refresh step is full attention
    q, k, v = project_qkv(attn, x0)
    residual = dense_attention(q, k, v) - window_attention(q, k, v, w)
    assert torch.equal(proc.residual, residual)  # R = O_r - W_r, per head, before the projection

    for later in (x1, x2):  # every later WA-RS step reuses the same R
        step(state, "wars")
        out = attn(later)
        q, k, v = project_qkv(attn, later)
        assert torch.equal(out, project_out(attn, window_attention(q, k, v, w) + residual, later, torch.float32))
        torch.testing.assert_close(out, reference_output(attn, later, w, residual), atol=1e-5, rtol=1e-5)
    assert torch.equal(proc.residual, residual)


@torch.no_grad()
def test_wars_with_whole_sequence_window_is_full_attention():
    attn, state, proc = layer()
    state.window_size = 1.0  # w = L - 1: every key is in the window, the residual is zero
    step(state, "full", refresh=True)
    attn(x(seed=1))
    assert torch.count_nonzero(proc.residual) == 0
    step(state, "wars")
    x1 = x(seed=2)
    torch.testing.assert_close(attn(x1), AttnProcessor2_0()(attn, x1), atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_ast_returns_the_cached_tensor():
    attn, state, proc = layer()
    step(state, "full", keep=True)
    out0 = attn(x(seed=1))
    step(state, "ast", keep=True)  # another AST follows: the cache is kept
    assert attn(x(seed=2)) is out0
    step(state, "ast")  # the run's last AST frees the cache
    assert attn(x(seed=3)) is out0  # a run of AST steps keeps sharing the last computed output
    assert proc.output_cache is None


@torch.no_grad()
def test_caches_are_freed_after_their_last_use():
    attn, state, proc = layer()
    state.set_step([Method.FULL], [True], [False])
    attn(x(seed=1))
    assert proc.residual is not None and proc.output_cache is None
    state.set_step([Method.WARS], [False], [True], release_residual=[False])
    attn(x(seed=2))
    assert proc.residual is not None and proc.output_cache is not None
    state.set_step([Method.WARS], [False], [False], release_residual=[True])
    attn(x(seed=3))
    assert proc.residual is None and proc.output_cache is None


@torch.no_grad()
def test_ast_without_a_cache_fails_clearly():
    attn, state, _ = layer()
    step(state, "ast")
    with pytest.raises(RuntimeError, match="'ast' has no cached output"):
        attn(x())


@pytest.mark.parametrize("cond_first", [True, False])
@torch.no_grad()
def test_asc_computes_the_conditional_half_and_copies_it(cond_first):
    attn, state, _ = layer(cond_first=cond_first)
    inp = x(batch=4)
    cond, uncond = (slice(0, 2), slice(2, 4)) if cond_first else (slice(2, 4), slice(0, 2))
    step(state, "asc")
    out = attn(inp)
    torch.testing.assert_close(out[cond], AttnProcessor2_0()(attn, inp[cond]), atol=1e-6, rtol=1e-6)
    assert torch.equal(out[uncond], out[cond])


@pytest.mark.parametrize("cond_first", [True, False])
@torch.no_grad()
def test_wars_asc_combines_both(cond_first):
    attn, state, proc = layer(cond_first=cond_first)
    cond, uncond = (slice(0, 2), slice(2, 4)) if cond_first else (slice(2, 4), slice(0, 2))
    w = window_half_width(L, FRACTION)
    step(state, "full", refresh=True)
    attn(x(batch=4, seed=1))
    step(state, "wars+asc")
    x1 = x(batch=4, seed=2)
    out = attn(x1)
    q, k, v = project_qkv(attn, x1[cond])
    expected = project_out(attn, window_attention(q, k, v, w) + proc.residual[cond], x1[cond], torch.float32)
    assert torch.equal(out[cond], expected)
    assert torch.equal(out[uncond], out[cond])


@torch.no_grad()
def test_asc_needs_an_even_batch():
    attn, state, _ = layer()
    step(state, "asc")
    with pytest.raises(ValueError, match="CFG batch must be even"):
        attn(x(batch=3))


@torch.no_grad()
def test_window_attention_alone_adds_no_residual():
    attn, state, proc = layer()
    w = window_half_width(L, FRACTION)
    step(state, "wa")
    x1 = x(seed=2)
    q, k, v = project_qkv(attn, x1)
    assert torch.equal(attn(x1), project_out(attn, window_attention(q, k, v, w), x1, torch.float32))
    assert proc.residual is None


# A one-layer plan that tells the two refresh rules apart: full -> asc -> ast -> wars ->
# wars+asc -> full -> asc -> wars. Under "full" the wars steps use the residual of the last full
# step; under "full_or_asc" the asc steps refresh it from the conditional half.
RULE_PLAN = ["full", "asc", "ast", "wars", "wars+asc", "full", "asc", "wars"]


def reference_run(attn, inputs, methods, refresh_on, cond):
    """float64 outputs of ``methods`` step by step from the definitions, with the residual kept
    by ``refresh_on``: R = O - W on the whole batch at a full refresh; at an asc refresh the
    conditional half's O - W, for both halves."""
    w = window_half_width(L, FRACTION)
    mask = dense_mask(band_mask_mod(w), L, L)

    def attention(inp, windowed=False):
        q, k, v = (t.double() for t in project_qkv(attn, inp))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if windowed:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1) @ v

    def out(o, inp):
        return project_out(attn, o.float(), inp, torch.float32)

    refreshers = {"full": ("full",), "full_or_asc": ("full", "asc")}[refresh_on]
    outputs, residual, previous = [], None, None
    for s, (m, inp) in enumerate(zip(methods, inputs, strict=True)):
        needs = any(later in ("wars", "wars+asc") for later in methods[s + 1:next(
            (j for j in range(s + 1, len(methods)) if methods[j] in refreshers), len(methods))])
        if m == "ast":
            y = previous
        elif m == "full":
            o = attention(inp)
            residual = o - attention(inp, True) if needs else residual
            y = out(o, inp)
        elif m == "asc":
            o = attention(inp[cond])
            if needs and "asc" in refreshers:
                residual = (o - attention(inp[cond], True)).repeat(2, 1, 1, 1)
            y = out(o, inp[cond]).repeat(2, 1, 1)
        elif m == "wars":
            y = out(attention(inp, True) + residual, inp)
        else:  # wars+asc
            y = out(attention(inp[cond], True) + residual[cond], inp[cond]).repeat(2, 1, 1)
        outputs.append(y)
        previous = y
    return outputs


@pytest.mark.parametrize("refresh_on", ["full", "full_or_asc"])
@pytest.mark.parametrize("cond_first", [True, False])
@torch.no_grad()
def test_each_refresh_rule_matches_its_reference(refresh_on, cond_first):
    from fastattn import CompressionPlan

    attn, state, _ = layer(cond_first=cond_first)
    plan = CompressionPlan([[m] for m in RULE_PLAN], window_size=FRACTION, refresh_on=refresh_on)
    state.set_plan(plan)
    inputs = [x(batch=4, seed=10 + s) for s in range(len(RULE_PLAN))]
    cond = slice(0, 2) if cond_first else slice(2, 4)
    want = reference_run(attn, inputs, RULE_PLAN, refresh_on, cond)
    for s, inp in enumerate(inputs):
        state.on_call(CallInfo(s, 0, COND_FIRST if cond_first else UNCOND_FIRST))
        torch.testing.assert_close(attn(inp), want[s], atol=2e-5, rtol=2e-5, msg=f"step {s} ({RULE_PLAN[s]})")


def test_the_refresh_rules_differ_only_where_an_asc_step_precedes_wars():
    from fastattn import CompressionPlan

    ours = CompressionPlan([[m] for m in RULE_PLAN])
    published = CompressionPlan([[m] for m in RULE_PLAN], refresh_on="full_or_asc")
    assert [r[0] for r in ours.refresh_mask()] == [True, False, False, False, False, True, False, False]
    assert [r[0] for r in published.refresh_mask()] == [False, True, False, False, False, False, True, False]
    assert CompressionPlan.from_dict(published.to_dict()) == published and "refresh_on" not in ours.to_dict()
    # wars after an asc with no full before it: valid only under the published rule
    with pytest.raises(ValueError, match="needs an earlier 'full' step"):
        CompressionPlan([["asc"], ["wars"]])
    assert CompressionPlan([["asc"], ["wars"]], refresh_on="full_or_asc").refresh_mask() == [[True], [False]]
    with pytest.raises(ValueError, match="plan.refresh_on must be one of full, full_or_asc"):
        CompressionPlan([["full"]], refresh_on="asc")
