"""Latency of one head under each method, for the search's objective.

Measured on the device by ``experiments/benchmark_headwise.py`` (it writes ``latency_table.json``)
or, without a measurement, the analytic fallback: the share of (query, key) pairs the method
attends, so full = 1, cache = 0 and an arrow head costs its mask's density. An ``arrow+rs`` head
without a measurement of its own costs what its arrow costs.

A table's keys are head methods (``arrow:0.0625``: 1/16 of the image tokens on each side of a
query); a table says so with ``"arrow_fraction": "each_side"``. Tables without it were measured
when an arrow's fraction was the whole band's width, and are read with each fraction halved.
"""

from __future__ import annotations

import math

from ..utils.io import read_json
from .methods import FRACTION_DIGITS, HeadMethod

MAX_TABLE_BYTES = 2**20  # a measured table is well under 1 KiB: anything near this is not one
# The key a table records its arrow fractions' convention under, and the conventions: each side of
# a query (as plans of schema 4), or the whole band (tables without the key).
ARROW_FRACTION_KEY = "arrow_fraction"
ARROW_FRACTIONS = ("each_side", "whole_band")


def _cost(key: str, value) -> float:
    """``value`` as the cost of method ``key``: a finite number > 0; a cached head (no attention) may cost 0."""
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not number or value < 0 or (value == 0 and key != "cache"):
        bound = ">= 0" if key == "cache" else "> 0"
        raise ValueError(f"relative_latency[{key!r}] must be a finite number {bound}, got {value!r}")
    return float(value)


class LatencyTable:
    def __init__(self, measured: dict[str, float] | None = None, source: str = "analytic", whole_band: bool = False):
        """``measured``: method -> latency relative to full; ``whole_band``: its arrow fractions are
        the whole band's width (tables without ``arrow_fraction``), halved on reading."""
        self.measured: dict[str, float] = {}
        keys: dict[str, str] = {}  # method -> the key that named it: two keys for one method are refused
        for key, value in (measured or {}).items():
            method = str(HeadMethod.parse(key, f"relative_latency[{key!r}]", whole_band))
            if method in keys:
                raise ValueError(f"relative_latency: keys {keys[method]!r} and {key!r} are both {method!r} "
                                 f"(methods keep {FRACTION_DIGITS} significant digits of a window fraction)")
            keys[method], self.measured[method] = key, _cost(key, value)
        self.source = source

    @classmethod
    def load(cls, path) -> "LatencyTable":
        """A measured table (``relative_latency``: method -> latency relative to full, and
        ``arrow_fraction``: see the module docstring); every cost is checked, and one-line errors
        name the file and the key."""
        data = read_json(path, "latency table", MAX_TABLE_BYTES)
        if not isinstance(data, dict) or not isinstance(data.get("relative_latency"), dict):
            raise ValueError(f"{path}: missing object 'relative_latency' (method -> latency relative to full)")
        convention = data.get(ARROW_FRACTION_KEY, "whole_band")
        if convention not in ARROW_FRACTIONS:
            raise ValueError(f"{path}: {ARROW_FRACTION_KEY} must be one of {', '.join(ARROW_FRACTIONS)}, "
                             f"got {convention!r}")
        try:
            return cls(data["relative_latency"], source=str(path), whole_band=convention == "whole_band")
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def cost(self, method: HeadMethod, image_len: int, text_len: int) -> float:
        key = str(method)
        if key in self.measured:
            return self.measured[key]
        if method.shares_residual:  # without its own measurement: its arrow's, the same kernel plus one add
            arrow_key = str(HeadMethod("arrow", method.fraction))
            if arrow_key in self.measured:
                return self.measured[arrow_key]
        seq = image_len + text_len
        return method.pairs(image_len, text_len) / (seq * seq)
