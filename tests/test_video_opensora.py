"""Open-Sora 1.1 STDiT2 adapter, against a stand-in ``opensora`` package that behaves as v1.1.0
does where the adapter depends on it (the real package is not a test dependency):

- a ``[B, C, T, H, W]`` latent cut into (1, 2, 2) patches (``config.patch_size``), spatial
  attention over each frame's tokens, temporal attention with a rotary embedding;
- ``Attention.forward`` applies the rotary embedding before the q/k norms and has no
  ``qk_norm_legacy`` attribute (v1.2 added it);
- captions ``y`` of shape [B, 1, tokens, C], the null caption being ``y_embedder.y_embedding``;
- two samplers with opposite CFG orders, both calling ``model.forward`` directly: IDDPM's
  ``forward_with_cfg`` batches [conditional, unconditional], dpm-solver's model wrapper
  [unconditional, conditional].
"""

import sys
import textwrap

import pytest
import torch

from fastattn import CompressionPlan, Method, apply_fastattn, remove_fastattn
from fastattn.family import COND_FIRST, UNCOND_FIRST, CallInfo
from fastattn.kernels import dense_mask, tile_mask_mod, tile_radius
from fastattn.layerwise.processor import FastAttnProcessor, StepState

F, W, T, C = Method.FULL, Method.WARS, Method.AST, Method.ASC

STAND_IN = textwrap.dedent('''
    import math
    from types import SimpleNamespace

    import torch
    from torch import nn


    def rotary(t):
        """A rotary embedding over the sequence axis of [B, heads, N, D] (pairs of channels turned by position)."""
        n, d = t.shape[-2], t.shape[-1]
        angle = torch.arange(n)[:, None] / (100 ** (torch.arange(d // 2) / (d // 2)))[None, :]
        cos, sin = angle.cos().repeat_interleave(2, -1), angle.sin().repeat_interleave(2, -1)
        pairs = torch.stack([-t[..., 1::2], t[..., 0::2]], dim=-1).flatten(-2)
        return t * cos + pairs * sin


    class Attention(nn.Module):
        def __init__(self, dim, num_heads, rope=None):
            super().__init__()
            self.num_heads, self.head_dim = num_heads, dim // num_heads
            self.qkv, self.proj, self.proj_drop = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Dropout(0.0)
            self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.LayerNorm(self.head_dim)
            self.rope = rope is not None
            if self.rope:
                self.rotary_emb = rope

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            if getattr(self, "qk_norm_legacy", True):  # v1.1.0: rotary, then the norms
                if self.rope:
                    q, k = self.rotary_emb(q), self.rotary_emb(k)
                q, k = self.q_norm(q), self.k_norm(k)
            else:  # v1.2 with qk_norm_legacy=False
                q, k = self.q_norm(q), self.k_norm(k)
                if self.rope:
                    q, k = self.rotary_emb(q), self.rotary_emb(k)
            weights = (q * self.head_dim ** -0.5 @ k.transpose(-2, -1)).float().softmax(-1).to(q.dtype)
            return self.proj_drop(self.proj((weights @ v).transpose(1, 2).reshape(b, n, c)))


    class STDiT2Block(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.attn = Attention(dim, heads)
            self.attn_temp = Attention(dim, heads, rope=rotary)

        def forward(self, x, y, T, S):
            b, _, c = x.shape
            x = x + self.attn(x.reshape(b * T, S, c)).reshape(b, T * S, c) + y.mean(1, keepdim=True)
            xt = x.reshape(b, T, S, c).transpose(1, 2).reshape(b * S, T, c)
            return x + self.attn_temp(xt).reshape(b, S, T, c).transpose(1, 2).reshape(b, T * S, c)


    class STDiT2(nn.Module):
        def __init__(self, channels=4, dim=16, heads=2, depth=2, text_len=5, text_dim=16):
            super().__init__()
            self.config = SimpleNamespace(patch_size=(1, 2, 2))
            self.patch_size = self.config.patch_size
            self.x_embedder = nn.Conv3d(channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
            self.y_embedder = nn.Module()
            self.y_embedder.y_embedding = nn.Parameter(torch.randn(text_len, text_dim) / text_dim ** 0.5)
            self.y_proj, self.t_proj = nn.Linear(text_dim, dim), nn.Linear(1, dim)
            self.blocks = nn.ModuleList(STDiT2Block(dim, heads) for _ in range(depth))
            self.out = nn.Linear(dim, channels * math.prod(self.patch_size))

        def forward(self, x, timestep, y, mask=None):
            b, c, frames, height, width = x.shape
            pt, ph, pw = self.patch_size
            t_, h_, w_ = frames // pt, height // ph, width // pw
            h = self.x_embedder(x).flatten(2).transpose(1, 2)  # [B, T*S, dim], frame-major
            h = h + self.t_proj(timestep.float()[:, None, None] / 1000)
            y = self.y_proj(y[:, 0])
            for block in self.blocks:
                h = block(h, y, t_, h_ * w_)
            out = self.out(h).view(b, t_, h_, w_, c, pt, ph, pw)
            return out.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, frames, height, width)
''')

