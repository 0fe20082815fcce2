"""Video DiTs: Latte (spatial + temporal attention) and Wan (full 3-D attention with RoPE).

Every technique is checked layer by layer against its definition in the layer's geometry: each
attention layer's input is recorded during a compressed generation and its output recomputed
from scratch (float64 masked softmax for Latte; diffusers' own WanAttnProcessor with a boolean
mask for Wan, so the RoPE path is checked against diffusers too).
"""

import math

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from fastattn import CompressionPlan, Method, apply_fastattn, get_handle, remove_fastattn, search_plan
from fastattn.kernels import dense_mask
from fastattn.kernels.masks import window_half_width
from fastattn.kernels.video_masks import (
    sparse_tile_window_attention, tile_neighbourhood_mask_mod, tile_pairs, tile_shape, tile_window_attention,
)
from experiments.models.tiny import tiny_null_embedding, tiny_prompt_embeddings
from experiments.models.tiny import tiny_latte_pipeline, tiny_wan_pipeline
from fastattn.models import layer_kinds, layers_of_kind
from fastattn.attention_io import project_out, project_qkv

F, W, T, C, WC = Method.FULL, Method.WARS, Method.AST, Method.ASC, Method.WARS_ASC
FRAMES, SIDE, TEXT, CAPTION = 4, 8, 6, 32  # Latte: 4 frames of 4x4 tokens
WAN_FRAMES, WAN_SIDE = 5, 16  # Wan: 3 latent frames of 4x4 tokens


