"""Adapters: what fastattn needs to know about each supported transformer architecture."""

from .base import ModelAdapter
from .registry import ADAPTERS, KINDS, get_adapter, layer_kinds, layers_of_kind

__all__ = ["ADAPTERS", "KINDS", "ModelAdapter", "get_adapter", "layer_kinds", "layers_of_kind"]
