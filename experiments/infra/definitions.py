"""The layer-wise techniques written out from their definitions, to check fastattn's on any model.

:class:`Definition` runs a model under a :class:`~fastattn.LayerPlan` without fastattn's
processors, caches or kernels: each attention layer's ``forward`` is wrapped, and its one
attention call is answered by softmax(q k^T * scale + mask) v spelled out over the pairs the
window keeps (DiTFastAttn, section 3):

- full: the model's own call; at a refresh step also R = O - W for the layer's later WA-RS steps;
- WA-RS: W + R; AST: the layer's output at its last computed step;
- ASC: the layer run on the conditional half of every batch-sized argument, copied to both halves.

The window: a band |i - j| <= w over an image-only sequence (w = window_half_width of its tokens);
over a sequence that also holds text, the band runs over the image tokens in the arrow's tiles
and every pair with a text token is kept. Which tokens are text follows the layouts fastattn reads
(:func:`fastattn.core_call.text_rows` for a layer given its text; else the latent's token count,
the text placed as the model's joint layers place it). Meant for float64 models on the CPU.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from fastattn import Method
from fastattn.core_call import SDPA, sdpa_arguments, text_rows
from fastattn.kernels.arrow import arrow_tile, tile_radius_of
from fastattn.kernels.masks import window_half_width
from fastattn.models import get_adapter
from fastattn.processor_args import ProcessorArgs, show_signature



def _batch_half(value: Any, half: slice, batch: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[half] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_batch_half(v, half, batch) for v in value)
    if isinstance(value, dict):
        return {k: _batch_half(v, half, batch) for k, v in value.items()}
    return value


def _doubled(out: Any) -> Any:
    return tuple(torch.cat([o, o]) for o in out) if isinstance(out, tuple) else torch.cat([out, out])


def _text_of(n: int, span: tuple[int, int]) -> torch.Tensor:
    start, count = span
    rows = torch.ones(n, dtype=torch.bool)
    rows[start:start + count] = False
    return rows


def _keep(q_len: int, k_len: int, layout, window_size: float) -> torch.Tensor:
    """[q, k] pairs the window keeps: the token band over an all-image sequence (``layout`` None),
    else, with ``layout`` the text rows of the queries and of the keys, the arrow's tiles over the
    image tokens (each by its place among the image tokens) and every pair with a text token."""
    if layout is None:
        i, j = torch.arange(q_len)[:, None], torch.arange(k_len)[None, :]
        return (i - j).abs() <= window_half_width(q_len, window_size)
    q_text, k_text = layout
    count = int((~q_text).sum())
    tile, radius = arrow_tile(count), tile_radius_of(window_half_width(count, window_size), count)
    qi, kj = (torch.cumsum(~t, 0) - 1 for t in (q_text, k_text))  # the image tokens' own order
    return q_text[:, None] | k_text[None, :] | ((qi[:, None] // tile - kj[None, :] // tile).abs() <= radius)


def spelled_out(named: dict, keep: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale + the call's mask) v over the pairs ``keep`` allows."""
    q, k, v, mask = named["query"], named["key"], named["value"], named.get("attn_mask")
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scale = named.get("scale") or q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if named.get("is_causal"):
        keep = keep & torch.ones_like(keep).tril()
    # a row with every key masked (a padded query) attends nothing: zeros, as SDPA gives
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0) @ v


class _Spy:
    """Stands in for a layer's processor (showing diffusers its signature, so every argument
    arrives by name): where the definition's layer call is pending, finds the image span from
    the processor's own arguments (the text it is given), then runs the processor."""

    def __init__(self, definition: "Definition", layer: int, inner):
        self.definition, self.layer, self.inner = definition, layer, inner
        self.args = ProcessorArgs(inner)
        show_signature(self, self.args)

    def __call__(self, attn, hidden_states, *args, **kwargs):
        named = self.args.named(args, kwargs)
        pending, d = self.definition.pending, self.definition

        def run_with_text(nan: torch.Tensor):
            return self.inner(attn, hidden_states, **{**named, "encoder_hidden_states": nan})
        if pending is not None and pending[0] == self.layer:
            span_of = d.span_of(run_with_text, named.get("encoder_hidden_states"), hidden_states, self.layer)
            d.active = (*pending, span_of)
        elif d.text_first is None and isinstance(named.get("encoder_hidden_states"), torch.Tensor):
            # a layer given its text shows where the model puts it, whatever its method: the
            # single-stream layers' text is placed the same way
            d.span_of(run_with_text, named["encoder_hidden_states"], hidden_states, self.layer)
        return self.inner(attn, hidden_states, **named)


