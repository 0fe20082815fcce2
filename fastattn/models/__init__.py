"""Model adapters, tiny offline models for tests, and loaders for the real checkpoints."""

from .base import ModelAdapter
from .registry import ADAPTERS, get_adapter

__all__ = ["ADAPTERS", "ModelAdapter", "get_adapter"]
