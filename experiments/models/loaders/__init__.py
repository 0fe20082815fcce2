"""Loaders: the real checkpoints through ``from_pretrained`` (one-line errors when offline), the
video pipelines, and the built-in default model shipped with the package."""

from .hub import DTYPES, from_pretrained, load_pipeline, parse_dtype

__all__ = ["DTYPES", "from_pretrained", "load_pipeline", "parse_dtype"]
