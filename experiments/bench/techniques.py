"""The paper's Table 2: attention FLOPs fraction and latency fraction of each technique
against full attention, for one self-attention layer at a model's sequence length."""

from __future__ import annotations

import torch

from fastattn.family import COND_FIRST, CallInfo
from fastattn.kernels import prefer_fast_dense
from fastattn.layerwise.flops import method_cost
from fastattn.layerwise.methods import Method
from fastattn.layerwise.processor import FastAttnProcessor, StepState
from fastattn.search.seam import LayerwiseSearchSeam

from ..infra.timing import time_graphed_ms, time_ms

METHODS = (Method.FULL, Method.ASC, Method.WARS, Method.WARS_ASC, Method.AST)


def layer_latencies(bm, device: torch.device, warmup: int, repeats: int, window_size: float = 0.125) -> list[dict]:
    """One record per method for the first attention layer of ``bm`` on a CFG batch."""
    from fastattn.models import get_adapter

    attn = get_adapter(bm.transformer).attention_layers(bm.transformer)[0]
    dim = attn.to_q.in_features
    p = next(bm.transformer.parameters())
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2 * bm.images, bm.seq_len, dim, generator=g, device=device, dtype=p.dtype)
    state = StepState(1, window_size=window_size)
    state.on_call(CallInfo(step=0, branch=0, cfg=COND_FIRST))  # x is a CFG batch, conditional half first
    original = attn.processor
    proc = FastAttnProcessor(0, state, original)
    seam = LayerwiseSearchSeam(state, [proc])
    attn.set_processor(proc)
    shape = dict(seq_len=bm.seq_len, heads=attn.heads, head_dim=attn.to_q.out_features // attn.heads,
                 model_dim=dim, window_size=window_size)
    raw = method_cost(Method.FULL, refresh=False, **shape).total
    rows = []
    try:
        with torch.no_grad(), prefer_fast_dense():  # full = the model's own call, on the same dense kernel
            state.set_step([Method.FULL], [True], [True])  # fill the residual and the output cache
            attn(x)
            times, graphed = {}, {}
            for method in METHODS:
                seam.trial([method])  # each timed call reads the caches and writes nothing
                times[method] = time_ms(lambda: attn(x), device, warmup, repeats)
                graphed[method] = time_graphed_ms(lambda: attn(x), device, warmup, repeats)
    finally:
        attn.set_processor(original)
    for method in METHODS[1:]:
        rows.append({"kind": "technique_benchmark", "model": bm.name, "seq_len": bm.seq_len, "method": method.value,
                     "flops_fraction": method_cost(method, refresh=False, **shape).total / raw,
                     "latency_fraction": times[method] / times[Method.FULL], "latency_ms": times[method],
                     "full_ms": times[Method.FULL], "batch": 2 * bm.images,
                     # the same from CUDA graphs: GPU time only, the host's launch overhead taken out
                     "graphed_latency_fraction": (graphed[method] / graphed[Method.FULL]
                                                  if graphed[method] is not None and graphed[Method.FULL] else None),
                     "graphed_ms": graphed[method], "graphed_full_ms": graphed[Method.FULL]})
    return rows
