"""The generic adapter (issue 31, first slice): a class with no hand-written adapter is read from
its diffusers attention modules, and the layer-wise family runs each self-attention layer's own
processor with only its attention core replaced (fastattn.core_call)."""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, HunyuanDiT2DModel, LTXVideoTransformer3DModel

from fastattn import CompressionPlan, LayerPlan, Method, apply_fastattn, describe, get_handle, remove_fastattn
from fastattn.models.adapters import ADAPTERS, ModelAdapter
from test_keywords_and_sizing import TinyT

F, WARS, WA, AST, ASC = Method.FULL, Method.WARS, Method.WA, Method.AST, Method.ASC
MIXED = [[F, F], [WARS, ASC], [AST, WA], [WARS, AST]]  # every technique, two layers


class TinySelf(TinyT):
    """Self-attention blocks of diffusers' Attention (AttnProcessor2_0), its timestep named timestep."""

    def forward(self, hidden_states, timestep):
        return super().forward(hidden_states, timestep)


def run(model, plan, timesteps, x):
    apply_fastattn(model, plan)
    outs = [model(x * t / 1000, timestep=torch.tensor(t))[0] for t in timesteps]  # inputs move with t
    remove_fastattn(model)
    return outs


def test_wrapped_techniques_match_the_hand_written_projections(monkeypatch):
    """Each technique through the own processor equals it through SELF's projections (float64)."""
    torch.manual_seed(0)
    model = TinySelf().double().eval()
    half = torch.randn(1, 24, 16, dtype=torch.float64)
    x, timesteps = torch.cat([half, half]), [900, 600, 300, 100]  # a CFG batch
    plan = LayerPlan(MIXED, window_size=0.125)
    assert describe(model).families == ("LayerPlan",)  # the generic adapter: no entry in ADAPTERS
    wrapped = run(model, plan, timesteps, x)
    monkeypatch.setitem(ADAPTERS, "TinySelf", ModelAdapter("TinySelf", cond_first=False))
    own = run(model, plan, timesteps, x)
    raw = [model(x * t / 1000, timestep=torch.tensor(t))[0] for t in timesteps]
    for a, b in zip(wrapped, own, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(wrapped[0], raw[0]) and not torch.allclose(wrapped[1], raw[1])


def hunyuan_dit():
    torch.manual_seed(0)
    model = HunyuanDiT2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                              in_channels=4, cross_attention_dim=32, cross_attention_dim_t5=32,
                              pooled_projection_dim=16, hidden_size=24, activation_fn="gelu-approximate", text_len=4,
                              text_len_t5=4).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(1, 4, 32, generator=g),
                  text_embedding_mask=torch.ones(1, 4), encoder_hidden_states_t5=torch.randn(1, 4, 32, generator=g),
                  text_embedding_mask_t5=torch.ones(1, 4), image_meta_size=torch.randn(1, 6, generator=g),
                  style=torch.zeros(1, dtype=torch.long), image_rotary_emb=_hunyuan_rotary(), return_dict=False)
    return model, inputs


def _hunyuan_rotary():
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    return get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))


def ltx_video():
    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                       cross_attention_dim=16, num_layers=2, caption_channels=16).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 2 * 4 * 4, 4, generator=g),
                  encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                  encoder_attention_mask=torch.ones(1, 3), num_frames=2, height=4, width=4, return_dict=False)
    return model, inputs


