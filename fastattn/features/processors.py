"""The family's processors on the model's attention layers, and each counted call told to the
family's state (:meth:`~fastattn.family.FamilyState.on_call`), which sets up every layer."""

from __future__ import annotations

from .part import Part


def set_processor(attn, processor) -> None:
    """``attn.set_processor``, or the plain attribute on a module without one (Mochi's attention
    reads ``self.processor`` and has no setter)."""
    if hasattr(attn, "set_processor"):
        attn.set_processor(processor)
    else:
        attn.processor = processor


class FamilyProcessors(Part):
    """Sets the handle's processors on the attention layers; removal puts back the original
    processor objects."""

    name = "processors"

    def install(self, handle) -> None:
        layers = handle.adapter.attention_layers(handle.transformer)
        self.originals = [attn.processor for attn in layers]
        for attn, proc in zip(layers, handle.processors, strict=True):
            set_processor(attn, proc)

    def remove(self, handle) -> None:
        for attn, original in zip(handle.adapter.attention_layers(handle.transformer), self.originals, strict=True):
            set_processor(attn, original)

    def begin_call(self, handle, call) -> None:
        handle.state.on_call(call)

    def reset(self, handle) -> None:
        handle.state.reset()


__all__ = ["FamilyProcessors"]
