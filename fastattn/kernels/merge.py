"""The WA-RS refresh from two partial attentions over disjoint key sets, merged by log-sum-exp.

Attention over the band keys gives W (the window output) and its log-sum-exp ``lse_w``;
attention over the remaining keys gives X and ``lse_x``. Full attention is their mix
O = a·X + (1 - a)·W with a = sigmoid(lse_x - lse_w) (each part's share of the softmax mass), so

    R = O - W = a·(X - W),    O = W + R.

One elementwise pass writes O and R (Triton on CUDA; torch ops elsewhere). A row with no key
outside the band has lse_x = -inf, a = 0: R = 0 and O = W, whatever X holds.

Tensors are [batch, seq, heads, head_dim] (the layout FlashAttention writes) and the
log-sum-exps [batch, heads, seq] in float32.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path
    triton = None


def merge_refresh_torch(w, lse_w, x, lse_x) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.sigmoid(lse_x.float() - lse_w.float())  # -inf - finite -> 0; both -inf cannot happen (W has its diagonal)
    a = a.transpose(1, 2).unsqueeze(-1)  # [batch, seq, heads, 1]
    r = torch.where(a > 0, a * (x.float() - w.float()), 0.0)
    o = w.float() + r
    return o.to(w.dtype), r.to(w.dtype)


if triton is not None:

    @triton.jit
    def _merge_kernel(w_ptr, x_ptr, lw_ptr, lx_ptr, o_ptr, r_ptr, rows, seq, heads, D,
                      BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (batch, seq, head) rows
        d = tl.arange(0, BLOCK_D)
        live = row < rows
        h = row % heads
        s = (row // heads) % seq
        b = row // (heads * seq)
        lse_at = (b * heads + h) * seq + s  # [batch, heads, seq] layout of the log-sum-exps
        lw = tl.load(lw_ptr + lse_at, mask=live, other=0.0)
        lx = tl.load(lx_ptr + lse_at, mask=live, other=float("-inf"))
        a = tl.where(lx == float("-inf"), 0.0, 1.0 / (1.0 + tl.exp(lw - lx)))
        at = row[:, None] * D + d[None, :]
        m = live[:, None] & (d[None, :] < D)
        w = tl.load(w_ptr + at, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + at, mask=m, other=0.0).to(tl.float32)
        r = tl.where(a[:, None] > 0, a[:, None] * (x - w), 0.0)
        tl.store(r_ptr + at, r.to(r_ptr.dtype.element_ty), mask=m)
        tl.store(o_ptr + at, (w + r).to(o_ptr.dtype.element_ty), mask=m)


def merge_refresh(w, lse_w, x, lse_x) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, R) of the refresh from the band part (w, lse_w) and the off-band part (x, lse_x)."""
    if triton is None or w.device.type != "cuda" or not (w.is_contiguous() and x.is_contiguous()):
        return merge_refresh_torch(w, lse_w, x, lse_x)
    batch, seq, heads, dim = w.shape
    o, r = torch.empty_like(w), torch.empty_like(w)
    rows = batch * seq * heads
    block_rows = 16
    _merge_kernel[(triton.cdiv(rows, block_rows),)](
        w, x, lse_w.contiguous(), lse_x.contiguous(), o, r, rows, seq, heads, dim,
        BLOCK_ROWS=block_rows, BLOCK_D=triton.next_power_of_2(dim))
    return o, r