def latte():
    p = tiny_latte_pipeline(sample_size=SIDE, video_length=FRAMES, num_layers=2, seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def latte_inputs(steps=4, guidance=7.5):
    return dict(prompt_embeds=tiny_prompt_embeddings([0], TEXT, CAPTION), negative_prompt=None,
                negative_prompt_embeds=tiny_null_embedding(1, TEXT, CAPTION), num_inference_steps=steps,
                guidance_scale=guidance, video_length=FRAMES, height=SIDE, width=SIDE, mask_feature=False,
                output_type="latent", generator=torch.Generator().manual_seed(0))


def wan():
    p = tiny_wan_pipeline(num_layers=2, seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def wan_inputs(steps=4, guidance=5.0, output_type="latent"):
    return dict(prompt_embeds=tiny_prompt_embeddings([0], TEXT, CAPTION), negative_prompt=None,
                negative_prompt_embeds=tiny_null_embedding(1, TEXT, CAPTION), num_inference_steps=steps,
                guidance_scale=guidance, num_frames=WAN_FRAMES, height=WAN_SIDE, width=WAN_SIDE,
                output_type=output_type, generator=torch.Generator().manual_seed(0))


class Recorder:
    """Records every call of every self-attention layer: (step, branch, input, output)."""

    def __init__(self, transformer, layers):
        self.calls = [[] for _ in layers]
        self.hooks = [attn.register_forward_hook(self._hook(i, transformer), with_kwargs=True)
                      for i, attn in enumerate(layers)]

    def _hook(self, i, transformer):
        def hook(attn, args, kwargs, output):
            h = get_handle(transformer)
            x = args[0] if args else kwargs["hidden_states"]
            rope = args[3] if len(args) > 3 else kwargs.get("rotary_emb")
            self.calls[i].append((h.state.step, h.branch, x.detach().clone(), output.detach().clone(), rope))
        return hook

    def close(self):
        for h in self.hooks:
            h.remove()


def recorded_calls(pipe, inputs, plan):
    """``pipe(**inputs)`` under ``plan``: its self-attention layers and every call each one saw."""
    handle = apply_fastattn(pipe, plan)
    layers = handle.adapter.attention_layers(pipe.transformer)
    rec = Recorder(pipe.transformer, layers)
    pipe(**inputs)
    rec.close()
    return layers, rec.calls


def check_against_definition(plan, layer, records, attention, window, cond_half, atol):
    """For every recorded call, recompute the layer output from its input by the definition:
    full = A(x); wars = W(x) + R with R = A(x_r) - W(x_r) at the refresh step r; ast = the
    previous step's output; asc / wars+asc: the conditional half's output copied to both halves.
    ``attention(x, rope)`` and ``window(x, rope)`` return the layer's output."""
    residual, previous = {}, {}  # per branch (pass within a step)
    for step, branch, x, out, rope in records:
        m = plan.methods[step][layer]
        half = cond_half(x.shape[0]) if m.shares_cfg else slice(None)
        xs = x[half]
        if m is T:
            expected = previous[branch]
        elif m is F:
            expected = attention(xs, rope)
            # The output projection is affine, so R = O - W maps to A(x_r) - W(x_r) after it.
            residual[branch] = expected - window(xs, rope)
        elif m is C:
            expected = attention(xs, rope)
        else:  # wars, wars+asc
            expected = window(xs, rope) + residual[branch][half]
        if m.shares_cfg:
            expected = torch.cat([expected, expected])
        torch.testing.assert_close(out, expected, atol=atol, rtol=atol,
                                   msg=lambda e: f"layer {layer} step {step} {m.value}: {e}")
        previous[branch] = out


# ------------------------------------------------------------------------------- Latte
def latte_reference(attn, mask):
    """float64 masked attention from the definition, through the layer's projections."""
    def run(x, rope=None):
        q, k, v = (t.double() for t in project_qkv(attn, x))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return project_out(attn, (scores.softmax(-1) @ v).float(), x, torch.float32)
    return run


def band(n, half_width):
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() <= half_width


@torch.no_grad()
def test_latte_layers_alternate_spatial_and_temporal_in_their_geometry():
    p = latte()
    assert layer_kinds(p.transformer) == ["spatial", "temporal", "spatial", "temporal"]
    assert layers_of_kind(p.transformer, "temporal") == [1, 3]
    _, calls = recorded_calls(p, latte_inputs(steps=2), CompressionPlan.all_full(2, 4))
    tokens = (SIDE // 2) ** 2
    assert calls[0][0][2].shape[:2] == (2 * FRAMES, tokens)  # spatial: a frame's tokens, per frame
    assert calls[1][0][2].shape[:2] == (2 * tokens, FRAMES)  # temporal: a location's frames


@torch.no_grad()
def test_latte_all_full_plan_is_bit_identical():
    p = latte()
    raw = p(**latte_inputs()).frames
    apply_fastattn(p, CompressionPlan.all_full(4, 4))
    assert torch.equal(p(**latte_inputs()).frames, raw)
    remove_fastattn(p)
    assert torch.equal(p(**latte_inputs()).frames, raw)


@torch.no_grad()
def test_latte_each_technique_matches_its_definition_on_spatial_and_temporal_attention():
    fraction = 0.25
    rows = [[F, F, F, F],
            [W, W, C, WC],   # wars on spatial (0) and temporal (1); asc spatial; wars+asc temporal
            [T, WC, W, T],   # ast on spatial and temporal; wars+asc temporal
            [WC, C, F, W]]   # wars+asc spatial; asc temporal
    plan = CompressionPlan(rows, window_size=fraction)
    layers, calls = recorded_calls(latte(), latte_inputs(), plan)
    tokens = (SIDE // 2) ** 2
    for i, attn in enumerate(layers):
        n = tokens if i % 2 == 0 else FRAMES  # a band over a frame's tokens, or over frames
        window = band(n, window_half_width(n, fraction))
        assert not window.all()
        check_against_definition(plan, i, calls[i], latte_reference(attn, None), latte_reference(attn, window),
                                 cond_half=lambda b: slice(b // 2, b), atol=2e-5)


def test_latte_search_runs_and_can_be_limited_to_spatial_layers():
    p = latte()
    plan = search_plan(p, latte_inputs(), threshold=0.5, progress=False)
    assert (plan.num_steps, plan.num_layers) == (4, 4)
    assert any(m is not F for row in plan.methods[1:] for m in row)
    spatial = layers_of_kind(p.transformer, "spatial")
    only = search_plan(p, latte_inputs(), threshold=0.5, progress=False, layers=spatial)
    assert all(row[l] is F for row in only.methods for l in (1, 3))
    assert only.search["layers"] == spatial
    apply_fastattn(p, only)
    p(**latte_inputs())


def test_unknown_attention_kind_is_named():
    with pytest.raises(ValueError, match=r"attention kinds: unknown \['spacial'\]"):
        layers_of_kind(latte().transformer, ["spacial"])


# ------------------------------------------------------------------------------- Wan
def brute_force_tiles(grid, tile, radius):
    """The tile neighbourhood from explicit (frame, row, col) coordinates."""
    coords = torch.tensor([(f, r, c) for f in range(grid[0]) for r in range(grid[1]) for c in range(grid[2])])
    tiles = coords // torch.tensor(tile)
    return ((tiles[:, None] - tiles[None, :]).abs() <= radius).all(-1)


@pytest.mark.parametrize("grid,fraction", [((3, 4, 4), 0.125), ((5, 6, 9), 0.3), ((21, 30, 52), 0.125)])
def test_tile_mask_matches_coordinates_and_its_pair_count(grid, fraction):
    tile = tile_shape(grid, fraction)
    n = math.prod(grid)
    if n <= 300:
        mask = dense_mask(tile_neighbourhood_mask_mod(grid, tile, 1), n, n)
        assert torch.equal(mask, brute_force_tiles(grid, tile, 1))
        assert int(mask.sum()) == tile_pairs(grid, tile) and not mask.all()
    else:  # tiles of whole tokens: only a large grid can match the fraction closely
        share = tile_pairs(grid, tile) / n**2
        assert 0.5 * fraction < share < 1.5 * fraction


def test_tile_window_covering_everything_is_full_attention():
    q, k, v = torch.randn(3, 1, 2, 48, 8).unbind(0)
    assert tile_shape((3, 4, 4), 1.0) == (3, 4, 4)
    torch.testing.assert_close(tile_window_attention(q, k, v, (3, 4, 4), 1.0),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match=r"token grid \(3, 4, 5\) has 60 tokens but the sequence has 48"):
        tile_window_attention(q, k, v, (3, 4, 5), 0.125)


@torch.no_grad()
def test_wan_all_full_plan_is_bit_identical_and_counts_two_calls_per_step():
    p = wan()
    raw = p(**wan_inputs()).frames
    handle = apply_fastattn(p, CompressionPlan.all_full(4, 2))
    assert torch.equal(p(**wan_inputs()).frames, raw)
    assert handle.state.step == 3 and handle.counter.calls == 8  # conditional + unconditional call per step
    remove_fastattn(p)
    assert torch.equal(p(**wan_inputs()).frames, raw)


@torch.no_grad()
@pytest.mark.parametrize("window_shape", ["band", "tile"])
def test_wan_techniques_match_their_definition_on_3d_attention(window_shape):
    # "band": the paper's 1-D band over the flattened (frame, row, col) tokens; "tile": 3-D tiles.
    fraction = 0.125
    plan = CompressionPlan([[F, F], [W, T], [T, W], [W, F]], window_size=fraction, window_shape=window_shape)
    layers, calls = recorded_calls(wan(), wan_inputs(), plan)
    grid = (3, WAN_SIDE // 4, WAN_SIDE // 4)
    n = math.prod(grid)
    mask = brute_force_tiles(grid, tile_shape(grid, fraction), 1) if window_shape == "tile" \
        else band(n, window_half_width(n, fraction))
    assert not mask.all()
    for i, attn in enumerate(layers):
        assert {r[1] for r in calls[i]} == {0, 1}  # both passes of every step recorded
        check_against_definition(plan, i, calls[i], lambda x, rope, a=attn: WanAttnProcessor()(a, x, rotary_emb=rope),
                                 lambda x, rope, a=attn: WanAttnProcessor()(a, x, attention_mask=mask, rotary_emb=rope),
                                 cond_half=None, atol=2e-5)


@pytest.mark.parametrize("window_shape", ["band", "tile"])
def test_wan_search_runs_end_to_end_without_cfg_sharing(window_shape):
    p = wan()
    plan = search_plan(p, wan_inputs(), threshold=0.5, window_shape=window_shape, progress=False)
    assert (plan.num_steps, plan.num_layers, plan.window_shape) == (4, 2, window_shape)
    assert not plan.uses_cfg_sharing() and plan.model["cfg"] == "separate"
    assert any(m is not F for row in plan.methods[1:] for m in row)
    apply_fastattn(p, plan)
    p(**wan_inputs())


def test_wan_rejects_cfg_sharing_plans_before_installing():
    p = wan()
    with pytest.raises(ValueError, match="separate calls"):
        apply_fastattn(p, CompressionPlan([[F, F], [C, F]]))
    assert get_handle(p) is None


def test_block_sparse_tile_window_in_tile_major_order_equals_the_masked_definition():
    # The CUDA path (FlexAttention over tile-major tokens) run eagerly on the CPU at a small grid.
    grid, fraction = (5, 6, 9), 0.3
    tile = tile_shape(grid, fraction)
    q, k, v = torch.randn(3, 2, 2, math.prod(grid), 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    sparse = sparse_tile_window_attention(q, k, v, grid, tile, compiled=False)
    torch.testing.assert_close(sparse, tile_window_attention(q, k, v, grid, fraction), atol=1e-5, rtol=1e-5)
