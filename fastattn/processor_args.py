"""The arguments of a layer's own processor, so a fastattn processor wrapping it loses none.

diffusers' attention modules (``Attention.forward``, ``FluxAttention.forward``, ...) pass on only
the keyword arguments whose names appear in ``inspect.signature(processor.__call__)``, and some
pass arguments by position (FLUX its ``image_rotary_emb`` fourth after ``hidden_states``, Wan its
``rotary_emb``, ERNIE-Image its ``attention_mask`` second). A wrapping processor therefore shows
diffusers the signature of the processor it wraps (:func:`show_signature`) and names each
positional argument by that signature (:meth:`ProcessorArgs.named`), so every argument reaches
the inner processor under its own name, and a plain call through it is the inner call itself.
"""

from __future__ import annotations

import inspect
from typing import Any

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _attention_processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
    """The signature of diffusers' AttnProcessor2_0: assumed where there is no own processor."""


class ProcessorArgs:
    """The parameters of ``inner(attn, hidden_states, ...)``, read once."""

    def __init__(self, inner: Any):
        # as diffusers reads it: the bound __call__ (no self), or what a wrapper shows there
        target = _attention_processor if inner is None else inner if inspect.isfunction(inner) else inner.__call__
        self.signature = inspect.signature(target)
        params = list(self.signature.parameters.values())
        positional = [p.name for p in params if p.kind in _POSITIONAL]
        # after (attn, hidden_states): the names positional arguments take, in order
        self.positional = tuple(positional[2:])
        self.varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)

    def named(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments after ``hidden_states``, every one by its name in the inner signature."""
        if len(args) > len(self.positional):
            if not self.varargs:
                raise TypeError(f"the layer's processor takes {len(self.positional) + 2} positional arguments, "
                                f"got {len(args) + 2}")
            raise TypeError("fastattn cannot name the extra positional arguments of a processor taking *args")
        named = dict(zip(self.positional, args))
        clash = named.keys() & kwargs.keys()
        if clash:
            raise TypeError(f"the layer's processor got {sorted(clash)} both by position and by name")
        return {**named, **kwargs}


# (processor class, signature text) -> its subclass showing that signature: one per model's
# layer kind, so compiled layers still share their processors' class.
_SHOWN: dict[tuple[type, str], type] = {}


def _showing(base: type, signature: inspect.Signature) -> type:
    """``base`` with a ``__call__`` that shows ``signature``. A class attribute, not an instance
    one: torch.compile traces a processor call through its class's ``__call__`` and breaks the
    graph on a callable stored on the instance."""
    key = (base, str(signature))
    if key not in _SHOWN:
        base_call = base.__call__

        def __call__(self, *args, **kwargs):
            return base_call(self, *args, **kwargs)

        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        __call__.__signature__ = signature.replace(parameters=[self_param, *signature.parameters.values()])
        _SHOWN[key] = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                                     "__qualname__": base.__qualname__, "_shown_base": base})
    return _SHOWN[key]


def show_signature(processor: Any, args: ProcessorArgs) -> None:
    """Make diffusers see ``args.signature`` on ``processor`` (see the module's docstring)."""
    base = getattr(type(processor), "_shown_base", type(processor))  # wrapped again: from its own class
    processor.__class__ = _showing(base, args.signature)


__all__ = ["ProcessorArgs", "show_signature"]
