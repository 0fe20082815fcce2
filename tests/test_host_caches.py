"""Host caches fetched ahead (fastattn/cache_prefetch.py) on the CPU: what a call reads, in
order, from the plan (pure); the prefetcher's bound and bookkeeping; and pipelines with
``cache_device="cpu"`` bit-identical to caches on the model's device with every read served
from a fetch, in each CFG mode (batched, separate calls, guidance 1), layer-wise and head-wise.

On a CPU the host is the model's device: the store fetches through :func:`copy_now` (copies made
at once) instead of CUDA streams, so everything but the streams runs here; the GPU variants are
in test_host_caches_gpu.py."""

import pytest
import torch

from fastattn import CompressionPlan, Method, apply_fastattn
from fastattn.cache_prefetch import PREFETCH_DEPTH, Fetch, Prefetcher, read_order
from fastattn.cache_store import CacheStore
from fastattn.family import COND_FIRST, CallInfo
from fastattn.layerwise.processor import StepState
from fastattn.search.seam import LayerwiseSearchSeam

from conftest import dit_inputs, pixart_inputs
from test_cfg_modes import flux, flux_inputs, head_grid, output
from test_cuda_graphs import headwise_case

F, W, T, C, X = Method.FULL, Method.WARS, Method.AST, Method.ASC, Method.FORECAST
WC = Method.WARS_ASC
FP8 = "float8_e4m3fn"


# ------------------------------------------------------------------------------ the planner
def test_read_order_lists_each_layers_slots_in_layer_order():
    assert read_order([(), ("output_cache",), ("head_out", "residual", "residual"), ()]) == [
        (1, "output_cache"), (2, "head_out"), (2, "residual"), (2, "residual")]
    assert read_order([]) == []


def test_layerwise_reads_follow_the_plan_rows():
    plan = CompressionPlan([[F, F, F], [F, W, T], [X, W, WC], [T, F, WC]], window_size=0.25)
    state = StepState(3)
    state.set_plan(plan)
    expected = [
        [(), (), ()],  # step 0: everything computes; layer 1's and 2's full steps refresh their residuals
        [(), ("residual",), ("output_cache",)],
        [("output_cache", "previous_output"), ("residual",), ("residual",)],
        [("output_cache",), (), ("residual",)],
    ]
    for step, reads in enumerate(expected):
        state.on_call(CallInfo(step, 0, COND_FIRST))
        assert state.call_reads() == reads, step
    LayerwiseSearchSeam(state, [])  # a search driving the layers: nothing known ahead
    assert state.call_reads() is None


def test_headwise_reads_follow_the_plan_rows():
    from fastattn.headwise.processor import HeadStepState

    plan = CompressionPlan.from_heads([[["full"] * 2] * 2, [["cache", "arrow+rs:0.125"], ["full", "full"]],
                                       [["full", "full"], ["arrow+rs:0.125", "cache"]]])
    state = HeadStepState(2, 2)
    state.set_plan(plan)
    for step in range(3):
        state.on_call(CallInfo(step, 0, COND_FIRST))
        reads = state.call_reads()
        for layer, slots in enumerate(reads):
            methods = plan.heads[step][layer]
            want = (("head_out",) if any(m.kind == "cache" for m in methods) else ()) \
                + (("residual",) if any(m.shares_residual for m in methods) else ()) \
                + (("residual",) if state.refresh[layer] is not None else ())
            assert slots == want, (step, layer)
    assert state.call_reads()[1] == ("head_out", "residual")  # step 2, layer 1


# ------------------------------------------------------------------------------ the prefetcher
class Cache:  # a stand-in: the prefetcher only compares identities
    pass


