"""Triton kernels for the 1-D band window and the WA-RS refresh step.

One program handles a block of queries of one (batch, head) and streams key/value blocks with
an online softmax. Three modes share the code:

* ``window``: only the key blocks that intersect the band ``|q - k| <= w`` are visited;
* ``window + residual``: the same, with the cached residual added in the epilogue, so a WA-RS
  step is one kernel and one write;
* ``refresh``: every key block is visited once for full attention O; the key blocks that
  intersect the band also feed a second accumulator, so the window output W comes from the
  same QK^T and the kernel writes O and R = O - W. The two accumulators split the keys (inside
  the band / outside it) and O adds them at the end, so every block does one P·V product
  except the few band edge blocks, which do two. They share the row's running max, which is
  exact unless a row's band weight falls below 2^-126 of its largest weight; W is then set to
  0 for that row.

Head dims that are not a power of two (DiT and PixArt use 72) are split into a power-of-two
part and a padded remainder (72 = 64 + 16) instead of padding to 128, which would waste 44%
of every product.

Outputs are allocated as [batch, seq, heads, head_dim] and returned as a [batch, heads, seq,
head_dim] view, so merging heads before the output projection is free.
"""

from __future__ import annotations

import math

import torch

from .dispatch import Backend, register

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
    return triton is not None and TRITON.fits(q)


# The band and the refresh (window + residual in one kernel, O and R in one pass).
TRITON = register(Backend("triton", ("window", "refresh"), needs="CUDA, Triton, fp16/bf16 inputs and head_dim >= 16",
                          devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), min_head_dim=16,
                          usable=lambda q, v, kind: triton_available(q)))


