"""Latency of one head under each method, for the search's objective.

Measured on the device by ``experiments/benchmark_headwise.py`` (it writes ``latency_table.json``)
or, without a measurement, the analytic fallback: the share of (query, key) pairs the method
attends, so full = 1, cache = 0 and an arrow head costs its mask's density. An ``arrow+rs`` head
without a measurement of its own costs what its arrow costs.
"""

from __future__ import annotations

import math

from ..utils.io import read_json
from .methods import HeadMethod

MAX_TABLE_BYTES = 2**20  # a measured table is well under 1 KiB: anything near this is not one


def _cost(key: str, value) -> float:
    """``value`` as the cost of method ``key``: a finite number > 0; a cached head (no attention) may cost 0."""
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not number or value < 0 or (value == 0 and key != "cache"):
        bound = ">= 0" if key == "cache" else "> 0"
        raise ValueError(f"relative_latency[{key!r}] must be a finite number {bound}, got {value!r}")
    return float(value)


class LatencyTable:
    def __init__(self, measured: dict[str, float] | None = None, source: str = "analytic"):
        self.measured: dict[str, float] = {}
        keys: dict[str, str] = {}  # method -> the key that named it: two keys for one method are refused
        for key, value in (measured or {}).items():
            method = str(HeadMethod.parse(key, f"relative_latency[{key!r}]"))
            if method in keys:
                raise ValueError(f"relative_latency: keys {keys[method]!r} and {key!r} are both {method!r} "
                                 "(methods keep 6 significant digits of a window fraction)")
            keys[method], self.measured[method] = key, _cost(key, value)
        self.source = source

    @classmethod
    def load(cls, path) -> "LatencyTable":
        """A measured table (``relative_latency``: method -> latency relative to full); every cost
        is checked, and one-line errors name the file and the key."""
        data = read_json(path, "latency table", MAX_TABLE_BYTES)
        if not isinstance(data, dict) or not isinstance(data.get("relative_latency"), dict):
            raise ValueError(f"{path}: missing object 'relative_latency' (method -> latency relative to full)")
        try:
            return cls(data["relative_latency"], source=str(path))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def cost(self, method: HeadMethod, image_len: int, text_len: int) -> float:
        key = str(method)
        if key in self.measured:
            return self.measured[key]
        if method.shares_residual and f"arrow:{method.fraction:g}" in self.measured:
            return self.measured[f"arrow:{method.fraction:g}"]  # the same kernel, plus one add
        seq = image_len + text_len
        return method.pairs(image_len, text_len) / (seq * seq)