def cfg_batch(inputs):
    """Both CFG halves the same call (what a CFG pipeline batches), as a batch of two."""
    return {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("build", [hunyuan_dit, ltx_video], ids=["hunyuan_dit", "ltx_video"])
def test_generic_models_all_full_is_bit_identical_and_a_full_window_is_full_attention(build):
    model, inputs = build()
    inputs = cfg_batch(inputs)
    info = describe(model)
    assert info.families == ("LayerPlan",) and {layer.kind for layer in info.layers} == {"self"}
    steps = [torch.tensor([900.0, 900.0]), torch.tensor([600.0, 600.0]), torch.tensor([300.0, 300.0])]
    raw = [model(timestep=t, **inputs)[0] for t in steps]
    processors = dict(model.attn_processors)
    apply_fastattn(model, info.all_full(3))
    assert all(torch.equal(model(timestep=t, **inputs)[0], r) for t, r in zip(steps, raw, strict=True))
    # a window over every token is full attention: WA-RS and ASC then equal the raw model's, the
    # model's rotary embedding, norms and keywords all applied by its own processor
    apply_fastattn(model, LayerPlan([[F, F], [WARS, ASC], [ASC, WARS]], window_size=1.0))
    for t, r in zip(steps, raw, strict=True):
        torch.testing.assert_close(model(timestep=t, **inputs)[0], r, rtol=1e-4, atol=1e-5)  # float32
    remove_fastattn(model)
    assert dict(model.attn_processors) == processors and get_handle(model) is None


def test_ast_reuses_the_layers_last_output():
    model, inputs = hunyuan_dit()
    attn = model.blocks[0].attn1
    outputs = []
    hook = attn.register_forward_hook(lambda m, a, o: outputs.append(o.clone()))
    apply_fastattn(model, LayerPlan([[F, F], [AST, F]]))
    model(timestep=torch.tensor([900.0]), **inputs)
    model(timestep=torch.tensor([500.0]), **inputs)
    hook.remove()
    remove_fastattn(model)
    assert torch.equal(outputs[0], outputs[1])


def test_a_layer_whose_attention_joins_the_text_windows_its_image_tokens():
    """CogVideoX's attn1 joins the text inside its processor: the text's rows are found (text
    first), a window over every image token is full attention, a narrow one is not."""
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        time_embed_dim=2, text_embed_dim=8, num_layers=1, sample_width=8,
                                        sample_height=8, sample_frames=8, patch_size=2, temporal_compression_ratio=4,
                                        max_text_seq_length=8).eval()
    inputs = dict(hidden_states=torch.randn(1, 1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 8, 8),
                  return_dict=False)
    steps = [torch.tensor([900]), torch.tensor([500])]
    raw = [model(timestep=t, **inputs)[0] for t in steps]
    apply_fastattn(model, LayerPlan.all_full(2, 1))
    assert torch.equal(model(timestep=steps[0], **inputs)[0], raw[0])
    for window, same in ((1.0, True), (0.0625, False)):
        handle = apply_fastattn(model, LayerPlan([[F], [WARS]], window_size=window))
        out = [model(timestep=t, **inputs)[0] for t in steps]
        [(q_rows, k_rows)] = next(iter(handle.processors[0].text_layouts.values()))  # one attention call
        assert q_rows.tolist() == k_rows.tolist() == [True] * 8 + [False] * 16 and handle.state.text_first
        assert torch.allclose(out[1], raw[1], rtol=1e-4, atol=1e-5) is same
    remove_fastattn(model)


def test_a_processor_without_an_sdpa_call_takes_no_window_and_is_refused_at_apply():
    """diffusers' AttnProcessor computes attention with baddbmm: no window can replace it, so a
    plan giving it one is refused before the model is touched; AST and ASC still run."""
    from diffusers.models.attention_processor import AttnProcessor

    torch.manual_seed(0)
    model = TinySelf().eval()
    model.transformer_blocks[0].attn1.set_processor(AttnProcessor())
    half = torch.randn(1, 24, 16)
    x = torch.cat([half, half])  # a CFG batch
    assert [layer.core for layer in describe(model).layers] == ["opaque", "sdpa"]
    with pytest.raises(ValueError, match="layer 0 of TinySelf attends without a scaled_dot_product_attention call"):
        apply_fastattn(model, LayerPlan([[F, F], [WARS, F]]))
    assert get_handle(model) is None
    raw = [model(x, timestep=torch.tensor(t))[0] for t in (900, 500)]
    apply_fastattn(model, LayerPlan([[F, F], [ASC, WARS]]))
    out = [model(x, timestep=torch.tensor(t))[0] for t in (900, 500)]
    remove_fastattn(model)
    assert torch.equal(out[0], raw[0]) and not torch.equal(out[1], raw[1])


def test_generic_joint_models_take_layer_wise_plans_on_their_image_tokens(monkeypatch):
    """FLUX read generically: joint and single layers; the layer-wise family serves them through
    their own processors (text found first), head-wise plans are refused in one line."""
    from experiments.models.tiny.mmdit import tiny_flux_pipeline

    monkeypatch.delitem(ADAPTERS, "FluxTransformer2DModel")
    pipe = tiny_flux_pipeline(num_layers=1, num_single_layers=2, num_heads=2, head_dim=16)
    info = describe(pipe)
    assert [layer.kind for layer in info.layers] == ["joint", "single", "single"] and info.families == ("LayerPlan",)
    assert "generic adapter" in dict(info.refused)["HeadPlan"]
    with pytest.raises(ValueError, match="layer 0 of FluxTransformer2DModel has only its own processor"):
        apply_fastattn(pipe, CompressionPlan.from_heads([[["full"] * 2] * 3] * 2))
    assert get_handle(pipe) is None


