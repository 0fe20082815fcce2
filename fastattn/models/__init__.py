"""Models: adapters for the supported transformers (:mod:`.adapters`) and the built-in model's
weights (``default/``, package data). Loaders, tiny test pipelines, benchmark architectures and
samplers are the harness's (``experiments/models/``)."""

from .adapters import ADAPTERS, KINDS, ModelAdapter, get_adapter, layer_kinds, layers_of_kind

__all__ = ["ADAPTERS", "KINDS", "ModelAdapter", "get_adapter", "layer_kinds", "layers_of_kind"]
