"""Triton kernels for the 1-D band window and the WA-RS refresh step.

One program handles a block of queries of one (batch, head) and streams key/value blocks with
an online softmax. Three modes share the code:

* ``window``: only the key blocks that intersect the band ``|q - k| <= w`` are visited;
* ``window + residual``: the same, with the cached residual added in the epilogue, so a WA-RS
  step is one kernel and one write;
* ``refresh``: every key block is visited once for full attention O; the key blocks that
  intersect the band also feed a second accumulator, so the window output W comes from the
  same QK^T and the kernel writes O and R = O - W. Inside the band's interior blocks the two
  accumulators receive the same P·V product (the band's softmax shares the row's running
  max), so only the few edge blocks do extra work. Sharing the max is exact unless a row's
  band weight falls below 2^-126 of its largest weight; W is then set to 0 for that row.

Head dims that are not a power of two (DiT and PixArt use 72) are split into a power-of-two
part and a padded remainder (72 = 64 + 16) instead of padding to 128, which would waste 44%
of every product.

Outputs are allocated as [batch, seq, heads, head_dim] and returned as a [batch, heads, seq,
head_dim] view, so merging heads before the output projection is free.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton use the SDPA paths
    triton = None

MODE_WINDOW, MODE_WINDOW_RESIDUAL, MODE_REFRESH = 0, 1, 2


def head_dim_split(head_dim: int) -> tuple[int, int]:
    """(DA, DB): a power-of-two part and a power-of-two padded remainder (0 if none)."""
    if head_dim < 16:
        raise ValueError(f"triton band kernel needs head_dim >= 16, got {head_dim}")
    da = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - da
    db = 0 if rest == 0 else max(16, 1 << (rest - 1).bit_length())
    return da, db


def triton_available(q: torch.Tensor) -> bool:
    return triton is not None and q.device.type == "cuda" and q.shape[-1] >= 16 and q.dtype in (
        torch.float16, torch.bfloat16)


if triton is not None:

    @triton.jit
    def _load_kv(ptr, offs_n, offs_d, stride_l, L, D, EVEN_N: tl.constexpr, FULL_D: tl.constexpr):
        ptrs = ptr + offs_n[:, None] * stride_l + offs_d[None, :]
        if EVEN_N and FULL_D:
            return tl.load(ptrs)
        return tl.load(ptrs, mask=(offs_n[:, None] < L) & (offs_d[None, :] < D), other=0.0)

    @triton.jit
    def _scores(q_a, q_b, k_ptr, offs_n, offs_da, offs_db, stride_kl, L, D,
                DB: tl.constexpr, EVEN_N: tl.constexpr):
        k_a = _load_kv(k_ptr, offs_n, offs_da, stride_kl, L, D, EVEN_N, True)
        s = tl.dot(q_a, tl.trans(k_a))
        if DB > 0:
            k_b = _load_kv(k_ptr, offs_n, offs_db, stride_kl, L, D, EVEN_N, False)
            s += tl.dot(q_b, tl.trans(k_b))
        return s

    @triton.jit
    def _pv(p, v_ptr, offs_n, offs_da, offs_db, stride_vl, L, D, DB: tl.constexpr, EVEN_N: tl.constexpr):
        v_a = _load_kv(v_ptr, offs_n, offs_da, stride_vl, L, D, EVEN_N, True)
        pv_a = tl.dot(p.to(v_a.dtype), v_a)
        if DB > 0:
            v_b = _load_kv(v_ptr, offs_n, offs_db, stride_vl, L, D, EVEN_N, False)
            pv_b = tl.dot(p.to(v_b.dtype), v_b)
        else:
            pv_b = pv_a
        return pv_a, pv_b

    @triton.jit
    def _band_kernel(
        Q, K, V, O, R, RES,
        sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, srb, srh, srl, sxb, sxh, sxl,
        H, L, half_width, qk_scale,
        D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, EVEN_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_da = tl.arange(0, DA)
        offs_db = DA + tl.arange(0, DB if DB > 0 else 16)
        q_ptr = Q + b * sqb + h * sqh
        k_ptr = K + b * skb + h * skh
        v_ptr = V + b * svb + h * svh

        q_a = tl.load(q_ptr + offs_m[:, None] * sql + offs_da[None, :], mask=offs_m[:, None] < L, other=0.0)
        if DB > 0:
            q_b = tl.load(q_ptr + offs_m[:, None] * sql + offs_db[None, :],
                          mask=(offs_m[:, None] < L) & (offs_db[None, :] < D), other=0.0)
        else:
            q_b = q_a

        # Key blocks intersecting the band [m0 - w, m0 + BLOCK_M - 1 + w].
        band_lo = tl.maximum(m0 - half_width, 0) // BLOCK_N * BLOCK_N
        band_hi = tl.minimum(m0 + BLOCK_M + half_width, L)

        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc_a = tl.zeros([BLOCK_M, DA], tl.float32)
        acc_b = tl.zeros([BLOCK_M, DB if DB > 0 else 16], tl.float32)

        if MODE == 2:
            # Full-attention blocks left of the band: one accumulator.
            for n0 in range(0, band_lo, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                s = _scores(q_a, q_b, k_ptr, offs_n, offs_da, offs_db, skl, L, D, DB, True) * qk_scale
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                pv_a, pv_b = _pv(p, v_ptr, offs_n, offs_da, offs_db, svl, L, D, DB, True)
                acc_a = acc_a * alpha[:, None] + pv_a
                if DB > 0:
                    acc_b = acc_b * alpha[:, None] + pv_b
                m_i = m_new
            # Band blocks: both accumulators, sharing the running max.
            lw_i = tl.zeros([BLOCK_M], tl.float32)
            accw_a = tl.zeros([BLOCK_M, DA], tl.float32)
            accw_b = tl.zeros([BLOCK_M, DB if DB > 0 else 16], tl.float32)
            for n0 in range(band_lo, band_hi, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                s = _scores(q_a, q_b, k_ptr, offs_n, offs_da, offs_db, skl, L, D, DB, EVEN_N) * qk_scale
                if not EVEN_N:
                    s = tl.where(offs_n[None, :] < L, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                in_band = tl.abs(offs_m[:, None] - offs_n[None, :]) <= half_width
                p_w = tl.where(in_band, p, 0.0)
                l_i = l_i * alpha + tl.sum(p, 1)
                lw_i = lw_i * alpha + tl.sum(p_w, 1)
                pv_a, pv_b = _pv(p, v_ptr, offs_n, offs_da, offs_db, svl, L, D, DB, EVEN_N)
                acc_a = acc_a * alpha[:, None] + pv_a
                if DB > 0:
                    acc_b = acc_b * alpha[:, None] + pv_b
                # Blocks wholly inside the band for every query row reuse P·V.
                interior = (n0 >= m0 + BLOCK_M - 1 - half_width) & (n0 + BLOCK_N - 1 <= m0 + half_width)
                if interior:
                    pw_a, pw_b = pv_a, pv_b
                else:
                    pw_a, pw_b = _pv(p_w, v_ptr, offs_n, offs_da, offs_db, svl, L, D, DB, EVEN_N)
                accw_a = accw_a * alpha[:, None] + pw_a
                if DB > 0:
                    accw_b = accw_b * alpha[:, None] + pw_b
                m_i = m_new
            # Blocks right of the band: the window accumulators are final (W = acc_w / l_w
            # does not depend on which max they are relative to).
            for n0 in range(band_hi // BLOCK_N * BLOCK_N + (BLOCK_N if band_hi % BLOCK_N else 0), L, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                s = _scores(q_a, q_b, k_ptr, offs_n, offs_da, offs_db, skl, L, D, DB, EVEN_N) * qk_scale
                if not EVEN_N:
                    s = tl.where(offs_n[None, :] < L, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                pv_a, pv_b = _pv(p, v_ptr, offs_n, offs_da, offs_db, svl, L, D, DB, EVEN_N)
                acc_a = acc_a * alpha[:, None] + pv_a
                if DB > 0:
                    acc_b = acc_b * alpha[:, None] + pv_b
                m_i = m_new
            safe_lw = tl.where(lw_i > 0, lw_i, 1.0)
            r_a = acc_a / l_i[:, None] - accw_a / safe_lw[:, None]
            r_b = acc_b / l_i[:, None] - accw_b / safe_lw[:, None]
        else:
            for n0 in range(band_lo, band_hi, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                s = _scores(q_a, q_b, k_ptr, offs_n, offs_da, offs_db, skl, L, D, DB, EVEN_N) * qk_scale
                keep = tl.abs(offs_m[:, None] - offs_n[None, :]) <= half_width
                if not EVEN_N:
                    keep = keep & (offs_n[None, :] < L)
                s = tl.where(keep, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                pv_a, pv_b = _pv(p, v_ptr, offs_n, offs_da, offs_db, svl, L, D, DB, EVEN_N)
                acc_a = acc_a * alpha[:, None] + pv_a
                if DB > 0:
                    acc_b = acc_b * alpha[:, None] + pv_b
                m_i = m_new

        o_a = acc_a / l_i[:, None]
        o_b = acc_b / l_i[:, None]
        row_ok = offs_m[:, None] < L
        if MODE == 1:
            res_ptr = RES + b * sxb + h * sxh + offs_m[:, None] * sxl
            o_a += tl.load(res_ptr + offs_da[None, :], mask=row_ok, other=0.0).to(tl.float32)
            if DB > 0:
                o_b += tl.load(res_ptr + offs_db[None, :], mask=row_ok & (offs_db[None, :] < D),
                               other=0.0).to(tl.float32)
        o_ptr = O + b * sob + h * soh + offs_m[:, None] * sol
        tl.store(o_ptr + offs_da[None, :], o_a.to(O.dtype.element_ty), mask=row_ok)
        if DB > 0:
            tl.store(o_ptr + offs_db[None, :], o_b.to(O.dtype.element_ty), mask=row_ok & (offs_db[None, :] < D))
        if MODE == 2:
            r_ptr = R + b * srb + h * srh + offs_m[:, None] * srl
            tl.store(r_ptr + offs_da[None, :], r_a.to(R.dtype.element_ty), mask=row_ok)
            if DB > 0:
                tl.store(r_ptr + offs_db[None, :], r_b.to(R.dtype.element_ty),
                         mask=row_ok & (offs_db[None, :] < D))


# Tile sizes per mode, chosen by the kernel sweep on an H200 (experiments/benchmark.py).
DEFAULT_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
_configs: dict[int, dict] = {}


def set_kernel_config(mode: int, **config) -> None:
    """Override tile sizes for a mode (used by the benchmark's tuning sweep)."""
    _configs[mode] = {**DEFAULT_CONFIG, **config}


def _empty_like_bhld(q: torch.Tensor) -> torch.Tensor:
    b, h, l, d = q.shape
    return torch.empty(b, l, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)


def _launch(q, k, v, half_width: int, mode: int, residual=None):
    b, h, l, d = q.shape
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"triton band kernel needs a contiguous last dim for {name}")
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    da, db = head_dim_split(d)
    cfg = _configs.get(mode, DEFAULT_CONFIG)
    o = _empty_like_bhld(q)
    r = _empty_like_bhld(q) if mode == MODE_REFRESH else o
    x = residual if residual is not None else o
    grid = (triton.cdiv(l, cfg["BLOCK_M"]), b * h)
    _band_kernel[grid](
        q, k, v, o, r, x,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *r.stride()[:3], *x.stride()[:3],
        h, l, half_width, math.log2(math.e) / math.sqrt(d),
        D=d, DA=da, DB=db, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], MODE=mode,
        EVEN_N=(l % cfg["BLOCK_N"] == 0), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return o, r


def triton_window(q, k, v, half_width: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Band attention, plus ``residual`` when given (the WA-RS step in one kernel)."""
    mode = MODE_WINDOW if residual is None else MODE_WINDOW_RESIDUAL
    return _launch(q, k, v, half_width, mode, residual)[0]


def triton_refresh(q, k, v, half_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, R): full attention and the residual O - W from one pass over the keys."""
    return _launch(q, k, v, half_width, MODE_REFRESH)
