"""Issue 31's silent hurts and public sizing: every keyword reaches the model's own processor,
a plan that does not fit a model is refused at apply in one line, the step counter reads the
timestep under the model's name for it, and ``fastattn.describe`` says what a plan must be."""

import inspect

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

import fastattn
from fastattn import CompressionPlan, LayerPlan, apply_fastattn, describe, remove_fastattn
from fastattn.headwise.processor import HeadStepState, HeadwiseJointProcessor
from fastattn.layerwise.processor import FastAttnProcessor, StepState
from fastattn.models.adapters import ADAPTERS, ModelAdapter
from experiments.models.tiny import tiny_dit_pipeline, tiny_latte_pipeline
from experiments.models.tiny.mmdit import tiny_flux_pipeline, tiny_text_inputs


def flux_attention_inputs(attn, text=3, image=5, dim=32):
    torch.manual_seed(0)
    x, text_states = torch.randn(2, image, dim), torch.randn(2, text, dim)
    freqs = torch.randn(text + image, attn.head_dim)
    return x, text_states, (freqs.cos(), freqs.sin())


@pytest.mark.parametrize("wrapper", ["layerwise", "headwise"])
def test_flux_positional_rotary_reaches_the_own_processor(wrapper):
    """FluxAttention passes image_rotary_emb by position: it is the rotary, never temb."""
    attn = tiny_flux_pipeline(num_heads=2, head_dim=16).transformer.transformer_blocks[0].attn
    x, text_states, rotary = flux_attention_inputs(attn)
    raw = attn(x, text_states, image_rotary_emb=rotary)
    own = attn.processor
    wrapped = (FastAttnProcessor(0, StepState(1), own) if wrapper == "layerwise"
               else HeadwiseJointProcessor(0, HeadStepState(1, 2), own, None))
    attn.set_processor(wrapped)
    # diffusers forwards the keywords the signature names: the own processor's, exactly
    assert inspect.signature(attn.processor.__call__) == inspect.signature(own.__call__)
    out = attn(x, text_states, image_rotary_emb=rotary)
    for a, b in zip(raw, out, strict=True):
        assert torch.equal(a, b)