class Definition(TorchFunctionMode):
    """``Definition(model, plan).run(calls)``: the outputs of ``model(**call)`` for each call (one
    per step), with the plan's techniques as defined; ASC's conditional half is where the model's
    adapter says its pipelines put it."""

    def __init__(self, model: torch.nn.Module, plan):
        super().__init__()
        self.model, self.plan, self.refresh = model, plan, plan.refresh_mask()
        self.adapter = get_adapter(model)
        self.layers = self.adapter.attention_layers(model)
        self.outputs: dict[int, Any] = {}
        self.residuals: dict[int, list[torch.Tensor]] = {}  # per layer: one residual, or one per sample
        self.text_first: bool | None = None
        self.layouts: dict[int, torch.Tensor] = {}  # a probed joint sequence's text rows, by its length
        self.step, self.pending, self.active, self.image_tokens, self.calls = -1, None, None, None, 0

    # -- the attention call -----------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not SDPA or self.active is None:
            return func(*args, **kwargs)
        layer, method, refresh, half, span_of = self.active
        index, self.calls = self.calls, self.calls + 1  # processors attending per sample or segment call again
        named = sdpa_arguments(args, kwargs)
        spans = span_of(index, named["query"].shape[-2], named["key"].shape[-2])
        if spans == "whole":  # text queries or text keys only: the arrow keeps every pair
            if refresh:
                self.residuals[layer].append(None)
            return func(*args, **kwargs)
        keep = _keep(named["query"].shape[-2], named["key"].shape[-2], spans, self.plan.window_size)
        if method.uses_window:
            stored = self.residuals[layer]
            if all(r is None or r.shape[0] == 1 for r in stored):  # one per sample (or a batch of one)
                return spelled_out(named, keep) + stored[index + (half.start if half is not None else 0)]
            return spelled_out(named, keep) + (stored[index] if half is None else stored[index][half])
        out = func(*args, **kwargs)
        if refresh:
            if half is not None:
                raise NotImplementedError("the definition run refreshes at full steps only")
            self.residuals[layer].append(out - spelled_out(named, keep))
        return out

    # -- the layers ---------------------------------------------------------------------------
    def span_of(self, run_with_text, text, x: torch.Tensor, layer: int):
        """(call index, q_len, k_len) -> the text rows of that call's queries and keys (None: all
        image; "whole": a call of text queries or text keys only)."""
        layer_tokens = x.shape[1]
        if isinstance(text, torch.Tensor) and not (text.shape == x.shape and torch.equal(text, x)):
            calls = text_rows(run_with_text, text, layer)
            self.text_first = bool(calls[0][1][0]) if self.text_first is None else self.text_first
            for q_rows, k_rows in calls:
                if q_rows.numel() == k_rows.numel() and bool((q_rows == k_rows).all()):
                    self.layouts.setdefault(q_rows.numel(), q_rows)

            def probed(index: int, q_len: int, k_len: int):
                rows = calls[index]
                if bool(rows[0].all()) or bool(rows[1].all()):
                    return "whole"
                if (q_len, k_len) == (rows[0].numel(), rows[1].numel()):
                    return rows
                # another share of the text than the probe's: the layer's image tokens
                return tuple(_text_of(n, (n - layer_tokens, layer_tokens) if bool(rows[1][0]) else (0, layer_tokens))
                             for n in (q_len, k_len))
            return probed
        image = self.image_tokens

        def span(index: int, q_len: int, k_len: int):
            if q_len < k_len:  # keys of a prefix, then the queries' own; or text queries, kept whole
                if image is not None and image != q_len:
                    return "whole"
                return _text_of(q_len, (0, q_len)), _text_of(k_len, (k_len - q_len, q_len))
            if q_len in self.layouts:  # a single-stream layer: where the joint layers had their text
                return self.layouts[q_len], self.layouts[q_len]
            if image is None or image >= q_len or q_len != layer_tokens:
                return None
            rows = _text_of(q_len, (q_len - image, image) if self.text_first else (0, image))
            return rows, rows
        return span

    def _layer_forward(self, layer: int, original):
        def forward(*args, **kwargs):
            method = self.plan.methods[self.step][layer]
            if method in (Method.AST, Method.FORECAST):
                if method is Method.FORECAST:
                    raise NotImplementedError("the definition run does not spell out forecast")
                return self.outputs[layer]
            refresh = bool(self.refresh[self.step][layer])
            half = None
            if method.shares_cfg:
                x = args[0] if args else kwargs["hidden_states"]
                batch = x.shape[0]
                half = slice(0, batch // 2) if self.adapter.cond_first else slice(batch // 2, batch)
                args, kwargs = _batch_half(args, half, batch), _batch_half(kwargs, half, batch)
            # the layer's processor (_Spy) finds its image span, then answers its attention call
            self.pending = (layer, method, refresh, half) if method.uses_window or refresh else None
            self.calls = 0
            if refresh:
                self.residuals[layer] = []
            try:
                out = original(*args, **kwargs)
            finally:
                self.pending = self.active = None
            out = _doubled(out) if half is not None else out
            self.outputs[layer] = out
            return out
        return forward

    def run(self, calls: list[dict[str, Any]]) -> list[Any]:
        """The model's outputs, one call per step of the plan."""
        wrapped = [(layer, layer.forward, layer.processor) for layer in self.layers]
        for i, (layer, original, processor) in enumerate(wrapped):
            layer.forward = self._layer_forward(i, original)
            layer.processor = _Spy(self, i, processor)
        results = []
        try:
            with self, torch.no_grad():
                for step, call in enumerate(calls):
                    self.step = step
                    grid = self.adapter.token_grid(self.model, (), call)
                    self.image_tokens = self.adapter.image_tokens(self.model, (), call, grid)
                    results.append(self.model(**call))
        finally:
            for layer, _, processor in wrapped:
                with contextlib.suppress(AttributeError):
                    del layer.forward
                layer.processor = processor
        return results


__all__ = ["Definition", "spelled_out"]
