import sys, torch
from experiments.bench import architectures
from experiments.bench.end_to_end import model_info
from fastattn import apply_fastattn, remove_fastattn
from fastattn.kernels import set_window_backend, prefer_fast_dense
from fastattn.search.recipe import plan_at_fraction
from fastattn.models.solvers import make_scheduler
dev = torch.device("cuda")
bm = architectures.build("pixart_sigma_xl", 2048, 1, dev, torch.bfloat16)
plan = plan_at_fraction(0.46, 50, model_info(bm))
for backend in sys.argv[1:]:
    set_window_backend(backend)
    h = apply_fastattn(bm.transformer, plan)
    sch = make_scheduler("dpm_solver"); sch.set_timesteps(50)
    x = bm.latents(); kw = bm.forward_kwargs(2)
    torch.cuda.reset_peak_memory_stats()
    try:
        with torch.no_grad(), prefer_fast_dense():
            for i, t in enumerate(sch.timesteps[:12]):
                inp = torch.cat([x, x])
                out = bm.transformer(inp, timestep=t.to(dev).expand(2), return_dict=False, **kw)[0]
                eps = out[:, :4]; c, u = eps.chunk(2); x = sch.step(u + 4.5 * (c - u), t, x).prev_sample
                torch.cuda.synchronize()
                print(backend, i, plan.counts() if i == 0 else "", "".join(m.value[0] for m in plan.methods[i]),
                      f"alloc {torch.cuda.memory_allocated()/2**30:.2f} GiB peak {torch.cuda.max_memory_allocated()/2**30:.2f}", flush=True)
    except torch.OutOfMemoryError as e:
        print("OOM", backend, str(e)[:200])
    remove_fastattn(bm.transformer); torch.cuda.empty_cache()
