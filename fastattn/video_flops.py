"""Moved to :mod:`fastattn.layerwise.video_flops`; this path still resolves its names, with a warning."""

from .utils.moved import forward_moved

__getattr__ = forward_moved(__name__, {"*": "fastattn.layerwise.video_flops"})
