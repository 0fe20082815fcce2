"""What each adapter reads from a call: the token grid (from the latent's shape and the patch
size, 4-D and 5-D, on non-square latents) and, for the 2-D tile window, that grid's width."""

import pytest
import torch

from fastattn import CompressionPlan, Method, apply_fastattn
from fastattn.kernels import dense_mask, tile_mask_mod, tile_radius
from experiments.models.tiny import (tiny_dit_pipeline, tiny_latte_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline,
                                  tiny_wan_pipeline)
from fastattn.attention_io import project_out, project_qkv


def dit():
    t = tiny_dit_pipeline(sample_size=16, num_layers=2, num_heads=2, head_dim=8).transformer
    return t, dict(hidden_states=torch.randn(2, 4, 8, 12), timestep=torch.tensor([5, 5]),
                   class_labels=torch.tensor([1, 1000]))


def pixart():
    t = tiny_pixart_pipeline(sample_size=16, num_layers=2, num_heads=2, head_dim=8, caption_channels=32).transformer
    return t, dict(hidden_states=torch.randn(2, 4, 8, 12), timestep=torch.tensor([5, 5]),
                   encoder_hidden_states=torch.randn(2, 6, 32),
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def sd3():
    t = tiny_sd3_pipeline(sample_size=16, num_layers=2, num_heads=2, head_dim=8).transformer
    return t, dict(hidden_states=torch.randn(2, 4, 8, 12), timestep=torch.tensor([5, 5]),
                   encoder_hidden_states=torch.randn(2, 5, 32), pooled_projections=torch.randn(2, 32))


def latte():
    t = tiny_latte_pipeline(sample_size=8, video_length=4, num_layers=2).transformer
    return t, dict(hidden_states=torch.randn(2, 4, 4, 8, 12), timestep=torch.tensor([5, 5]),
                   encoder_hidden_states=torch.randn(2, 6, 32), enable_temporal_attentions=True)


def wan():
    t = tiny_wan_pipeline(num_layers=2).transformer
    return t, dict(hidden_states=torch.randn(1, 4, 3, 8, 12), timestep=torch.tensor([5]),
                   encoder_hidden_states=torch.randn(1, 6, 32))


# (model, expected (frames, rows, cols)): DiT / PixArt / SD3 patch 2 on a 8 x 12 latent;
# Latte patch 2 over H, W of a 4-frame latent (frames stay whole); Wan (1, 2, 2) over [B, C, F, H, W].
CASES = {"dit": (dit, (1, 4, 6)), "pixart": (pixart, (1, 4, 6)), "sd3": (sd3, (1, 4, 6)),
         "latte": (latte, (4, 4, 6)), "wan": (wan, (3, 4, 6))}


@pytest.mark.parametrize("name", CASES)
def test_token_grid_comes_from_the_latent_and_the_patch_size(name):
    build, grid = CASES[name]
    transformer, inputs = build()
    layers = 2 if name in ("dit", "pixart", "sd3", "wan") else 4
    plan = (CompressionPlan.from_heads([[["full"] * 2] * 2]) if name == "sd3"
            else CompressionPlan.all_full(1, layers))
    handle = apply_fastattn(transformer, plan)
    with torch.no_grad():
        transformer(**inputs)
    assert handle.state.call.grid == grid


def test_tile_window_on_a_non_square_latent_is_the_definition():
    # A DiT call on an 8 x 12 latent: 4 x 6 tokens. The tile window of layer 0 against a float64
    # reference that masks with the grid's real width (6), through a step whose layer 0 is 'wa'.
    transformer, inputs = dit()
    attn = transformer.transformer_blocks[0].attn1
    seen = {}

    def record_input(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    attn.register_forward_pre_hook(record_input, with_kwargs=True)
    plan = CompressionPlan([[Method.FULL] * 2, [Method.WA, Method.FULL]], window_size=0.5, window_shape="tile")
    apply_fastattn(transformer, plan)
    outputs = {}
    attn.register_forward_hook(lambda m, a, out: outputs.__setitem__("out", out))
    with torch.no_grad():
        transformer(**inputs)  # step 0
        seen.clear()
        transformer(**dict(inputs, timestep=torch.tensor([4, 4])))  # step 1: layer 0 is 'wa'
        x = seen["x"]
        q, k, v = (t.double() for t in project_qkv(attn, x))
        mask = dense_mask(tile_mask_mod(tile_radius(24, 0.5), 6), 24, 24)
        scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
        want = project_out(attn, (scores.softmax(-1) @ v).float(), x, torch.float32)
    torch.testing.assert_close(outputs["out"], want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ descriptions
def test_each_adapter_describes_its_layers_and_builds_nothing():
    from fastattn.attention_io import SELF
    from fastattn.models.adapters.mmdit import FLUX_JOINT, SD3_JOINT
    from fastattn.models.adapters.video import WAN_ROTARY
    from fastattn.models import ADAPTERS, get_adapter
    from experiments.models.tiny import tiny_flux_pipeline

    assert not any(hasattr(adapter, "make_processors") for adapter in ADAPTERS.values())
    flux = tiny_flux_pipeline(sample_size=16, num_layers=1, num_single_layers=1, num_heads=2, head_dim=16).transformer
    expected = {"dit": [("self", "spatial", SELF)] * 2, "sd3": [("joint", "spatial", SD3_JOINT)] * 2,
                "latte": [("self", "spatial", SELF), ("self", "temporal", SELF)] * 2,
                "wan": [("self", "full3d", WAN_ROTARY)] * 2}
    for name, layers in expected.items():
        transformer = CASES[name][0]()[0]
        description = get_adapter(transformer).description(transformer)
        assert [(layer.kind, layer.geometry, layer.io) for layer in description.layers] == layers
        assert description.facts() == get_adapter(transformer).describe(transformer)
    description = get_adapter(flux).description(flux)
    assert [(layer.kind, layer.io) for layer in description.layers] == [("joint", FLUX_JOINT), ("single", FLUX_JOINT)]
    assert description.joint and description.text_first and not description.cfg_batched
    assert list(description.facts()) == ["class_name", "num_layers", "num_heads", "head_dim", "model_dim", "joint",
                                         "text_first"]


def test_projection_helpers_keep_their_old_import_path():
    import fastattn.attention_io as io
    import fastattn.processor as processor

    with pytest.warns(DeprecationWarning, match="moved to fastattn.attention_io"):
        assert processor.project_qkv is io.project_qkv
    assert processor.project_out is io.project_out