def test_prefetcher_keeps_at_most_depth_in_flight_and_serves_reads_in_any_order():
    started, dropped = [], []

    def start(cache):
        started.append(cache)
        fetch = Fetch(torch.tensor(len(started)), None)
        fetch.drop = lambda: dropped.append(cache)
        return fetch

    caches = [Cache() for _ in range(5)]
    p = Prefetcher(2, start)
    p.begin(caches)
    assert started == caches[:2] and len(p.in_flight) == 2
    assert p.take(caches[0])[0].item() == 1 and started == caches[:3]  # one taken, one more started
    assert p.take(caches[2])[0].item() == 3 and started == caches[:4]  # out of order: still served
    assert p.take(caches[4]) is None and p.misses == 1  # not started yet: a miss, and not fetched later
    p.forget(caches[3])  # overwritten before its read: its fetch is let go
    assert dropped == [caches[3]] and [c for c, _ in p.in_flight] == [caches[1]]
    p.begin(caches[:1])  # the next call: what is left is let go first
    assert dropped == [caches[3], caches[1]] and p.most_in_flight == 2 and p.hits == 2
    with pytest.raises(ValueError, match="at least 1"):
        Prefetcher(0, start)


def test_a_store_without_host_caches_has_no_prefetcher():
    assert CacheStore().prefetcher is None and CacheStore(FP8).prefetcher is None
    assert CacheStore(device="cpu").prefetcher.depth == PREFETCH_DEPTH
    assert CacheStore(device="cpu", prefetch=0).prefetcher is None


# ------------------------------------------------------------------------------ pipelines
AST_WARS = [[F, F, F], [T, W, F], [W, T, W], [T, W, T], [F, T, W], [T, F, T]]  # AST and WA-RS, no CFG sharing
FORECASTING = [[F, F, F], [F, W, F], [X, W, T], [X, F, T], [F, W, X], [T, W, X]]


def pixart_run(pipe, guidance):
    return pipe(**pixart_inputs(steps=len(AST_WARS), guidance=guidance)).images


