"""fastattn inside diffusers' own context parallelism (Ulysses and ring), on 2 and 4 CPU processes (gloo).

diffusers 0.42 builds its device mesh from ``torch.accelerator`` (``rank % device_count()``, zero
on a CPU); each test process points that at the CPU before ``enable_parallelism``. Its ring needs
each attention call's log-sum-exp, which the CPU's ``native`` backend does not return: for ring
runs the test gives that backend one that does (:func:`native_with_lse`, the same softmax). Those
are the two changes to diffusers' code path. Each rank computes the single-process outputs first,
then splits the model: an all-full plan must equal the split raw model bit for bit, and each
technique must equal its single-process run within float32 tolerance (the split model's own raw
output differs from the unsplit one by float32 rounding).
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastattn import CompressionPlan, LayerPlan, Method, apply_fastattn, remove_fastattn
from test_distributed import free_port

F, W, T, WA = Method.FULL, Method.WARS, Method.AST, Method.WA
TIMESTEPS = (0.9, 0.7, 0.5, 0.3)
ROWS = [[F, F, F], [W, W, T], [T, W, W], [W, T, WA]]  # FLUX: one joint and two single-stream layers


def flux(heads: int):
    from experiments.models.tiny.mmdit import tiny_flux_pipeline

    transformer = tiny_flux_pipeline(num_layers=1, num_single_layers=2, num_heads=heads, head_dim=16).transformer
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 64, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), img_ids=torch.randn(64, 3), txt_ids=torch.randn(8, 3),
                  guidance=torch.tensor([3.5]), return_dict=False)
    return transformer, inputs


def wan(heads: int):
    from experiments.models.tiny import tiny_wan_pipeline

    transformer = tiny_wan_pipeline(num_layers=3, num_heads=heads, seed=0).transformer
    torch.manual_seed(0)
    return transformer, dict(hidden_states=torch.randn(1, 4, 2, 16, 16), encoder_hidden_states=torch.randn(1, 6, 32),
                             return_dict=False)


MODELS = {"flux": flux, "wan": wan}


def loop(transformer, inputs, plan=None, handles: list | None = None) -> list[torch.Tensor]:
    wan_like = type(transformer).__name__.startswith("Wan")
    if plan is not None:
        handle = apply_fastattn(transformer, plan)
        if handles is not None:
            handles.append(handle)
    try:
        with torch.no_grad():
            return [transformer(**inputs, timestep=torch.tensor([t * 1000 if wan_like else t]))[0] for t in TIMESTEPS]
    finally:
        if plan is not None:
            remove_fastattn(transformer)


SPLITS = {"ulysses": lambda world: {"ulysses_degree": world}, "ring": lambda world: {"ring_degree": world},
          "ring_tiles": lambda world: {"ring_degree": world},  # a video's tile window on the ring
          "both": lambda world: {"ring_degree": 2, "ulysses_degree": world // 2}}  # ring-major ranks


def head_rows(heads: int) -> list:
    """A head-wise plan for FLUX's three layers: every head method, caches and residuals included."""
    step1 = ["arrow:0.25", "cache", "full", "arrow+rs:0.25"]
    step2 = ["cache", "arrow:0.25", "arrow+rs:0.25", "full"]
    return [[(row * heads)[:heads]] * 3 for row in (["full"], step1, step2, step1)]


def native_with_lse() -> None:
    """diffusers' native attention op answering ``return_lse`` (its ring asks for it): the same
    attention in float32 math, with the log-sum-exp in diffusers' [batch, tokens, heads] layout."""
    from diffusers.models import attention_dispatch

    plain = attention_dispatch._native_attention_forward_op

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse:
            return plain(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
                         _save_ctx, _parallel_config)
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
        lse = scores.logsumexp(dim=-1)
        out = torch.exp(scores - lse[..., None]) @ v
        return out.transpose(1, 2).to(query.dtype), lse.transpose(1, 2)

    attention_dispatch._native_attention_forward_op = forward_op


