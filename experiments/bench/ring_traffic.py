"""What fastattn's band-aware ring (:mod:`fastattn.layerwise.ring`) did on this rank while counting:
the ring steps each window call took (the ranks :func:`~fastattn.layerwise.ring.band_sources`
picked, this rank's own shard among them) and the bytes its point-to-point exchange sent.

The ring looks both functions up on their modules at every call, so wrapping them there sees
each call (a call whose band holds only the rank's own shard sends nothing and is counted too).
"""

from __future__ import annotations

import torch.distributed as dist

from fastattn.layerwise import ring


class RingTraffic:
    """Counts while entered: ``steps`` (one entry per window call), ``sent_bytes`` (per exchange)."""

    def __init__(self):
        self.steps: list[int] = []
        self.sent_bytes: list[int] = []

    def __enter__(self) -> RingTraffic:
        self._sources, self._exchange = ring.band_sources, dist.batch_isend_irecv

        def sources(*args, **kwargs):
            picked = self._sources(*args, **kwargs)
            self.steps.append(len(picked))
            return picked

        def exchange(ops):
            self.sent_bytes.append(sum(op.tensor.nbytes for op in ops if op.op is dist.isend))
            return self._exchange(ops)

        ring.band_sources, dist.batch_isend_irecv = sources, exchange
        return self

    def __exit__(self, *exc) -> None:
        ring.band_sources, dist.batch_isend_irecv = self._sources, self._exchange

    def summary(self) -> dict:
        calls = len(self.steps)
        return {"window_calls": calls, "steps_max": max(self.steps, default=0),
                "steps_mean": sum(self.steps) / calls if calls else 0.0,
                "sent_bytes_per_window_call": sum(self.sent_bytes) / calls if calls else 0.0}


__all__ = ["RingTraffic"]
