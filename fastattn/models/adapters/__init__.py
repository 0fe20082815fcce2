"""Adapters: what fastattn needs to know about each supported transformer architecture."""

from .base import ModelAdapter
from .description import AttentionLayer, ModelDescription
from .registry import ADAPTERS, KINDS, get_adapter, layer_kinds, layers_of_kind

__all__ = ["ADAPTERS", "KINDS", "AttentionLayer", "ModelAdapter", "ModelDescription", "get_adapter", "layer_kinds",
           "layers_of_kind"]
