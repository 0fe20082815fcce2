"""The head-wise method vocabulary of DiTFastAttnV2: what one head does at one step.

- ``full``         the head's own attention over the whole joint sequence.
- ``cache``        head-wise caching: the head's output from the previous step, no attention.
- ``arrow:<f>``    arrow attention whose image-image band covers the fraction ``f`` of the image
                   tokens (text rows and columns stay full).
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


@dataclass(frozen=True)
class HeadMethod:
    kind: str
    fraction: float | None = None  # arrow, arrow+rs: band width as a fraction of the image tokens

    @classmethod
    def parse(cls, value: "str | HeadMethod", where: str = "head method") -> "HeadMethod":
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
            if not 0 < fraction <= 2:
                raise ValueError(f"{where}: window fraction of {value!r} must be in (0, 2]")
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
        if self.fraction is not None:  # f is the whole band: f / 2 of the image tokens on each side
            return window_half_width(image_len, self.fraction / 2)
        raise ValueError("a cached head has no attention window")

    def pairs(self, image_len: int, text_len: int) -> int:
        """(query, key) pairs this head attends per sample: its share of the attention work."""
        if self.kind == "cache":
            return 0
        pairs = arrow_pairs(image_len, text_len, self.half_width(image_len))
        return pairs // 2 if self.kind == "cfg" else pairs  # one sample of each CFG pair

    def __str__(self) -> str:
        return self.kind if self.fraction is None else f"{self.kind}:{self.fraction:g}"


FULL = HeadMethod("full")
CACHE = HeadMethod("cache")
CFG = HeadMethod("cfg")


def arrow(fraction: float) -> HeadMethod:
    return HeadMethod.parse(f"arrow:{fraction:g}")


def arrow_rs(fraction: float) -> HeadMethod:
    """Arrow attention with residual sharing at window ``fraction``."""
    return HeadMethod.parse(f"arrow+rs:{fraction:g}")
