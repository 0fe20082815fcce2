"""Models: adapters for the supported transformers (:mod:`.adapters`), loaders for the real
checkpoints and the built-in model (:mod:`.loaders`), tiny random-weight pipelines for tests
(:mod:`.tiny`), full-size random-weight architectures for benchmarks (:mod:`.architectures`)
and the samplers (:mod:`.solvers`)."""

from .adapters import ADAPTERS, KINDS, ModelAdapter, get_adapter, layer_kinds, layers_of_kind

__all__ = ["ADAPTERS", "KINDS", "ModelAdapter", "get_adapter", "layer_kinds", "layers_of_kind"]
