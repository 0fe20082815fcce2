"""Synthetic head-wise rows at a chosen attention sparsity: what the head-wise benchmark and the
arrow probe time."""

from __future__ import annotations

from fastattn.headwise.methods import CACHE, FULL, HeadMethod, arrow


def layer_sparsity(methods: list[HeadMethod], image_len: int, text_len: int) -> float:
    seq = image_len + text_len
    return 1 - sum(m.pairs(image_len, text_len) for m in methods) / (len(methods) * seq * seq)


def synthetic_row(heads: int, target: float, mode: str, window: float, image_len: int, text_len: int):
    """Head methods of one layer whose attention sparsity is as close to ``target`` as heads allow."""
    best = None
    for n_cache in range(heads + 1):
        for n_arrow in range(heads - n_cache + 1):
            if (mode == "cache" and n_arrow) or (mode == "arrow" and n_cache):
                continue
            row = [CACHE] * n_cache + [arrow(window)] * n_arrow + [FULL] * (heads - n_cache - n_arrow)
            gap = abs(layer_sparsity(row, image_len, text_len) - target)
            balance = abs(n_cache - n_arrow) if mode == "mixed" else 0
            if best is None or (gap, balance) < best[0]:
                best = ((gap, balance), row)
    return best[1]
