"""The head-wise method vocabulary of DiTFastAttnV2: what one head does at one step.

- ``full``         the head's own attention over the whole joint sequence.
- ``cache``        head-wise caching: the head's output from the previous step, no attention.
- ``arrow:<f>``    arrow attention whose image-image band keeps the fraction ``f`` of the image
                   tokens on each side of a query (text rows and columns stay full). ``f`` is the
                   layer-wise ``window_size`` convention (flash-attn's window_size): the paper's
                   1/8 is 0.125. Head-wise plans of schema 2 stored the whole band's width, twice
                   this (:data:`fastattn.headwise.plan.HEAD_SCHEMA_WHOLE_BAND`).
- ``cfg``          CFG sharing: full attention on the conditional half of the CFG batch, copied
                   to the unconditional half (half the work; pipelines with a CFG batch only).
- ``arrow+rs:<f>`` arrow attention with residual sharing (the V2 paper's ablation): the arrow
                   output plus the head's residual full - arrow cached at its last ``full`` step.

Plans store the short strings; code uses :class:`HeadMethod`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels.arrow import arrow_pairs
from ..kernels.masks import window_half_width

# Significant digits a method's string keeps of its fraction: seven, so that a schema 2 fraction
# (six digits, the whole band) halved to the fraction on each side is still exact.
FRACTION_DIGITS = 7


@dataclass(frozen=True)
class HeadMethod:
    kind: str
    fraction: float | None = None  # arrow, arrow+rs: of the image tokens on each side of a query

    @classmethod
    def parse(cls, value: "str | HeadMethod", where: str = "head method", whole_band: bool = False) -> "HeadMethod":
        """A head method from its short string; ``whole_band``: the string's fraction is the whole
        band's width (schema 2 plans, older latency tables), halved to the fraction on each side."""
        if isinstance(value, HeadMethod):
            return value
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string like 'full', 'cache' or 'arrow:0.125', got {value!r}")
        kind, _, arg = value.partition(":")
        if kind in ("full", "cache", "cfg") and not arg:
            return cls(kind)
        if kind in ("arrow", "arrow+rs"):
            try:
                fraction = float(arg)
            except ValueError:
                raise ValueError(f"{where}: {value!r} needs a window fraction, e.g. '{kind}:0.125'") from None
            if whole_band:
                fraction /= 2  # exact in binary: the same band as before
            if not 0 < fraction <= 1:
                raise ValueError(f"{where}: window fraction of {value!r} must be in (0, {2 if whole_band else 1}]")
            return cls(kind, fraction)
        raise ValueError(f"{where}: unknown head method {value!r} "
                         "(known: full, cache, cfg, arrow:<fraction>, arrow+rs:<fraction>)")

    @property
    def computes(self) -> bool:
        return self.kind != "cache"

    @property
    def shares_residual(self) -> bool:
        """Adds the residual cached at the head's last full step (``arrow+rs``)."""
        return self.kind == "arrow+rs"

    def half_width(self, image_len: int) -> int:
        """Band half-width over the image tokens; full attention is a band covering all of them."""
        if self.kind in ("full", "cfg"):
            return max(image_len - 1, 0)
        if self.fraction is not None:
            return window_half_width(image_len, self.fraction)
        raise ValueError("a cached head has no attention window")

    def pairs(self, image_len: int, text_len: int) -> int:
        """(query, key) pairs this head attends per sample: its share of the attention work."""
        if self.kind == "cache":
            return 0
        pairs = arrow_pairs(image_len, text_len, self.half_width(image_len))
        return pairs // 2 if self.kind == "cfg" else pairs  # one sample of each CFG pair

    def __str__(self) -> str:
        return self.kind if self.fraction is None else f"{self.kind}:{self.fraction:.{FRACTION_DIGITS}g}"


FULL = HeadMethod("full")
CACHE = HeadMethod("cache")
CFG = HeadMethod("cfg")


def arrow(fraction: float) -> HeadMethod:
    """Arrow attention keeping ``fraction`` of the image tokens on each side of a query."""
    return HeadMethod.parse(str(HeadMethod("arrow", fraction)))


def arrow_rs(fraction: float) -> HeadMethod:
    """Arrow attention with residual sharing at window ``fraction``."""
    return HeadMethod.parse(str(HeadMethod("arrow+rs", fraction)))