def separate_call_run(pipe):
    """A sampler that runs the conditional and unconditional passes as two calls per step."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(len(AST_WARS))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = pixart_inputs(steps=1)
    for t in scheduler.timesteps:
        eps = []
        for embeds in (text["prompt_embeds"], text["negative_prompt_embeds"]):
            out = pipe.transformer(x, encoder_hidden_states=embeds, timestep=t.expand(2),
                                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            eps.append(out[:, :4])
        x = scheduler.step(eps[1] + 4.5 * (eps[0] - eps[1]), t, x).prev_sample
    return x


MODES = {"cfg_batch": lambda pipe: pixart_run(pipe, 4.5), "no_cfg": lambda pipe: pixart_run(pipe, 1.0),
         "separate_calls": separate_call_run}


@pytest.mark.parametrize("rows", [AST_WARS, FORECASTING], ids=["ast_wars", "forecast"])
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_host_caches_fetched_ahead_equal_device_caches_in_every_cfg_mode(pixart_pipe, mode, rows):
    run = MODES[mode]
    plan = CompressionPlan(rows, window_size=0.3)
    apply_fastattn(pixart_pipe, plan)
    expected = run(pixart_pipe)
    handle = apply_fastattn(pixart_pipe, plan, cache_device="cpu")
    prefetcher = handle.state.cache_store.prefetcher
    assert torch.equal(torch.as_tensor(run(pixart_pipe)), torch.as_tensor(expected))
    reads = 2 * sum(len(r) for r in (layer_reads_of(plan, s) for s in range(plan.num_steps))) \
        if mode == "separate_calls" else sum(len(layer_reads_of(plan, s)) for s in range(plan.num_steps))
    assert prefetcher.misses == 0 and prefetcher.hits == reads > 0  # every read was fetched ahead
    assert prefetcher.most_in_flight == PREFETCH_DEPTH
    apply_fastattn(pixart_pipe, plan)  # and the device caches still give the same (nothing leaked into them)
    assert torch.equal(torch.as_tensor(run(pixart_pipe)), torch.as_tensor(expected))


def layer_reads_of(plan, step):
    state = StepState(len(plan.methods[0]))
    state.set_plan(plan)
    state.on_call(CallInfo(step, 0, COND_FIRST))
    return read_order(state.call_reads())


@torch.no_grad()
def test_host_fp8_caches_equal_fp8_caches_on_the_device(pixart_pipe):
    plan = CompressionPlan([[F, F, F], [T, W, C], [W, T, WC], [T, W, C], [F, T, WC], [T, W, C]], window_size=0.3)
    apply_fastattn(pixart_pipe, plan, cache_dtype=FP8)
    expected = pixart_run(pixart_pipe, 4.5)
    handle = apply_fastattn(pixart_pipe, plan, cache_dtype=FP8, cache_device="cpu")
    assert torch.equal(torch.as_tensor(pixart_run(pixart_pipe, 4.5)), torch.as_tensor(expected))
    assert handle.state.cache_store.prefetcher.misses == 0


@pytest.mark.parametrize("case", ["sd3_batched", "flux_separate"])
@torch.no_grad()
def test_headwise_host_caches_fetched_ahead_equal_device_caches(case):
    if case == "sd3_batched":
        pipe, plan, run = headwise_case("sd3")
        go = lambda: run(0)  # noqa: E731
    else:
        pipe = flux()
        plan = CompressionPlan.from_heads(head_grid(2, 2, ["cache", "arrow+rs:0.125", "full"]))
        go = lambda: output(pipe, flux_inputs(4.0))  # noqa: E731
    apply_fastattn(pipe, plan)
    expected = go()
    handle = apply_fastattn(pipe, plan, cache_device="cpu")
    assert torch.equal(go(), expected)
    prefetcher = handle.state.cache_store.prefetcher
    assert prefetcher.misses == 0 and prefetcher.hits > 0 and prefetcher.most_in_flight <= PREFETCH_DEPTH


@torch.no_grad()
def test_dit_host_caches_equal_device_caches(dit_pipe):
    plan = CompressionPlan([[F, F, F], [T, W, C], [W, T, WC], [T, W, C]], window_size=0.25)
    apply_fastattn(dit_pipe, plan)
    expected = dit_pipe(**dit_inputs(steps=4)).images
    handle = apply_fastattn(dit_pipe, plan, cache_device="cpu")
    assert (dit_pipe(**dit_inputs(steps=4)).images == expected).all()
    assert handle.state.cache_store.prefetcher.misses == 0


@torch.no_grad()
def test_compiled_layers_get_no_prefetch_and_the_modules_are_walked_once_per_generation(dit_pipe, monkeypatch):
    import fastattn.features.host_caches as host_caches

    plan = CompressionPlan([[F, F, F], [T, W, C], [W, T, WC], [T, W, C]], window_size=0.25)
    apply_fastattn(dit_pipe, plan)
    expected = dit_pipe(**dit_inputs(steps=4)).images
    walks, walk = [], host_caches.compiled_modules
    monkeypatch.setattr(host_caches, "compiled_modules", lambda m: walks.append(m) or walk(m))
    handle = apply_fastattn(dit_pipe, plan, cache_device="cpu")
    prefetcher = handle.state.cache_store.prefetcher
    dit_pipe(**dit_inputs(steps=4))
    assert len(walks) == 1 and prefetcher.hits > 0  # 4 steps: one walk
    block = dit_pipe.transformer.transformer_blocks[0]
    block._compiled_call_impl = block._call_impl  # marked as compiled (``block.compile()``), still eager
    try:
        hits = prefetcher.hits
        assert (dit_pipe(**dit_inputs(steps=4)).images == expected).all()
        assert len(walks) == 2 and prefetcher.hits == hits and prefetcher.misses > 0  # read when used
    finally:
        block._compiled_call_impl = None


@torch.no_grad()
def test_a_cache_moved_into_forecast_history_is_never_handed_to_the_store_to_overwrite(pixart_pipe):
    """Forecast moves a layer's last output into ``previous_output`` and then writes the new one:
    the store (which reuses the buffer it is given, on CUDA) must not get the moved cache."""
    seen = []

    class Watching(CacheStore):
        def put(self, held, value, static=False):
            moved = [p.previous_output for p in handle.processors
                     if p.previous_output is not None and p.previous_output is p.output_cache]
            if moved:  # a write right after the move: the slot's old cache now lives on as history
                seen.append(any(held is m for m in moved))
            return super().put(held, value, static)

    plan = CompressionPlan(FORECASTING, window_size=0.3)
    handle = apply_fastattn(pixart_pipe, plan, cache_device="cpu")
    handle.state.cache_store = Watching(device="cpu")
    pixart_run(pixart_pipe, 4.5)
    assert seen and not any(seen)