def _rank(rank: int, world: int, port: int, out: str, model: str, split: str = "ulysses") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.accelerator.device_count = lambda: 1  # diffusers' mesh on the CPU (see the module docstring)
    torch._C._get_accelerator = lambda: torch.device("cpu")
    try:
        from diffusers import ContextParallelConfig

        degrees = SPLITS[split](world)
        if degrees.get("ring_degree", 1) > 1:
            native_with_lse()
        transformer, inputs = MODELS[model](heads=world)
        plan = LayerPlan(ROWS, window_size=0.25, window_shape="tile" if split == "ring_tiles" else "band")
        handles = []
        alone = loop(transformer, inputs, plan, handles)
        head_plan = CompressionPlan.from_heads(head_rows(world)) if model == "flux" else None
        heads_alone = loop(transformer, inputs, head_plan) if head_plan is not None else None
        transformer.enable_parallelism(config=ContextParallelConfig(**degrees))
        raw = loop(transformer, inputs)
        full = loop(transformer, inputs, CompressionPlan.all_full(len(TIMESTEPS), 3))
        split = loop(transformer, inputs, plan, handles)
        headwise = {}
        try:  # Ulysses: the rank's heads on whole sequences; ring: refused in one line
            all_full_heads = loop(transformer, inputs, CompressionPlan.from_heads([[["full"] * world] * 3] * 4))
            split_heads = loop(transformer, inputs, head_plan)
            headwise = {"all_full_equal": all(torch.equal(a, b) for a, b in zip(all_full_heads, raw, strict=True)),
                        "max_diff": max(float((a - b).abs().max()) for a, b in zip(split_heads, heads_alone,
                                                                                   strict=True)),
                        "compressed": max(float((a - b).abs().max()) for a, b in zip(split_heads, raw, strict=True))}
        except ValueError as error:
            headwise = str(error)
        result = {"all_full_equal": all(torch.equal(a, b) for a, b in zip(full, raw, strict=True)),
                  "max_diff": max(float((a - b).abs().max()) for a, b in zip(split, alone, strict=True)),
                  "compressed": max(float((a - b).abs().max()) for a, b in zip(split, raw, strict=True)),
                  "headwise": headwise,
                  "token_counts": [handle.state.seq_len for handle in handles]}  # the whole sequence's, split or not
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("model,world,split", [("flux", 2, "ulysses"), ("flux", 4, "ulysses"), ("wan", 2, "ulysses"),
                                               ("flux", 4, "ring"), ("wan", 4, "ring"), ("flux", 4, "both"),
                                               ("wan", 4, "both"), ("wan", 4, "ring_tiles")])
def test_layerwise_plans_under_context_parallelism_equal_one_process(tmp_path, model, world, split):
    mp.spawn(_rank, args=(world, free_port(), str(tmp_path), model, split), nprocs=world)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r in results:
        assert r["all_full_equal"]  # bit-identical to the split raw model
        assert r["max_diff"] < 1e-4, r  # each technique as in one process (float32)
        assert r["compressed"] > 1e-3  # and the plan did compress
        assert r["token_counts"][0] == r["token_counts"][1], r  # a plan's resolution check counts every shard
        if model == "wan":
            assert "self-attention" in r["headwise"]  # no joint layers: head-wise plans need them
        elif split == "ulysses":
            assert r["headwise"]["all_full_equal"] and r["headwise"]["max_diff"] < 1e-4, r
            assert r["headwise"]["compressed"] > 1e-3
        else:
            assert "head-wise plans run under Ulysses alone" in r["headwise"], r


def test_head_wise_plans_are_refused_under_a_ring_or_an_uneven_head_split():
    """apply_fastattn refuses in one line, before touching the model: a head-wise plan under ring,
    and one whose heads do not split over the Ulysses degree (diffusers' config stood in)."""
    from types import SimpleNamespace

    transformer, _ = flux(heads=2)
    plan = CompressionPlan.from_heads([[["full", "arrow:0.25"]] * 3] * 2)
    for degrees, message in (({"ring_degree": 2, "ulysses_degree": 1}, "head-wise plans run under Ulysses alone"),
                             ({"ring_degree": 1, "ulysses_degree": 4}, "does not split into ulysses_degree=4")):
        transformer._parallel_config = SimpleNamespace(context_parallel_config=SimpleNamespace(**degrees))
        with pytest.raises(ValueError, match=message) as error:
            apply_fastattn(transformer, plan)
        assert "\n" not in str(error.value)
    del transformer._parallel_config