if triton is not None:

    @triton.jit
    def _load_kv(ptr, offs_n, offs_d, stride_l, L, D, MASK_N: tl.constexpr, FULL_D: tl.constexpr):
        ptrs = ptr + offs_n[:, None] * stride_l + offs_d[None, :]
        if (not MASK_N) and FULL_D:
            return tl.load(ptrs)
        return tl.load(ptrs, mask=(offs_n[:, None] < L) & (offs_d[None, :] < D), other=0.0)

    @triton.jit
    def _pv(p, v_ptr, offs_n, offs_da, offs_db, stride_vl, L, D, DB: tl.constexpr, MASK_N: tl.constexpr):
        v_a = _load_kv(v_ptr, offs_n, offs_da, stride_vl, L, D, MASK_N, True)
        pv_a = tl.dot(p.to(v_a.dtype), v_a)
        if DB > 0:
            v_b = _load_kv(v_ptr, offs_n, offs_db, stride_vl, L, D, MASK_N, False)
            pv_b = tl.dot(p.to(v_b.dtype), v_b)
        else:
            pv_b = pv_a
        return pv_a, pv_b

    @triton.jit
    def _attend_block(q_a, q_b, k_ptr, v_ptr, n0, offs_m, offs_da, offs_db, skl, svl, L, D, half_width, qk_scale,
                      m_i, l_i, acc_a, acc_b, lw_i, accw_a, accw_b,
                      DB: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, KIND: tl.constexpr):
        """One key block of the online softmax. KIND 0: the main accumulator only, no band mask;
        1: the main accumulator masked to the band (window kernels' edge blocks); 2: the window
        accumulator only, block inside the band for every row; 3: band edge block, split between
        the window accumulator (keys in the band) and the main one (keys outside it)."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_a = _load_kv(k_ptr, offs_n, offs_da, skl, L, D, MASK_N, True)
        s = tl.dot(q_a, tl.trans(k_a))
        if DB > 0:
            k_b = _load_kv(k_ptr, offs_n, offs_db, skl, L, D, MASK_N, False)
            s += tl.dot(q_b, tl.trans(k_b))
        s = s * qk_scale
        if MASK_N:
            s = tl.where(offs_n[None, :] < L, s, float("-inf"))
        in_band = tl.abs(offs_m[:, None] - offs_n[None, :]) <= half_width  # unused (removed) for KIND 0/2
        if KIND == 1:
            s = tl.where(in_band, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        if KIND == 3:
            p_w = tl.where(in_band, p, 0.0)
            p_main = p - p_w
        else:
            p_w = p
            p_main = p
        # The main accumulator: all keys (KIND 0/1), or only the keys outside the band (KIND 2/3:
        # the refresh kernel's band keys go to the window accumulator alone; O adds both).
        l_i = l_i * alpha
        acc_a = acc_a * alpha[:, None]
        if DB > 0:
            acc_b = acc_b * alpha[:, None]
        if KIND != 2:
            l_i += tl.sum(p_main, 1)
            pv_a, pv_b = _pv(p_main, v_ptr, offs_n, offs_da, offs_db, svl, L, D, DB, MASK_N)
            acc_a += pv_a
            if DB > 0:
                acc_b += pv_b
        if KIND >= 2:
            lw_i = lw_i * alpha + tl.sum(p_w, 1)
            pw_a, pw_b = _pv(p_w, v_ptr, offs_n, offs_da, offs_db, svl, L, D, DB, MASK_N)
            accw_a = accw_a * alpha[:, None] + pw_a
            if DB > 0:
                accw_b = accw_b * alpha[:, None] + pw_b
        return m_new, l_i, acc_a, acc_b, lw_i, accw_a, accw_b

    @triton.jit
    def _band_kernel(
        Q, K, V, O, R, RES,
        sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, srb, srh, srl, sxb, sxh, sxl,
        H, L, half_width, qk_scale,
        D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, MASK_N: tl.constexpr,
        DBP: tl.constexpr, EDGE: tl.constexpr, INNER: tl.constexpr,
    ):
        # DBP: the second head-dim part's width (16 when unused); EDGE / INNER: the block kinds of
        # band edge and interior blocks for this mode (see _attend_block). MASK_N: L % BLOCK_N != 0.
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_da = tl.arange(0, DA)
        offs_db = DA + tl.arange(0, DBP)
        q_ptr = Q + b * sqb + h * sqh
        k_ptr = K + b * skb + h * skh
        v_ptr = V + b * svb + h * svh

        q_a = tl.load(q_ptr + offs_m[:, None] * sql + offs_da[None, :], mask=offs_m[:, None] < L, other=0.0)
        if DB > 0:
            q_b = tl.load(q_ptr + offs_m[:, None] * sql + offs_db[None, :],
                          mask=(offs_m[:, None] < L) & (offs_db[None, :] < D), other=0.0)
        else:
            q_b = q_a

        # Key blocks intersecting the band [m0 - w, m0 + BLOCK_M - 1 + w], and among them the
        # interior ones, inside the band for every row and wholly below L (no masks at all).
        band_lo = tl.maximum(m0 - half_width, 0) // BLOCK_N * BLOCK_N
        band_end = tl.cdiv(tl.minimum(m0 + BLOCK_M + half_width, L), BLOCK_N) * BLOCK_N
        inner_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 - half_width, 0), BLOCK_N) * BLOCK_N
        inner_lo = tl.minimum(tl.maximum(inner_lo, band_lo), band_end)
        inner_hi = tl.minimum((m0 + half_width + 1) // BLOCK_N * BLOCK_N, L // BLOCK_N * BLOCK_N)
        inner_hi = tl.maximum(inner_hi, inner_lo)

        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc_a = tl.zeros([BLOCK_M, DA], tl.float32)
        acc_b = tl.zeros([BLOCK_M, DBP], tl.float32)
        lw_i = tl.zeros([BLOCK_M], tl.float32)
        accw_a = tl.zeros([BLOCK_M, DA], tl.float32)
        accw_b = tl.zeros([BLOCK_M, DBP], tl.float32)

        if MODE == 2:  # full attention left of the band
            for n0 in range(0, band_lo, BLOCK_N):
                m_i, l_i, acc_a, acc_b, lw_i, accw_a, accw_b = _attend_block(
                    q_a, q_b, k_ptr, v_ptr, n0, offs_m, offs_da, offs_db, skl, svl, L, D, half_width, qk_scale,
                    m_i, l_i, acc_a, acc_b, lw_i, accw_a, accw_b, DB, BLOCK_N, False, 0)
        for n0 in range(band_lo, inner_lo, BLOCK_N):
            m_i, l_i, acc_a, acc_b, lw_i, accw_a, accw_b = _attend_block(
                q_a, q_b, k_ptr, v_ptr, n0, offs_m, offs_da, offs_db, skl, svl, L, D, half_width, qk_scale,
                m_i, l_i, acc_a, acc_b, lw_i, accw_a, accw_b, DB, BLOCK_N, MASK_N, EDGE)
        for n0 in range(inner_lo, inner_hi, BLOCK_N):
            m_i, l_i, acc_a, acc_b, lw_i, accw_a, accw_b = _attend_block(
                q_a, q_b, k_ptr, v_ptr, n0, offs_m, offs_da, offs_db, skl, svl, L, D, half_width, qk_scale,
                m_i, l_i, acc_a, acc_b, lw_i, accw_a, accw_b, DB, BLOCK_N, False, INNER)
        for n0 in range(inner_hi, band_end, BLOCK_N):
            m_i, l_i, acc_a, acc_b, lw_i, accw_a, accw_b = _attend_block(
                q_a, q_b, k_ptr, v_ptr, n0, offs_m, offs_da, offs_db, skl, svl, L, D, half_width, qk_scale,
                m_i, l_i, acc_a, acc_b, lw_i, accw_a, accw_b, DB, BLOCK_N, MASK_N, EDGE)
        m_band = m_i
        if MODE == 2:  # right of the band: the window accumulators are final (W = acc_w / l_w
            # does not depend on which running max they are relative to)
            for n0 in range(band_end, L, BLOCK_N):
                m_i, l_i, acc_a, acc_b, lw_i, accw_a, accw_b = _attend_block(
                    q_a, q_b, k_ptr, v_ptr, n0, offs_m, offs_da, offs_db, skl, svl, L, D, half_width, qk_scale,
                    m_i, l_i, acc_a, acc_b, lw_i, accw_a, accw_b, DB, BLOCK_N, MASK_N, 0)

        if MODE == 2:
            # acc holds the keys outside the band relative to the final max; acc_w the band keys
            # relative to the max when the band ended (m_band): rescale before adding.
            c = tl.exp2(m_band - m_i)
            l_all = l_i + c * lw_i
            o_a = (acc_a + c[:, None] * accw_a) / l_all[:, None]
            o_b = (acc_b + c[:, None] * accw_b) / l_all[:, None]
        else:
            o_a = acc_a / l_i[:, None]
            o_b = acc_b / l_i[:, None]
        row_ok = offs_m[:, None] < L
        col_b_ok = row_ok & (offs_db[None, :] < D)
        if MODE == 1:
            res_ptr = RES + b * sxb + h * sxh + offs_m[:, None] * sxl
            o_a += tl.load(res_ptr + offs_da[None, :], mask=row_ok, other=0.0).to(tl.float32)
            if DB > 0:
                o_b += tl.load(res_ptr + offs_db[None, :], mask=col_b_ok, other=0.0).to(tl.float32)
        o_ptr = O + b * sob + h * soh + offs_m[:, None] * sol
        tl.store(o_ptr + offs_da[None, :], o_a.to(O.dtype.element_ty), mask=row_ok)
        if DB > 0:
            tl.store(o_ptr + offs_db[None, :], o_b.to(O.dtype.element_ty), mask=col_b_ok)
        if MODE == 2:
            safe_lw = tl.where(lw_i > 0, lw_i, 1.0)
            r_ptr = R + b * srb + h * srh + offs_m[:, None] * srl
            r_a = o_a - accw_a / safe_lw[:, None]
            tl.store(r_ptr + offs_da[None, :], r_a.to(R.dtype.element_ty), mask=row_ok)
            if DB > 0:
                r_b = o_b - accw_b / safe_lw[:, None]
                tl.store(r_ptr + offs_db[None, :], r_b.to(R.dtype.element_ty), mask=col_b_ok)


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
        MASK_N=(l % cfg["BLOCK_N"] != 0), DBP=db or 16, EDGE=3 if mode == MODE_REFRESH else 1,
        INNER=2 if mode == MODE_REFRESH else 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return o, r


def triton_window(q, k, v, half_width: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Band attention, plus ``residual`` when given (the WA-RS step in one kernel)."""
    mode = MODE_WINDOW if residual is None else MODE_WINDOW_RESIDUAL
    return _launch(q, k, v, half_width, mode, residual)[0]


def triton_refresh(q, k, v, half_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, R): full attention and the residual O - W from one pass over the keys."""
    return _launch(q, k, v, half_width, MODE_REFRESH)
