"""Latency of one head under each method, for the search's objective.

Measured on the device by ``experiments/benchmark_headwise.py`` (it writes ``latency_table.json``)
or, without a measurement, the analytic fallback: the share of (query, key) pairs the method
attends, so full = 1, cache = 0 and an arrow head costs its mask's density. An ``arrow+rs`` head
without a measurement of its own costs what its arrow costs.
"""

from __future__ import annotations

import json
from pathlib import Path

from .methods import HeadMethod


class LatencyTable:
    def __init__(self, measured: dict[str, float] | None = None, source: str = "analytic"):
        self.measured = {str(HeadMethod.parse(k, "latency table")): float(v) for k, v in (measured or {}).items()}
        self.source = source

    @classmethod
    def load(cls, path) -> "LatencyTable":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latency table not found: {path}")
        data = json.loads(path.read_text())
        if not isinstance(data.get("relative_latency"), dict):
            raise ValueError(f"{path}: missing object 'relative_latency' (method -> latency relative to full)")
        return cls(data["relative_latency"], source=str(path))

    def cost(self, method: HeadMethod, image_len: int, text_len: int) -> float:
        key = str(method)
        if key in self.measured:
            return self.measured[key]
        if method.shares_residual and f"arrow:{method.fraction:g}" in self.measured:
            return self.measured[f"arrow:{method.fraction:g}"]  # the same kernel, plus one add
        seq = image_len + text_len
        return method.pairs(image_len, text_len) / (seq * seq)
