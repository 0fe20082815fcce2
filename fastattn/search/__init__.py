"""Compression-plan searches."""

from .greedy import search_plan
from .losses import LOSSES, get_loss, mean_relative_absolute_error

__all__ = ["LOSSES", "get_loss", "mean_relative_absolute_error", "search_plan"]