class ScaledProcessor(AttnProcessor2_0):
    """A model's own processor taking a keyword diffusers' Attention does not know."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 boost: float = 1.0):
        return boost * super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_every_keyword_the_own_processor_names_reaches_it():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, processor=ScaledProcessor())
    x = torch.randn(2, 6, 16)
    raw = attn(x, boost=3.0)
    attn.set_processor(FastAttnProcessor(0, StepState(1), attn.processor))
    assert torch.equal(attn(x, boost=3.0), raw)
    assert not torch.equal(attn(x, boost=1.0), raw)  # (the keyword does matter)


def test_a_layerwise_plan_on_flux_runs_its_joint_layers_through_their_own_processors():
    """FLUX passes image_rotary_emb positionally: an all-full layer-wise plan keeps it (bit-identical)."""
    pipe = tiny_flux_pipeline(num_heads=2, head_dim=16)
    processors = dict(pipe.transformer.attn_processors)
    pipe.set_progress_bar_config(disable=True)
    inputs = dict(tiny_text_inputs("flux", [0], text_len=7), height=16, width=16, num_inference_steps=2,
                  output_type="pt")
    raw = pipe(**inputs, generator=torch.Generator().manual_seed(0)).images
    assert describe(pipe).families == ("HeadPlan", "LayerPlan")
    apply_fastattn(pipe, LayerPlan.all_full(2, describe(pipe).num_layers))
    out = pipe(**inputs, generator=torch.Generator().manual_seed(0)).images
    remove_fastattn(pipe)
    assert torch.equal(out, raw) and dict(pipe.transformer.attn_processors) == processors


# -- the timestep under the model's name for it ---------------------------------------------------
class TinyT(nn.Module):
    """A transformer whose forward calls its timestep ``t`` (as Z-Image does)."""

    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(nn.Module() for _ in range(2))
        for block in self.transformer_blocks:
            block.attn1 = Attention(query_dim=16, heads=2, dim_head=8)
        self.config = type("Config", (), {"patch_size": None})()

    def forward(self, hidden_states, t):
        for block in self.transformer_blocks:
            hidden_states = hidden_states + block.attn1(hidden_states)
        return (hidden_states,)


@pytest.fixture
def tiny_t(monkeypatch):
    monkeypatch.setitem(ADAPTERS, "TinyT", ModelAdapter("TinyT", cond_first=True, timestep_arg="t"))
    torch.manual_seed(0)
    return TinyT().eval()


def steps_seen(model, timesteps):
    handle = apply_fastattn(model, LayerPlan.all_full(8, 2))
    x, seen = torch.randn(2, 6, 16), []
    for t in timesteps:
        model(x, t=t)
        seen.append((handle.counter.step, handle.counter.branch))
    remove_fastattn(model)
    return seen


def test_the_counter_reads_the_timestep_the_adapter_names(tiny_t):
    assert describe(tiny_t).timestep_arg == "t"
    assert steps_seen(tiny_t, [torch.tensor([5.0, 5.0]), torch.tensor([5.0, 5.0]), torch.tensor(3.0)]) == \
        [(0, 0), (0, 1), (1, 0)]


def test_per_frame_timesteps_start_a_step_where_any_frame_moves(tiny_t):
    # a clean first frame (t = 0) at every step: its first element never moves
    frames = [torch.tensor([[0.0, 9.0, 9.0]]), torch.tensor([[0.0, 9.0, 9.0]]), torch.tensor([[0.0, 7.0, 7.0]])]
    assert steps_seen(tiny_t, frames) == [(0, 0), (0, 1), (1, 0)]
    handle = apply_fastattn(tiny_t, LayerPlan.all_full(8, 2))
    assert handle.counter.value_of(handle.counter.timestep_key(tiny_t, (), {"t": frames[2]})) == 7.0
    remove_fastattn(tiny_t)


# -- describe -----------------------------------------------------------------------------------
def test_describe_sizes_a_self_attention_model():
    pipe = tiny_dit_pipeline(sample_size=8, num_layers=3, num_heads=2, head_dim=8)
    info = describe(pipe, height=8, width=8)  # the tiny VAE does not downsample
    assert "describe" in fastattn.__all__
    assert (info.class_name, info.num_layers, info.num_heads, info.head_dim) == ("DiTTransformer2DModel", 3, 2, 8)
    assert {layer.kind for layer in info.layers} == {"self"} and info.families == ("LayerPlan",)
    assert info.token_grid == (1, 4, 4) and info.num_tokens == 16
    assert describe(pipe.transformer, height=8, width=8).token_grid == (1, 4, 4)  # latent sizes
    assert dict(info.refused)["HeadPlan"].startswith("head-wise plans need a joint-attention model")
    plan = info.all_full(2)
    assert isinstance(plan, LayerPlan) and plan.num_layers == 3
    apply_fastattn(pipe, plan)
    remove_fastattn(pipe)


def test_describe_sizes_joint_and_video_models():
    flux = describe(tiny_flux_pipeline(num_layers=1, num_single_layers=2, num_heads=2, head_dim=16))
    assert [layer.kind for layer in flux.layers] == ["joint", "single", "single"]
    assert flux.families == ("HeadPlan", "LayerPlan")  # layer-wise through the layers' own processors
    assert flux.token_grid is None  # FLUX takes packed tokens
    plan = flux.all_full(2)
    assert isinstance(plan, CompressionPlan) and plan.num_layers == 3 and type(plan).__name__ == "HeadPlan"
    latte = describe(tiny_latte_pipeline(num_layers=2).transformer, height=8, width=8, num_frames=4)
    assert latte.num_layers == 4 and [layer.geometry for layer in latte.layers] == ["spatial", "temporal"] * 2
    assert latte.token_grid[0] == 4
