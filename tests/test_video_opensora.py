"""Open-Sora 1.1 STDiT2 adapter, against a stand-in ``opensora`` package with the same interface
(the real one is not a test dependency): it activates only when importable, checks the interface
when applied, compresses spatial attention, and counts steps through ``model.forward`` calls."""

import sys
import textwrap

import pytest
import torch

from fastattn import CompressionPlan, Method, apply_fastattn, remove_fastattn

F, W, T = Method.FULL, Method.WARS, Method.AST

STAND_IN = textwrap.dedent('''
    import torch
    from torch import nn


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
            q, k = self.q_norm(q), self.k_norm(k)
            if self.rope:
                q, k = self.rotary_emb(q), self.rotary_emb(k)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, c)))


    class STDiT2Block(nn.Module):
        def __init__(self, dim, heads, frames, tokens):
            super().__init__()
            self.d_t, self.d_s = frames, tokens
            self.attn = Attention(dim, heads)
            self.attn_temp = Attention(dim, heads, rope=lambda t: t.flip(-1))

        def forward(self, x):
            b = x.shape[0]
            s = self.attn(x.reshape(b * self.d_t, self.d_s, -1)).reshape(b, self.d_t * self.d_s, -1)
            x = x + s
            xt = x.reshape(b, self.d_t, self.d_s, -1).transpose(1, 2).reshape(b * self.d_s, self.d_t, -1)
            t = self.attn_temp(xt).reshape(b, self.d_s, self.d_t, -1).transpose(1, 2).reshape(b, -1, x.shape[-1])
            return x + t


    class STDiT2(nn.Module):
        def __init__(self, channels=4, dim=16, heads=2, depth=2, frames=3, tokens=8):
            super().__init__()
            self.embed, self.out = nn.Linear(channels, dim), nn.Linear(dim, channels)
            self.time, self.text = nn.Linear(1, dim), nn.Linear(dim, dim)
            self.blocks = nn.ModuleList(STDiT2Block(dim, heads, frames, tokens) for _ in range(depth))

        def forward(self, x, timestep, y, mask=None):
            b, c = x.shape[:2]
            h = self.embed(x.flatten(2).transpose(1, 2))
            h = h + self.time(timestep.float()[:, None, None] / 1000) + self.text(y).mean(1, keepdim=True)
            for block in self.blocks:
                h = block(h)
            return self.out(h).transpose(1, 2).reshape(x.shape)
''')


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


def forward_with_cfg(model, x, t, y, y_null, scale=7.0):
    """Open-Sora's IDDPM pattern: one CFG batch [cond, uncond] through model.forward (no hooks)."""
    out = model.forward(torch.cat([x, x]), t.expand(2), torch.cat([y, y_null]))
    cond, uncond = out.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def sample(model, steps=4):
    g = torch.Generator().manual_seed(0)
    x, y, y_null = torch.randn(1, 4, 3, 2, 4, generator=g), torch.randn(1, 5, 16, generator=g), torch.zeros(1, 5, 16)
    for t in torch.linspace(900, 100, steps):
        x = x - 0.1 * forward_with_cfg(model, x, t.reshape(1), y, y_null)
    return x


def model(opensora):
    torch.manual_seed(0)
    return opensora.STDiT2().eval()


def test_without_opensora_the_error_says_what_to_install():
    class STDiT2(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="needs the Open-Sora package importable"):
        apply_fastattn(STDiT2(), CompressionPlan.all_full(2, 2))


def test_all_full_is_bit_identical_and_removal_restores_the_modules(opensora):
    m = model(opensora)
    raw = sample(m)
    handle = apply_fastattn(m, CompressionPlan.all_full(4, 2))
    assert torch.equal(sample(m), raw)
    assert handle.state.step == 3 and handle.counter.calls == 4  # model.forward calls counted, once each
    remove_fastattn(m)
    assert all("forward" not in b.attn.__dict__ for b in m.blocks) and "forward" not in m.__dict__
    assert torch.equal(sample(m), raw)


def test_spatial_attention_is_compressed_and_a_whole_window_is_full(opensora):
    m = model(opensora)
    raw = sample(m)
    apply_fastattn(m, CompressionPlan([[F, F], [W, T], [T, W], [W, W]], window_fraction=0.25))
    assert not torch.allclose(sample(m), raw)
    # WA-RS whose window covers every token recomputes full attention through the adapter's
    # own q/k/v and output projections: the result must be the raw one.
    apply_fastattn(m, CompressionPlan([[F, F]] + [[W, W]] * 3, window_fraction=2.0))
    torch.testing.assert_close(sample(m), raw, atol=1e-5, rtol=1e-5)


def test_an_installed_version_with_another_interface_is_refused(opensora):
    m = model(opensora)
    del m.blocks[1].attn.proj_drop
    with pytest.raises(ValueError, match=r"blocks\[1\] lacks attn.proj_drop \(installed opensora differs\)"):
        apply_fastattn(m, CompressionPlan.all_full(4, 2))