@pytest.mark.parametrize("name,dims", [("Ideogram4Transformer2DModel", (4, 8, 32)),  # num_heads
                                       ("PRXTransformer2DModel", (2, 16, 32)),  # a fused qkv Linear
                                       ("Kandinsky5Transformer3DModel", (2, 16, 32)),  # to_query
                                       ("Cosmos3OmniTransformer", (4, 8, 32))])  # num_attention_heads
def test_dimensions_are_read_from_what_the_attention_module_has(name, dims):
    from experiments.infra.coverage import build

    info = describe(build(name))
    assert (info.num_heads, info.head_dim, info.model_dim) == dims


def test_a_module_holding_a_processor_without_a_setter_is_found_and_set_by_attribute():
    """Mochi's attention is a plain module with a processor attribute (no AttentionModuleMixin)."""
    from experiments.infra.coverage import build
    from fastattn.features.processors import set_processor
    from fastattn.models.adapters.generic import attention_modules

    model = build("MochiTransformer3DModel")
    found = attention_modules(model)
    assert [n for n, _ in found] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    attn, own = found[0][1], found[0][1].processor
    set_processor(attn, "other")
    assert attn.processor == "other"
    set_processor(attn, own)
    assert attn.processor is own


def test_a_tile_window_on_layers_with_text_is_refused_at_apply():
    from experiments.models.tiny.mmdit import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(num_layers=1, num_single_layers=1, num_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="layer 0 of FluxTransformer2DModel is joint attention .*window_shape='band'"):
        apply_fastattn(pipe, LayerPlan([[F, F], [WARS, AST]], window_shape="tile"))
    assert get_handle(pipe) is None


@pytest.mark.parametrize("rows", [[[F, F], [AST, WARS], [WARS, AST], [AST, F]],
                                  [[F, F], [WARS, WARS], [WA, AST], [WARS, WARS]]], ids=["ast_wars", "wars_wa"])
def test_layerwise_on_flux_true_cfg_keeps_caches_per_branch(rows):
    """FLUX's true CFG calls the transformer once per branch: its joint and single layers, run
    through their own processors, keep their WA-RS residuals and AST outputs per branch."""
    from test_cfg_modes import flux, flux_inputs, output, per_branch_reference

    pipe = flux()
    plan = LayerPlan(rows, window_size=0.25)
    reference = per_branch_reference(pipe, flux_inputs(4.0), plan)
    handle = apply_fastattn(pipe, plan)
    got = output(pipe, flux_inputs(4.0))
    assert handle.counter.calls == 2 * len(rows) and torch.equal(got, reference)
    remove_fastattn(pipe)
    assert not torch.equal(got, output(pipe, flux_inputs(4.0)))  # the plan did compress


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("causal", [False, True])
def test_the_masked_window_keeps_the_pairs_both_masks_keep(kind, causal):
    """A key-padding mask ([batch, 1, 1, keys]) of either dtype, with and without causality, over
    an image span with text before it and keys with text only they hold: the definition."""
    from fastattn.kernels import masked_window_attention
    from fastattn.kernels.arrow import arrow_tile, tile_radius_of

    torch.manual_seed(0)
    q = torch.randn(2, 2, 20, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 24, 8, dtype=torch.float64) for _ in range(2))
    valid = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    valid[1, ..., -3:] = False  # the second sample's last three keys are padding
    mask = valid if kind == "bool" else torch.zeros(valid.shape, dtype=torch.float64).masked_fill(~valid, -1e9)
    q_span, k_span, half = (4, 16), (8, 16), 2  # 4 text queries, then 16 image; 8 text keys, then 16 image
    out = masked_window_attention(q, k, v, half, mask, q_span, k_span, causal)
    i, j = torch.arange(20)[:, None] - 4, torch.arange(24)[None, :] - 8
    tile, radius = arrow_tile(16), tile_radius_of(half, 16)
    keep = (i < 0) | (i >= 16) | (j < 0) | (j >= 16) | ((i // tile - j // tile).abs() <= radius)
    if causal:
        keep = keep & torch.ones(20, 24, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    scores = scores.masked_fill(~(keep & valid), float("-inf"))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, rtol=1e-10, atol=1e-10)
