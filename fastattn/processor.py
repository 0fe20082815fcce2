"""Moved to :mod:`fastattn.layerwise.processor`; this path still resolves its names, with a warning."""

from .utils.moved import forward_moved

__getattr__ = forward_moved(__name__, {"project_qkv": "fastattn.attention_io", "project_out": "fastattn.attention_io",
                                     "*": "fastattn.layerwise.processor"})