LATENT = (1, 4, 3, 12, 16)  # [B, C, T, H, W]: 3 frames of 6 x 8 patches (not square)


@pytest.fixture
def opensora(tmp_path, monkeypatch):
    pkg = tmp_path / "opensora" / "models" / "stdit"
    pkg.mkdir(parents=True)
    for folder in (tmp_path / "opensora", tmp_path / "opensora" / "models", pkg):
        (folder / "__init__.py").write_text("")
    (pkg / "stdit2.py").write_text(STAND_IN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield __import__("opensora.models.stdit.stdit2", fromlist=["STDiT2"])
    for name in [m for m in sys.modules if m == "opensora" or m.startswith("opensora.")]:
        del sys.modules[name]


def iddpm_forward_with_cfg(model, x, t, y, y_null, scale=7.0):
    """v1.1.0 IDDPM: one CFG batch [conditional, unconditional] through model.forward (no hooks)."""
    cond, uncond = model.forward(torch.cat([x, x]), t.expand(2), torch.cat([y, y_null])).chunk(2)
    return uncond + scale * (cond - uncond)


def dpm_solver_forward(model, x, t, y, y_null, scale=7.0):
    """v1.1.0 dpm-solver's model wrapper: [unconditional, conditional], also through model.forward."""
    uncond, cond = model.forward(torch.cat([x, x]), t.expand(2), torch.cat([y_null, y])).chunk(2)
    return uncond + scale * (cond - uncond)


SAMPLERS = {"iddpm": (iddpm_forward_with_cfg, COND_FIRST), "dpm_solver": (dpm_solver_forward, UNCOND_FIRST)}


def caption(model, seed):
    return torch.randn(1, 1, 5, 16, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample(model, guided, steps=4):
    x = torch.randn(*LATENT, generator=torch.Generator().manual_seed(0))
    y, y_null = caption(model, 1), model.y_embedder.y_embedding[None, None]
    for t in torch.linspace(900, 100, steps):
        x = x - 0.1 * guided(model, x, t.reshape(1), y, y_null)
    return x


def model(opensora):
    torch.manual_seed(0)
    return opensora.STDiT2().eval()


def test_without_opensora_the_error_says_what_to_install():
    class STDiT2(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="needs the Open-Sora package importable"):
        apply_fastattn(STDiT2(), CompressionPlan.all_full(2, 2))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_all_full_is_bit_identical_and_removal_restores_the_modules(opensora, sampler):
    m, guided = model(opensora), SAMPLERS[sampler][0]
    raw = sample(m, guided)
    handle = apply_fastattn(m, CompressionPlan.all_full(4, 2))
    assert torch.equal(sample(m, guided), raw)
    assert handle.state.step == 3 and handle.counter.calls == 4  # model.forward calls counted, once each
    assert handle.state.call.cfg == SAMPLERS[sampler][1]
    assert handle.state.call.grid == (3, 6, 8)  # from the 5-D latent and the (1, 2, 2) patch
    remove_fastattn(m)
    assert all("forward" not in b.attn.__dict__ for b in m.blocks) and "forward" not in m.__dict__
    assert torch.equal(sample(m, guided), raw)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_asc_computes_the_conditional_half_whichever_order_the_sampler_batches(opensora, sampler):
    m = model(opensora)
    order = SAMPLERS[sampler][1]
    x = torch.randn(*LATENT, generator=torch.Generator().manual_seed(3))
    y, y_null = caption(m, 1), m.y_embedder.y_embedding[None, None]
    ys = torch.cat([y, y_null] if order == COND_FIRST else [y_null, y])
    cond = 0 if order == COND_FIRST else 1

    def call(t):
        return m.forward(torch.cat([x, x]), torch.tensor([t, t]), ys)

    with torch.no_grad():
        full = call(500.0)
        handle = apply_fastattn(m, CompressionPlan([[F, F], [C, C]]))
        call(600.0)  # step 0: full
        shared = call(500.0)
    assert handle.state.call.cfg == order
    # the conditional sample keeps its own attention (the full model's output); the other gets it too
    torch.testing.assert_close(shared[cond], full[cond], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shared[1 - cond], full[1 - cond], atol=1e-4, rtol=1e-4)


def test_a_batch_without_the_null_caption_has_no_known_cfg_layout(opensora):
    m = model(opensora)
    x = torch.randn(*LATENT, generator=torch.Generator().manual_seed(3))
    two_prompts = torch.cat([caption(m, 1), caption(m, 2)])
    apply_fastattn(m, CompressionPlan([[F, F], [C, C]]))
    with torch.no_grad(), pytest.raises(ValueError, match="has no CFG batch"):
        m.forward(torch.cat([x, x]), torch.tensor([600.0, 600.0]), two_prompts)


def test_spatial_attention_is_compressed_and_a_whole_window_is_full(opensora):
    m, guided = model(opensora), iddpm_forward_with_cfg
    raw = sample(m, guided)
    apply_fastattn(m, CompressionPlan([[F, F], [W, T], [T, W], [W, W]], window_size=0.25))
    assert not torch.allclose(sample(m, guided), raw)
    # WA-RS whose window covers every token recomputes full attention through the adapter's
    # own q/k/v and output projections: the result must be the raw one.
    apply_fastattn(m, CompressionPlan([[F, F]] + [[W, W]] * 3, window_size=1.0))
    torch.testing.assert_close(sample(m, guided), raw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("legacy", [None, True, False], ids=["v1.1.0", "v1.2_legacy", "v1.2"])
def test_projections_follow_the_modules_rotary_and_norm_order(opensora, legacy):
    # The adapter drives only spatial attention, but its projections must match any attention
    # module it is given: the temporal one has a rotary embedding.
    from fastattn.models.adapters.opensora import STDIT_FUSED
    from fastattn.models.adapters.opensora import ProcessorSlot

    m = model(opensora)
    attn = m.blocks[0].attn_temp
    if legacy is not None:
        attn.qk_norm_legacy = legacy
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(5))
    state = StepState(1, window_size=1.0)
    state.on_call(CallInfo(0, 0))
    state.set_step([F], [True], [False])  # a refresh: full attention through the adapter's projections
    proc = FastAttnProcessor(0, state, None, STDIT_FUSED)
    with torch.no_grad():
        torch.testing.assert_close(proc(ProcessorSlot(attn), x), attn(x), atol=1e-5, rtol=1e-5)


def test_tile_window_uses_the_latent_grid_width(opensora):
    # 6 x 8 patches per frame: the tile window's rows are 8 tokens wide, whatever sqrt(48) says.
    from fastattn.models.adapters.opensora import STDIT_FUSED
    from fastattn.models.adapters.opensora import ProcessorSlot

    m = model(opensora)
    attn = m.blocks[0].attn
    x = torch.randn(3, 48, 16, generator=torch.Generator().manual_seed(6))
    state = StepState(1, window_size=0.25, window_shape="tile")
    state.on_call(CallInfo(0, 0, grid=(3, 6, 8)))
    state.set_step([Method.WA], [False], [False])
    proc = FastAttnProcessor(0, state, None, STDIT_FUSED)
    slot = ProcessorSlot(attn)
    with torch.no_grad():
        got = proc(slot, x)
        q, k, v = (t.double() for t in STDIT_FUSED.qkv(slot, x))
        mask = dense_mask(tile_mask_mod(tile_radius(48, 0.25), 8), 48, 48)
        scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
        want = STDIT_FUSED.out(slot, (scores.softmax(-1) @ v).float(), x, torch.float32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_an_installed_version_with_another_interface_is_refused(opensora):
    m = model(opensora)
    del m.blocks[1].attn.proj_drop
    with pytest.raises(ValueError, match=r"blocks\[1\] lacks attn.proj_drop \(installed opensora differs\)"):
        apply_fastattn(m, CompressionPlan.all_full(4, 2))
    m = model(opensora)
    del m.config.patch_size
    with pytest.raises(ValueError, match=r"expected config.patch_size"):
        apply_fastattn(m, CompressionPlan.all_full(4, 2))
